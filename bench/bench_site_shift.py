"""What a simulated site costs a model, family by family, before any fine-tuning.

Scores the model on the validation cases (the last N of train.list, never trained on) unshifted and as each
site family acquires them (`semiseg_la.preprocess.site_shift`, the same site seed and case seeds as
bench/bench_finetune.py), and prints the Dice of each and what it costs:

    python bench/bench_site_shift.py --data ../shared/data/LA [--model ID] \
        [--families scanner piecewise thick-slices bias rician-noise] [--strength 1] [--json out.json] \
        [--match-histograms 16] [--tta flip]

`--match-histograms N` asks whether intensity standardisation, which needs no labels, undoes a site: each
family's scans are scored again after quantile matching (Nyul-Udupa, `--landmarks` K percentiles from 0.5 to
99.5, default 100) onto the pooled histogram of N unshifted train.list cases after the site's 16 (neither
site nor scored), once with one map fitted on the site's 16 scans as bench/bench_finetune.py acquires them
(a site-level map, what a fine-tune could learn from unannotated scans) and once with each scan matched on
its own; the unshifted cases matched on their own show what the standardisation alone costs the model.
With `--matched-model` the model was trained on scans each matched onto that reference, so every scored scan,
unshifted or not, is matched on its own first. (A model trained with `normalization: standardized-zscore`
standardises its inputs itself, onto the reference in its card: score it without these options.)
`--write-matched DIR` writes such training data: every
train.list case matched on its own, in the LA h5 layout, and exits (docs/results.md, "Standardising").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from semiseg_la.checkpoints import load_network, resolve_model, validation_model_id
from semiseg_la.cli.common import inference_spec
from semiseg_la.inference.predictor import Predictor, combine_networks
from semiseg_la.io.datasets import open_dataset
from semiseg_la.metrics import dice
from semiseg_la.preprocess.normalize import landmarks, match_quantiles, standardize
from semiseg_la.preprocess.site_shift import SiteShift, shift_families

#: bench/bench_finetune.py's site: the first 16 train.list cases (4 labelled + 12 unlabelled, case seeds 0-15)
SITE_CASES = 16


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
    parser.add_argument("--tta", choices=("none", "flip", "mirror"), default="none",
                        help="test-time augmentation (default none; `segment` and bench_finetune.py use flip)")
    parser.add_argument("--match-histograms", type=int, default=0, metavar="N",
                        help="also score after quantile matching onto N unshifted reference cases (default 0: off)")
    parser.add_argument("--landmarks", type=int, default=100, help="percentiles matched (at least 3; default 100)")
    parser.add_argument("--write-matched", default=None, metavar="DIR",
                        help="write every train.list case matched onto the reference to DIR (LA h5 layout) and exit")
    parser.add_argument("--matched-model", action="store_true", help="the model was trained on scans each matched "
                        "onto the reference: match every scored scan on its own first (needs --match-histograms)")
    args = parser.parse_args(argv)
    if (args.matched_model or args.write_matched) and not args.match_histograms:
        parser.error("--matched-model and --write-matched need --match-histograms N (the reference to match onto)")
    if args.landmarks < 3:
        parser.error("--landmarks must be at least 3")
    every = [r for r in open_dataset(args.data, "train.list") if r.label_path]
    references = every[SITE_CASES:SITE_CASES + args.match_histograms]
    reference = pooled_landmarks([r.load()[0].array for r in references], args.landmarks) if references else None
    if args.write_matched:
        write_matched(every, Path(args.write_matched), reference)
        return 0
    cases = [record.load() for record in every[-args.val:]]
    # the site's own scans, for the site-level map (as bench_finetune.py writes them: case seeds 0-15)
    site_images = [r.load()[0] for r in every[:SITE_CASES]] if reference is not None and not args.matched_model else []
    network, card = load_network(resolve_model(args.model or validation_model_id()))
    predictor = Predictor(combine_networks(network, tta=args.tta), inference_spec(card), device="cpu")

    def mean_dice(pairs) -> float:
        return float(np.mean([dice(predictor.predict(image).label.array, label.array) for image, label in pairs]))

    def report(name: str, pairs) -> float:
        score = mean_dice(pairs)
        print(f"{name:16s} Dice {score:.4f}  costs {100 * (unshifted - score):5.2f} points", flush=True)
        return score

    unshifted = mean_dice(matched(cases, reference) if args.matched_model else cases)
    print(f"model {card.id}: {len(cases)} validation cases, Dice {unshifted:.4f} unshifted"
          + (", each scan matched (as the model was trained)" if args.matched_model else ""), flush=True)
    rows = {}
    if reference is not None and not args.matched_model:
        rows["unshifted, each scan matched"] = report("unshifted, each scan matched", matched(cases, reference))
    for family in args.families:
        shift = SiteShift(family, args.strength, args.seed)
        # case seeds 1000 + i, as bench_finetune.py scores its validation cases
        shifted = [(shift.apply(image, 1000 + i), label) for i, (image, label) in enumerate(cases)]
        if args.matched_model:
            shifted = matched(shifted, reference)
        rows[family] = report(family, shifted)
        if reference is not None and not args.matched_model:
            site = pooled_landmarks([shift.apply(image, i).array for i, image in enumerate(site_images)],
                                    args.landmarks)
            rows[f"{family}, site map"] = report("  site's map", matched(shifted, reference, site))
            rows[f"{family}, each scan matched"] = report("  each matched", matched(shifted, reference))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": card.id, "strength": args.strength, "seed": args.seed,
                                               "unshifted": unshifted, "families": rows}, indent=2) + "\n")
    return 0


def pooled_landmarks(arrays: Sequence[np.ndarray], count: int = 100) -> np.ndarray:
    """The pooled intensity histogram's landmarks: `count` percentiles from 0.5 to 99.5 of every voxel."""
    return landmarks(np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays]), count)


def write_matched(records, folder: Path, reference: np.ndarray) -> None:
    """`records` matched each on its own onto `reference`, as `<folder>/<ID>/mri_norm2.h5` plus train.list."""
    for record in records:
        image, label = record.load()
        (folder / record.case_id).mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / record.case_id / "mri_norm2.h5", "w") as handle:
            handle.create_dataset("image", data=standardize(image.array, reference), compression="gzip")
            handle.create_dataset("label", data=np.asarray(label.array, np.uint8), compression="gzip")
    (folder / "train.list").write_text("".join(f"{record.case_id}\n" for record in records))
    print(f"wrote {len(records)} matched cases to {folder}")


def matched(pairs, reference: np.ndarray, site: np.ndarray | None = None):
    """(image, label) pairs with each image matched onto `reference`: by the `site` landmarks, or its own."""
    return [(image.with_array(standardize(image.array, reference) if site is None
                              else match_quantiles(image.array, site, reference)), label) for image, label in pairs]


if __name__ == "__main__":
    sys.exit(main())
