"""Field-of-view robustness: Dice from the h5 input vs from the same case written as a cropped NRRD,
and from a wider field of view (the crop padded with background) on validation cases.

    python bench/bench_fov.py --data ../shared/data/LA --cases 4 [--model ID]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from semiseg_la.checkpoints import load_network, resolve_model
from semiseg_la.inference.predictor import InferenceSpec, Predictor
from semiseg_la.io import read_volume, write_volume
from semiseg_la.io.datasets import open_dataset
from semiseg_la.metrics import dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    network, card = load_network(resolve_model(args.model))
    predictor = Predictor(network, InferenceSpec(tuple(card.patch_size), tuple(card.spacing)), device="auto")
    records = [r for r in open_dataset(args.data, "train.list") if r.label_path][-args.cases:]
    print(f"{'case':22s} {'h5':>7s} {'nrrd':>7s} {'wide FOV':>9s}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for record in records:
            image, label = record.load()
            from_h5 = dice(predictor.predict(image).label.array, label.array)
            path = Path(tmp) / f"{record.case_id}.nrrd"
            write_volume(image, path)
            from_nrrd = dice(predictor.predict(read_volume(path)).label.array, label.array)
            wide = widen(image)
            pred_wide = predictor.predict(wide).label.array[48:-48, 48:-48, :]
            from_wide = dice(pred_wide, label.array)
            rows.append((from_h5, from_nrrd, from_wide))
            print(f"{record.case_id:22s} {from_h5:7.4f} {from_nrrd:7.4f} {from_wide:9.4f}")
    mean = np.mean(rows, axis=0)
    print(f"{'mean':22s} {mean[0]:7.4f} {mean[1]:7.4f} {mean[2]:9.4f}")


def widen(image):
    """The crop inside a wider, darker field of view (48 voxels of background each side in x and y)."""
    background = float(np.percentile(image.array, 5))
    array = np.pad(image.array, ((48, 48), (48, 48), (0, 0)), constant_values=background)
    origin = tuple(o - 48 * s if i < 2 else o for i, (o, s) in enumerate(zip(image.origin, image.spacing)))
    return type(image)(array, image.spacing, origin, image.direction, image.source)


if __name__ == "__main__":
    main()
