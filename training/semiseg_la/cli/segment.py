"""`semiseg-la segment IN -o OUT`: a label map on the input's exact grid."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..errors import InputError
from ..inference.predictor import Predictor
from ..io.validate import validate_image
from ..io.volume import read_volume, write_volume
from ..progress import ProgressReporter
from .common import add_device_flag, add_progress_flag, inference_spec, load_catalog_model, reporter_for


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment the left atrium in a scan (NRRD, NIfTI, MHA, DICOM folder)")
    p.add_argument("input", help="image file or DICOM series folder")
    p.add_argument("-o", "--output", required=True, help="label map to write (.nrrd, .nii.gz, .mha)")
    p.add_argument("--model", default=None, help="catalog id or model folder (default: the catalog's default)")
    add_device_flag(p)
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1) (default 0.5)")
    p.add_argument("--mode", choices=("fast", "sliding"), default="fast",
                   help="fast: one whole-volume window when it fits (default); sliding: training-size windows")
    p.add_argument("--legacy", action="store_true",
                   help="the LA papers' procedure: stride 18/18/4 windows, uniform averaging (slow; comparison)")
    p.add_argument("--sw-batch-size", type=int, default=2, help="windows per network pass")
    p.add_argument("--roi", type=int, nargs=6, metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                   help="segment only this voxel box of the input (upper bounds exclusive)")
    p.add_argument("--probabilities", default=None, help="also write the foreground probability map here")
    p.add_argument("--no-largest-component", action="store_true", help="keep every connected component")
    add_progress_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    reporter = reporter_for(args)
    t0 = time.perf_counter()
    check_output_path(args.output)
    if not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap {args.overlap} must be in [0, 1)")
    reporter.start("load", 1)
    image = read_volume(args.input)
    validate_image(image)
    reporter.update(1)
    load_s = time.perf_counter() - t0
    network, card, model_id = load_catalog_model(args.model)
    spec = inference_spec(card)
    roi = check_roi(args.roi, image.shape) if args.roi else None
    prediction, device, fell_back = predict_with_fallback(network, spec, image, args, roi, reporter)
    t_write = time.perf_counter()
    reporter.start("write", 1)
    write_volume(prediction.label, args.output)
    if args.probabilities and prediction.probability is not None:
        write_volume(prediction.probability, args.probabilities)
    reporter.update(1)
    reporter.end()
    timings = {"load_s": round(load_s, 3), **{k: round(v, 3) for k, v in prediction.timings.items()},
               "write_s": round(time.perf_counter() - t_write, 3), "total_s": round(time.perf_counter() - t0, 3)}
    reporter.log(f"wrote {args.output} ({int(prediction.label.array.sum())} LA voxels, {timings['total_s']} s)")
    reporter.done(output=str(Path(args.output).resolve()), model=model_id, device=device,
                  fell_back_to_cpu=fell_back, voxels=int(prediction.label.array.sum()), timings=timings)
    return 0


def predict_with_fallback(network, spec, image, args, roi, reporter: ProgressReporter):
    """Run on the chosen device; on CUDA out-of-memory move accumulation to the CPU, then run on the CPU."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    attempts = [dict(device=device, accumulate_on_cpu=False)]
    if device != "cpu" and torch.cuda.is_available():
        attempts += [dict(device="cuda", accumulate_on_cpu=True), dict(device="cpu", accumulate_on_cpu=False)]
    for i, attempt in enumerate(attempts):
        try:
            predictor = make_predictor(network, spec, args, **attempt)
            prediction = predictor.predict(image, roi=roi, want_probability=bool(args.probabilities),
                                           reporter=reporter)
            return prediction, prediction.device.split(":")[0], attempt["device"] == "cpu" and i > 0
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if i + 1 == len(attempts):
                raise
            nxt = attempts[i + 1]
            reporter.log("CUDA out of memory: " + ("retrying with accumulation on the CPU"
                                                   if nxt["device"] == "cuda" else "retrying on the CPU"))
    raise AssertionError("unreachable")


def make_predictor(network, spec, args, device: str, accumulate_on_cpu: bool) -> Predictor:
    mode = "legacy" if getattr(args, "legacy", False) else getattr(args, "mode", "fast")
    return Predictor(network, spec, device=device, overlap=args.overlap, mode=mode,
                     sw_batch_size=args.sw_batch_size, largest_component=not args.no_largest_component,
                     accumulate_on_cpu=accumulate_on_cpu)


def check_output_path(path: str) -> None:
    suffixes = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
    if not str(path).lower().endswith(suffixes):
        raise InputError(f"{path}: unknown output format; use one of {', '.join(suffixes)}")


def check_roi(roi, shape) -> Optional[Dict[str, Any]]:
    lower, upper = roi[:3], roi[3:]
    if any(lo < 0 or hi > s or lo >= hi for lo, hi, s in zip(lower, upper, shape)):
        raise InputError(f"--roi {roi} is outside the image of size {tuple(shape)} or empty")
    return list(roi)
