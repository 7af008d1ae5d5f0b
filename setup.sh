#!/usr/bin/env bash
# Create .venv and install everything the project needs. Safe to run again: a finished install
# is recorded with the hash of requirements.txt and skipped while that file is unchanged.
# --with-data: also install Fashion-MNIST (Debian's dataset-fashion-mnist; needs root or sudo).
# --with-visdom-assets: also install the visdom dashboard page's JavaScript from the npm registry
# (scripts/visdom_assets.sh), for machines where visdom cannot fetch it from its CDNs.
# --with-browser: also install Debian's chromium (needs root or sudo), which the test suite uses to
# load a real dashboard page and screenshot it (scripts/dashboard_screenshot.py).
set -euo pipefail
cd "$(dirname "$0")"
visdom_assets=false
apt_packages=()
for arg in "$@"; do
  case "$arg" in
    --with-visdom-assets) visdom_assets=true ;;
    --with-data)
      [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_packages+=(dataset-fashion-mnist) ;;
    --with-browser)
      command -v chromium >/dev/null || apt_packages+=(chromium) ;;
    *) echo "setup.sh: unknown option $arg (use --with-data, --with-visdom-assets, --with-browser)" >&2; exit 2 ;;
  esac
done
if [ ${#apt_packages[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_packages[@]}" >/dev/null \
    || { echo "setup.sh: could not install ${apt_packages[*]} with apt-get (needs root or sudo)" >&2; exit 1; }
fi
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
# the checkout's own path too: the editable install below points at it
want=$( (sha256sum requirements.txt setup.sh pyproject.toml; pwd) | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  if $visdom_assets; then scripts/visdom_assets.sh .venv/bin/python; fi
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# visdom's setup.py needs pkg_resources, which setuptools 81 removed.
pip install "setuptools<81" wheel
pip install --no-build-isolation -r requirements.txt
# the project's packages, importable from anywhere (benchmarks, scripts, the tests)
pip install --no-build-isolation --no-deps -e .
.venv/bin/python -c "import torch, torchvision, visdom, ptflops, tqdm, numpy, pytest, matplotlib, app, models" \
  || { echo "setup.sh: the install is incomplete (see the pip messages above)" >&2; exit 1; }
echo "$want" > "$stamp"
if $visdom_assets; then scripts/visdom_assets.sh .venv/bin/python; fi
