# Helpers for the benchmark scripts; source it.
BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
clock() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }

# ready URL [SECONDS]: poll until URL answers below 500.
ready() {
  local end=$((SECONDS + ${2:-30})) code
  while ((SECONDS < end)); do
    code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" || true)
    [[ $code =~ ^[1-4][0-9][0-9]$ ]] && return 0
    sleep 0.1
  done
  return 1
}

# descendants PID: PID and every process below it.
descendants() {
  local c
  echo "$1"
  for c in $(pgrep -P "$1" || true); do descendants "$c"; done
}

# peak_rss_kib PID: summed VmHWM of the process tree (an upper bound for multi-process servers).
peak_rss_kib() {
  local total=0 p v
  for p in $(descendants "$1"); do
    v=$(awk '/^VmHWM:/ { print $2 }' "/proc/$p/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# reset_peak_rss PID: VmHWM := VmRSS for the tree, so the next peak covers what follows.
reset_peak_rss() {
  local p
  for p in $(descendants "$1"); do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done
}

# halt PID: SIGTERM the tree, wait up to 10 s, then SIGKILL what is left.
halt() {
  local pid=${1:-} procs p i alive
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  procs=$(descendants "$pid")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do
    alive=0
    for p in $procs; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for p in $procs; do kill -KILL "$p" 2>/dev/null || true; done
}

# nginx_conf DATA_DIR: the common head of an nginx config writing only under DATA_DIR.
nginx_head() {
  local data=$1 user=""
  [[ $(id -u) == 0 ]] && user="user root;"
  cat <<CONF
$user
worker_processes auto;
pid $data/nginx.pid;
error_log $data/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
  client_body_temp_path $data/tmp/body;
  proxy_temp_path $data/tmp/proxy;
  fastcgi_temp_path $data/tmp/fastcgi;
  uwsgi_temp_path $data/tmp/uwsgi;
  scgi_temp_path $data/tmp/scgi;
CONF
}

# registry_config ROOT PORT [PROXY_URL]: a docker-registry config (filesystem storage under
# ROOT, access log off, proxy mode when PROXY_URL is given) on stdout.
registry_config() {
  cat <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $1
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$2
  secret: bench
YML
  [[ -z ${3:-} ]] || printf 'proxy:\n  remoteurl: %s\n' "$3"
}

# need_tools CMD:PACKAGE ...: installs the Debian package of each command that is missing.
need_tools() {
  local need=() t sudo=""
  for t in "$@"; do
    command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
  done
  ((${#need[@]})) || return 0
  say "installing ${need[*]}"
  [[ $(id -u) == 0 ]] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
}

# new_run KIND: builds wharf (release; $WHARF) and makes a fresh $RUN under $WORK.
new_run() {
  say "building wharf (release)"
  (cd "$REPO" && cargo build --release --locked -q)
  WHARF=$REPO/target/release/wharf
  mkdir -p "$WORK/images"
  RUN=$WORK/$1-$(date +%Y%m%dT%H%M%S)
  mkdir -p "$RUN"
}

# origin_config ROOT PORT: registry_config with the access log on (to count origin GETs).
origin_config() {
  registry_config "$1" "$2" | sed 's/disabled: true/disabled: false/'
}

# image NAME SEED SIZES [extra mkimage args]: a seeded image under $WORK/images, built once
# and kept between runs, with its summary as NAME.json.
image() {
  local name=$1 seed=$2 sizes=$3
  shift 3
  [[ -s $WORK/images/$name.json ]] && return
  say "generating image $name ($sizes)"
  rm -rf "$WORK/images/$name"
  python3 "$BENCH_ROOT/mkimage.py" --out "$WORK/images/$name" --seed "$seed" --sizes "$sizes" "$@" >"$WORK/images/$name.json"
}
