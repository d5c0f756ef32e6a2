#!/usr/bin/env bash
# Install the headless package (CPU torch first) and segment a scan with the bundled default model:
#   bash scripts/segment.sh scan.nrrd scan-seg.nrrd
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check "$here/training"
semiseg-la segment "$1" -o "$2" "${@:3}"
