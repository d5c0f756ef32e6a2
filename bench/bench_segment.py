"""Default inference vs the LA papers' legacy procedure on real LA cases, side by side.

    python bench/bench_segment.py --data ../shared/data/LA --cases 4 [--model ID] [--device cpu|cuda]

Prints seconds per case, the speed-up ratio, the Dice of each mode and the network voxels run per
model-grid voxel (1.0 = one network pass per voxel). Target on a 2-core CPU: >= 10x faster than
legacy at a Dice no more than 0.2 points lower.
"""

import sys

from semiseg_la.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "segment", *sys.argv[1:]]))
