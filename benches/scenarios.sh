#!/usr/bin/env bash
# Side-by-side benchmark of pull-through registry proxies on this machine: wharf, CNCF
# distribution in proxy mode and an nginx cache (rpardini/docker-registry-proxy recipe),
# with static nginx and the origin itself as references. Every proxy runs the same
# scenarios against one seeded origin, interleaved (order rotated per repetition), REPS
# times; the table shows medians and wharf's ratio to each peer. Loopback only; every load
# is bounded in time.
#
# usage: benches/scenarios.sh [PROXY ...]        (default: wharf distribution nginx)
#        (wharf-auth: wharf with htpasswd auth on; every client here sends Basic
#        credentials, which proxies without auth ignore, so its rows compare auth on/off)
# knobs: REPS=3 LOAD_SECONDS=10 CONNS=64 BIG_CLIENTS=8 HERD_CLIENTS=32 OFFLINE_WAIT=12
#        IDLE_CONNS=10000 (idle keep-alive connections held in scenario i)
#        PORT0=18000 BENCH_WORK=/tmp/wharf-bench (images are kept there between runs)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO=$(cd "$BENCH_ROOT/.." && pwd)
REPS=${REPS:-3} LOAD_SECONDS=${LOAD_SECONDS:-10} CONNS=${CONNS:-64}
BIG_CLIENTS=${BIG_CLIENTS:-8} HERD_CLIENTS=${HERD_CLIENTS:-32} OFFLINE_WAIT=${OFFLINE_WAIT:-12}
PORT0=${PORT0:-18000} IDLE_CONNS=${IDLE_CONNS:-10000}
# Every proxy and the idle-connection holder get room for IDLE_CONNS descriptors and more
# (as root the hard limit can be raised; the default soft limit is often 1024).
ulimit -Hn 1048576 2>/dev/null || true
ulimit -Sn 65536 2>/dev/null || true
WORK=${BENCH_WORK:-/tmp/wharf-bench}
# Every client sends these credentials (wharf-auth checks them; the others ignore them):
# curl through a curlrc, wrk and ab with -H, skopeo with --src-creds.
BENCH_AUTH="Basic $(printf bench:bench | base64)"
export CURL_HOME=$WORK/curlhome
mkdir -p "$CURL_HOME"
printf 'header = "Authorization: %s"\n' "$BENCH_AUTH" >"$CURL_HOME/.curlrc"
PROXIES=("$@")
((${#PROXIES[@]})) || PROXIES=(wharf distribution nginx)
ORIGIN_PORT=$PORT0 STATIC_PORT=$((PORT0 + 1))
ORIGIN=http://127.0.0.1:$ORIGIN_PORT
INDEX_ACCEPT="application/vnd.oci.image.index.v1+json"

# ---- set-up ------------------------------------------------------------------
need_tools docker-registry:docker-registry nginx:nginx skopeo:skopeo wrk:wrk ab:apache2-utils curl:curl jq:jq
new_run run
RESULTS=$RUN/results.tsv
: >"$RESULTS"
rep=0
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$rep" "$3" >>"$RESULTS"; }

image app-1 app-1 4K,64K,1M,4M,16M,32M
image app-2 app-2 4K,64K,1M,4M,16M,32M
image base base 4K,2M
image big big 1G --platforms linux/amd64 --no-attestations
image herd herd 256M --platforms linux/amd64 --no-attestations

ORIGIN_PID=""
start_origin() {
  mkdir -p "$WORK/origin/store"
  cat >"$WORK/origin/config.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $WORK/origin/store
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$ORIGIN_PORT
  secret: bench
YML
  docker-registry serve "$WORK/origin/config.yml" >>"$RUN/origin-access.log" 2>>"$RUN/origin.log" </dev/null &
  ORIGIN_PID=$!
  ready "$ORIGIN/v2/" 30 || { say "origin did not start"; exit 1; }
}
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}" "$ORIGIN_PID"; do halt "$p"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$WORK/origin"
start_origin
push() { skopeo --insecure-policy copy -q --all --preserve-digests --dest-tls-verify=false "oci:$WORK/images/$1:img" "docker://127.0.0.1:$ORIGIN_PORT/$2" >&2; }
say "seeding the origin"
push app-1 bench/app:1; push app-1 bench/app:latest
push app-2 bench/app:2; push app-2 bench/app:latest # the tag moves, as a release would
push base bench/base:1.0; push big bench/big:latest; push herd bench/herd:latest
APP_INDEX=$(jq -r .index "$WORK/images/app-2.json")
BASE_INDEX=$(jq -r .index "$WORK/images/base.json")
SMALL=$(jq -r '.images["linux/amd64"].layers[0]' "$WORK/images/app-2.json")
BIG=$(jq -r '.images["linux/amd64"].layers[0]' "$WORK/images/big.json")
HERD=$(jq -r '.images["linux/amd64"].layers[0]' "$WORK/images/herd.json")
BIG_SIZE=$(stat -c %s "$WORK/images/big/blobs/sha256/${BIG#sha256:}")
HERD_SIZE=$(stat -c %s "$WORK/images/herd/blobs/sha256/${HERD#sha256:}")

# ---- measurements --------------------------------------------------------------
origin_lines() { wc -l <"$RUN/origin-access.log"; }
origin_requests_since() { echo $(($(origin_lines) - $1)); }
pull() { # URL-HOST/REPO:TAG DEST -> seconds, or FAIL
  local t0 t
  t0=$(clock)
  rm -rf "$2"
  if timeout 600 skopeo --insecure-policy copy -q --all --src-tls-verify=false --src-creds bench:bench "docker://$1" "oci:$2:x" >>"$RUN/skopeo.log" 2>&1; then
    t=$(elapsed "$t0"); echo "$t"
  else echo FAIL; fi
}
# Writes still in the page cache from an earlier run would go to disk during this one (a
# proxy that does not fsync leaves its writeback to the kernel, ~30 s later), and on a VM
# that writeback slows whatever runs then by up to a fifth: flush them before each timing.
settle() { sync; }
mbps() { settle; curl -s -o /dev/null -m 600 -w '%{size_download} %{time_total}' "$1" | awk '{ printf "%.0f", $1 / $2 / 1e6 }'; }
hashed_mbps() { # URL of the big blob -> MB/s of a GET piped through sha256sum; digest check in last-digest
  local t digest
  settle; t=$(clock); digest=$(curl -s -m 600 "$1" | sha256sum | cut -d' ' -f1)
  [[ sha256:$digest == "$BIG" ]] && echo ok >"$RUN/last-digest" || echo BAD >"$RUN/last-digest"
  awk -v s="$BIG_SIZE" -v t="$(elapsed "$t")" 'BEGIN { printf "%.0f", s / t / 1e6 }'
}
wrk_rate() { # URL -> req/s
  wrk -t2 -c"$CONNS" -d"${LOAD_SECONDS}s" -H "Accept: $INDEX_ACCEPT" -H "Authorization: $BENCH_AUTH" "$1" 2>/dev/null | awk '/^Requests\/sec/ { printf "%.0f", $2 }'
}
ab_head_rate() { # URL -> req/s (wrk 4.1 waits for a body after HEAD, so ab)
  ab -k -i -q -c "$CONNS" -t "$LOAD_SECONDS" -n 100000000 -H "Accept: $INDEX_ACCEPT" -H "Authorization: $BENCH_AUTH" "$1" 2>/dev/null |
    awk '/^Requests per second/ { printf "%.0f", $4 }'
}

start_proxy() { # NAME PORT -> PID (fresh data dir)
  local dir=$RUN/data/$1
  rm -rf "$dir"; mkdir -p "$dir"
  settle
  "$BENCH_ROOT/proxies/$1.sh" "$2" "$ORIGIN" "$dir"
}
stop_proxy() { # NAME PID: stop, keep logs, drop data
  halt "$2"
  mkdir -p "$RUN/logs"
  # Appended per proxy: every repetition's log survives, and two wharf builds do not
  # overwrite each other's.
  local f
  for f in "$RUN/data/$1"/*.log; do
    [[ -e $f ]] && { echo "=== repetition $rep"; cat "$f"; } >>"$RUN/logs/$1-$(basename "$f")"
  done
  rm -rf "$RUN/data/$1"
}

scenarios() { # NAME PORT
  local name=$1 port=$2 pid n0 host=127.0.0.1:$2 t digest i
  pid=$(start_proxy "$name" "$port"); PIDS+=("$pid")
  n0=$(origin_lines); record "$name" a_cold_pull_s "$(pull "$host/bench/app:latest" "$RUN/out")"
  record "$name" a_cold_pull_origin_requests "$(origin_requests_since "$n0")"
  # What the proxy says of itself right after a cold pull (wharf: connection closes by
  # reason, downloads, errors), kept for when a pull fails or stalls.
  mkdir -p "$RUN/logs"
  curl -s -m 5 "http://$host/metrics" >"$RUN/logs/$name-rep$rep-after-cold-pull.metrics" 2>/dev/null || true
  n0=$(origin_lines); record "$name" b_warm_pull_s "$(pull "$host/bench/app:latest" "$RUN/out")"
  record "$name" b_warm_pull_origin_requests "$(origin_requests_since "$n0")"
  n0=$(origin_lines); record "$name" c_head_tag_rps "$(ab_head_rate "http://$host/v2/bench/app/manifests/latest")"
  record "$name" c_head_tag_origin_requests "$(origin_requests_since "$n0")"
  curl -s -o /dev/null -H "Accept: $INDEX_ACCEPT" "http://$host/v2/bench/app/manifests/$APP_INDEX"
  record "$name" c_get_index_by_digest_rps "$(wrk_rate "http://$host/v2/bench/app/manifests/$APP_INDEX")"
  curl -s -o /dev/null "http://$host/v2/bench/app/blobs/$SMALL"
  record "$name" c_get_small_blob_rps "$(wrk_rate "http://$host/v2/bench/app/blobs/$SMALL")"
  record "$name" f_peak_rss_ac_mib $(($(peak_rss_kib "$pid") / 1024))
  reset_peak_rss "$pid"
  record "$name" d_cold_big_mbps "$(hashed_mbps "http://$host/v2/bench/big/blobs/$BIG")"
  record "$name" d_cold_big_digest "$(cat "$RUN/last-digest")"
  record "$name" d_cached_big_1_mbps "$(mbps "http://$host/v2/bench/big/blobs/$BIG")"
  settle; t=$(clock)
  clients=()
  for i in $(seq "$BIG_CLIENTS"); do
    curl -s -o /dev/null -m 600 "http://$host/v2/bench/big/blobs/$BIG" &
    clients+=($!)
  done
  wait "${clients[@]}" # only the clients: the origin is a background job too
  record "$name" d_cached_big_n_mbps "$(awk -v s="$BIG_SIZE" -v n="$BIG_CLIENTS" -v t="$(elapsed "$t")" 'BEGIN { printf "%.0f", n * s / t / 1e6 }')"
  record "$name" f_peak_rss_d_mib $(($(peak_rss_kib "$pid") / 1024))
  stop_proxy "$name" "$pid"
  herd "$name" "$port"
}

herd() { # NAME PORT: HERD_CLIENTS clients at once on one cold blob, fresh proxy
  local name=$1 port=$2 pid n0 i dir=$RUN/herd
  rm -rf "$dir"; mkdir -p "$dir"
  pid=$(start_proxy "$name" "$port"); PIDS+=("$pid")
  n0=$(origin_lines)
  clients=()
  for i in $(seq "$HERD_CLIENTS"); do
    curl -s -m 600 -o "$dir/$i.body" -w '%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n' \
      "http://127.0.0.1:$port/v2/bench/herd/blobs/$HERD" >"$dir/$i.out" &
    clients+=($!)
  done
  wait "${clients[@]}"
  tail -n +"$((n0 + 1))" "$RUN/origin-access.log" | grep "GET /v2/bench/herd/blobs/$HERD" >"$dir/origin.log" || true
  record "$name" e_herd_origin_gets "$(wc -l <"$dir/origin.log")"
  record "$name" e_herd_origin_mb "$(awk '{ s += $10 } END { printf "%.0f", s / 1e6 }' "$dir/origin.log")"
  record "$name" e_herd_ttfb_first_s "$(cat "$dir"/*.out | sort -k3 -g | head -1 | awk '{ printf "%.3f", $3 }')"
  record "$name" e_herd_ttfb_slowest_s "$(cat "$dir"/*.out | sort -k3 -g | tail -1 | awk '{ printf "%.3f", $3 }')"
  record "$name" e_herd_complete "$(awk -v s="$HERD_SIZE" '$1 == 200 && $2 == s { n++ } END { print n + 0 }' "$dir"/*.out)/$HERD_CLIENTS"
  record "$name" e_herd_digest "$([[ sha256:$(sha256sum <"$dir/1.body" | cut -d' ' -f1) == "$HERD" ]] && echo ok || echo BAD)"
  record "$name" f_peak_rss_e_mib $(($(peak_rss_kib "$pid") / 1024))
  rm -rf "$dir"
  stop_proxy "$name" "$pid"
}

references() { # the origin itself and static nginx, once per repetition
  local big_file=$WORK/images/big/blobs/sha256/${BIG#sha256:} pid t i
  record origin c_head_tag_rps "$(ab_head_rate "$ORIGIN/v2/bench/app/manifests/latest")"
  record origin c_get_index_by_digest_rps "$(wrk_rate "$ORIGIN/v2/bench/app/manifests/$APP_INDEX")"
  record origin c_get_small_blob_rps "$(wrk_rate "$ORIGIN/v2/bench/app/blobs/$SMALL")"
  record origin d_cold_big_mbps "$(hashed_mbps "$ORIGIN/v2/bench/big/blobs/$BIG")"
  pid=$("$BENCH_ROOT/proxies/static.sh" "$STATIC_PORT" "$big_file" "$RUN/data/static"); PIDS+=("$pid")
  record static d_cached_big_1_mbps "$(mbps "http://127.0.0.1:$STATIC_PORT/blob")"
  settle; t=$(clock)
  clients=()
  for i in $(seq "$BIG_CLIENTS"); do
    curl -s -o /dev/null -m 600 "http://127.0.0.1:$STATIC_PORT/blob" &
    clients+=($!)
  done
  wait "${clients[@]}"
  record static d_cached_big_n_mbps "$(awk -v s="$BIG_SIZE" -v n="$BIG_CLIENTS" -v t="$(elapsed "$t")" 'BEGIN { printf "%.0f", n * s / t / 1e6 }')"
  halt "$pid"
}

p50_ms() { # URL -> median latency of a cached GET under light load (4 connections), ms
  wrk -t1 -c4 -d5s --latency -H "Accept: $INDEX_ACCEPT" -H "Authorization: $BENCH_AUTH" "$1" 2>/dev/null |
    awk '$1 == "50%" { v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
      printf "%.3f", v * (u == "us" ? 0.001 : u == "s" ? 1000 : 1) }'
}
rss_kib() { # PID -> summed VmRSS of the process tree
  local total=0 p v
  for p in $(descendants "$1"); do
    v=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
idle() { # NAME PORT: IDLE_CONNS idle keep-alive connections, and a cached GET meanwhile
  local name=$1 port=$2 pid holder url base during out=$RUN/idle-$1.out
  pid=$(start_proxy "$name" "$port"); PIDS+=("$pid")
  url="http://127.0.0.1:$port/v2/bench/app/manifests/$APP_INDEX"
  curl -s -o /dev/null -H "Accept: $INDEX_ACCEPT" "$url"
  base=$(p50_ms "$url")
  : >"$out"
  python3 "$BENCH_ROOT/idle_conns.py" "$port" "$IDLE_CONNS" "/v2/bench/app/manifests/$APP_INDEX" "$BENCH_AUTH" >"$out" &
  holder=$!
  for _ in $(seq 600); do grep -q '^open' "$out" && break; sleep 0.1; done
  during=$(p50_ms "$url")
  record "$name" i_idle_rss_mib $(($(rss_kib "$pid") / 1024))
  record "$name" i_idle_p50_base_ms "$base"
  record "$name" i_idle_p50_during_ms "$during"
  record "$name" i_idle_latency_x "$(awk -v a="$during" -v b="$base" 'BEGIN { if (b > 0) printf "%.2f", a / b }')"
  kill -USR1 "$holder" 2>/dev/null || true
  wait "$holder" 2>/dev/null || true
  record "$name" i_idle_opened "$(awk '/^open/ { print $2 }' "$out")"
  record "$name" i_idle_held "$(awk '/^held/ { print $2 }' "$out")"
  stop_proxy "$name" "$pid"
}

offline() { # NAME PORT: warm, lose the origin, pull again
  local name=$1 port=$2 pid
  pid=$(start_proxy "$name" "$port"); PIDS+=("$pid")
  pull "127.0.0.1:$port/bench/base:1.0" "$RUN/out" >/dev/null
  halt "$ORIGIN_PID"
  sleep "$OFFLINE_WAIT" # let short tag caches (nginx's 10s) expire: the point of the test
  record "$name" g_offline_by_tag "$(pull "127.0.0.1:$port/bench/base:1.0" "$RUN/out" | sed 's/^[0-9.]*$/ok/')"
  record "$name" g_offline_by_digest "$(pull "127.0.0.1:$port/bench/base@$BASE_INDEX" "$RUN/out" | sed 's/^[0-9.]*$/ok/')"
  stop_proxy "$name" "$pid"
  start_origin
}

for rep in $(seq "$REPS"); do
  say "repetition $rep/$REPS"
  references
  n=${#PROXIES[@]}
  for i in $(seq 0 $((n - 1))); do
    name=${PROXIES[$(((i + rep - 1) % n))]}
    say "  $name"
    scenarios "$name" $((PORT0 + 10 + i))
    idle "$name" $((PORT0 + 10 + i))
  done
done
rep=1
for i in "${!PROXIES[@]}"; do
  say "offline: ${PROXIES[$i]}"
  offline "${PROXIES[$i]}" $((PORT0 + 10 + i))
done
python3 "$BENCH_ROOT/report.py" "$RESULTS" "${PROXIES[@]}" | tee "$RUN/report.md"
say "results: $RESULTS, report: $RUN/report.md"
