"""`semiseg-la train` and `semiseg-la finetune`: run the shared loop, then export a catalog model."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..engine.config import TrainConfig, build_config, load_config_file, load_preset, parse_overrides
from ..engine.data import (
    Split,
    TrainCase,
    cut_around_label,
    prepare_views,
    split_cases,
    wide_validation_cases,
)
from ..engine.loop import Trainer, TrainResult, method_for
from ..errors import ConfigError, InputError, RegionError
from ..inference.localise import Localiser, settle_region
from ..io.datasets import CaseRecord, open_dataset, open_unlabeled_folder
from ..io.volume import Volume
from ..preprocess.normalize import reference_landmarks
from ..preprocess.resample import crop_to_roi
from ..preprocess.wide_fov import REGION_MARGIN_MM, is_whole_scan, patch_mm
from ..progress import ProgressReporter
from .common import COMMAND_STARTED, add_device_flag, add_progress_flag, card_get, command_seconds, reporter_for


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a method on a dataset and export it to the local catalog")
    _add_common(t)
    t.set_defaults(handler=run_train)
    f = sub.add_parser("finetune", help="fine-tune a catalog model on your own cases (records the parent)")
    f.add_argument("--from", dest="from_model", default=None,
                   help="parent: catalog id or model folder (default: default)")
    _add_common(f)
    f.set_defaults(handler=run_finetune)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="a named preset (see `semiseg-la models presets`)")
    p.add_argument("--config", default=None, help="a YAML config file")
    p.add_argument("--method", default=None, help="supervised | mean_teacher | ...")
    p.add_argument("--data", default=None, help="LA h5 root, nnU-Net-style folder, or images/ + labels/ folder")
    p.add_argument("--list", dest="train_list", default=None, help="case list (LA: train.list)")
    p.add_argument("--labeled", dest="labeled_num", type=int, default=None, help="labelled cases: the first N")
    p.add_argument("--val", dest="val_num", type=int, default=None,
                   help="validation cases: the last N labelled cases, never trained on (finetune: from 3 "
                   "labelled cases one in five, 1 to 5, held out to check the child against its parent)")
    p.add_argument("--unlabeled", dest="unlabeled_dir", default=None, help="extra folder of unlabelled scans")
    p.add_argument("--iterations", dest="max_iterations", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--labeled-bs", type=int, default=None)
    p.add_argument("--lr", dest="base_lr", type=float, default=None)
    p.add_argument("--patch", dest="patch_size", type=int, nargs=3, default=None)
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="model spacing in mm")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--validate-every", type=int, default=None)
    p.add_argument("--time-budget", dest="time_budget_s", type=float, default=None, help="stop after S seconds")
    p.add_argument("--output", default=None, help="run folder (default runs/<name>)")
    p.add_argument("--name", default=None, help="name of the exported model (an id is derived from it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--no-export", action="store_true", help="do not add the result to the local catalog")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set method_params.consistency=0.2")
    add_device_flag(p)
    add_progress_flag(p)


FLAG_KEYS = ("method", "data", "train_list", "labeled_num", "val_num", "unlabeled_dir", "max_iterations",
             "batch_size", "labeled_bs", "base_lr", "patch_size", "spacing", "seed", "validate_every",
             "time_budget_s", "output")


def resolve_config(args: argparse.Namespace, base: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """base (a fine-tune's preset with its parent's patch, spacing and input, already merged) or --preset, then
    --config, the flags and --set, each over the one before."""
    layers: List[Dict[str, Any]] = [base or {}]
    if args.preset and base is None:
        layers.append(load_preset(args.preset))
    if args.config:
        layers.append(load_config_file(args.config))
    flags = {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k, None) is not None}
    flags["device"] = args.device
    layers.append(flags)
    layers.append(parse_overrides(args.overrides))
    merged: Dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key == "method_params":
                merged.setdefault(key, {}).update(value or {})
            else:
                merged[key] = value
    merged["preset"] = args.preset or merged.get("preset")
    if not merged.get("data"):
        raise ConfigError("--data is required (LA h5 root, nnU-Net-style folder, or images/ + labels/ folder)")
    if not merged.get("output"):
        merged["output"] = str(Path("runs") / _default_run_name(merged))
    return build_config(merged)


def _default_run_name(cfg: Dict[str, Any]) -> str:
    name = cfg.get("preset") or f"{cfg.get('method', 'supervised')}-l{cfg.get('labeled_num', 8)}"
    return f"{name}-s{cfg.get('seed', 1337)}"


def load_split(config: TrainConfig, reporter: ProgressReporter, unseen_validation: bool = False) -> tuple:
    """Records -> (split, labelled cases, unlabelled cases, validation cases). `unseen_validation`: a fine-tune's
    held-out cases stay out of the unlabelled pool (`split_cases`)."""
    records = open_dataset(config.data, config.train_list if _is_la(config.data, config.train_list) else None)
    extra = open_unlabeled_folder(config.unlabeled_dir) if config.unlabeled_dir else []
    split = split_cases(records, config.labeled_num, config.val_num, extra, config.use_unlabeled,
                        unseen_validation)
    total = len(split.labeled) + len(split.unlabeled) + len(split.validation)
    reporter.start("load", total, "reading and resampling cases")
    done = 0

    cut = WholeScanCut(config, reporter) if config.cut_whole_scans else None
    no_atrium = 0

    if config.normalization == "standardized-zscore" and config.intensity_reference is None:
        config.intensity_reference = training_reference(split.labeled, config)
        reporter.log(f"standardized-zscore: reference landmarks from the {len(split.labeled)} labelled cases: "
                     + ", ".join(f"{v:.3g}" for v in config.intensity_reference))

    def prep(group: Sequence[CaseRecord], labels: bool, one_view: bool = False) -> List[TrainCase]:
        nonlocal done, no_atrium
        views = (lambda image, label: cut(image, label)[:1]) if cut is not None and one_view else cut
        out = []
        for record in group:
            try:
                out.extend(prepare_views(record, config.spacing, with_label=labels,
                                         normalization=config.normalization, views=views,
                                         reference=config.intensity_reference))
            except RegionError as exc:  # only an unlabelled whole scan is cut where the localiser finds the atrium
                reporter.log(f"{record.case_id}: left out of the unlabelled scans: {exc}")
                split.left_out[record.case_id] = str(exc)
                no_atrium += 1
            except InputError as exc:  # an annotated case is the user's work: its problem stops the run
                if labels:
                    raise
                # an unlabelled one is extra (a 2D localiser series of the study, a file cut short): the run goes on
                reporter.log(f"warning: {record.case_id}: left out of the unlabelled scans, unusable: {exc}")
                split.left_out[record.case_id] = str(exc)
            done += 1
            reporter.update(done)
        return out

    labeled = prep(split.labeled, True)
    unlabeled = prep(split.unlabeled, False)
    validation = prep(split.validation, True, one_view=True)  # scored as `segment` shows it
    reporter.end()
    summary = cut.summary(no_atrium) if cut is not None else None
    if summary:
        reporter.log(summary)
    unusable = len(split.left_out) - no_atrium
    if unusable:
        reporter.log(f"warning: {unusable} of {len(split.unlabeled)} unlabelled scan(s) could not be used (above); "
                     "the run went on without them")
    return split, labeled, unlabeled, validation


def training_reference(records: Sequence[CaseRecord], config: TrainConfig) -> List[float]:
    """standardized-zscore's reference histogram: the mean landmarks of the labelled training cases, each as
    the model is trained on it (a whole scan cut around its label, as `WholeScanCut` cuts it)."""
    fine_mm = patch_mm(config.patch_size, config.spacing)

    def trained_on(record: CaseRecord) -> Volume:
        image, label = record.load()
        if config.cut_whole_scans and is_whole_scan(image.shape, image.spacing):
            image = cut_around_label(image, label, fine_mm)[0]
        return image

    return [float(v) for v in reference_landmarks(trained_on(r).array for r in records)]


class WholeScanCut:
    """Whole scans cut as `segment --region auto` cuts them (config `cut_whole_scans`): a labelled one around
    its label (`labelled_cuts` times: the first with REGION_MARGIN_MM a side, or where `segment` would settle with
    `labelled_region: localiser`; the others with margins drawn from `labelled_cut_margin_mm`), an unlabelled one
    where the catalog's localiser finds the atrium (RegionError when
    it finds none); a crop-sized case stays as it is. Called with a case, it gives the list of its views; counts
    what it cut, for the log."""

    def __init__(self, config: TrainConfig, reporter: ProgressReporter) -> None:
        self.fine_mm = patch_mm(config.patch_size, config.spacing)
        self.device, self.reporter = config.device, reporter
        self.cuts, self.margin_mm, self.seed = config.labelled_cuts, config.labelled_cut_margin_mm, config.seed
        self.labelled_region = config.labelled_region
        self.localiser: Optional[Localiser] = None
        self.around_label = self.where_found = 0

    def __call__(self, image: Volume, label: Optional[Volume]) -> List[Tuple[Volume, Optional[Volume]]]:
        if not is_whole_scan(image.shape, image.spacing):
            return [(image, label)]
        if label is not None:
            first, *others = self._margins()
            head = (self._as_segment_settles(image, label) if self.labelled_region == "localiser"
                    else cut_around_label(image, label, self.fine_mm, first))
            return [head] + [cut_around_label(image, label, self.fine_mm, margins) for margins in others]
        try:
            region = self._localiser().find(image, min_size_mm=self.fine_mm)
        except RegionError as exc:  # without segment's hint to give a region: here the scan is simply not used
            raise RegionError(f"the localiser found no plausible atrium in this whole scan ({exc.reason})") from exc
        self.where_found += 1
        return [(crop_to_roi(image, region.lower, region.upper), None)]

    def _margins(self) -> List[Optional[List[float]]]:
        """Each cut's six margins (None: REGION_MARGIN_MM a side), drawn from a stream seeded by the run's seed and
        the labelled scan's order, so a resumed run cuts the same views."""
        rng = np.random.default_rng([self.seed, self.around_label])
        self.around_label += 1
        return [None] + [list(rng.uniform(*self.margin_mm, size=6)) for _ in range(self.cuts - 1)]

    def _as_segment_settles(self, image: Volume, label: Volume) -> Tuple[Volume, Volume]:
        """The localiser's box grown to hold the label's box + REGION_MARGIN_MM (`settle_region` with the label as
        the first pass); the label's box alone when the localiser finds nothing."""
        try:
            region = self._localiser().find(image, min_size_mm=self.fine_mm)
        except RegionError:
            return cut_around_label(image, label, self.fine_mm)
        region, _ = settle_region(region, np.asarray(label.array) > 0, image)
        return crop_to_roi(image, region.lower, region.upper), crop_to_roi(label, region.lower, region.upper)

    def _localiser(self) -> Localiser:
        if self.localiser is None:
            from ..checkpoints.catalog import default_localiser_id
            from .segment import load_localiser

            localiser_id = default_localiser_id()
            if localiser_id is None:
                raise RegionError("no localiser model installed to find the atrium in an unlabelled whole scan")
            self.localiser, used = load_localiser(localiser_id, self.device)
            self.reporter.log(f"whole scans: the localiser {used} finds the atrium (unlabelled ones are cut there)")
        return self.localiser

    def summary(self, left_out: int) -> Optional[str]:
        if not (self.around_label or self.where_found or left_out):
            return None
        first = (f"the localiser's box grown to hold the label's box + {REGION_MARGIN_MM:g} mm"
                 if self.labelled_region == "localiser" else f"the label's box + {REGION_MARGIN_MM:g} mm")
        views = (f", {self.cuts} views each: that one, the others with margins of "
                 f"{self.margin_mm[0]:g}-{self.margin_mm[1]:g} mm" if self.cuts > 1 else "")
        return (f"whole scans cut to the atrium's region, as `segment` shows it to the model: {self.around_label} "
                f"labelled ({first}{views}), {self.where_found} unlabelled "
                f"(where the localiser found the atrium), {left_out} unlabelled left out (no atrium found)")


def _load_multimodal(config: TrainConfig, reporter: ProgressReporter, unseen_validation: bool = False) -> tuple:
    """Co-registered channels (nnU-Net `_0000`/`_0001` files): the multi-modal Semi-CML path."""
    from ..engine.multimodal import modality_names, prepare_multimodal_split

    reporter.log("reading multi-modal cases (one channel per modality)")
    config.method_params.setdefault("modality_names", modality_names(config.data))
    return prepare_multimodal_split(config, unseen_validation=unseen_validation)


def _is_la(root: str, list_file: Optional[str] = None) -> bool:
    """An LA h5 root, or a training cache that holds (or is given) its case list: the list applies."""
    from ..io.la_cache import is_la_cache
    from ..io.la_h5 import is_la_root

    if is_la_root(root):
        return True
    return bool(list_file) and is_la_cache(root) and ((Path(root) / list_file).is_file() or Path(list_file).is_file())


def run_train(args: argparse.Namespace, initial=None, parent_card=None, base: Optional[Dict[str, Any]] = None,
              parent_folder: Optional[Path] = None) -> int:
    from ..inference.validation import make_multimodal_validator, make_validator

    config = resolve_config(args, base)
    method_for(config)  # a misspelt or impossible method setting stops here, before the cases load
    reporter = reporter_for(args)
    if args.resume and not (Path(config.output) / "checkpoints" / "last.pt").is_file():
        raise InputError(f"{config.output}: nothing to resume (no checkpoints/last.pt); drop --resume")
    if not args.resume and (Path(config.output) / "checkpoints" / "last.pt").is_file():
        raise InputError(f"{config.output} already holds a run; add --resume to continue it or choose --output")
    if args.resume and config.fit_to_budget:
        config = _with_saved_plan(config)
    if args.resume and config.intensity_reference is None:
        config = _with_saved_reference(config)
    device = _validation_device(config.device)
    trainer_ref: list = []
    held_out = parent_card is not None  # a fine-tune's validation cases judge it against its parent: unseen
    if config.in_channels > 1:
        split, labeled, unlabeled, validation = _load_multimodal(config, reporter, held_out)
        validator = make_multimodal_validator(validation, config.patch_size, config.spacing,
                                              lambda: trainer_ref[0].method.exported_channel, device,
                                              log=reporter.log)
    else:
        split, labeled, unlabeled, validation = load_split(config, reporter, held_out)
        if config.wide_fov_prob > 0 and validation:  # trained for whole scans: selected on whole-scan canvases
            validation = wide_validation_cases(validation, labeled, config.spacing, config.wide_fov_max_mm,
                                               intensities=config.wide_fov_intensities,
                                               region=config.wide_fov_region_mm is not None,
                                               min_size=config.patch_size, normalization=config.normalization,
                                               reference=config.intensity_reference)
            reporter.log("validation also on whole-scan canvases (without and with a decoy atrium): "
                         f"{len(validation)} cases")
        validator = make_validator(validation, config.patch_size, config.spacing, device, log=reporter.log)
    reporter.log(f"{len(labeled)} labelled, {len(unlabeled)} unlabelled, {len(validation)} validation cases")
    active_validator = validator if validation else None
    if config.fit_to_budget and config.time_budget_s and not args.resume:
        from ..engine.budget import plan_to_budget

        comparisons = 2 if parent_card is not None else 1
        config = plan_to_budget(config, labeled, unlabeled, active_validator, initial, command_seconds, reporter,
                                export_evaluations=comparisons if validation else 1)
    trainer = Trainer(config, labeled, unlabeled, active_validator, reporter,
                      initial_weights=initial)
    trainer_ref.append(trainer)
    result = trainer.run(resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    exported = None
    if not args.no_export:
        from .export import export_run

        deadline = COMMAND_STARTED + float(config.time_budget_s) if config.time_budget_s else None
        exported = export_run(config, result, split, validation_records=split.validation,
                              parent_card=parent_card, name=args.name, reporter=reporter,
                              parent_folder=parent_folder, deadline=deadline)
    if exported:
        reporter.log(f"exported model {exported[0]} to {exported[1]}")
    guard = _guard_summary(exported[3] if exported else None)
    reporter.done(run_dir=str(Path(config.output).resolve()), iterations=result.iterations, guard=guard,
                  stopped_early=result.stopped_early, best_iteration=result.best_iteration,
                  model_id=exported[0] if exported else None, model_dir=str(exported[1]) if exported else None,
                  validation=exported[2] if exported else result.best_metrics,
                  left_out_unlabeled=dict(split.left_out))  # scan -> why it was not trained on
    return 0


def _guard_summary(finetune: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The parent/child check for the `done` record (the Slicer module keeps the parent when "worse")."""
    if not finetune:
        return None
    holdout = finetune.get("site_holdout") or {}
    return {"verdict": finetune.get("verdict"), "parent": finetune.get("parent"),
            "parent_dice": holdout.get("parent_dice"), "child_dice": holdout.get("child_dice"),
            "held_out_cases": finetune.get("held_out_cases"), "agreement": finetune.get("agreement")}


def _with_saved_plan(config: TrainConfig) -> TrainConfig:
    """A resumed budget-fitted run keeps the schedule it was planned with (its saved config.yaml)."""
    import dataclasses

    saved = load_config_file(Path(config.output) / "config.yaml")
    return dataclasses.replace(config, max_iterations=int(saved.get("max_iterations", config.max_iterations)),
                               loop_budget_s=saved.get("loop_budget_s"), iteration_cap=saved.get("iteration_cap"))


def _with_saved_reference(config: TrainConfig) -> TrainConfig:
    """A resumed run standardises onto the reference its weights were trained with (its saved config.yaml),
    even if cases were added to its data folder since."""
    import dataclasses

    saved = load_config_file(Path(config.output) / "config.yaml")
    return dataclasses.replace(config, intensity_reference=saved.get("intensity_reference"))


def _validation_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_finetune(args: argparse.Namespace) -> int:
    """Training that starts from a catalog model: its weights, patch size and spacing; parent recorded."""
    from ..checkpoints import load_model_weights, resolve_model

    folder = resolve_model(args.from_model)
    weights, card = load_model_weights(folder)
    info = card_get(card, "inference") or {}
    arch = (card_get(card, "architecture") or {}).get("config", {})
    base = load_preset(args.preset or finetune_preset(args.method))
    base.update({"patch_size": info["patch_size"], "spacing": info["spacing"],
                 "in_channels": int(arch.get("in_channels", 1)),
                 "normalization": info.get("normalization", "zscore-volume")})  # inputs as the parent saw them
    if info.get("intensity_reference") is not None:  # standardised onto the parent's reference histogram
        base["intensity_reference"] = list(info["intensity_reference"])
    if "patch_size" in (base.get("method_params") or {}):  # CRLN's DIM grid follows the parent's patch
        base["method_params"]["patch_size"] = list(info["patch_size"])
    _keep_parent_adapter(base, arch, card)
    _keep_parent_width(base, arch, card)
    base["role"] = card.role  # a localiser's child finds atria too
    if args.data and (args.labeled_num is None or args.val_num is None) and "labeled_num" not in base:
        labeled_num, val_num = _site_split(args)  # a site's folder; a training preset keeps its own split
        base["val_num"] = val_num
        if args.labeled_num is None:
            base["labeled_num"] = labeled_num
    # the parent is read again at export (blend, guard rail) from this folder: `--from FOLDER` need not be installed
    return run_train(args, initial=weights, parent_card=card, base=base, parent_folder=folder)


#: the methods whose network can carry a site adapter (models/adapter.py)
ADAPTER_METHODS = ("site_adapter", "supervised", "mean_teacher")


def _keep_parent_width(base: Dict[str, Any], arch: Dict[str, Any], card) -> None:
    """A parent narrower or wider than the V-Net's default 16 channels (the localiser has 8) is fine-tuned at
    its own width by the methods that train one V-Net; the others build theirs at 16 and could not load it."""
    width = int(arch.get("base", 16))
    if width == 16:
        return
    if base.get("method") not in ADAPTER_METHODS:
        raise ConfigError(f"{card_get(card, 'id')} is a V-Net {width} channels wide: fine-tune it with --method "
                          f"{' | '.join(ADAPTER_METHODS)}")
    base.setdefault("method_params", {})["base"] = width


def _keep_parent_adapter(base: Dict[str, Any], arch: Dict[str, Any], card) -> None:
    """A site-adapted parent (an intensity adapter in front of its V-Net) is fine-tuned with its adapter, by the
    methods that train one V-Net (the adapter alone, supervised, mean teacher); the others cannot take it."""
    width = arch.get("input_adapter")
    if not width:
        return
    if base.get("method") not in ADAPTER_METHODS:
        parent = (card_get(card, "lineage") or {}).get("parent")
        raise ConfigError(f"{card_get(card, 'id')} is a site-adapted model (an intensity adapter in front of its "
                          f"parent's V-Net): fine-tune it with --method {' | '.join(ADAPTER_METHODS)}"
                          + (f", or fine-tune its parent {parent} with this method" if parent else ""))
    base.setdefault("method_params", {})["input_adapter"] = int(width)


def finetune_preset(method: Optional[str]) -> str:
    """The fine-tune preset of a method: `finetune` (mean teacher, the default) or `finetune-<method>`."""
    from ..engine.config import preset_names

    if not method or method == "mean_teacher":
        return "finetune"
    name = "finetune-" + method.replace("_", "-")
    if name not in preset_names():
        raise ConfigError(f"no fine-tune preset for method {method!r}; available: "
                          + ", ".join(n for n in preset_names() if n.startswith("finetune")))
    return name


def _site_split(args: argparse.Namespace) -> tuple:
    """(labelled, held out): every labelled case trains, except the last `held_out_count` ones, held out for
    the parent/child check (their images still join the unlabelled pool)."""
    from .export import held_out_count

    records = open_dataset(args.data, args.train_list)
    n = sum(1 for r in records if r.label_path is not None)
    val = args.val_num if args.val_num is not None else held_out_count(n)
    if n - val < 1:
        raise InputError(f"{args.data}: fine-tuning needs at least one labelled case outside validation")
    return n - val, val


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


__all__ = ["register", "resolve_config", "run_train", "run_finetune", "Split", "TrainResult"]
