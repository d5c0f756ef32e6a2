"""Iterations per second and peak memory of training steps per method (2 labelled + 2 unlabelled).

    python bench/bench_train.py --methods supervised mean_teacher --patch 112 112 80 --steps 3 \
        [--iterations 15000] [--device cuda]
"""

import sys

from semiseg_la.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
