"""`semiseg-la evaluate`: segment labelled cases with a model and score them in both conventions."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..errors import InputError
from ..inference.predictor import Predictor, combine_networks
from ..io.atomic import atomic_write_text
from ..io.datasets import open_dataset
from ..io.volume import write_volume
from ..metrics import METRIC_DEFINITIONS, evaluate_case, format_table, paired_interval, summarize
from ..progress import ProgressReporter
from .common import (
    add_device_flag,
    add_progress_flag,
    add_tta_flag,
    card_get,
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
    p.add_argument("--against", default=None, metavar="MODEL",
                   help="also score this model (a catalog id or folder, or `parent`: the model --model was "
                        "fine-tuned from) on the same cases and print the two side by side, per case, with the mean "
                        "difference and its paired 95 %% interval")
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
    postprocess, tta = postprocessing(args), tta_choice(args)
    scorers = [ModelScorer(args.model, args, postprocess, tta, reporter)]
    if args.against:
        scorers.append(ModelScorer(against_model(args.against, scorers[0]), args, postprocess, tta, reporter))
    records = [r for r in open_dataset(args.data, args.case_list) if r.label_path is not None]
    # --predictions: the model's labels in that folder, the other model's in a folder of its id inside it
    folders = [Path(args.predictions), Path(args.predictions) / scorers[-1].model_id] if args.predictions else []
    reporter.start("evaluate", len(records), " and ".join(f"model {s.model_id}" for s in scorers))
    for i, record in enumerate(records, 1):
        image, label = record.load()
        for scorer, folder in zip(scorers, folders or [None] * len(scorers)):
            scorer.score(image, label, record.case_id, folder)
        reporter.update(i, dice=round(scorers[0].cases[record.case_id]["dice"], 4))
    reporter.end()
    report = scorers[0].report(args, tta, postprocess)
    if len(scorers) > 1:
        report["against"] = scorers[1].report(args, tta, postprocess)
        report["paired"] = paired_dice(scorers[0], scorers[1])
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(_finite(report), indent=2) + "\n")
    out = sys.stdout if args.progress != "json" else sys.stderr
    print(f"inference: {report['inference']}; region: {args.region}; test-time augmentation: {tta}; post-processing: "
          + ("largest connected component" if postprocess == "largest" else "none (every predicted voxel)"), file=out)
    print(format_table(report["summary"]), file=out)
    if len(scorers) > 1:
        print(paired_table(report["paired"], scorers[0].model_id, scorers[1].model_id), file=out)
    reporter.done(json=args.json_out, mean=_finite(report["mean"]), n_cases=report["n_cases"],
                  **({"paired": _finite(report["paired"])} if len(scorers) > 1 else {}))
    return 0


def against_model(against: str, scorer: ModelScorer) -> str:
    """`--against parent`: the model this one was fine-tuned from, as its card records it; else a model id."""
    if against != "parent":
        return against
    parent = (card_get(scorer.card, "lineage") or {}).get("parent")
    if not parent:
        raise InputError(f"--against parent: {scorer.model_id} has no parent in its lineage; name the model to "
                         "compare it with")
    return str(parent)


class ModelScorer:
    """One model as `evaluate` runs it (`segment`'s flips, post-processing and, with `--region auto`, region), and
    the metrics of each case it scored."""

    def __init__(self, model: Optional[str], args: argparse.Namespace, postprocess: str, tta: str,
                 reporter: ProgressReporter) -> None:
        network, self.card, self.model_id = load_catalog_model(model)
        self.predictor = Predictor(combine_networks(network, tta=tta), inference_spec(self.card), device=args.device,
                                   overlap=args.overlap, mode="legacy" if args.legacy else "fast",
                                   largest_component=postprocess == "largest")
        self.segment = (AsSegmentGives(self.predictor, network, self.card, args, reporter)
                        if args.region == "auto" else None)
        self.cases: Dict[str, Dict[str, Any]] = {}
        self.regions: Dict[str, Any] = {}

    def score(self, image, label, case_id: str, predictions: Optional[Path]) -> None:
        if self.segment is not None:
            predicted, self.regions[case_id] = self.segment(image, case_id)
        else:
            predicted = self.predictor.predict(image).label.array
        if predictions:
            write_volume(image.with_array(predicted), predictions / f"{case_id}.nrrd")
        self.cases[case_id] = _plain(evaluate_case(predicted, label.array, image.spacing))

    def report(self, args: argparse.Namespace, tta: str, postprocess: str) -> Dict[str, Any]:
        summary = summarize(self.cases)
        return {"model": self.model_id, "data": str(args.data), "list": args.case_list, "n_cases": len(self.cases),
                "inference": "legacy" if args.legacy else "fast", "tta": tta, "postprocess": postprocess,
                "region": args.region, "mean": summary["mean"], "std": summary["std"],
                "summary": summary, "definitions": METRIC_DEFINITIONS, "cases": self.cases,
                **({"regions": self.regions} if self.segment is not None else {})}


def paired_dice(model: ModelScorer, against: ModelScorer) -> Dict[str, Any]:
    """The two models' Dice on the same cases: the mean difference, its paired bootstrap interval, and the cases
    each does better on (a few cases are little evidence: the interval says how little)."""
    cases = list(model.cases)
    if not cases:
        return {"n_cases": 0}
    diffs = np.array([model.cases[c]["dice"] - against.cases[c]["dice"] for c in cases], dtype=float)
    low, high = paired_interval(diffs)
    return {"n_cases": len(cases), "dice_difference": float(diffs.mean()), "interval_95": [low, high],
            "better": int((diffs > 0).sum()), "worse": int((diffs < 0).sum()),
            "cases": {c: {"dice": model.cases[c]["dice"], "against_dice": against.cases[c]["dice"],
                          "difference": float(d)} for c, d in zip(cases, diffs)}}


def paired_table(paired: Dict[str, Any], model_id: str, against_id: str) -> str:
    """Per case and overall, in Dice points: what the user reads to choose between the two."""
    if not paired.get("n_cases"):
        return f"{model_id} against {against_id}: no case to compare"
    width = max(len(c) for c in paired["cases"])
    lines = [f"{'case':<{width}}  {'Dice':>7}  {'against':>7}  {'difference':>10}"]
    for case, row in paired["cases"].items():
        lines.append(f"{case:<{width}}  {100 * row['dice']:7.2f}  {100 * row['against_dice']:7.2f}  "
                     f"{100 * row['difference']:+10.2f}")
    low, high = paired["interval_95"]
    lines.append(f"{model_id} against {against_id}: {100 * paired['dice_difference']:+.2f} Dice points on average "
                 f"(better on {paired['better']}, worse on {paired['worse']} of {paired['n_cases']} cases; paired "
                 f"95 % interval {100 * low:+.2f} to {100 * high:+.2f})")
    return "\n".join(lines)


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
