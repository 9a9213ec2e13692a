#!/usr/bin/env bash
# What a user's `pip install .` costs: a fresh venv, no pip cache, every dependency downloaded; the
# install's wall time, the venv's size, the largest packages in it, and whether TensorFlow came along.
#   bash bench/install_size.sh [SOURCE] [VENV]   # SOURCE: a checkout (default: this repo); VENV: a new folder
# The venv is made anew (an existing VENV is removed first) with the interpreter $PYTHON (default python3)
# and its own bundled pip, as a user's would be. SOURCE's files that git tracks or does not ignore are
# copied to a temporary folder first (pip builds in the tree: no build/ or egg-info is left in SOURCE).
# Prints one summary line per measure, `key: value`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(cd "${1:-$ROOT}" && pwd)
VENV=${2:-/tmp/ddpm_install_size_venv}
PY=${PYTHON:-python3}

copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
git -C "$SRC" ls-files -z --cached --others --exclude-standard | (cd "$SRC" && tar --ignore-failed-read --null -T - -cf - 2>/dev/null) | tar -C "$copy" -xf -
rm -rf "$VENV"
"$PY" -m venv "$VENV"
load=$(cut -d" " -f1-3 /proc/loadavg)
start=$(date +%s.%N)
# (the file:// extra indexes of this machine's pip.conf warn for each package they lack: not shown)
"$VENV/bin/python" -m pip install --quiet --no-cache-dir "$copy" 2> >(grep -v "is ignored: it is neither" >&2)
end=$(date +%s.%N)

site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "load_average_at_start: $load (1, 5, 15 min; 2 cores)"
echo "source: $SRC ($(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo 'not git'))"
echo "python: $("$VENV/bin/python" -c 'import platform; print(platform.python_version())')"
echo "install_seconds: $(echo "$end - $start" | bc)"
bytes=$(du -sb "$VENV" | cut -f1)
echo "venv_size: $(echo "scale=2; $bytes / 1024^3" | bc) GiB ($bytes bytes; on disk $(du -sh "$VENV" | cut -f1))"
echo "distributions: $("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | wc -l)"
if "$VENV/bin/python" -c "import tensorflow" 2>/dev/null; then tf=yes; else tf=no; fi
echo "tensorflow_importable: $tf"
echo "tensorflow_distributions: $("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -ic '^tensorflow\(-cpu\|_cpu\|-intel\)\?==' || true)"
echo "largest in site-packages:"
du -sm "$site"/* 2>/dev/null | sort -rn | head -12 | awk '{printf "  %6d MiB  %s\n", $1, $2}' | sed "s|$site/||"
