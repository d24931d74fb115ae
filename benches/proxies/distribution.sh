#!/usr/bin/env bash
# CNCF distribution (Debian docker-registry) in pull-through proxy mode, filesystem storage.
# usage: distribution.sh PORT UPSTREAM_URL DATA_DIR  -> prints the PID once /v2/ answers
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
port=$1 upstream=$2 data=$3
mkdir -p "$data/store"
registry_config "$data/store" "$port" "$upstream" >"$data/config.yml"
docker-registry serve "$data/config.yml" >"$data/distribution.log" 2>&1 </dev/null &
pid=$!
ready "http://127.0.0.1:$port/v2/" 30 || { halt "$pid"; say "distribution did not start"; exit 1; }
echo "$pid"
