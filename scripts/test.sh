#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs the Debian packages the tests
# drive when they are missing (a real upstream registry; real clients: skopeo,
# containerd's ctr, the docker daemon; Prometheus and promtool; systemd-analyze) and the oras Python client
# (PyPI, into .tools/python), then runs `cargo test`. Extra arguments go to
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
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if ((${#need[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  echo "installing test dependencies: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# The oras Python client (PyPI), into a project-local tool dir.
ORAS_VERSION=0.2.43
export WHARF_TEST_PYTHONPATH="$PWD/.tools/python"
if ! PYTHONPATH="$WHARF_TEST_PYTHONPATH" python3 -c "import oras, sys; sys.exit(oras.__version__ != '$ORAS_VERSION')" 2>/dev/null; then
  echo "installing test dependency: oras==$ORAS_VERSION (PyPI) into .tools/python" >&2
  pip_install=(python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --upgrade --target "$WHARF_TEST_PYTHONPATH" "oras==$ORAS_VERSION")
  # A Debian python3 marks itself externally managed; a --target dir is ours alone.
  "${pip_install[@]}" >&2 || "${pip_install[@]}" --break-system-packages >&2
fi

cargo test --locked "$@"
