"""Whole-scan robustness: `semiseg-la segment` on validation crops and on whole-scan-like cases built from them.

    python bench/bench_fov.py --data ../shared/data/LA [--cases 8] [--sizes 320 448 576] [--model ID]
                              [--localiser ID] [--region auto|whole]

No whole-scan LA data exist here, so each validation crop is placed in a canvas of the given in-plane
size (x 88 slices, 0.625 mm) tiled with real tissue of training cases whose atria are painted out
(preprocess/wide_fov.py), once without and once with a decoy (another case's atrium, mirrored, beside
the target). Each case goes through the real command (written as NRRD, segmented with --roi-out).
Printed per case and as means: Dice on the crop, Dice on the wide case, whether the region used holds the
whole label (hit), and the region's smallest in-plane margin to the label in mm (negative: the label was cut).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from semiseg_la.checkpoints import validation_model_id
from semiseg_la.cli.main import main as cli
from semiseg_la.io import read_volume, write_volume
from semiseg_la.io.datasets import open_dataset
from semiseg_la.io.volume import Volume
from semiseg_la.metrics import dice
from semiseg_la.preprocess.wide_fov import build_wide_case, make_donor

SPACING = (0.625, 0.625, 0.625)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cases", type=int, default=8, help="validation cases: the last N of train.list")
    parser.add_argument("--donors", type=int, default=12, help="tissue donors: the first N of train.list")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 448, 576], help="canvas sizes (voxels)")
    parser.add_argument("--model", default=None, help="fine model (default: the default's "
                        "validation run, never trained on the scored cases)")
    parser.add_argument("--localiser", default=None)
    parser.add_argument("--region", default="auto", choices=("auto", "whole"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.model = args.model or validation_model_id()
    records = [r for r in open_dataset(args.data, "train.list") if r.label_path]
    donors = [make_donor(*_arrays(r), SPACING, seed=i) for i, r in enumerate(records[:args.donors])]
    rows: List[Dict[str, float]] = []
    print(f"{'case':22s} {'canvas':>7s} {'decoy':>5s} {'crop':>7s} {'wide':>7s} {'hit':>4s} {'margin mm':>9s} "
          f"{'time s':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for n, record in enumerate(records[-args.cases:]):
            image, label = _arrays(record)
            crop_dice = segment_dice(Volume(image, SPACING), label, Path(tmp), args)[0]
            rng = np.random.default_rng([args.seed, n])
            for size in args.sizes:
                for decoy in (False, True):
                    wide = build_wide_case(image, label, donors, (size, size, image.shape[2]), rng, decoy=decoy)
                    wide_dice, region, seconds = segment_dice(Volume(wide.image, SPACING), wide.label, Path(tmp), args)
                    hit, margin = region_fit(region["box"], wide.label)
                    rows.append({"decoy": decoy, "crop": crop_dice, "wide": wide_dice, "hit": hit, "margin": margin,
                                 "size": size, "seconds": seconds})
                    print(f"{record.case_id:22s} {size:7d} {'yes' if decoy else 'no':>5s} {crop_dice:7.4f} "
                          f"{wide_dice:7.4f} {'yes' if hit else 'NO':>4s} {margin:9.1f} {seconds:6.1f}", flush=True)
    summarize(rows)


def _arrays(record):
    image, label = record.load()
    return np.asarray(image.array, np.float32), (np.asarray(label.array) > 0).astype(np.uint8)


def segment_dice(image: Volume, label: np.ndarray, tmp: Path, args) -> tuple:
    """(Dice, the region record, seconds) of `semiseg-la segment` on `image`, run in this process."""
    import time

    src, out, roi = tmp / "in.nrrd", tmp / "out.nrrd", tmp / "roi.json"
    write_volume(image, src, compress=False)
    cmd = ["segment", str(src), "-o", str(out), "--roi-out", str(roi), "--progress", "none",
           "--region", args.region]
    cmd += (["--model", args.model] if args.model else []) + (["--localiser", args.localiser] if args.localiser else [])
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # segment's lines for each canvas stay out of the table
        code = cli(cmd)
    seconds = time.perf_counter() - started
    if code != 0:
        return 0.0, {"box": [0, 0, 0, 0, 0, 0]}, seconds
    return dice(read_volume(out).array, label), json.loads(roi.read_text()), seconds


def region_fit(box: Sequence[int], label: np.ndarray) -> tuple:
    """(the box holds the whole label, smallest distance in mm from the label's bounding box to a face of the
    box that lies inside the image; negative when the label sticks out)."""
    where = np.nonzero(label)
    low = np.array([w.min() for w in where])
    high = np.array([w.max() + 1 for w in where])
    lower, upper = np.array(box[:3]), np.array(box[3:])
    margins = np.concatenate([low - lower, upper - high]) * SPACING[0]
    hit = bool(np.all(margins >= 0))
    # in-plane faces that lie inside the image (z is the whole scan's, as in the crops)
    inner = np.concatenate([lower > 0, upper < np.array(label.shape)]) & np.array([True, True, False] * 2)
    return hit, float(margins[inner].min()) if inner.any() else float("nan")


def summarize(rows: List[Dict[str, float]]) -> None:
    print()
    for decoy in (False, True):
        chosen = [r for r in rows if r["decoy"] == decoy]
        if not chosen:
            continue
        crop = np.mean([r["crop"] for r in chosen])
        wide = np.array([r["wide"] for r in chosen])
        print(f"{'with' if decoy else 'without'} decoys: {len(chosen)} wide cases; Dice crop {crop:.4f}, wide "
              f"{wide.mean():.4f} ({100 * (wide.mean() - crop):+.2f} points), lowest {wide.min():.4f}, "
              f"below 0.80: {int(np.sum(wide < 0.80))}; hit rate {np.mean([r['hit'] for r in chosen]):.2f}; "
              f"median margin {np.nanmedian([r['margin'] for r in chosen]):.1f} mm; mean time "
              f"{np.mean([r['seconds'] for r in chosen]):.1f} s")


if __name__ == "__main__":
    main()
