# wharf's container image: one static binary on an empty base, run as a non-root user.
#
#   docker build -t wharf .                         # compiles in the build stage
#   scripts/build-static.sh && \
#   docker build --build-arg WHARF_BINARY=prebuilt -t wharf .   # takes target/static/wharf
#
# Needs BuildKit (DOCKER_BUILDKIT=1 or buildx), which skips the stage not chosen.
# Run: docker run -p 5000:5000 -v wharf-data:/data wharf
# Configuration: /etc/wharf/config.toml (mount your own over it, or point WHARF_CONFIG
# elsewhere); top-level keys also from WHARF_* variables (WHARF_LISTEN, WHARF_DATA_DIR).
ARG WHARF_BINARY=build

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/build-static.sh release && install -D target/static/wharf /out/wharf

FROM scratch AS prebuilt
COPY target/static/wharf /out/wharf

FROM ${WHARF_BINARY} AS binary
# An empty directory for /data: scratch has no mkdir, and a volume takes its owner from
# the image's directory.
WORKDIR /data

FROM scratch AS runtime
COPY --from=binary /out/wharf /usr/local/bin/wharf
COPY --from=binary --chown=65532:65532 /data /data
COPY deploy/docker/passwd /etc/passwd
COPY deploy/docker/group /etc/group
COPY deploy/docker/config.toml /etc/wharf/config.toml
ENV PATH=/usr/local/bin WHARF_CONFIG=/etc/wharf/config.toml
USER 65532:65532
VOLUME /data
EXPOSE 5000
ENTRYPOINT ["wharf", "serve"]
