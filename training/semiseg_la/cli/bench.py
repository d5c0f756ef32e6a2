"""`semiseg-la bench`: figures measured side by side in one run (ratios mean something on any machine).

- `bench segment`: default (fast) inference vs the LA papers' legacy procedure on real labelled cases:
  seconds per case, their ratio, Dice of each, and network voxels run per input voxel.
- `bench train`: iterations per second and peak memory of training steps per method on random data.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any, Dict, List

import numpy as np
import torch

from ..inference.predictor import Predictor
from ..io.datasets import open_dataset
from ..metrics import dice
from .common import add_device_flag, inference_spec, load_catalog_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: segmentation speed vs legacy, training step speed")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    seg = bsub.add_parser("segment", help="default vs legacy inference on labelled cases")
    seg.add_argument("--data", required=True)
    seg.add_argument("--list", dest="case_list", default=None)
    seg.add_argument("--cases", type=int, default=2, help="how many cases (from the end of the list)")
    seg.add_argument("--model", default=None)
    seg.add_argument("--json", dest="json_out", default=None)
    seg.add_argument("--papers-config", action="store_true",
                     help="speed only: an untrained V-Net in the LA papers' configuration (112x112x80 at "
                          "0.625 mm) instead of a catalog model; Dice is then meaningless and not printed")
    add_device_flag(seg)
    seg.set_defaults(handler=run_segment)
    tr = bsub.add_parser("train", help="training-step speed and peak memory per method")
    tr.add_argument("--methods", nargs="+", default=["supervised", "mean_teacher"])
    tr.add_argument("--patch", type=int, nargs=3, default=(112, 112, 80))
    tr.add_argument("--steps", type=int, default=3)
    tr.add_argument("--warmup", type=int, default=1)
    tr.add_argument("--iterations", type=int, default=None, help="project a full run of this many iterations")
    add_device_flag(tr)
    tr.set_defaults(handler=run_train)


def run_segment(args: argparse.Namespace) -> int:
    if args.papers_config:
        from ..inference.predictor import InferenceSpec
        from ..models import VNet

        torch.manual_seed(0)
        network, model_id = VNet().eval(), "untrained V-Net, papers' configuration (speed only)"
        spec = InferenceSpec((112, 112, 80), (0.625, 0.625, 0.625))
    else:
        network, card, model_id = load_catalog_model(args.model)
        spec = inference_spec(card)
    records = [r for r in open_dataset(args.data, args.case_list) if r.label_path is not None][-args.cases:]
    modes = {"default": Predictor(network, spec, device=args.device, mode="fast"),
             "legacy": Predictor(network, spec, device=args.device, mode="legacy", largest_component=False)}
    rows: List[Dict[str, Any]] = []
    for record in records:
        image, label = record.load()
        for name, predictor in modes.items():
            t0 = time.perf_counter()
            prediction = predictor.predict(image)
            seconds = time.perf_counter() - t0
            rows.append({"case": record.case_id, "mode": name, "seconds": seconds,
                         "dice": dice(prediction.label.array, label.array),
                         "passes_per_voxel": prediction.network_voxels / float(np.prod(_model_grid_shape(
                             image.shape, image.spacing, spec.spacing))), "windows": prediction.windows})
    summary = {}
    for name in modes:
        mine = [r for r in rows if r["mode"] == name]
        summary[name] = {k: float(np.mean([r[k] for r in mine])) for k in ("seconds", "dice", "passes_per_voxel")}
    ratio = summary["legacy"]["seconds"] / summary["default"]["seconds"]
    print(f"model {model_id} on {len(records)} case(s), device {modes['default'].device}")
    print(f"{'mode':8s} {'s/case':>8s} {'dice':>7s} {'network passes/voxel':>21s}")
    for name, s in summary.items():
        dice_text = "      -" if args.papers_config else f"{s['dice']:7.4f}"
        print(f"{name:8s} {s['seconds']:8.2f} {dice_text} {s['passes_per_voxel']:21.2f}")
    print(f"speed-up default vs legacy: {ratio:.1f}x", end="")
    if args.papers_config:
        print(" (untrained network: speed only)")
    else:
        print(f"; Dice difference (default - legacy): "
              f"{100 * (summary['default']['dice'] - summary['legacy']['dice']):+.2f} points")
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"model": model_id, "rows": rows, "summary": summary, "speedup": ratio}, handle, indent=2)
    return 0


def _model_grid_shape(shape, spacing, model_spacing):
    return [max(1, round(n * s / m)) for n, s, m in zip(shape, spacing, model_spacing)]


def run_train(args: argparse.Namespace) -> int:
    from ..methods import Batch, build_method

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    print(f"training-step benchmark on {device}, patch {tuple(args.patch)}, batch 2 labelled + 2 unlabelled")
    header = f"{'method':14s} {'it/s':>8s} {'s/it':>8s} {'peak MiB':>10s}"
    print(header + ("  projected run" if args.iterations else ""))
    for name in args.methods:
        method = build_method(name, {}, 1000).to(device)
        method.train(True)
        optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
        image = torch.randn(4, 1, *args.patch, device=device)
        label = (torch.rand(4, *args.patch, device=device) > 0.7).long()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = method.training_step(Batch(image, label, 2), step).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            method.after_optimizer_step(step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        per_it = float(np.median(times))
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        line = f"{name:14s} {1 / per_it:8.3f} {per_it:8.3f} {peak:10.0f}"
        if args.iterations:
            line += f"  {args.iterations * per_it / 60:.1f} min for {args.iterations} iterations"
        print(line)
    if device.type == "cpu":
        print("(CPU peak = process max RSS, cumulative over the methods above)")
    return 0
