"""What a simulated site costs a model, family by family, before any fine-tuning.

Scores the model on the validation cases (the last N of train.list, never trained on) unshifted and as each
site family acquires them (`semiseg_la.preprocess.site_shift`, the same site seed and case seeds as
bench/bench_finetune.py), and prints the Dice of each and what it costs:

    python bench/bench_site_shift.py --data ../shared/data/LA [--model ID] \
        [--families scanner piecewise thick-slices bias rician-noise] [--strength 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from semiseg_la.checkpoints import load_network, resolve_model, validation_model_id
from semiseg_la.inference.predictor import InferenceSpec, Predictor
from semiseg_la.io.datasets import open_dataset
from semiseg_la.metrics import dice
from semiseg_la.preprocess.site_shift import SiteShift, shift_families


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="LA h5 root with train.list")
    parser.add_argument("--model", default=None, help="catalog id (default: the default's "
                        "validation run, never trained on the scored cases)")
    parser.add_argument("--families", nargs="+", default=["scanner", "piecewise", "thick-slices", "bias",
                                                           "rician-noise"], choices=shift_families())
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="the simulated site")
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    records = [r for r in open_dataset(args.data, "train.list") if r.label_path][-args.val:]
    cases = [record.load() for record in records]
    network, card = load_network(resolve_model(args.model or validation_model_id()))
    predictor = Predictor(network, InferenceSpec(tuple(card.patch_size), tuple(card.spacing)), device="cpu")

    def mean_dice(pairs) -> float:
        return float(np.mean([dice(predictor.predict(image).label.array, label.array) for image, label in pairs]))

    unshifted = mean_dice(cases)
    print(f"model {card.id}: {len(cases)} validation cases, Dice {unshifted:.4f} unshifted", flush=True)
    rows = {}
    for family in args.families:
        shift = SiteShift(family, args.strength, args.seed)
        # case seeds 1000 + i, as bench_finetune.py scores its validation cases
        rows[family] = mean_dice([(shift.apply(image, 1000 + i), label) for i, (image, label) in enumerate(cases)])
        print(f"{family:16s} Dice {rows[family]:.4f}  costs {100 * (unshifted - rows[family]):5.2f} points", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": card.id, "strength": args.strength, "seed": args.seed,
                                               "unshifted": unshifted, "families": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
