#!/usr/bin/env bash
# Install what the tests need (CPU torch first, so no CUDA build is pulled) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e "training[test]"
ruff check training SemiSegLA Testing bench
# The suite writes large checkpoints to the temporary folder; a full disk shows up as torch.save errors.
echo "free for temporary files: $(df -h "${TMPDIR:-/tmp}" | awk 'NR==2 {print $4}')"
cd Testing && python3 -m pytest -q "$@"
