#!/usr/bin/env bash
# The whole suite on Python 3.9, the Python of 3D Slicer 5.6 and 5.8, with the versions of one pin file:
#   bash scripts/test_slicer_python.sh [slicer-5.8|floor] [pytest arguments]
# slicer-5.8 (default): Slicer 5.8.1's numpy and SimpleITK, torch 2.8.0 (the newest for Python 3.9);
# floor: the oldest release of every dependency that training/pyproject.toml admits (torch 2.4.1).
# Not part of CI: PyPI's Linux torch wheels are CUDA builds, about 3.5 GB with their libraries. The venv is
# kept outside the checkout ($SEMISEG_LA_COMPAT_DIR, default ~/.cache/semiseg-la/compat) and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
pins="slicer-5.8"  # a first argument naming a file of scripts/compat/ chooses it; the rest go to pytest
if [[ $# -gt 0 && -f "scripts/compat/$1.txt" ]]; then pins="$1"; shift; fi
pin_file="scripts/compat/$pins.txt"
python39="${PYTHON39:-}"
if [[ -z "$python39" ]]; then  # the first that runs as 3.9 (a pyenv shim may exist and refuse)
  for candidate in python3.9 "$HOME"/.pyenv/versions/3.9*/bin/python; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' 2>/dev/null; then
      python39="$candidate"; break
    fi
  done
fi
[[ -n "$python39" ]] || { echo "no Python 3.9 found: set PYTHON39 to one" >&2; exit 2; }
venv="${SEMISEG_LA_COMPAT_DIR:-$HOME/.cache/semiseg-la/compat}/py39-$pins"
[[ -x "$venv/bin/python" ]] || "$python39" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$pin_file")
"${pip[@]}" -r "$pin_file"
"${pip[@]}" -e "training[test]"
"$venv/bin/python" - <<'PY'
import platform, numpy, scipy, skimage, SimpleITK, torch
print(f"Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
      f"SimpleITK {SimpleITK.Version_VersionString()}, scipy {scipy.__version__}, scikit-image {skimage.__version__}")
PY
cd Testing && "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
