#!/usr/bin/env bash
# Install the JavaScript, CSS and fonts of visdom's dashboard page into the installed visdom
# package, from the npm registry. visdom's server fetches them from CDNs on its first start
# (visdom/server/build.py, download_scripts), which fails on a machine without internet access;
# this takes the same libraries at the same versions from npm (`npm pack`) and copies them under
# the names visdom expects, then marks the install built so the server skips its download.
#
# Usage: scripts/visdom_assets.sh [PYTHON]     (default: .venv/bin/python, else python3)
set -euo pipefail
usage="usage: scripts/visdom_assets.sh [PYTHON]  (the interpreter whose visdom gets the files; default: .venv/bin/python, else python3)"
case $# in
  0) PY="" ;;
  1) case $1 in
       -h|--help) echo "$usage"; exit 0 ;;
       -*) echo "visdom_assets.sh: unknown option '$1'; $usage" >&2; exit 2 ;;
       # a path is the caller's: made absolute before the cd below (a missing folder fails the check after)
       */*) dir=$(cd "$(dirname "$1")" 2>/dev/null && pwd) && PY=$dir/$(basename "$1") || PY=$1 ;;
       *) PY=$1 ;;
     esac
     command -v "$PY" >/dev/null \
       || { echo "visdom_assets.sh: no Python interpreter at '$1'; give the python of the environment with visdom, e.g. .venv/bin/python" >&2; exit 2; } ;;
  *) echo "visdom_assets.sh: expected at most one argument, got $#; $usage" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
if [ -z "$PY" ]; then
  PY=.venv/bin/python
  [ -x "$PY" ] || PY=python3
fi
command -v npm >/dev/null || { echo "visdom_assets.sh: needs npm (Debian: apt-get install npm)" >&2; exit 1; }
static=$("$PY" -c "import os, visdom; print(os.path.join(os.path.dirname(visdom.__file__), 'static'))") \
  || { echo "visdom_assets.sh: $PY cannot import visdom (run ./setup.sh first)" >&2; exit 1; }
version=$("$PY" -c "import visdom; print(visdom.__version__)")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# package@version, file in the package, destination under visdom/static (as in download_scripts).
assets="
jquery@3.1.1                dist/jquery.min.js                                js/jquery.min.js
bootstrap@3.3.7             dist/js/bootstrap.min.js                          js/bootstrap.min.js
react@16.2.0                umd/react.production.min.js                       js/react-react.min.js
react-dom@16.2.0            umd/react-dom.production.min.js                   js/react-dom.min.js
react-modal@3.1.10          dist/react-modal.min.js                           js/react-modal.min.js
plotly.js-dist-min@2.11.1   plotly.min.js                                     js/plotly-plotly.min.js
sjcl@1.0.7                  sjcl.js                                           js/sjcl.js
layout-bin-packer@1.4.0     dist/layout-bin-packer.js.map                     js/layout-bin-packer.js.map
layout-bin-packer@1.4.0     dist/layout-bin-packer.js                         js/layout_bin_packer.js
d3@3.5.17                   d3.min.js                                         js/d3.v3.min.js
d3-selection-multi@1.0.1    build/d3-selection-multi.js                       js/d3-selection-multi.v1.js
save-svg-as-png@1.4.17      lib/saveSvgAsPng.js                               js/saveSvgAsPng.js
react-resizable@1.4.6       css/styles.css                                    css/react-resizable-styles.css
react-grid-layout@0.16.3    css/styles.css                                    css/react-grid-layout-styles.css
bootstrap@3.3.7             dist/css/bootstrap.min.css                        css/bootstrap.min.css
classnames@2.2.5            index.js                                          fonts/classnames
bootstrap@3.3.7             dist/fonts/glyphicons-halflings-regular.eot       fonts/glyphicons-halflings-regular.eot
bootstrap@3.3.7             dist/fonts/glyphicons-halflings-regular.woff2     fonts/glyphicons-halflings-regular.woff2
bootstrap@3.3.7             dist/fonts/glyphicons-halflings-regular.woff      fonts/glyphicons-halflings-regular.woff
bootstrap@3.3.7             dist/fonts/glyphicons-halflings-regular.ttf       fonts/glyphicons-halflings-regular.ttf
bootstrap@3.3.7             dist/fonts/glyphicons-halflings-regular.svg       fonts/glyphicons-halflings-regular.svg#glyphicons_halflingsregular
mathjax@2.7.5               MathJax.js                                        js/mathjax/2.7.5/MathJax.js
mathjax@2.7.5               config/Safe.js                                    js/mathjax/2.7.5/config/Safe.js
mathjax@2.7.5               config/TeX-AMS-MML_HTMLorMML.js                   js/mathjax/2.7.5/config/TeX-AMS-MML_HTMLorMML.js
mathjax@2.7.5               extensions/Safe.js                                js/mathjax/2.7.5/extensions/Safe.js
mathjax@2.7.5               jax/output/SVG/config.js                          js/mathjax/2.7.5/jax/output/SVG/config.js
mathjax@2.7.5               jax/output/SVG/jax.js                             js/mathjax/2.7.5/jax/output/SVG/jax.js
mathjax@2.7.5               jax/output/SVG/fonts/TeX/fontdata.js              js/mathjax/2.7.5/jax/output/SVG/fonts/TeX/fontdata.js
mathjax@2.7.5               jax/output/SVG/fonts/TeX/Size1/Regular/Main.js    js/mathjax/2.7.5/jax/output/SVG/fonts/TeX/Size1/Regular/Main.js
"

missing=0
while read -r pkg file dest; do
  [ -z "$pkg" ] || [ -f "$static/$dest" ] || missing=$((missing + 1))
done <<< "$assets"
if [ "$missing" -eq 0 ] && [ "$(cat "$static/version.built" 2>/dev/null)" = "$version" ]; then
  echo "visdom_assets.sh: already installed in $static"
  exit 0
fi

while read -r pkg file dest; do
  [ -n "$pkg" ] || continue
  dir="$work/$pkg"
  if [ ! -d "$dir" ]; then
    tarball=$(cd "$work" && npm pack --silent "$pkg") \
      || { echo "visdom_assets.sh: npm pack $pkg failed (is the npm registry reachable?)" >&2; exit 1; }
    mkdir -p "$dir"
    tar --warning=no-unknown-keyword -xzf "$work/$tarball" -C "$dir"
  fi
  [ -f "$dir/package/$file" ] || { echo "visdom_assets.sh: $pkg has no $file" >&2; exit 1; }
  mkdir -p "$(dirname "$static/$dest")"
  cp "$dir/package/$file" "$static/$dest"
done <<< "$assets"

# download_scripts only fetches missing files once the install is marked built for this version.
echo "$version" > "$static/version.built"
echo "visdom_assets.sh: installed $(grep -c . <<< "$assets") files into $static"
