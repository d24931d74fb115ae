#!/usr/bin/env bash
# wharf with access control on: an htpasswd user (bench:bench, bcrypt) and no anonymous
# pulls; the load tools send `Authorization: Basic` on every request (BENCH_AUTH).
# usage: wharf-auth.sh PORT UPSTREAM_URL DATA_DIR  -> prints the PID once it answers
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
port=$1 upstream=$2 data=$3
bin=${WHARF_BIN:-$BENCH_ROOT/../target/release/wharf}
# bcrypt("bench", cost 10).
echo 'bench:$2b$10$2ip0RqS07g7MM2nB/LRqs.K8hXl98Szn7JhVxOPiQoyXDjuf5StLW' >"$data/htpasswd"
printf '[auth]\nhtpasswd_file = "%s"\nanonymous = false\n' "$data/htpasswd" >"$data/wharf.toml"
RUST_LOG=warn "$bin" serve --config "$data/wharf.toml" --listen "127.0.0.1:$port" --upstream "$upstream" \
  --data-dir "$data/store" >"$data/wharf.log" 2>&1 </dev/null &
pid=$!
ready "http://127.0.0.1:$port/_wharf/health" 30 || { halt "$pid"; say "wharf did not start: $data/wharf.log"; exit 1; }
echo "$pid"
