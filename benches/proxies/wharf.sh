#!/usr/bin/env bash
# wharf (this project), release build, defaults (tag_ttl 0: every tag request revalidated).
# WHARF_LOG sets its log filter (default warn; e.g. WHARF_LOG=wharf=debug to trace a failure).
# usage: wharf.sh PORT UPSTREAM_URL DATA_DIR  -> prints the PID once /v2/ answers
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
port=$1 upstream=$2 data=$3
bin=${WHARF_BIN:-$BENCH_ROOT/../target/release/wharf}
RUST_LOG=${WHARF_LOG:-warn} "$bin" serve --listen "127.0.0.1:$port" --upstream "$upstream" --data-dir "$data/store" \
  >"$data/wharf.log" 2>&1 </dev/null &
pid=$!
ready "http://127.0.0.1:$port/v2/" 30 || { halt "$pid"; say "wharf did not start: $data/wharf.log"; exit 1; }
echo "$pid"
