#!/usr/bin/env bash
# Cold `skopeo copy --all` of a multi-platform image through each proxy, with a fresh data
# dir every time, interleaved over REPS repetitions: the one scenario of scenarios.sh that
# measures what a cold pull pays before answering, quick enough to compare two builds.
#
# usage: benches/coldpull.sh [PROXY ...]   (default: wharf nginx)
#        PROXY is a script in benches/proxies, or wharf=PATH for another wharf binary
#        (e.g. wharf=/tmp/old/target/release/wharf) to put two builds side by side.
# knobs: REPS=7 PORT0=18100 BENCH_WORK=/tmp/wharf-bench (images are shared with scenarios.sh)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO=$(cd "$BENCH_ROOT/.." && pwd)
REPS=${REPS:-7} PORT0=${PORT0:-18100}
WORK=${BENCH_WORK:-/tmp/wharf-bench}
PROXIES=("$@")
((${#PROXIES[@]})) || PROXIES=(wharf nginx)
ORIGIN_PORT=$PORT0 ORIGIN=http://127.0.0.1:$PORT0

for t in docker-registry:docker-registry nginx:nginx skopeo:skopeo curl:curl jq:jq; do
  command -v "${t%%:*}" >/dev/null || {
    sudo=""; [[ $(id -u) == 0 ]] || sudo=sudo
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${t#*:}" >&2
  }
done
(cd "$REPO" && cargo build --release --locked -q)
mkdir -p "$WORK/images"
RUN=$WORK/coldpull-$(date +%Y%m%dT%H%M%S)
mkdir -p "$RUN"
[[ -s $WORK/images/app-1.json ]] || {
  rm -rf "$WORK/images/app-1"
  python3 "$BENCH_ROOT/mkimage.py" --out "$WORK/images/app-1" --seed app-1 --sizes 4K,64K,1M,4M,16M,32M >"$WORK/images/app-1.json"
}

mkdir -p "$RUN/origin/store"
registry_config "$RUN/origin/store" "$ORIGIN_PORT" >"$RUN/origin/config.yml"
docker-registry serve "$RUN/origin/config.yml" >"$RUN/origin.log" 2>&1 </dev/null &
ORIGIN_PID=$!
PIDS=()
trap 'for p in "${PIDS[@]}" "$ORIGIN_PID"; do halt "$p"; done' EXIT
ready "$ORIGIN/v2/" 30 || { say "origin did not start"; exit 1; }
skopeo --insecure-policy copy -q --all --preserve-digests --dest-tls-verify=false \
  "oci:$WORK/images/app-1:img" "docker://127.0.0.1:$ORIGIN_PORT/bench/app:latest" >&2

: >"$RUN/results.tsv"
for rep in $(seq "$REPS"); do
  n=${#PROXIES[@]}
  for i in $(seq 0 $((n - 1))); do
    p=${PROXIES[$(((i + rep - 1) % n))]}
    name=${p%%=*} script=$name label=$p
    [[ $p == *=* ]] && export WHARF_BIN=${p#*=} || unset WHARF_BIN
    port=$((PORT0 + 10 + i)) dir=$RUN/data/$i
    rm -rf "$dir"; mkdir -p "$dir"; sync
    pid=$("$BENCH_ROOT/proxies/$script.sh" "$port" "$ORIGIN" "$dir"); PIDS+=("$pid")
    rm -rf "$RUN/out"; t0=$(clock)
    if skopeo --insecure-policy copy -q --all --src-tls-verify=false \
      "docker://127.0.0.1:$port/bench/app:latest" "oci:$RUN/out:x" >>"$RUN/skopeo.log" 2>&1; then
      printf '%s\t%s\n' "$label" "$(elapsed "$t0")" >>"$RUN/results.tsv"
    else
      printf '%s\tFAIL\n' "$label" >>"$RUN/results.tsv"
    fi
    halt "$pid"
  done
done
echo "cold skopeo copy --all, seconds (median of $REPS; all runs):"
for p in "${PROXIES[@]}"; do
  awk -F'\t' -v p="$p" '$1 == p { print $2 }' "$RUN/results.tsv" | sort -n |
    awk -v p="$p" '{ v[NR] = $1 } END { printf "%-60s %s   (", p, v[int((NR + 1) / 2)]; for (i = 1; i <= NR; i++) printf "%s ", v[i]; print ")" }'
done
