#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs the Debian packages the tests
# drive (a real upstream registry and a real client) when they are missing, then runs
# `cargo test`. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  echo "installing test dependencies: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

cargo test --locked "$@"
