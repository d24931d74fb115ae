#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs the Debian packages the tests
# drive when they are missing (a real upstream registry; real clients: skopeo,
# containerd's ctr, the docker daemon; Prometheus and promtool), then runs `cargo test`. Extra arguments go to
# cargo test. The client tests start private daemons, so they need root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
command -v curl >/dev/null || need+=(curl)
command -v containerd >/dev/null || need+=(containerd)
command -v dockerd >/dev/null || need+=(docker.io)
command -v runc >/dev/null || need+=(runc)
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
if ((${#need[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  echo "installing test dependencies: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

cargo test --locked "$@"
