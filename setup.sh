#!/usr/bin/env bash
# Create .venv and install everything the project needs. Safe to run again: a finished install
# is recorded with the hash of requirements.txt and skipped while that file is unchanged.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# visdom's setup.py needs pkg_resources, which setuptools 81 removed.
pip install "setuptools<81" wheel
pip install --no-build-isolation -r requirements.txt
.venv/bin/python -c "import torch, torchvision, visdom, ptflops, tqdm, numpy, pytest, matplotlib" \
  || { echo "setup.sh: the install is incomplete (see the pip messages above)" >&2; exit 1; }
echo "$want" > "$stamp"
