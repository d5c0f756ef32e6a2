"""End-to-end `semiseg-la segment` on a full-size 576 x 576 x 88 scan against its atrium crop alone.

    python bench/bench_segment_fullsize.py [--data ../shared/data/LA] [--model ID] [--device auto|cpu|cuda]
                                           [--repeats 2] [--region auto|whole]

The scan is a validation LA crop placed in a 576 x 576 x 88 canvas (the challenge scans' size) of real
tissue from other cases with their atria painted out (preprocess/wide_fov.py); without the data, a
synthetic volume. Both inputs are written as NRRD and segmented by the real command in a child process,
alternately, so a passing load meets both. Printed: each run's wall time (process start and torch import
included) and the command's own stage timings, then the median of each and their ratio. The whole scan also
runs with `--tta none` (one network pass instead of the default's 4 flips), for the cost of the default TTA.
Targets: whole scan at most 1.5 x its crop on a CPU (issue 14); the default at most 1.5 x the one-pass
command (issue 13); at most 1 s on one H100.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from semiseg_la.io.volume import Volume, write_volume

FULL = (576, 576, 88)
SPACING = (0.625, 0.625, 0.625)


def scan_and_crop(data: Path | None) -> Tuple[Volume, Volume]:
    """(full-size scan, the crop inside it)."""
    if data is not None and (data / "train.list").is_file():
        from semiseg_la.io.datasets import open_dataset
        from semiseg_la.preprocess.wide_fov import build_wide_case, make_donor

        records = [r for r in open_dataset(str(data), "train.list") if r.label_path]
        donors = []
        for i, record in enumerate(records[:6]):
            image, label = record.load()
            donors.append(make_donor(image.array, label.array, SPACING, seed=i))
        image, label = records[-1].load()
        wide = build_wide_case(image.array, label.array, donors, FULL, np.random.default_rng(0))
        return Volume(wide.image, SPACING), Volume(np.asarray(image.array, np.float32), SPACING)
    rng = np.random.default_rng(0)
    full = rng.normal(0.0, 0.3, FULL).astype(np.float32)
    return Volume(full, SPACING), Volume(full[200:376, 220:356].copy(), SPACING)


def run_once(cmd: List[str]) -> Tuple[float, Dict[str, float]]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8")
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"segment failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout[-500:]}")
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    return wall, {**done["timings"], "device": done["device"], "region": done.get("region", {}).get("source")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--region", default="auto", choices=("auto", "whole"))
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"))
    args = parser.parse_args()
    scan, crop = scan_and_crop(Path(args.data))
    runs = {"crop": ("crop", []), "scan": ("scan", []), "scan, one pass": ("scan", ["--tta", "none"])}
    walls: Dict[str, List[float]] = {kind: [] for kind in runs}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {"crop": Path(tmp) / "crop.nrrd", "scan": Path(tmp) / "scan.nrrd"}
        write_volume(crop, inputs["crop"], compress=False)
        write_volume(scan, inputs["scan"], compress=False)
        for i in range(args.repeats):
            for kind, (source, extra) in runs.items():
                cmd = [sys.executable, "-m", "semiseg_la.cli.main", "segment", str(inputs[source]), "-o",
                       str(Path(tmp) / "seg.nrrd"), "--device", args.device, "--progress", "json",
                       "--region", args.region, *extra] + (["--model", args.model] if args.model else [])
                wall, stages = run_once(cmd)
                walls[kind].append(wall)
                print(f"run {i + 1} {kind}: {wall:.2f} s end to end; stages {stages}", flush=True)
    crop_s, scan_s, one_pass_s = (float(np.median(walls[kind])) for kind in runs)
    print(f"\nmedian: crop {crop_s:.2f} s ({'x'.join(map(str, crop.shape))}), whole scan {scan_s:.2f} s "
          f"({'x'.join(map(str, scan.shape))}); ratio {scan_s / crop_s:.2f} (target <= 1.5 on a CPU)")
    print(f"whole scan with --tta none {one_pass_s:.2f} s: the default's flip TTA costs {scan_s / one_pass_s:.2f} x "
          "(target <= 1.5)")


if __name__ == "__main__":
    main()
