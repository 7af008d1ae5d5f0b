#!/usr/bin/env bash
# Start the visdom server the --visdom runs plot to, in the foreground (Ctrl-C stops it).
#
# Usage: scripts/visdom_server.sh [PORT] [--all-interfaces]
#   PORT              default 8097 (the scripts' --vis-port default)
#   --all-interfaces  listen on every network interface instead of 127.0.0.1 only; visdom has no
#                     login by default, so anyone who reaches the port sees and edits the plots
# Environment: PYTHON (default .venv/bin/python), VISDOM_ENV_PATH (where the server saves
# environments; default ~/.visdom/).
#
# The server is started without `python -m visdom.server`, which first downloads the page's
# JavaScript from CDNs and stops where the internet is unreachable; scripts/visdom_assets.sh
# installs the same files from the npm registry.
set -euo pipefail
usage="usage: scripts/visdom_server.sh [PORT] [--all-interfaces]  (default port 8097, listening on 127.0.0.1 only)"
# PYTHON and VISDOM_ENV_PATH relative to the caller's directory, resolved before the cd below.
PY=${PYTHON:-}
[[ $PY == */* && $PY != /* ]] && PY=$PWD/$PY
env_path=${VISDOM_ENV_PATH:-$HOME/.visdom/}
[[ $env_path != /* ]] && env_path=$PWD/$env_path
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
port=8097
bind=(-bind_local)
for arg in "$@"; do
  case "$arg" in
    -h|--help) echo "$usage"; exit 0 ;;
    --all-interfaces) bind=() ;;
    ''|*[!0-9]*) echo "visdom_server.sh: expected a port number or --all-interfaces, got '$arg'; $usage" >&2; exit 2 ;;
    *) port=$arg ;;
  esac
done
if [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
  echo "visdom_server.sh: the port must be in 1..65535, got $port" >&2
  exit 2
fi
static=$("$PY" -c "import os, visdom; print(os.path.join(os.path.dirname(visdom.__file__), 'static'))") \
  || { echo "visdom_server.sh: $PY cannot import visdom (run ./setup.sh first)" >&2; exit 1; }
if [ ! -f "$static/js/plotly-plotly.min.js" ]; then
  echo "visdom_server.sh: the dashboard page's JavaScript is not installed, so the page will stay blank;" \
       "run scripts/visdom_assets.sh (or ./setup.sh --with-visdom-assets) first" >&2
fi
mkdir -p "$env_path"
host=127.0.0.1
[ ${#bind[@]} -eq 0 ] && host=$(hostname)
echo "visdom_server.sh: dashboard at http://$host:$port (environments saved in $env_path)"
exec "$PY" -c "from visdom.server.run_server import main; main()" \
  -port "$port" "${bind[@]}" -env_path "${env_path%/}/" -logging_level WARNING
