"""What the loader thread (`prefetch`) saves per training step, side by side in one run.

Trains the same short run twice on synthetic LA-sized cases, without and with `prefetch`, and prints the
seconds per iteration of each, their ratio, and the host batch time alone (crops, augmentation, simulated
sites, wide-FOV canvases), which is what the thread can hide behind the step:

    python bench/bench_loader.py [--device cpu|cuda] [--iterations 20] [--site-shift 0.5] [--wide-fov 0.0]
        [--on-canvas] [--workers N]

`--workers N` also times the step with N loader processes (`loader_workers`), which draw other batches
(each its own seed) than the thread, of the same kind.

On a CPU the thread and the step share the cores, so the saving is at most the host time and can be
negative; on a GPU the step runs on the device and the host time can be hidden entirely.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from semiseg_la.engine.config import build_config
from semiseg_la.engine.data import TrainCase
from semiseg_la.engine.loop import Trainer


def la_sized_cases(count: int, shape=(112, 112, 72), seed: int = 0):
    """Bright ellipsoids in noise, about the size of an LA crop at 1.25 mm (z-scored like training cases)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    cases = []
    for i in range(count):
        centre = [s / 2 + rng.uniform(-8, 8) for s in shape]
        dist = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, (22, 20, 16))))
        label = (dist < 1).astype(np.uint8)
        image = label * 1.5 + rng.normal(0, 0.5, shape)
        image = (image - image.mean()) / image.std()
        cases.append(TrainCase(f"case{i}", image[None].astype(np.float32), label))
    return cases


def bench_config(args: argparse.Namespace, cases, output: Path, **extra):
    """Supervised, batch 4 x 64x64x48 at 1.25 mm, the host pipeline the command line asks for."""
    return build_config({
        "method": "supervised", "data": "synthetic", "patch_size": [64, 64, 48], "spacing": [1.25] * 3,
        "batch_size": 4, "labeled_bs": 4, "labeled_num": len(cases), "val_num": 0, "validate_every": 0,
        "checkpoint_every": 10 ** 6, "seed": 1, "site_shift_prob": args.site_shift, "wide_fov_prob": args.wide_fov,
        "site_shift_on_canvas": args.on_canvas, "output": str(output), **extra})


def run_once(prefetch: bool, args: argparse.Namespace, cases, work: Path, workers: int = 0) -> float:
    trainer = Trainer(bench_config(args, cases, work / f"prefetch-{prefetch}-{workers}", device=args.device,
                                   prefetch=prefetch, loader_workers=workers, max_iterations=args.iterations + 2),
                      cases, [])
    for _ in range(2):  # warm-up: the first steps allocate
        trainer.train_step()
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.iterations):
        trainer.train_step()
    synchronize(args.device)
    seconds = (time.perf_counter() - start) / args.iterations
    if trainer.loader is not None:
        trainer.loader.close()
    return seconds


def host_batch_seconds(args: argparse.Namespace, cases, work: Path, repeats: int = 5) -> float:
    trainer = Trainer(bench_config(args, cases, work / "host", device="cpu"), cases, [])
    start = time.perf_counter()
    for _ in range(repeats):
        trainer._make_host_batch()
    return (time.perf_counter() - start) / repeats


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--site-shift", type=float, default=0.5, help="site_shift_prob of the runs")
    parser.add_argument("--wide-fov", type=float, default=0.0, help="wide_fov_prob of the runs")
    parser.add_argument("--on-canvas", action="store_true",
                        help="site_shift_on_canvas: the site acquires the whole-scan canvas, not the crop")
    parser.add_argument("--workers", type=int, default=0, help="also time N loader processes (0: not timed)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = la_sized_cases(args.cases)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        work = Path(tmp)
        host = host_batch_seconds(args, cases, work)
        plain = run_once(False, args, cases, work)
        prefetched = run_once(True, args, cases, work)
        processes = run_once(False, args, cases, work, args.workers) if args.workers else None
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch 4 x 64x64x48, "
          f"site_shift_prob {args.site_shift:g}{' on the canvas' if args.on_canvas else ''}, wide_fov_prob "
          f"{args.wide_fov:g}, {args.iterations} iterations each")
    print(f"host batch alone:  {host:.3f} s")
    print(f"step, no prefetch: {plain:.3f} s/it")
    print(f"step, prefetch:    {prefetched:.3f} s/it")
    print(f"prefetch / plain:  {prefetched / plain:.2f}x (host share of a plain step {host / plain:.0%})")
    if processes is not None:
        print(f"step, {args.workers} processes: {processes:.3f} s/it ({processes / plain:.2f}x plain)")
    if args.json:
        figures = {"device": args.device, "host_batch_s": host, "plain_s_per_it": plain,
                   "prefetch_s_per_it": prefetched, "ratio": prefetched / plain, "iterations": args.iterations,
                   "site_shift_prob": args.site_shift, "wide_fov_prob": args.wide_fov,
                   "site_shift_on_canvas": args.on_canvas, "workers": args.workers, "workers_s_per_it": processes}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
