#!/usr/bin/env bash
# nginx serving one file with sendfile at /blob: the ceiling for serving a cached blob.
# usage: static.sh PORT FILE DATA_DIR  -> prints the master PID once it answers
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
port=$1 file=$(realpath "$2") data=$3
mkdir -p "$data/tmp"
{
  nginx_head "$data"
  cat <<CONF
  server {
    listen 127.0.0.1:$port;
    location = /blob { default_type application/octet-stream; alias $file; }
    location / { return 200 "static\n"; }
  }
}
CONF
} >"$data/nginx.conf"
nginx -p "$data" -e "$data/error.log" -c "$data/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
pid=$!
ready "http://127.0.0.1:$port/" 30 || { halt "$pid"; exit 1; }
echo "$pid"
