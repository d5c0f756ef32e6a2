"""Turn a finished run into a catalog model: weights of the selected checkpoint + an honest card."""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..checkpoints import ModelCard, new_local_model_dir, save_model, unique_model_id
from ..checkpoints.card import default_classes, default_inference, utc_now_iso, weights_fingerprint
from ..engine.config import TrainConfig
from ..engine.data import Split
from ..engine.loop import TrainResult, restore_method
from ..engine.precision import device_name
from ..engine.state import load_state
from ..errors import InputError, StorageError
from ..inference.memory import StickyFallback
from ..inference.predictor import InferenceSpec, Predictor
from ..io.datasets import CaseRecord
from ..metrics import dice, evaluate_case, summarize
from ..progress import ProgressReporter
from .common import (
    ancestor_trained_on_regions,
    card_get,
    inference_spec,
    region_settler,
    settler_folder,
    trains_on_regions,
)
from .segment import label_as_segment_gives

#: with this many labelled cases or more, a fine-tune holds some out to compare the child with its parent
HOLDOUT_FROM = 3
#: at most this many held out: each costs two evaluations at export (the child's and the parent's)
HOLDOUT_MAX = 5
#: at most this many unlabelled scans segmented by the child and its parent after a fine-tune, to say where the two
#: disagree (each costs two segmentations, and runs only in what is left of the time budget)
AGREEMENT_SCANS = 16
#: seconds kept after the comparison for writing the model folder
AGREEMENT_RESERVE_S = 4.0
#: the scans of lowest agreement whose two labels are kept (in the run folder's AGREEMENT_LABELS), so the user sees
#: both results where the two disagree most without segmenting again (the Slicer module names and shows these)
AGREEMENT_SHOWN = 3
AGREEMENT_LABELS = "agreement"


def held_out_count(labelled: int) -> int:
    """How many of a site's labelled cases the guard rail holds out: none below HOLDOUT_FROM, then one in five
    (at least one, at most HOLDOUT_MAX). One case is a coarse judge: with 16 labelled, the 16th alone called a
    child worse that was 2.6 points better over 8 other cases; the last 3 called it better (docs/results.md)."""
    if labelled < HOLDOUT_FROM:
        return 0
    return min(HOLDOUT_MAX, max(1, labelled // 5))


def export_run(config: TrainConfig, result: TrainResult, split: Split, validation_records: Sequence[CaseRecord],
               parent_card=None, name: Optional[str] = None, reporter: Optional[ProgressReporter] = None,
               parent_folder: Optional[Path] = None, deadline: Optional[float] = None
               ) -> Tuple[str, Path, Dict[str, Any], Optional[Dict[str, Any]]]:
    """Export the best-by-validation checkpoint (the last one when there is no validation split, or with
    `export_checkpoint: last`): (model id, folder, validation figures, the fine-tune's parent/child record or None).
    A fine-tune's parent weights are read from `parent_folder` (the one it started from), else by the card's id.
    `deadline` (time.monotonic()): when the time budget ends; the comparison on unlabelled scans stops before it.
    """
    reporter = reporter or ProgressReporter()
    ckpt_dir = Path(config.output) / "checkpoints"
    use_best = (config.export_checkpoint == "best" and bool(validation_records)
                and (ckpt_dir / "best.pt").is_file())
    state = load_state(ckpt_dir / ("best.pt" if use_best else "last.pt"))
    params = {"in_channels": config.in_channels, **config.method_params}
    # the method as the checkpoint left it: which network it exports (and, multi-modal, which channel that
    # network takes) follows the checkpoint, not the run's last state
    exported = restore_method(config.method, params, state["networks"])
    network = exported.inference_network().eval()
    blended = (blend_with_parent(network, parent_card, config.parent_blend, reporter, parent_folder)
               if parent_card else None)
    channel = getattr(exported, "exported_channel", None)  # multi-modal training, one-modality model
    started = time.monotonic()
    if validation_records:
        scout = _child_scout(config, parent_card)
        validation = evaluate_records(network, config, validation_records, reporter, channel, scout=scout)
    else:  # e.g. a site fine-tune on 2-3 cases: a figure, labelled for what it is (fit, not generalisation)
        validation = evaluate_records(network, config, split.labeled[:8], reporter, channel)
        validation["split"] = (f"no held-out validation case: Dice on {min(len(split.labeled), 8)} labelled "
                               "training cases (training fit, optimistic)")
    scored = len(validation_records) or min(len(split.labeled), 8)
    per_scan_s = (time.monotonic() - started) / max(scored, 1)  # one model on one scan, as measured here
    validation["checkpoint"] = f"{'best' if use_best else 'last'} (iteration {int(state['iteration'])})"
    validation["figure"] = _figure_kind(validation_records, parent_card)
    model_id = unique_model_id(name or _default_name(config, parent_card))
    card = make_card(model_id, config, result, split, validation, parent_card, int(state["iteration"]), exported)
    if parent_card is not None:
        card.extra["finetune"] = finetune_record(config, split, validation, parent_card, validation_records,
                                                 reporter, channel, parent_folder)
        card.extra["finetune"]["parent_blend"] = blended
        _report_guard(card.extra["finetune"], reporter)
        scans = _unannotated_scans(config, reporter)
        if channel is None and scans:
            card.extra["finetune"]["agreement"] = unlabelled_agreement(
                network, config, parent_card, parent_folder, scans, reporter, deadline, per_scan_s,
                Path(config.output).resolve() / AGREEMENT_LABELS)
    folder = new_local_model_dir(model_id)
    state_dict = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    save_model(folder, state_dict, card)
    return model_id, folder, validation, card.extra.get("finetune")


def blend_with_parent(network: torch.nn.Module, parent_card, share: float, reporter: ProgressReporter,
                      parent_folder: Optional[Path] = None) -> Optional[float]:
    """WiSE-FT: the network's floating-point tensors become (1 - share) x its own + share x the parent's, in
    place; the share applied (None when off, or when the parent's tensors do not match the exported network's,
    which is said and leaves the fine-tuned weights as they are)."""
    if share <= 0:
        return None
    from ..checkpoints import load_model_weights

    parent, _ = load_model_weights(_parent_dir(parent_card, parent_folder))
    own = network.state_dict()
    if set(parent) != set(own) or any(parent[k].shape != own[k].shape for k in own):
        reporter.log(f"parent_blend {share:g} skipped: the parent {card_get(parent_card, 'id')} and the exported "
                     "network do not have the same tensors; the fine-tuned weights are exported as they are")
        return None
    with torch.no_grad():
        for key, tensor in own.items():
            if tensor.is_floating_point():
                tensor.mul_(1.0 - share).add_(parent[key].to(tensor.device, tensor.dtype), alpha=share)
    reporter.log(f"exported weights: {1 - share:g} x fine-tuned + {share:g} x parent (WiSE-FT)")
    return float(share)


def _child_scout(config: TrainConfig, parent_card):
    """(network, card) whose first pass settles the fine-tuned child's region on held-out whole scans, as
    `segment` will settle it (`common.region_settler`, walking up from the parent the child records); None
    when the child settles its own (trained on regions itself, no parent, or nothing cut from whole scans)."""
    if parent_card is None or not config.cut_whole_scans or trains_on_regions(config):
        return None
    return _as_scout(ancestor_trained_on_regions(card_get(parent_card, "id"),
                                                 weights_fingerprint(ModelCard.coerce(parent_card))))


def _as_scout(settler):
    """`evaluate_records`'s scout, (network in eval mode, card), from a settler (network, card, id) or None."""
    return (settler[0].eval(), settler[1]) if settler is not None else None


def _parent_dir(parent_card, parent_folder: Optional[Path]) -> Path:
    """The parent's model folder: the one the fine-tune started from, else the catalog's by the card's id."""
    from ..checkpoints import resolve_model

    return Path(parent_folder) if parent_folder is not None else resolve_model(card_get(parent_card, "id"))


def _figure_kind(validation_records: Sequence[CaseRecord], parent_card) -> str:
    if not validation_records:
        return "training fit"
    return "site hold-out" if parent_card is not None else "validation"


def finetune_record(config: TrainConfig, split: Split, validation: Dict[str, Any], parent_card,
                    held_out: Sequence[CaseRecord], reporter: ProgressReporter,
                    channel: Optional[int] = None, parent_folder: Optional[Path] = None) -> Dict[str, Any]:
    """What a fine-tune's card says about the site: the parent and the child on the held-out site case(s),
    the verdict, the parent's own (shift-free) figure, the case counts, the budget and the device."""
    parent_validation = card_get(parent_card, "validation") or {}
    record: Dict[str, Any] = {
        "parent": card_get(parent_card, "id"),
        "labeled_cases": len(split.labeled), "held_out_cases": len(held_out),
        "unlabeled_cases": len(split.unlabeled),
        "time_budget_s": config.time_budget_s, "device": device_name(config.device),
        "parent_reference": {"dice": parent_validation.get("dice"),
                             "measured_on": parent_validation.get("split", "unknown")},
    }
    if not held_out:
        record["verdict"] = (f"unchecked: fewer than {HOLDOUT_FROM} labelled cases, so none was held out to "
                             "compare the fine-tuned model with its parent")
        return record
    parent_network, parent_config, scout = _parent_as_scored(config, parent_card, parent_folder)
    parent = evaluate_records(parent_network, parent_config, held_out, reporter, channel,
                              what="the parent on the held-out case(s)", scout=scout)
    child_dice, parent_dice = float(validation["dice"]), float(parent["dice"])
    record["site_holdout"] = {"cases": [r.case_id for r in held_out], "parent_dice": parent_dice,
                              "child_dice": child_dice, "parent_hd95_mm": parent.get("hd95_mm"),
                              "child_hd95_mm": validation.get("hd95_mm")}
    record["verdict"] = "worse" if child_dice < parent_dice else "better or equal"
    return record


def _parent_as_scored(config: TrainConfig, parent_card, parent_folder: Optional[Path]):
    """The parent as `segment` runs it, for the guard rail and the comparison on unlabelled scans: its network in
    eval mode, `config` with its card's inputs, and the scout that settles its region on a whole scan."""
    from ..checkpoints import load_network

    network, _ = load_network(_parent_dir(parent_card, parent_folder), device="cpu")
    scout = _as_scout(region_settler(parent_card)) if config.cut_whole_scans else None
    return network.eval(), with_card_inputs(config, parent_card), scout


def with_card_inputs(config: TrainConfig, card) -> TrainConfig:
    """`config` with the inputs a model's card says it takes (patch, spacing, normalisation and its reference):
    how a parent is scored when its child normalises otherwise, and how a shipped model is scored."""
    info = card_get(card, "inference") or {}
    reference = info.get("intensity_reference")
    return dataclasses.replace(config, patch_size=[int(p) for p in info["patch_size"]],
                               spacing=[float(s) for s in info["spacing"]],
                               normalization=info.get("normalization", "zscore-volume"),
                               intensity_reference=[float(v) for v in reference] if reference is not None else None)


def _report_guard(record: Dict[str, Any], reporter: ProgressReporter) -> None:
    """The check of the child against its parent, one line in the log whatever it found (a script's log is read for
    it); a worse child is also printed on stderr when the log goes elsewhere (JSON lines on stdout)."""
    holdout = record.get("site_holdout")
    if not holdout:
        why = record["verdict"].removeprefix("unchecked: ")
        reporter.log(f"not checked against the parent {record['parent']}: {why}")
        return
    figures = f"(Dice {holdout['child_dice']:.4f} vs {holdout['parent_dice']:.4f})"
    cases = ", ".join(holdout["cases"])
    if record["verdict"] != "worse":
        reporter.log(f"the fine-tuned model is better than or equal to its parent {record['parent']} on the held-out "
                     f"case(s) {cases} {figures}; {len(holdout['cases'])} case(s) are little evidence: compare the "
                     "two on scans you did not annotate (on ones you annotate later: `semiseg-la evaluate --model "
                     "NEW --against parent`)")
        return
    # "held-out case(s)", not "site case(s)": a fine-tune with --val holds out validation cases of any dataset
    message = (f"WARNING: the fine-tuned model is worse than its parent {record['parent']} on the held-out "
               f"case(s) {cases} {figures}; keep using the parent, or annotate more cases and fine-tune again")
    reporter.log(message)
    if not reporter.logs_to_stderr:
        print(f"semiseg-la: {message}", file=sys.stderr)


def evaluate_records(network, config: TrainConfig, records: Sequence[CaseRecord],
                     reporter: ProgressReporter, channel: Optional[int] = None,
                     what: str = "validation metrics of the exported model", scout=None) -> Dict[str, Any]:
    """Full metrics on the input grid (mm and legacy conventions) of the validation records. `scout`:
    (network, card) whose first pass settles a whole scan's region (`_child_scout`), else the network's own."""
    if not records:
        return {"split": "none (no validation cases): figures unavailable"}
    segment = Segmenter(network, config, reporter, scout)
    cases = {}
    reporter.start("evaluate", len(records), what)
    for i, record in enumerate(records, 1):
        image, label = record.load(channel=channel) if channel is not None else record.load()
        predicted = segment(image, record.case_id)
        metrics = evaluate_case(predicted, label.array, image.spacing)
        cases[record.case_id] = {k: (float(v) if not isinstance(v, bool) else v) for k, v in metrics.items()}
        reporter.update(i)
    reporter.end()
    summary = summarize(cases)
    mean = summary["mean"]
    return {"split": f"{len(records)} validation cases (labels never trained on): "
                     + ", ".join(r.case_id for r in records),
            "dice": mean.get("dice"), "jaccard": mean.get("jaccard"), "hd95_mm": mean.get("hd95_mm"),
            "asd_mm": mean.get("asd_mm"), "hd95_vox_legacy": mean.get("hd95_vox_legacy"),
            "asd_vox_legacy": mean.get("asd_vox_legacy"), "std": summary.get("std"), "cases": cases}


class Segmenter:
    """The label a network gives a scan as `segment` gives it: a whole scan (config `cut_whole_scans`) on its whole
    grid, in the region `--region auto` finds (settled by `scout`'s first pass when given), else the whole image."""

    def __init__(self, network, config: TrainConfig, reporter: ProgressReporter, scout=None) -> None:
        self.network, self.spec, self.scout, self.reporter = network, InferenceSpec.of_training(config), scout, reporter
        self.whole_scans = config.cut_whole_scans
        self.device = "cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu"
        self.fallback = StickyFallback(self.device, "fast", reporter.log)
        self.localisers: Dict[str, Any] = {}  # loaded once for every whole scan

    def _predictor(self, network, spec: InferenceSpec, image):
        return lambda roi: self.fallback(lambda where: Predictor(
            network, spec, device=where.device, mode=where.mode, accumulate_on_cpu=where.accumulate_on_cpu
        ).predict(image, roi=roi))

    def __call__(self, image, case_id: str) -> np.ndarray:
        predict = self._predictor(self.network, self.spec, image)
        if not self.whole_scans:
            return predict(None).label.array
        scout_predict = (self._predictor(self.scout[0], inference_spec(self.scout[1]), image)
                         if self.scout is not None else None)
        return label_as_segment_gives(image, self.spec, predict, self.device, self.localisers, case_id,
                                      self.reporter, scout_predict)[0]


def _unannotated_scans(config: TrainConfig, reporter: ProgressReporter) -> List[CaseRecord]:
    """The site's unannotated scans (`--unlabeled`), whether or not the method trained on them. A folder gone since
    the run started (or resumed) costs the comparison, not the trained model."""
    from ..io.datasets import open_unlabeled_folder

    try:
        return open_unlabeled_folder(config.unlabeled_dir) if config.unlabeled_dir else []
    except InputError as exc:
        reporter.log(f"the new model is not compared with its parent on unlabelled scans: {exc}")
        return []


def unlabelled_agreement(network, config: TrainConfig, parent_card, parent_folder: Optional[Path],
                         scans: Sequence[CaseRecord], reporter: ProgressReporter, deadline: Optional[float],
                         per_scan_s: float, labels_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Where the fine-tuned model and its parent disagree on the site's unlabelled scans: the Dice between their
    labels, lowest first: the scans to look at first. A single held-out case judges the child on one scan; this says
    where the two differ, for better or worse: at a simulated scanner the lowest agreement fell on the scans the
    parent segmented worst, among them scans the child made worse and the one it improved most (docs/results.md).
    Up to AGREEMENT_SCANS, in what is left of the time budget (a scan costs two segmentations, about `per_scan_s`
    each as the export measured them). With `labels_dir` the two labels of the AGREEMENT_SHOWN scans of lowest
    agreement are kept there, on each scan's grid (`AgreementLabels`)."""
    parent_network, parent_config, parent_scout = _parent_as_scored(config, parent_card, parent_folder)
    child = Segmenter(network, config, reporter, _child_scout(config, parent_card))
    parent = Segmenter(parent_network, parent_config, reporter, parent_scout)
    chosen = list(scans)[:AGREEMENT_SCANS]
    figures: Dict[str, float] = {}
    unreadable: Dict[str, str] = {}  # a method that trains on labelled cases only never read these files
    kept = AgreementLabels(labels_dir, reporter) if labels_dir is not None else None
    reporter.start("compare", len(chosen), "the new model and its parent on unlabelled scans")
    for i, record in enumerate(chosen, 1):
        if deadline is not None and time.monotonic() + 2.5 * per_scan_s + AGREEMENT_RESERVE_S > deadline:
            break
        try:
            image, _ = record.load()
        except InputError as exc:
            unreadable[record.case_id] = str(exc)
            reporter.log(f"{record.case_id}: not compared: {exc}")
            continue
        new, old = child(image, record.case_id), parent(image, record.case_id)
        figures[record.case_id] = float(dice(new, old))
        if kept is not None:
            kept.offer(record.case_id, figures[record.case_id], image, new, old)
        reporter.update(i)
    reporter.end()
    result = agreement_record(figures, len(chosen), unreadable)
    reporter.log(result["summary"])
    if kept is not None and kept.files:
        result["labels"] = {case: kept.files[case] for case, _ in result["cases"] if case in kept.files}
        reporter.log(f"the two labels of {', '.join(result['labels'])}, each model's, are in {kept.folder} "
                     "(<scan>_new.nrrd, <scan>_parent.nrrd; one network pass each, without test-time flips)")
    return result


class AgreementLabels:
    """The child's and the parent's labels of the AGREEMENT_SHOWN scans of lowest agreement so far, as files in
    `folder` (`<case>_new.nrrd`, `<case>_parent.nrrd`, on the scan's grid): on disk, not in memory (two labels of a
    whole scan each), and a scan pushed out by a lower one loses its files. A file that cannot be written costs the
    files, not the comparison or the model."""

    def __init__(self, folder: Path, reporter: ProgressReporter) -> None:
        import shutil

        self.folder, self.reporter, self.files = Path(folder), reporter, {}
        self.values: Dict[str, float] = {}
        shutil.rmtree(self.folder, ignore_errors=True)  # a resumed run's earlier export named other scans

    def offer(self, case_id: str, value: float, image, new: np.ndarray, old: np.ndarray) -> None:
        ranked = sorted({**self.values, case_id: value}.items(), key=lambda item: item[1])[:AGREEMENT_SHOWN]
        if case_id not in dict(ranked):
            return
        from ..io import write_volume

        paths = {"new": self.folder / f"{case_id}_new.nrrd", "parent": self.folder / f"{case_id}_parent.nrrd"}
        try:
            for which, label in (("new", new), ("parent", old)):
                write_volume(image.with_array(np.asarray(label, np.uint8)), paths[which])
        except (OSError, StorageError) as exc:
            self.reporter.log(f"{case_id}: the two labels were not kept: {exc}")
            return
        self.values[case_id], self.files[case_id] = value, {k: str(v) for k, v in paths.items()}
        for dropped in set(self.values) - set(dict(ranked)):
            for path in self.files.pop(dropped).values():
                Path(path).unlink(missing_ok=True)
            del self.values[dropped]


def agreement_record(figures: Dict[str, float], chosen: int, unreadable: Optional[Dict[str, str]] = None
                     ) -> Dict[str, Any]:
    """The card's account of the comparison: each scan's Dice between the two models' labels, lowest first, the
    scans that could not be read, and one sentence for the user."""
    ordered = sorted(figures.items(), key=lambda item: item[1])
    unreadable = unreadable or {}
    if not ordered and unreadable:
        summary = (f"the new model was not compared with its parent: none of the {len(unreadable)} unlabelled scan(s) "
                   "tried could be read")
    elif not ordered:
        summary = "no time was left in the budget to compare the new model with its parent on unlabelled scans"
    else:
        lowest = ", ".join(f"{case} ({value:.2f})" for case, value in ordered[:3])
        summary = (f"the new model and its parent, compared on {len(ordered)} unlabelled scan(s), disagree most on "
                   f"{lowest} (Dice between their labels): look at those first (where their labels differ, one of the "
                   "two is wrong, and it may be either)")
    return {"cases": [[case, round(value, 4)] for case, value in ordered], "compared": len(ordered),
            "not_compared": chosen - len(ordered), "unreadable": unreadable, "summary": summary}


def _default_name(config: TrainConfig, parent_card) -> str:
    if parent_card is not None:
        return f"{card_get(parent_card, 'name')}-ft"
    return config.preset or f"{config.method.replace('_', '-')}-l{config.labeled_num}"


def make_card(model_id: str, config: TrainConfig, result: TrainResult, split: Split, validation: Dict[str, Any],
              parent_card, iteration: int, exported=None) -> ModelCard:
    """`exported`: the method restored from the exported checkpoint (default: the run's final method)."""
    exported = exported if exported is not None else result.method
    network = exported.inference_network()
    arch = dict(getattr(network, "config", {}))
    arch["has_dropout"] = False
    arch_name = getattr(network, "architecture_name", "vnet")
    training = {
        "preset": config.preset, "method": config.method, "data": str(config.data),
        "labeled_cases": len(split.labeled), "unlabeled_cases": len(split.unlabeled),
        "validation_cases": len(split.validation),
        "labeled_ids": [r.case_id for r in split.labeled],
        "iterations": result.iterations, "exported_iteration": iteration, "seed": config.seed,
        "patch_size": list(config.patch_size), "spacing": list(config.spacing), "batch_size": config.batch_size,
        "labeled_bs": config.labeled_bs, "base_lr": config.base_lr, "lr_policy": config.lr_policy,
        "time_s": round(result.elapsed_s, 1), "stopped_early": result.stopped_early,
        "hardware": f"{device_name(config.device)} ({platform.machine()})",
        "config": config.to_dict(),
    }
    lineage = {"parent": None, "parent_sha256": None, "created": utc_now_iso(),
               "cases_used": {"labeled": training["labeled_ids"], "unlabeled": len(split.unlabeled)}}
    if parent_card is not None:
        lineage["parent"] = card_get(parent_card, "id")
        lineage["parent_sha256"] = weights_fingerprint(ModelCard.coerce(parent_card))
        settler = None if trains_on_regions(config) else settler_folder(lineage["parent"], lineage["parent_sha256"])
        if settler is not None:  # `segment --region auto` settles this model's region on that one's first pass
            lineage["region_settler"] = {"id": card_get(settler[1], "id"), "sha256": weights_fingerprint(settler[1])}
    name = model_id.rsplit("-v", 1)[0]
    inference = default_inference(config.patch_size, config.spacing)
    inference["normalization"] = config.normalization  # the Predictor normalises inputs the same way
    if config.intensity_reference is not None:
        inference["intensity_reference"] = [float(v) for v in config.intensity_reference]
    modality = getattr(exported, "exported_modality", None)
    if modality:  # multi-modal training, one-modality inference: say which modality the model takes
        inference["channel_names"] = {"0": str(modality)}
        training["modalities"] = list(config.method_params.get("modality_names") or [])
    card = ModelCard(id=model_id, name=name, version=model_id.rsplit("-v", 1)[-1] if "-v" in model_id else "0.1.0",
                     method=config.method, description=_description(config, split, parent_card),
                     architecture={"name": arch_name, "config": arch},
                     inference=inference, classes=default_classes(),
                     training=training, validation=validation, lineage=lineage, created=utc_now_iso())
    if config.role != "segmenter":  # a localiser: `segment --region auto` finds the atrium with it
        card.extra["role"] = config.role
    return card


def _description(config: TrainConfig, split: Split, parent_card) -> str:
    origin = f"fine-tuned from {card_get(parent_card, 'id')}" if parent_card is not None else "trained"
    kind = "localiser (whole-scan atrium finder)" if config.role == "localiser" else "V-Net"
    return (f"{config.method} {kind} {origin} on {len(split.labeled)} labelled + {len(split.unlabeled)} "
            f"unlabelled cases at {config.spacing[0]:g} mm, patch {'x'.join(map(str, config.patch_size))}")
