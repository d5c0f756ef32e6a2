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
from pathlib import Path
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
    tr.add_argument("--presets", nargs="+", default=None,
                    help="measure these presets instead (their method, parameters, patch and batch) and project "
                         "every preset's full run from the matching measurement")
    tr.add_argument("--patch", type=int, nargs=3, default=None, help="patch (default 112 112 80; with --presets, "
                    "the preset's own)")
    tr.add_argument("--steps", type=int, default=3, help="timed steps (at least this many)")
    tr.add_argument("--seconds", type=float, default=None, help="time box per method: timed steps until it is spent")
    tr.add_argument("--warmup", type=int, default=1)
    tr.add_argument("--iterations", type=int, default=None, help="project a full run of this many iterations")
    tr.add_argument("--json", dest="json_out", default=None, help="write the figures here as JSON")
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
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    jobs = _preset_jobs(args) if args.presets else [
        {"label": name, "method": name, "params": {}, "patch": list(args.patch or (112, 112, 80)),
         "batch_size": 4, "labeled_bs": 2, "max_iterations": args.iterations} for name in args.methods]
    what = "presets" if args.presets else "methods"
    print(f"training-step benchmark on {device} ({what}; batch and patch per row)")
    header = f"{'preset' if args.presets else 'method':20s} {'patch':>12s} {'it/s':>8s} {'s/it':>8s} {'peak MiB':>10s}"
    print(header + "  projected run")
    rows = []
    for job in jobs:
        try:
            row = _measure(job, device, args)
        except RuntimeError as exc:  # e.g. CUDA out of memory: one row fails, the others are still measured
            row = {**_describe(job), "error": " ".join(str(exc).split())[:300]}
            print(f"{job['label']:20s} failed: {row['error']}")
        else:
            print(f"{job['label']:20s} {'x'.join(map(str, job['patch'])):>12s} {row['it_per_s']:8.3f} "
                  f"{row['s_per_it']:8.3f} {row['peak_mib']:10.0f}  {_projection_text(row)}")
        rows.append(row)
        _release(device)
    if device.type == "cpu":
        print("(CPU peak = process max RSS, cumulative over the rows above)")
    projections = _project_presets(rows) if args.presets else []
    for item in projections:
        if item["measured_as"] != item["preset"]:
            print(f"{item['preset']:20s} projected {item['projected_min']:.1f} min for {item['max_iterations']} "
                  f"iterations (from {item['measured_as']})")
    if args.json_out:
        from ..engine.precision import device_name

        report = {"device": str(device), "device_name": device_name(str(device)), "torch": torch.__version__,
                  "autocast": "bfloat16" if device.type == "cuda" else None, "seconds": args.seconds,
                  "rows": rows, "projections": projections}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _preset_jobs(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from ..engine.config import load_preset

    jobs = []
    for name in args.presets:
        preset = load_preset(name)
        patch = list(args.patch or preset.get("patch_size", (112, 112, 80)))
        params = {"in_channels": int(preset.get("in_channels", 1)), **(preset.get("method_params") or {})}
        if "patch_size" in params:  # CRLN's DIM grid follows the patch
            params["patch_size"] = list(patch)
        jobs.append({"label": name, "preset": name, "method": preset.get("method", "supervised"), "params": params,
                     "patch": patch, "batch_size": int(preset.get("batch_size", 4)),
                     "labeled_bs": int(preset.get("labeled_bs", 2)),
                     "max_iterations": args.iterations or int(preset.get("max_iterations", 6000))})
    return jobs


def _describe(job: Dict[str, Any]) -> Dict[str, Any]:
    return {"label": job["label"], "preset": job.get("preset"), "method": job["method"], "patch": job["patch"],
            "batch_size": job["batch_size"], "labeled_bs": job["labeled_bs"], "max_iterations": job["max_iterations"]}


def _measure(job: Dict[str, Any], device: torch.device, args: argparse.Namespace) -> Dict[str, Any]:
    from ..methods import Batch, build_method

    method = build_method(job["method"], job["params"], job["max_iterations"] or 1000).to(device)
    method.train(True)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    n, patch = job["batch_size"], job["patch"]
    channels = int(job["params"].get("in_channels", 1))
    image = torch.randn(n, channels, *patch, device=device)
    label = (torch.rand(n, *patch, device=device) > 0.7).long()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times: List[float] = []
    started = None
    step = 0
    while True:
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = method.training_step(Batch(image, label, job["labeled_bs"]), step).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step += 1
        if step <= args.warmup:
            continue
        times.append(time.perf_counter() - t0)
        started = started or t0
        spent = time.perf_counter() - started
        if len(times) >= args.steps and (args.seconds is None or spent >= args.seconds):
            break
    per_it = float(np.median(times))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    row = {**_describe(job), "steps": len(times), "s_per_it": per_it, "it_per_s": 1.0 / per_it,
           "s_per_it_mean": float(np.mean(times)), "peak_mib": float(peak), "loss_finite": bool(torch.isfinite(loss))}
    if job["max_iterations"]:
        row["projected_min"] = job["max_iterations"] * per_it / 60
    del method, optimizer, image, label, loss
    return row


def _projection_text(row: Dict[str, Any]) -> str:
    if "projected_min" not in row:
        return ""
    return f"{row['projected_min']:.1f} min for {row['max_iterations']} iterations"


def _project_presets(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every training preset's full run (its max_iterations) from the row of the same method, patch and batch
    (the preset's own row when it was measured). Validation time is not included."""
    from ..engine.config import load_preset, preset_names

    measured = [r for r in rows if "s_per_it" in r]
    out = []
    for name in preset_names():
        preset = load_preset(name)
        key = (preset.get("method", "supervised"), list(preset.get("patch_size", (112, 112, 80))),
               int(preset.get("batch_size", 4)))
        match = next((r for r in measured if r.get("preset") == name), None) or next(
            (r for r in measured if (r["method"], list(r["patch"]), r["batch_size"]) == key), None)
        if match is None:
            continue
        iterations = int(preset.get("max_iterations", 6000))
        out.append({"preset": name, "measured_as": match["label"], "max_iterations": iterations,
                    "s_per_it": match["s_per_it"], "projected_min": iterations * match["s_per_it"] / 60})
    return out


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
