#!/usr/bin/env bash
# nginx as a registry cache, the way rpardini/docker-registry-proxy sets it up: blobs cached
# by digest (shared across repositories), manifests by digest cached long, manifests by tag
# cached for NGINX_TAG_TTL (10s), proxy_cache_lock for concurrent misses, stale on errors.
# usage: nginx.sh PORT UPSTREAM_URL DATA_DIR  -> prints the master PID once /v2/ answers
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
port=$1 upstream=$2 data=$3
origin=${upstream#*://}
mkdir -p "$data/cache" "$data/tmp"
{
  nginx_head "$data"
  cat <<CONF
  proxy_cache_path $data/cache levels=1:2 max_size=32g inactive=60d keys_zone=registry:10m use_temp_path=off;
  upstream origin { server $origin; keepalive 32; }
  server {
    listen 127.0.0.1:$port;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $origin;
    proxy_read_timeout 900;
    proxy_cache_lock on;
    proxy_cache_lock_timeout 880s;
    proxy_cache_valid 200 206 60d;
    proxy_ignore_headers X-Accel-Expires Expires Cache-Control Set-Cookie;
    proxy_force_ranges on;
    proxy_ignore_client_abort on;
    location ~ ^/v2/.*/blobs/(sha256:[0-9a-f]+)$ {
      set \$blob \$1;
      proxy_pass http://origin;
      proxy_cache registry;
      proxy_cache_key \$blob;
      proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504 http_429;
    }
    location ~ ^/v2/.*/manifests/sha256: {
      proxy_pass http://origin;
      proxy_cache registry;
      proxy_cache_key \$uri\$http_accept;
      proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504 http_429;
    }
    location ~ ^/v2/.*/manifests/ {
      proxy_pass http://origin;
      proxy_cache registry;
      proxy_cache_key \$request_method\$uri\$http_accept;
      proxy_cache_valid 200 ${NGINX_TAG_TTL:-10s};
      proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504 http_429;
    }
    location / { proxy_pass http://origin; }
  }
}
CONF
} >"$data/nginx.conf"
nginx -p "$data" -e "$data/error.log" -c "$data/nginx.conf" -g 'daemon off;' </dev/null >/dev/null 2>&1 &
pid=$!
ready "http://127.0.0.1:$port/v2/" 30 || { halt "$pid"; say "nginx did not start: $data/error.log"; exit 1; }
echo "$pid"
