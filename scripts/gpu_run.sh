#!/usr/bin/env bash
# One prepared GPU session (issue 12): measure the GPU paths and train the release models in <= 9 minutes.
#
#   bash scripts/gpu_run.sh OUTDIR [--dry-run] [--pack DIR] [--data cache/la] [--budget 540] [--jobs sites]
#       [--finetune seeds|more|ema] [--skip STEP ...]
#
# Steps, in order, each time-boxed, each failure logged and skipped: set-up (SimpleITK from .whl/ when
# missing, pip install -e training), environment report + `pytest -m cuda`, bench/bench_train.py, segment
# on a 576 x 576 x 88 scan, training of the default clinical model and caml-la-8 (concurrently on a GPU),
# their exports copied into OUTDIR/models as fp16 shards, and with --finetune a grid of fine-tune
# benchmarks (issue 10). --dry-run: every step with tiny sizes on the CPU.
# --pack DIR: OUTDIR also goes into DIR as at most 8 archive parts below 16 MiB (the device tool's $OUT).
# Everything is in scripts/gpu_run.py (`python3 scripts/gpu_run.py --help`).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_run.py run "$@"
