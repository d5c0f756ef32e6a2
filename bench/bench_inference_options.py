"""Inference-side options on the validation split, side by side: plain, flip TTA, a two-model ensemble, both.

    python bench/bench_inference_options.py --data ../shared/data/LA --model A [--second B] [--cases 8]

Each option segments the same validation cases (the last N of train.list; never trained on by the
validation-run models) in one process, as `segment` does (`--tta flip`, `--ensemble B`). Printed per option:
mean Dice, HD95 and ASD (mm), seconds per case and the time ratio to plain inference.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List

import numpy as np

from semiseg_la.checkpoints import load_network, resolve_model, validation_model_id
from semiseg_la.cli.common import inference_spec
from semiseg_la.inference.predictor import Predictor, combine_networks
from semiseg_la.io.datasets import open_dataset
from semiseg_la.metrics import evaluate_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default=None, help="catalog id (default: the default's "
                        "validation run, never trained on the scored cases)")
    parser.add_argument("--second", default=None, help="the ensemble's second model")
    parser.add_argument("--cases", type=int, default=8)
    args = parser.parse_args()
    network, card = load_network(resolve_model(args.model or validation_model_id()))
    spec = inference_spec(card)
    options: Dict[str, object] = {"plain": network, "mirror TTA": combine_networks(network, tta="mirror"),
                                  "flip TTA": combine_networks(network, tta="flip")}
    if args.second:
        second, _ = load_network(resolve_model(args.second))
        options["ensemble"] = combine_networks(network, [second])
        options["ensemble + flip TTA"] = combine_networks(network, [second], tta="flip")
    records = [r for r in open_dataset(args.data, "train.list") if r.label_path][-args.cases:]
    cases = [r.load() for r in records]
    rows: Dict[str, List[Dict[str, float]]] = {name: [] for name in options}
    for image, label in cases:  # options alternate case by case, so a passing load meets all of them
        for name, net in options.items():
            started = time.perf_counter()
            prediction = Predictor(net, spec, device="cpu").predict(image)
            seconds = time.perf_counter() - started
            metrics = evaluate_case(prediction.label.array, label.array, image.spacing)
            rows[name].append({**{k: float(metrics[k]) for k in ("dice", "hd95_mm", "asd_mm")}, "s": seconds})
    plain_s = np.mean([r["s"] for r in rows["plain"]])
    print(f"{'option':22s} {'Dice':>7s} {'HD95 mm':>8s} {'ASD mm':>7s} {'s/case':>7s} {'time ratio':>10s}")
    for name, got in rows.items():
        mean = {k: float(np.mean([r[k] for r in got])) for k in ("dice", "hd95_mm", "asd_mm", "s")}
        print(f"{name:22s} {mean['dice']:7.4f} {mean['hd95_mm']:8.2f} {mean['asd_mm']:7.2f} {mean['s']:7.2f} "
              f"{mean['s'] / plain_s:10.2f}")


if __name__ == "__main__":
    main()
