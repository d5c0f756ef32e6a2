"""`semiseg-la evaluate`: segment labelled cases with a model and score them in both conventions."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict

from ..inference.predictor import Predictor, combine_networks
from ..io.atomic import atomic_write_text
from ..io.datasets import open_dataset
from ..io.volume import write_volume
from ..metrics import METRIC_DEFINITIONS, evaluate_case, format_table, summarize
from ..progress import ProgressReporter
from .common import (
    add_device_flag,
    add_progress_flag,
    add_tta_flag,
    inference_spec,
    load_catalog_model,
    region_settler,
    reporter_for,
    tta_choice,
)
from .segment import label_as_segment_gives


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a model on labelled cases (Dice, Jaccard, HD95, ASD; mm + legacy)")
    p.add_argument("--model", default=None, help="catalog id or model folder (default: the catalog's default)")
    p.add_argument("--data", required=True, help="LA h5 root, nnU-Net-style folder, or images/ + labels/ folder")
    p.add_argument("--list", dest="case_list", default=None, help="case list file (e.g. a validation list)")
    p.add_argument("--json", dest="json_out", default=None, help="write per-case and mean metrics here")
    p.add_argument("--predictions", default=None, help="also write each predicted label map into this folder")
    p.add_argument("--legacy", action="store_true", help="LA papers' inference (stride 18/18/4, uniform)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--postprocess", choices=("auto", "largest", "none"), default="auto",
                   help="keep the largest connected component (largest) or every voxel (none); auto: none with "
                        "--legacy, as the LA papers evaluate (CAML and MC-Net nms=0, CRLN post-processing off), "
                        "largest otherwise, as `segment` does")
    p.add_argument("--region", choices=("auto", "whole"), default="auto",
                   help="auto (default): a whole scan is segmented where `segment --region auto` segments it (the "
                        "localiser's region, settled on a first pass; a scan where no plausible atrium is found "
                        "scores as an empty label), so the figures are those of what `segment` writes; whole: "
                        "the whole volume. An image no larger than an atrium crop is segmented whole either way")
    add_tta_flag(p)
    add_device_flag(p)
    add_progress_flag(p)
    p.set_defaults(handler=run)


def postprocessing(args: argparse.Namespace) -> str:
    """"largest" or "none": the papers' legacy evaluation keeps every voxel; `segment` keeps the largest."""
    if args.postprocess != "auto":
        return args.postprocess
    return "none" if args.legacy else "largest"


def run(args: argparse.Namespace) -> int:
    reporter = reporter_for(args)
    network, card, model_id = load_catalog_model(args.model)
    postprocess = postprocessing(args)
    tta = tta_choice(args)
    predictor = Predictor(combine_networks(network, tta=tta), inference_spec(card), device=args.device,
                          overlap=args.overlap, mode="legacy" if args.legacy else "fast",
                          largest_component=postprocess == "largest")
    records = [r for r in open_dataset(args.data, args.case_list) if r.label_path is not None]
    segment = AsSegmentGives(predictor, network, card, args, reporter) if args.region == "auto" else None
    cases: Dict[str, Dict[str, Any]] = {}
    regions: Dict[str, Any] = {}
    reporter.start("evaluate", len(records), f"model {model_id}")
    for i, record in enumerate(records, 1):
        image, label = record.load()
        if segment is not None:
            predicted, regions[record.case_id] = segment(image, record.case_id)
        else:
            predicted = predictor.predict(image).label.array
        if args.predictions:
            write_volume(image.with_array(predicted), Path(args.predictions) / f"{record.case_id}.nrrd")
        cases[record.case_id] = _plain(evaluate_case(predicted, label.array, image.spacing))
        reporter.update(i, dice=round(cases[record.case_id]["dice"], 4))
    reporter.end()
    summary = summarize(cases)
    report = {"model": model_id, "data": str(args.data), "list": args.case_list, "n_cases": len(cases),
              "inference": "legacy" if args.legacy else "fast", "tta": tta, "postprocess": postprocess,
              "region": args.region, "mean": summary["mean"], "std": summary["std"],
              "summary": summary, "definitions": METRIC_DEFINITIONS, "cases": cases,
              **({"regions": regions} if segment is not None else {})}
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(_finite(report), indent=2) + "\n")
    out = sys.stdout if args.progress != "json" else sys.stderr
    print(f"inference: {report['inference']}; region: {args.region}; test-time augmentation: {tta}; post-processing: "
          + ("largest connected component" if postprocess == "largest" else "none (every predicted voxel)"), file=out)
    print(format_table(summary), file=out)
    reporter.done(json=args.json_out, mean=_finite(summary["mean"]), n_cases=len(cases))
    return 0


class AsSegmentGives:
    """A scan's label as `segment --region auto` gives it, with the same first pass settling the region: a site
    fine-tune's ancestor (`region_settler`), else the model's own single pass when test-time flips are on.
    Called with a scan: (label array, its region record: box, source, first-pass agreement; None when no
    plausible atrium was found)."""

    def __init__(self, predictor: Predictor, network, card, args: argparse.Namespace,
                 reporter: ProgressReporter) -> None:
        self.predictor, self.spec, self.device, self.reporter = predictor, inference_spec(card), args.device, reporter
        settler = region_settler(card)
        if settler is not None:
            reporter.log(f"region: settled on the first pass of {settler[2]}, the model this one was fine-tuned "
                         "from, as `segment` settles it")
            self.scout = self._like(predictor, settler[0], inference_spec(settler[1]))
        elif predictor.network is not network:  # with flips: a one-pass first look, as `segment` takes
            self.scout = self._like(predictor, network, self.spec)
        else:
            self.scout = None
        self.localisers: Dict[str, Any] = {}  # loaded once for every scan

    @staticmethod
    def _like(predictor: Predictor, network, spec) -> Predictor:
        return Predictor(network, spec, device=predictor.device, overlap=predictor.overlap, mode=predictor.mode,
                         largest_component=predictor.largest_component)

    def __call__(self, image, case_id: str):
        def in_box(predictor: Predictor):
            return lambda box: predictor.predict(image, roi=box)

        label, region = label_as_segment_gives(image, self.spec, in_box(self.predictor), self.device,
                                               self.localisers, case_id, self.reporter,
                                               in_box(self.scout) if self.scout is not None else None)
        record = None if region is None else {"source": region.source, "box": list(region.box),
                                              "scout_agreement": region.scout_agreement}
        return label, record


def _plain(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (bool(v) if isinstance(v, bool) else float(v)) for k, v in metrics.items()}


def _finite(obj: Any) -> Any:
    """JSON has no NaN: undefined distances (empty masks) are written as null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
