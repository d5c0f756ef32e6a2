"""Does "Fine-tune semi-supervised" adapt a model to a new site? Side by side, at one CPU time budget.

A simulated site (`semiseg_la.preprocess.site_shift`) acquires the first cases of train.list: 4 labelled
and 12 unlabelled site scans. The base model is scored on the validation cases (the last 8 of train.list,
never trained on) as the site would acquire them, and unshifted. Then each fine-tune runs through the real
CLI (`semiseg-la finetune`, one child process each, one after the other, with the same time budget) and
its model is scored the same way:

    python bench/bench_finetune.py --data ../shared/data/LA --shift scanner [--strength 1] [--budget 600] \
        [--methods default supervised caml crln semicml-la] [--tta flip|mirror|none] [--json out.json] [--work DIR] \
        [--whole 448 [--fixed-region [MM ...]]]

With `--whole VOXELS` every scan is what a clinician brings instead of the benchmark's atrium-centred crop: the
crop inside a whole-scan canvas (VOXELS x VOXELS in-plane at 0.625 mm, the crop's slices) tiled with the tissue
of other training cases (preprocess/wide_fov.py; the 12 after the default site's 16 whatever the site's size, so that
every run scores the same canvases), then acquired by the site. The fine-tunes get those files;
the scored cases go through `semiseg-la segment` as a user runs it (`--region auto`: the localiser finds the
atrium, the model segments its region), and are scored on the whole canvas. `--fixed-region` also scores each
model in one region per case, the atrium's box + 15 mm drawn from the reference label: a shifted whole scan's
Dice moves by several points with a few millimetres of region (docs/results.md), and `--region auto` settles
each model's region on its own first pass, so the auto figures mix what a fine-tune changed in the network with
where its region settled; the fixed-region figures hold the region still. With several margins
(`--fixed-region 10 15 20 25`) each model is scored in each, and the mean per-case spread (highest minus lowest
Dice over the margins) says how much the region alone moves a case. `--methods` with no name scores the base
only. With `--score-unlabeled` the base and each fine-tuned model are also scored on the site's unlabelled scans
(their reference labels are known here, never to the fine-tune), listed beside the Dice between the child's and
the parent's labels that the fine-tune's card records: are the scans where the two disagree most, which the
Slicer module names after a fine-tune, the ones the fine-tune changed, and for better or worse? Each whole scan
scored through `--region auto` also records its `scout_agreement` (the figure `segment` warns on, None where it
has none); `bench/pool_scout_agreement.py` reads those over runs.

Columns: iterations run, seconds per iteration (measured by the run's own budget plan), wall time of the
command, Dice on shifted validation cases, the share of the Dice lost to the shift that the fine-tune
recovers, Dice on unshifted validation cases (what the site did not ask to lose) and the guard rail's
verdict on the held-out site case.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from semiseg_la.checkpoints import ModelCard, load_network, resolve_model, validation_model_id
from semiseg_la.cli.common import inference_spec
from semiseg_la.cli.main import main as cli
from semiseg_la.engine.data import label_roi
from semiseg_la.errors import RegionError
from semiseg_la.inference.predictor import Predictor, combine_networks
from semiseg_la.io import read_volume, write_volume
from semiseg_la.io.atomic import atomic_write_text
from semiseg_la.io.datasets import open_dataset
from semiseg_la.io.volume import Volume
from semiseg_la.metrics import dice, paired_interval
from semiseg_la.preprocess.site_shift import SiteShift, shift_families
from semiseg_la.preprocess.wide_fov import REGION_MARGIN_MM, build_wide_case, make_donor, patch_mm

#: tissue donors of the whole-scan canvases: the train.list cases after the default site's (neither site nor scored)
WHOLE_DONORS = 12
#: the default site's size (4 labelled + 12 unlabelled): the donors start after it, whatever the run's site
DEFAULT_SITE = 16

#: method name on the command line -> the finetune preset it runs ("default" is what Slicer runs)
PRESETS = {"default": "finetune", "supervised": "finetune-supervised", "caml": "finetune-caml",
           "crln": "finetune-crln", "semicml-la": "finetune-semicml-la", "adapter": "finetune-site-adapter"}
#: the unlabelled scans of lowest agreement that the Slicer module names after a fine-tune
LOWEST_NAMED = 3
#: per scored case, the Dice between the first pass that settled its whole-scan region and the label scored
SCOUT_KEYS = ("unshifted_scout_agreement", "shifted_scout_agreement")
STEP_RE = re.compile(r"([0-9.]+) s per iteration")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # a folder, so that the fine-tunes, which run with the work folder's own catalog, find a model of the user's
    args.model = str(resolve_model(args.model or validation_model_id()))
    shift = SiteShift(args.shift, args.strength, args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-finetune-"))
    records = [r for r in open_dataset(args.data, "train.list") if r.label_path]
    site, validation = records[:args.labeled + args.unlabeled], records[-args.val:]
    donors = whole_scan_donors(records, len(site), args.val) if args.whole else []
    acquire = WholeScans(donors, args.whole) if args.whole else None
    site_dir, unlabeled_dir = write_site(work, site, args.labeled, shift, acquire)
    cases = [acquire(record, 1000 + i) if acquire else record.load() for i, record in enumerate(validation)]
    shifted = [(shift.apply(image, 1000 + i), label) for i, (image, label) in enumerate(cases)]
    scorer = WholeScanScorer(work / "scoring", args.tta, args.fixed_region or (), args.device) if acquire else None
    base = score_model(args.model, cases, shifted, args.tta, scorer, args.device)
    rows: List[Dict] = []
    save = partial(write_json, args, shift, validation, base, rows, donors)
    save()
    print(f"site: {shift.describe()}; {args.labeled} labelled + {args.unlabeled} unlabelled site "
          f"{f'whole scans ({args.whole} x {args.whole} in-plane)' if acquire else 'scans'}; "
          f"{len(cases)} validation cases scored with --tta {args.tta}; budget {args.budget:g} s; "
          f"torch threads {torch_threads()}"
          + (f"; --set {' '.join(args.overrides)}" if args.overrides else ""))
    print(f"base model {base['model']}: Dice {base['unshifted']:.4f} unshifted, {base['shifted']:.4f} at the site "
          f"(shift costs {100 * (base['unshifted'] - base['shifted']):.2f} points)", flush=True)
    for margin, fixed in base.get("fixed_regions", {}).items():
        print(f"  in the label's box + {margin} mm: {fixed['unshifted']:.4f} unshifted, {fixed['shifted']:.4f} at "
              "the site", flush=True)
    if "region_spread" in base:
        print(format_spread(base["region_spread"]), flush=True)
    print(f"{'fine-tune':12s} {'iters':>5s} {'s/it':>5s} {'wall s':>6s} {'site Dice':>9s} {'recovered':>9s} "
          f"{'unshifted':>9s} {'d unshift':>9s}  guard", flush=True)
    for method in args.methods:
        run = run_finetune(method, args, work, site_dir, unlabeled_dir)
        if run.get("error"):
            rows.append({"method": method, **run})
            print(f"{method:12s} FAILED: {run['error']}", flush=True)
            save()
            continue
        scores = score_model(run["model_dir"], cases, shifted, args.tta, scorer, args.device)
        lost = base["unshifted"] - base["shifted"]
        recovered = (scores["shifted"] - base["shifted"]) / lost if lost > 0 else float("nan")
        row = {"method": method, **run, "shifted": scores["shifted"], "unshifted": scores["unshifted"],
               "recovered": recovered, "unshifted_change": scores["unshifted"] - base["unshifted"],
               "shifted_cases": scores["shifted_cases"], "unshifted_cases": scores["unshifted_cases"]}
        row.update({k: scores[k] for k in ("fixed_regions", "region_spread", *SCOUT_KEYS) if k in scores})
        if args.score_unlabeled:  # the base once, with the first fine-tune, in one pass over the scans
            models = ([] if "unlabeled_cases" in base else [args.model]) + [run["model_dir"]]
            figures = score_unlabeled(models, unlabeled_site_scans(site, args.labeled, unlabeled_dir, acquire),
                                      args.tta, scorer, args.device)
            base.setdefault("unlabeled_cases", figures[0])
            row["unlabeled_cases"] = figures[-1]
        rows.append(row)
        save()
        print(format_row(row), flush=True)
        for margin, fixed in row.get("fixed_regions", {}).items():
            print(format_fixed(fixed, base["fixed_regions"][margin], margin), flush=True)
        if "region_spread" in row:
            print(format_spread(row["region_spread"]), flush=True)
        if "unlabeled_cases" in row:
            agreement = ((row.get("guard") or {}).get("agreement") or {}).get("cases")
            print("\n".join(format_unlabeled(base["unlabeled_cases"], row["unlabeled_cases"], agreement)), flush=True)
    print_summary(base, rows)
    return 0


def whole_scan_donors(records: Sequence, site_size: int, val: int) -> List:
    """The tissue donors of the whole-scan canvases: the WHOLE_DONORS cases after the default site, or after a larger
    site. The same cases whatever a smaller site's size, so that the scored canvases (built from them) are the same
    and runs with other site sizes compare; never a site or a scored case."""
    start = max(DEFAULT_SITE, site_size)
    if start + WHOLE_DONORS > len(records) - val:
        raise SystemExit(f"--whole needs {WHOLE_DONORS} tissue donors between the site's {site_size} cases and the "
                         f"{val} scored ones: train.list has {len(records)} labelled cases")
    return list(records[start:start + WHOLE_DONORS])


def write_json(args: argparse.Namespace, shift: SiteShift, validation, base: Dict, rows: List[Dict],
               donors: Sequence = ()) -> None:
    """Every figure so far into `--json`, rewritten after each fine-tune: a run stopped part-way keeps them."""
    if not args.json:
        return
    result = {"shift": shift.describe(), "family": args.shift, "strength": args.strength, "seed": args.seed,
              "budget_s": args.budget, "tta": args.tta, "labeled": args.labeled, "unlabeled": args.unlabeled,
              "whole": args.whole, "overrides": args.overrides, "device": args.device,
              "validation": [r.case_id for r in validation], "donors": [r.case_id for r in donors], "base": base,
              "runs": rows}
    atomic_write_text(Path(args.json), json.dumps(result, indent=2, default=float) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="LA h5 root with train.list")
    parser.add_argument("--model", default=None, help="the base model, catalog id or folder (default: the default's "
                        "validation run, never trained on the scored cases)")
    parser.add_argument("--shift", default="scanner", choices=shift_families())
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="the simulated site")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds per fine-tune (whole command)")
    parser.add_argument("--methods", nargs="*", default=list(PRESETS), choices=list(PRESETS),
                        help="the fine-tunes to run (default: all); none named: score the base model only")
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("--unlabeled", type=int, default=12)
    parser.add_argument("--val", type=int, default=8, help="the last N train.list cases (the base's validation)")
    parser.add_argument("--device", default="cpu", help="where the fine-tunes train and the models are scored")
    parser.add_argument("--tta", choices=("flip", "mirror", "none"), default="flip",
                        help="test-time augmentation when scoring (default flip: what `segment` writes by default)")
    parser.add_argument("--whole", type=int, default=0, metavar="VOXELS",
                        help="whole scans instead of crops: canvases of VOXELS x VOXELS in-plane (0.625 mm), scored "
                        "through `segment --region auto` (default 0: the crops)")
    parser.add_argument("--fixed-region", nargs="*", type=float, default=None, metavar="MM",
                        help="with --whole: also score every model in the label's box + MM a side (default 15, "
                        "`segment`'s margin: the region held still); several margins: each, and the per-case spread")
    parser.add_argument("--score-unlabeled", action="store_true",
                        help="also score the base and each fine-tuned model on the site's unlabelled scans (their "
                        "reference labels are known to this bench, not to the fine-tune), beside the card's agreement "
                        "between the child and its parent: are the scans where the two disagree most the ones the "
                        "fine-tune changed, and for better or worse?")
    parser.add_argument("--work", default=None, help="folder for the site data, runs and models (default: temp)")
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every fine-tune (e.g. --set base_lr=0.002)")
    args = parser.parse_args(argv)
    if args.fixed_region is not None and not args.whole:
        parser.error("--fixed-region scores whole scans in a fixed region: give --whole VOXELS too")
    if args.fixed_region == []:
        args.fixed_region = [REGION_MARGIN_MM]
    return args


class WholeScans:
    """A case as a whole scan: its crop inside a canvas tiled with the donors' tissue (seeded by the case)."""

    def __init__(self, donor_records, size: int) -> None:
        self.size, self.donors = size, []
        for i, record in enumerate(donor_records):
            image, label = record.load()
            self.donors.append(make_donor(np.asarray(image.array, np.float32), np.asarray(label.array) > 0,
                                          image.spacing, seed=i))

    def __call__(self, record, case_seed: int):
        image, label = record.load()
        shape = (max(self.size, image.shape[0]), max(self.size, image.shape[1]), image.shape[2])
        wide = build_wide_case(np.asarray(image.array, np.float32), np.asarray(label.array) > 0, self.donors, shape,
                               np.random.default_rng([7, case_seed]))
        origin = np.asarray(image.origin) - np.asarray(image.direction).reshape(3, 3) @ (
            np.asarray(image.spacing) * np.asarray(wide.offset))
        canvas = Volume(wide.image, image.spacing, tuple(origin), image.direction)
        return canvas, Volume(wide.label, image.spacing, tuple(origin), image.direction)


def write_site(work: Path, site, labeled: int, shift: SiteShift, acquire=None):
    """The site's scans as a clinician would bring them: NRRD files, labelled ones with a label map."""
    site_dir, unlabeled_dir = work / "site", work / "unlabeled"
    for sub in (site_dir / "images", site_dir / "labels", unlabeled_dir):
        sub.mkdir(parents=True, exist_ok=True)
    for i, record in enumerate(site):
        image, label = acquire(record, i) if acquire else record.load()
        moved = shift.apply(image, i)
        if i < labeled:
            write_volume(moved, site_dir / "images" / f"{record.case_id}.nrrd")
            write_volume(label, site_dir / "labels" / f"{record.case_id}.nrrd")
        else:
            write_volume(moved, unlabeled_dir / f"{record.case_id}.nrrd")
    return site_dir, unlabeled_dir


class WholeScanScorer:
    """Labels of whole scans as a user gets them: `semiseg-la segment --region auto`, in this process; with
    `margins`, also in the region `--region X0 .. Z1` of the atrium's box + each margin (mm; the same box for
    every model)."""

    def __init__(self, folder: Path, tta: str, margins: Sequence[float] = (), device: str = "cpu") -> None:
        self.folder, self.tta, self.margins = folder, tta, tuple(float(m) for m in margins)
        self.device = device
        #: the last automatic region's `scout_agreement` (what `segment` warns on), None when it had none
        self.scout_agreement: Optional[float] = None
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, model: str, image: Volume, region: Sequence[int] = ()) -> np.ndarray:
        source, output, roi = self.folder / "scan.nrrd", self.folder / "label.nrrd", self.folder / "roi.json"
        write_volume(image, source, compress=False)
        roi.unlink(missing_ok=True)
        self.scout_agreement = None
        messages = io.StringIO()
        with contextlib.redirect_stderr(messages):  # segment's lines for each scored scan stay out of the table
            code = cli(["segment", str(source), "-o", str(output), "--model", model, "--tta", self.tta, "--device",
                        self.device, "--progress", "none", "--roi-out", str(roi),
                        *(["--region", *map(str, region)] if region else [])])
        if code == RegionError.exit_code:  # what the user gets: no segmentation, scored as such
            print(f"segment with {model}: no plausible atrium found, scored as Dice 0", flush=True)
            return np.zeros(image.shape, np.uint8)
        if code != 0:
            raise RuntimeError(f"segment exited with {code} for model {model}: {messages.getvalue().strip()}")
        if roi.is_file():
            self.scout_agreement = json.loads(roi.read_text()).get("scout_agreement")
        return read_volume(output).array

    def fixed_region(self, model: str, label: Volume, margin: float = REGION_MARGIN_MM) -> List[int]:
        """The atrium's box + `margin` mm a side, at least the model's patch (`label_roi`, as a fine-tune cuts)."""
        spec = inference_spec(ModelCard.load(resolve_model(model)))  # the card alone: no weights read per case
        return label_roi(label, patch_mm(spec.patch_size, spec.spacing), [margin] * 6)


def case_scorer(model: str, tta: str, scorer=None, device: str = "cpu"):
    """`score(image, label)`: the Dice of `model`'s label as this bench scores it (a whole scan through `segment
    --region auto`, a crop with the predictor), and the model's id."""
    if scorer is not None:
        return (lambda image, label: dice(scorer(model, image), label.array)), model
    network, card = load_network(resolve_model(model))
    predictor = Predictor(combine_networks(network, tta=tta), inference_spec(card), device=device)
    return (lambda image, label: dice(predictor.predict(image).label.array, label.array)), card.id


def score_model(model: str, cases, shifted, tta: str, scorer=None, device: str = "cpu") -> Dict:
    score, model_id = case_scorer(model, tta, scorer, device)
    if scorer is not None:
        scores = _scored(model, cases, shifted, score, lambda: scorer.scout_agreement)
        fixed = {f"{m:g}": _scored(model, cases, shifted, lambda image, label, m=m: dice(
            scorer(model, image, scorer.fixed_region(model, label, m)), label.array)) for m in scorer.margins}
        if fixed:
            scores["fixed_regions"] = {m: {k: v for k, v in f.items() if k != "model"} for m, f in fixed.items()}
        if len(fixed) > 1:
            scores["region_spread"] = region_spread(list(fixed.values()))
        return scores
    return _scored(model_id, cases, shifted, score)


def unlabeled_site_scans(site, labeled: int, unlabeled_dir: Path, acquire=None):
    """The unlabelled site scans as the fine-tune read them (the written files), each with its reference label:
    (case id, image, label), one at a time."""
    for i, record in enumerate(site):
        if i >= labeled:
            label = (acquire(record, i) if acquire else record.load())[1]
            yield record.case_id, read_volume(unlabeled_dir / f"{record.case_id}.nrrd"), label


def score_unlabeled(models: Sequence[str], scans, tta: str, scorer=None, device: str = "cpu") -> List[Dict]:
    """Each model's Dice on each unlabelled site scan: {case id: Dice} per model, in the order given."""
    scores = [case_scorer(model, tta, scorer, device)[0] for model in models]
    figures: List[Dict] = [{} for _ in models]
    for case_id, image, label in scans:
        for score, by_case in zip(scores, figures):
            by_case[case_id] = float(score(image, label))
    return figures


def format_unlabeled(parent: Dict[str, float], child: Dict[str, float], agreement: Sequence) -> List[str]:
    """Per unlabelled scan, lowest agreement first: the parent's and the child's Dice, the change, and the card's
    agreement; then the mean change on the scans the card ranks lowest (as many as the Slicer module names) and on
    the rest."""
    agreed = {str(case): float(value) for case, value in agreement or []}
    order = sorted(child, key=lambda case: agreed.get(case, 2.0))
    lines = [f"  {'unlabelled':20s} {'parent':>7s} {'child':>7s} {'change':>7s} {'agreement':>9s}"]
    for case in order:
        value = f"{agreed[case]:9.3f}" if case in agreed else f"{'-':>9s}"
        lines.append(f"  {case:20s} {parent[case]:7.4f} {child[case]:7.4f} "
                     f"{100 * (child[case] - parent[case]):+6.2f}p {value}")
    ranked = [case for case in order if case in agreed]
    if len(ranked) > LOWEST_NAMED:
        change = [100 * (child[c] - parent[c]) for c in ranked]
        lines.append(f"  the {LOWEST_NAMED} scans with the lowest agreement: mean change "
                     f"{np.mean(change[:LOWEST_NAMED]):+.2f}p; the other {len(ranked) - LOWEST_NAMED}: "
                     f"{np.mean(change[LOWEST_NAMED:]):+.2f}p")
    return lines


def _scored(model: str, cases, shifted, score, scout=None) -> Dict:
    """Mean and per-case Dice on the unshifted and the shifted cases: `score(image, label)`; with `scout`, what it
    returns after each case too (the `scout_agreement` of that label, `pool_scout_agreement.py` reads it)."""
    scores: Dict = {"model": model}
    for kind, pairs in (("unshifted", cases), ("shifted", shifted)):
        figures, agreements = [], []
        for image, label in pairs:
            figures.append(float(score(image, label)))
            agreements.append(scout() if scout is not None else None)
        scores[kind], scores[f"{kind}_cases"] = float(np.mean(figures)), figures
        if scout is not None:
            scores[f"{kind}_scout_agreement"] = agreements
    return scores


def run_finetune(method: str, args: argparse.Namespace, work: Path, site_dir: Path, unlabeled_dir: Path) -> Dict:
    """One `semiseg-la finetune` in a child process: wall time, iterations, step time, model folder, guard."""
    output = work / "runs" / method
    command = [sys.executable, "-m", "semiseg_la.cli.main", "finetune", "--from", args.model,
               "--data", str(site_dir), *(["--unlabeled", str(unlabeled_dir)] if args.unlabeled else []),
               "--preset", PRESETS[method],
               "--time-budget", f"{args.budget:g}", "--device", args.device, "--output", str(output),
               "--name", f"bench-{method}", "--progress", "json"]
    for item in args.overrides:
        command += ["--set", item]
    env = dict(os.environ, SEMISEG_LA_HOME=str(work / "home"))
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, encoding="utf-8")
    wall = time.monotonic() - start
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = next((r for r in records if r.get("stage") == "done"), None)
    if proc.returncode != 0 or done is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}", "wall_s": wall}
    plan = next((r["message"] for r in records if r.get("stage") == "log" and "s per iteration" in r["message"]), "")
    step = STEP_RE.search(plan)
    return {"model_dir": done["model_dir"], "iterations": done["iterations"], "wall_s": wall,
            "step_s": float(step.group(1)) if step else float("nan"), "guard": done.get("guard"),
            "best_iteration": done.get("best_iteration")}


def format_row(row: Dict) -> str:
    guard = row.get("guard") or {}
    verdict = guard.get("verdict", "-")
    if guard.get("child_dice") is not None:
        verdict += f" ({guard['child_dice']:.3f} vs parent {guard['parent_dice']:.3f})"
    return (f"{row['method']:12s} {row['iterations']:5d} {row['step_s']:5.2f} {row['wall_s']:6.0f} "
            f"{row['shifted']:9.4f} {100 * row['recovered']:8.1f}% {row['unshifted']:9.4f} "
            f"{100 * row['unshifted_change']:+8.2f}p  {verdict}")


def region_spread(by_margin: Sequence[Dict]) -> Dict[str, float]:
    """Mean over cases of the highest minus the lowest Dice across the fixed regions, at the site and unshifted:
    how much the region alone moves a case (a region-stable model keeps this small)."""
    return {side: float(np.mean(np.ptp([f[f"{side}_cases"] for f in by_margin], axis=0)))
            for side in ("shifted", "unshifted")}


def format_spread(spread: Dict[str, float]) -> str:
    return (f"  spread over the fixed regions, mean per case: {100 * spread['shifted']:.1f} points at the site, "
            f"{100 * spread['unshifted']:.1f} unshifted")


def format_fixed(fixed: Dict, base: Dict, margin: str = f"{REGION_MARGIN_MM:g}") -> str:
    """The fixed-region figures of a fine-tune against the base's, in the same region."""
    lost = base["unshifted"] - base["shifted"]
    recovered = (fixed["shifted"] - base["shifted"]) / lost if lost > 0 else float("nan")
    return (f"  in the label's box + {margin} mm: site {fixed['shifted']:.4f} (base {base['shifted']:.4f}, recovered "
            f"{100 * recovered:.1f}%), unshifted {fixed['unshifted']:.4f} "
            f"({100 * (fixed['unshifted'] - base['unshifted']):+.2f}p)")


def print_summary(base: Dict, rows: List[Dict]) -> None:
    done = {r["method"]: r for r in rows if "shifted" in r}
    sup = done.get("supervised")
    if sup:
        for name, row in done.items():
            if name != "supervised":
                diffs = np.subtract(row["shifted_cases"], sup["shifted_cases"])
                low, high = paired_interval(diffs)
                print(f"{name} vs supervised-only: {100 * (row['shifted'] - sup['shifted']):+.2f} Dice points at the "
                      f"site (better on {int((diffs > 0).sum())} of {diffs.size} cases; paired 95 % interval "
                      f"{100 * low:+.2f} to {100 * high:+.2f}); step time {row['step_s'] / sup['step_s']:.2f}x")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
