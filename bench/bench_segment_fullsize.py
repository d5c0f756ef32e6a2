"""End-to-end `semiseg-la segment` on a full-size 576 x 576 x 88 volume (the challenge scans' size).

    python bench/bench_segment_fullsize.py [--model ID] [--device auto|cpu|cuda] [--repeats 2]

Builds a real scan-sized input by placing a validation LA crop inside a 576 x 576 x 88 field of view
(when ../shared/data/LA or --data is available; else a synthetic volume), writes it as NRRD, and
times the whole command (read, preprocess, network, resample back, write) as a user runs it,
reporting the child's own per-stage timings. Target on one H100: at most 1 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from semiseg_la.io.volume import Volume, write_volume

FULL = (576, 576, 88)


def full_size_volume(data: Path | None) -> Volume:
    rng = np.random.default_rng(0)
    array = rng.normal(0.0, 0.3, FULL).astype(np.float32)
    if data is not None and (data / "train.list").is_file():
        from semiseg_la.io.la_h5 import find_la_case, read_la_h5

        case = (data / "train.list").read_text().split()[-1]
        image, _ = read_la_h5(find_la_case(data, case))
        x0, y0 = (FULL[0] - image.shape[0]) // 2, (FULL[1] - image.shape[1]) // 2
        array[x0:x0 + image.shape[0], y0:y0 + image.shape[1], :] = image.array
    return Volume(array, (0.625, 0.625, 0.625))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "scan.nrrd", Path(tmp) / "seg.nrrd"
        write_volume(full_size_volume(Path(args.data)), src, compress=False)
        cmd = [sys.executable, "-m", "semiseg_la.cli.main", "segment", str(src), "-o", str(out),
               "--device", args.device, "--progress", "json"] + (["--model", args.model] if args.model else [])
        for i in range(args.repeats):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", check=True)
            wall = time.perf_counter() - t0
            done = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"run {i + 1}: {wall:.2f} s end to end (process start and torch import included); "
                  f"device {done['device']}; stages {done['timings']}")


if __name__ == "__main__":
    main()
