#!/usr/bin/env bash
# A statically linked wharf for the container image (FROM scratch): glibc's static
# libc with the host's Rust toolchain, so no second toolchain or musl target is needed.
# getaddrinfo in a static glibc reads /etc/hosts and /etc/resolv.conf itself, which is
# all a container has. Usage: scripts/build-static.sh [release|dev] (default release);
# the binary lands at target/static/wharf.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
profile=${1:-release}
host=$(rustc -vV | sed -n 's/^host: //p')
case $host in
  *-linux-gnu) ;;
  *) echo "build-static.sh: a static glibc build needs a *-linux-gnu host, not $host" >&2; exit 1 ;;
esac
# An explicit --target keeps the flag off build scripts and proc-macros, which cannot be static.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/static}
# An image carries no debug info (symbol names stay, for backtraces): a release binary
# is 15 MiB without it and 90 MiB with the line tables, a dev one 40 MiB and 180 MiB.
case $profile in
  dev) export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-0} ;;
  release)
    export CARGO_PROFILE_RELEASE_DEBUG=${CARGO_PROFILE_RELEASE_DEBUG:-0}
    export CARGO_PROFILE_RELEASE_STRIP=${CARGO_PROFILE_RELEASE_STRIP:-debuginfo}
    ;;
esac
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --locked --profile "$profile" --target "$host" --bin wharf
dir=$profile
[[ $profile == dev ]] && dir=debug
mkdir -p target/static
install -m 0755 "$CARGO_TARGET_DIR/$host/$dir/wharf" target/static/wharf.new
mv target/static/wharf.new target/static/wharf
if readelf -l target/static/wharf | grep -q INTERP || readelf -d target/static/wharf | grep -q NEEDED; then
  echo "build-static.sh: target/static/wharf is dynamically linked" >&2
  exit 1
fi
echo "target/static/wharf ($profile, $host, static)" >&2
