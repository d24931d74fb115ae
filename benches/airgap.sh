#!/usr/bin/env bash
# The air-gap workflow, side by side with the tools it stands in for, on this machine:
#   - prefetch of the bench images (two multi-platform releases with attestations and a
#     base image) into an empty cache, against `skopeo sync --all` of the same list
#     straight from the origin; and how often the origin saw each blob asked for;
#   - export of a cached 2 GiB image to a bundle against `cat` of the same bytes, and
#     import of that bundle against `sha256sum` of it (import hashes every byte).
# Runs interleaved, REPS times; the table shows medians and the ratios.
#
# usage: benches/airgap.sh
# knobs: REPS=3 PORT0=18100 BENCH_WORK=/tmp/wharf-bench (images are kept there between runs)
#        GAP_SIZE=2G (the exported image's one layer)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO=$(cd "$BENCH_ROOT/.." && pwd)
REPS=${REPS:-3} PORT0=${PORT0:-18100} GAP_SIZE=${GAP_SIZE:-2G}
WORK=${BENCH_WORK:-/tmp/wharf-bench}
ORIGIN_PORT=$PORT0
ORIGIN=http://127.0.0.1:$ORIGIN_PORT

need_tools docker-registry:docker-registry skopeo:skopeo curl:curl jq:jq
new_run airgap
RESULTS=$RUN/results.tsv
: >"$RESULTS"
record() { printf '%s\t%s\t%s\n' "$1" "$rep" "$2" >>"$RESULTS"; }

image app-1 app-1 4K,64K,1M,4M,16M,32M
image app-2 app-2 4K,64K,1M,4M,16M,32M
image base base 4K,2M
image "gap-$GAP_SIZE" "gap-$GAP_SIZE" "$GAP_SIZE" --platforms linux/amd64 --no-attestations

ORIGIN_PID=""
cleanup() { halt "$ORIGIN_PID"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$WORK/airgap-origin"
mkdir -p "$WORK/airgap-origin"
cat >"$WORK/airgap-origin/config.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $WORK/airgap-origin/store
http:
  addr: 127.0.0.1:$ORIGIN_PORT
  secret: bench
YML
docker-registry serve "$WORK/airgap-origin/config.yml" >>"$RUN/origin-access.log" 2>>"$RUN/origin.log" </dev/null &
ORIGIN_PID=$!
ready "$ORIGIN/v2/" 30 || { say "origin did not start"; exit 1; }
push() { skopeo --insecure-policy copy -q --all --preserve-digests --dest-tls-verify=false "oci:$WORK/images/$1:img" "docker://127.0.0.1:$ORIGIN_PORT/$2" >&2; }
say "seeding the origin"
push app-1 bench/app:1; push app-2 bench/app:2; push base bench/base:1.0; push "gap-$GAP_SIZE" bench/gap:1
LIST=$RUN/images.txt
printf 'bench/app:1\nbench/app:2\nbench/base:1.0\n' >"$LIST"
CONFIG=$RUN/wharf.toml
printf '[[upstreams]]\nname = "docker.io"\nurl = "%s"\ninsecure = true\n' "$ORIGIN" >"$CONFIG"

# The most GETs the origin's access log shows for one blob since line $1.
max_blob_gets_since() {
  tail -n +"$(($1 + 1))" "$RUN/origin-access.log" | grep -o '"GET /v2/[^ ]*/blobs/sha256:[0-9a-f]*' |
    sed 's|.*/blobs/||' | sort | uniq -c | sort -rn | awk 'NR == 1 { print $1 } END { if (NR == 0) print 0 }'
}

say "the 2 GiB image into a cache, once"
GAPDATA=$RUN/gap-data
"$WHARF" --config "$CONFIG" --data-dir "$GAPDATA" prefetch bench/gap:1 >/dev/null 2>&1
GAP_LAYER=$(jq -r '.images["linux/amd64"].layers[0]' "$WORK/images/gap-$GAP_SIZE.json")
GAP_BLOB=$GAPDATA/docker/registry/v2/blobs/sha256/${GAP_LAYER:7:2}/${GAP_LAYER#sha256:}/data
[[ -s $GAP_BLOB ]] || { say "the cached layer is missing: $GAP_BLOB"; exit 1; }

for rep in $(seq "$REPS"); do
  say "repetition $rep/$REPS"
  # Prefetch against skopeo sync, order rotated.
  for who in $( ((rep % 2)) && echo "wharf skopeo" || echo "skopeo wharf"); do
    rm -rf "$RUN/prefetch-data" "$RUN/sync"
    sync
    lines=$(wc -l <"$RUN/origin-access.log")
    t=$(clock)
    if [[ $who == wharf ]]; then
      "$WHARF" --config "$CONFIG" --data-dir "$RUN/prefetch-data" prefetch -f "$LIST" >/dev/null 2>&1
      record prefetch_wharf_s "$(elapsed "$t")"
      record prefetch_max_gets_per_blob "$(max_blob_gets_since "$lines")"
    else
      mkdir -p "$RUN/sync"
      while read -r img; do
        skopeo --insecure-policy sync --all --scoped --src docker --dest dir --src-tls-verify=false \
          "127.0.0.1:$ORIGIN_PORT/$img" "$RUN/sync" >/dev/null
      done <"$LIST"
      record prefetch_skopeo_sync_s "$(elapsed "$t")"
    fi
  done

  # Export against cat of the same bytes; import against sha256sum of the bundle.
  rm -f "$RUN/cat.out" "$RUN/gap.tar"
  sync; t=$(clock); cat "$GAP_BLOB" >"$RUN/cat.out"; sync; record cat_s "$(elapsed "$t")"
  rm -f "$RUN/cat.out"
  sync; t=$(clock)
  "$WHARF" --config "$CONFIG" --data-dir "$GAPDATA" export -o "$RUN/gap.tar" bench/gap:1 >/dev/null
  sync; record export_s "$(elapsed "$t")"
  sync; t=$(clock); sha256sum "$RUN/gap.tar" >/dev/null; record sha256sum_s "$(elapsed "$t")"
  rm -rf "$RUN/import-data"
  sync; t=$(clock)
  "$WHARF" --config "$CONFIG" --data-dir "$RUN/import-data" import "$RUN/gap.tar" >/dev/null
  sync; record import_s "$(elapsed "$t")"
  rm -rf "$RUN/import-data" "$RUN/gap.tar"
done

BYTES=$(stat -c %s "$GAP_BLOB")
python3 - "$RESULTS" "$BYTES" "$BENCH_ROOT" <<'PY'
import sys
sys.path.insert(0, sys.argv[3])
from medians import load, table
rows, med = load(sys.argv[1])
gib = int(sys.argv[2]) / 2**30
table(rows, med, 36)
print(f"prefetch: wharf {med['prefetch_wharf_s']:.2f} s, skopeo sync {med['prefetch_skopeo_sync_s']:.2f} s: "
      f"{med['prefetch_wharf_s'] / med['prefetch_skopeo_sync_s']:.2f}x the time (goal <= 1.1x); "
      f"most origin GETs of one blob in a prefetch: {max(rows['prefetch_max_gets_per_blob']):.0f}")
print(f"export of {gib:.2f} GiB: {gib * 1024 / med['export_s']:.0f} MiB/s, cat {gib * 1024 / med['cat_s']:.0f} MiB/s: "
      f"{med['cat_s'] / med['export_s']:.2f}x cat's throughput (goal >= 0.8x)")
print(f"import of {gib:.2f} GiB: {gib * 1024 / med['import_s']:.0f} MiB/s, sha256sum {gib * 1024 / med['sha256sum_s']:.0f} MiB/s: "
      f"{med['sha256sum_s'] / med['import_s']:.2f}x sha256sum's throughput")
PY
say "results in $RUN"
