"""Training configuration: a dataclass, YAML presets, `key=value` overrides, saved into the run folder.

Hyper-parameter names follow SSL4MIS where they exist (labeled_num, labeled_bs, max_iterations,
base_lr, consistency, consistency_rampup, ema_decay).
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from ..errors import ConfigError
from ..preprocess.normalize import NORMALIZATIONS, Z_SCORED, check_reference
from ..preprocess.site_shift import AUGMENTATION_FAMILIES, FAMILIES


@dataclasses.dataclass
class TrainConfig:
    method: str = "supervised"
    preset: Optional[str] = None
    # data
    data: str = ""
    train_list: Optional[str] = "train.list"
    labeled_num: int = 8
    val_num: int = 8
    unlabeled_dir: Optional[str] = None
    use_unlabeled: bool = True
    # model geometry
    patch_size: List[int] = dataclasses.field(default_factory=lambda: [112, 112, 80])
    spacing: List[float] = dataclasses.field(default_factory=lambda: [0.625, 0.625, 0.625])
    in_channels: int = 1
    # optimisation
    max_iterations: int = 6000
    batch_size: int = 4
    labeled_bs: int = 2
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    optimizer: str = "sgd"  # sgd | adam (Adam takes base_lr and weight_decay; momentum/nesterov are SGD's)
    lr_policy: str = "step"  # constant | step | poly | multistep
    lr_step: int = 2500
    lr_gamma: float = 0.1
    poly_power: float = 0.9
    # the official per-epoch schedulers: with lr_epochs set, the LR changes once per max_iterations / lr_epochs
    # iterations, and lr_warmup, lr_milestones (multistep) and poly count those epochs; else they count iterations
    lr_epochs: Optional[int] = None
    lr_warmup: int = 0  # linear warm-up: factor (e + 1) / lr_warmup for the first lr_warmup epochs (iterations)
    lr_milestones: List[float] = dataclasses.field(default_factory=list)  # multistep: x lr_gamma at each
    min_lr: float = 0.0  # floor of the schedule (CRLN's PolyLR: 1e-6)
    # augmentation
    rot_flip: bool = True
    intensity_scale: List[float] = dataclasses.field(default_factory=lambda: [0.6, 1.6])
    intensity_shift: List[float] = dataclasses.field(default_factory=lambda: [-0.3, 1.0])
    intensity_prob: float = 0.8
    # wide field of view (preprocess/wide_fov.py): this share of labelled samples is placed in a whole-scan-
    # sized canvas of other training cases' tissue (atria painted out); decoys add a mirrored atrium beside it
    wide_fov_prob: float = 0.0
    wide_fov_decoy_prob: float = 0.0
    wide_fov_max_mm: float = 360.0
    # the intensities canvases are built from: "normalized" (each case as the model sees it alone) or "stored"
    # (as stored; the LA release z-scores each crop over its whole scan, so an atrium keeps its brightness
    # relative to its own scan, and to the tissue around it)
    wide_fov_intensities: str = "normalized"
    # a fine model's view of those canvases: null (the whole canvas: a localiser) or [low, high] mm, the box that
    # `segment --region auto` cuts around the atrium, each face's margin drawn from that range (it cuts 15 mm)
    wide_fov_region_mm: Optional[List[float]] = None
    # site-shift augmentation (preprocess/site_shift.py): this share of training samples (labelled and unlabelled)
    # passes through a random simulated site, 1 to `site_shift_max_families` of `site_shift_families` at
    # strengths up to `site_shift_strength`, so a model learns what differs between scanners; the mean teacher's
    # teacher sees the sample as it was (consistency across sites)
    site_shift_prob: float = 0.0
    site_shift_strength: float = 1.0
    site_shift_families: List[str] = dataclasses.field(default_factory=lambda: list(AUGMENTATION_FAMILIES))
    # at most this many families per simulated site (1..this many, no more than are listed, are drawn; another
    # scanner differs in several ways at once: `scanner` is a contrast curve, a coil's bias, thick slices and noise)
    site_shift_max_families: int = 3
    # where a sample meets its simulated site: false, the training patch after the normalisation (as before);
    # true, the whole crop or region before it is normalised again, as another site's scan reaches `segment`
    # (so a standardising model learns what its standardisation leaves of a site, not curves it would undo)
    site_shift_before_normalization: bool = False
    # a sample placed in a whole-scan canvas (`wide_fov_prob`) meets its simulated site over the whole canvas, before
    # its region is cut and normalised, as a scanner acquires a whole scan: a bias field across the whole field of
    # view, a contrast curve fitted to the whole scan's range (the same site over a region alone cost the bundled
    # default 24 Dice points less at a far site: docs/results.md, "A base trained with sites as far"); such a
    # patch is not shifted again, and the mean teacher's teacher sees it as the site acquired it
    site_shift_on_canvas: bool = False
    # whole scans among the cases (larger than an atrium crop, preprocess/wide_fov.py is_whole_scan) are cut as
    # `segment --region auto` cuts them before a fine model sees them: a labelled one to its atrium's box with a
    # 15 mm margin, an unlabelled one to the box the localiser finds (left out when it finds none). null (the
    # default) means on for a single-channel segmenter (a fine model is only ever shown regions, whether it is
    # fine-tuned on a site's scans or trained from scratch on whole scans), off for a localiser (trained on
    # whole scans) and for multi-modal cases (read as whole co-registered volumes)
    cut_whole_scans: Optional[bool] = None
    # how many times a labelled whole scan is cut (1: once, with that 15 mm margin); each further cut draws each
    # face's margin from `labelled_cut_margin_mm`, so a model fine-tuned on a few whole scans learns the atrium
    # in the regions `segment` may settle on (its own first pass decides them), not one region's intensities
    labelled_cuts: int = 1
    labelled_cut_margin_mm: List[float] = dataclasses.field(default_factory=lambda: [5.0, 25.0])
    # where a labelled whole scan's (first) cut lies: "label" (the label's box + 15 mm) or "localiser" (the box the
    # localiser finds, grown to hold the label's box + 15 mm: the region `segment` settles on when its first pass
    # is right; the label's box when the localiser finds nothing). Both options measured, neither adopted
    # (docs/results.md, "Whole scans at `scanner`")
    labelled_region: str = "label"
    # "segmenter" (the default) or "localiser": a coarse model that `segment --region auto` uses to find the
    # atrium in a whole scan; written into the model card
    role: str = "segmenter"
    # intensities of every training, validation and exported-model input (a volume as read):
    # "zscore-volume" (default; what `segment` does with user scans), "stored" (as stored: the LA h5
    # release is already z-scored over the whole uncropped scan, and the official code uses it as is) or
    # "minmax-volume" (the whole volume min-max scaled to [0, 1], CRLN's LA loader) or "standardized-zscore"
    # (each volume matched by its own percentiles onto `intensity_reference`, then z-scored: another scanner's
    # contrast curve is undone before the network sees the scan); recorded in the model card
    normalization: str = "zscore-volume"
    # standardized-zscore's reference landmarks (intensities at 0.5 ... 99.5 %); null: taken at the start of
    # training from the labelled training cases (a fine-tune keeps its parent's)
    intensity_reference: Optional[List[float]] = None
    # run control
    seed: int = 1337
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    # training batches made on the device: cases held there, augmentation and crops there (bit-identical draws);
    # ignored with wide_fov_prob > 0 (those canvases are built on the host)
    device_data: bool = False
    sync_batchnorm: bool = False  # under torchrun: BatchNorm statistics over every rank's batch
    # the next host batch (crops, augmentation, simulated sites, wide-FOV canvases) made in a background thread
    # while the current step runs; None = on when training on a GPU (on a CPU the thread takes a core from the
    # step). Batches and resumed runs are the same with and without it.
    prefetch: Optional[bool] = None
    # host batches made by this many forked processes instead (a GPU whose step outruns one host core): each
    # batch gets its own seed from the augmentation stream, so a run draws other batches than with 0, the same
    # ones with any number of processes, resumed or not
    loader_workers: int = 0
    validate_every: int = 200
    validate_from: int = 0
    checkpoint_every: int = 100
    val_overlap: float = 0.5
    log_every: int = 10
    time_budget_s: Optional[float] = None
    # with a time budget: measure a step first and size the schedule (max_iterations) to fit the budget,
    # which then counts the whole command (loading, training, export); max_iterations becomes a cap
    fit_to_budget: bool = False
    loop_budget_s: Optional[float] = None  # the training loop's share of the budget (set by the plan)
    iteration_cap: Optional[int] = None  # the preset's max_iterations, kept when the plan resizes the run
    output: str = ""
    # which checkpoint the catalog model is exported from: "best" (best validation Dice; the last one without a
    # validation split) or "last" (the final iteration, as the CAML paper reports)
    export_checkpoint: str = "best"
    init_from: Optional[str] = None
    freeze: List[str] = dataclasses.field(default_factory=list)  # parameter-name prefixes kept fixed
    # L2-SP: anchor_weight x the squared distance of the trained parameters from the initial (parent) ones is
    # added to the loss, so a fine-tune on a few cases stays near what the parent learnt from many
    anchor_weight: float = 0.0
    # WiSE-FT (Wortsman et al., CVPR 2022): a fine-tune exports (1 - parent_blend) x its own weights +
    # parent_blend x its parent's; a few site cases then move the model part of the way, which keeps what the
    # parent learnt from many cases (docs/results.md, site adaptation). 0 exports the fine-tuned weights as they are
    parent_blend: float = 0.0
    train_only: Optional[str] = None  # "norm": train the normalisation layers' parameters only
    method_params: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cut_whole_scans is None:
            self.cut_whole_scans = self.role == "segmenter" and self.in_channels == 1

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        problems = []
        if self.labeled_bs < 1 or self.labeled_bs > self.batch_size:
            problems.append(f"labeled_bs={self.labeled_bs} must be in 1..batch_size={self.batch_size}")
        if len(self.patch_size) != 3 or any(int(p) % 16 for p in self.patch_size):
            problems.append(f"patch_size={self.patch_size} must be 3 multiples of 16 (V-Net)")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            problems.append(f"spacing={self.spacing} must be 3 positive numbers (mm)")
        if self.max_iterations < 1:
            problems.append("max_iterations must be >= 1")
        if self.lr_policy not in LR_POLICIES:
            problems.append(f"lr_policy={self.lr_policy!r} must be one of {', '.join(LR_POLICIES)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} must be one of {', '.join(OPTIMIZERS)}")
        if self.lr_epochs is not None and int(self.lr_epochs) < 1:
            problems.append(f"lr_epochs={self.lr_epochs} must be >= 1")
        if self.lr_warmup < 0 or self.min_lr < 0:
            problems.append("lr_warmup and min_lr must be >= 0")
        if self.lr_policy == "multistep" and not self.lr_milestones:
            problems.append("lr_policy=multistep needs lr_milestones")
        if list(self.lr_milestones) != sorted(self.lr_milestones):
            problems.append(f"lr_milestones={self.lr_milestones} must be increasing")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization={self.normalization!r} must be one of {', '.join(NORMALIZATIONS)}")
        if self.normalization not in Z_SCORED and getattr(self, "wide_fov_prob", 0.0) > 0:
            problems.append("wide_fov_prob > 0 z-scores its canvases: it needs normalization zscore-volume or "
                            "standardized-zscore")
        if self.normalization == "standardized-zscore" and self.in_channels != 1:
            problems.append("normalization standardized-zscore needs single-channel images (in_channels 1)")
        if self.intensity_reference is not None:
            try:
                check_reference(self.intensity_reference)
            except ValueError as exc:
                problems.append(str(exc))
        if self.export_checkpoint not in ("best", "last"):
            problems.append(f"export_checkpoint={self.export_checkpoint!r} must be best or last")
        volume_space = (self.method == "crln" and (self.method_params or {}).get("input_space") == "minmax_volume")
        if volume_space != (self.method == "crln" and self.normalization == "minmax-volume"):
            problems.append("CRLN: method_params.input_space minmax_volume and normalization minmax-volume go "
                            "together (the network then sees whole-volume [0, 1] intensities)")
        if self.labeled_num < 1:
            problems.append("labeled_num must be >= 1")
        if not 0.0 <= self.wide_fov_prob <= 1.0 or not 0.0 <= self.wide_fov_decoy_prob <= 1.0:
            problems.append("wide_fov_prob and wide_fov_decoy_prob must be in [0, 1]")
        if self.wide_fov_intensities not in WIDE_FOV_INTENSITIES:
            problems.append(f"wide_fov_intensities={self.wide_fov_intensities!r} must be one of "
                            + ", ".join(WIDE_FOV_INTENSITIES))
        for name, span in (("wide_fov_region_mm", self.wide_fov_region_mm),
                           ("labelled_cut_margin_mm", self.labelled_cut_margin_mm)):
            if span is not None and (len(span) != 2 or not 0 <= span[0] <= span[1]):
                problems.append(f"{name}={span} must be [low, high] with 0 <= low <= high")
        if self.labelled_cuts < 1:
            problems.append("labelled_cuts must be >= 1")
        if self.labelled_region not in ("label", "localiser"):
            problems.append(f"labelled_region={self.labelled_region!r} must be label or localiser")
        if self.wide_fov_prob > 0 and self.in_channels != 1:
            problems.append("wide_fov_prob > 0 needs single-channel images (in_channels 1)")
        if not 0.0 <= self.site_shift_prob <= 1.0 or not 0.0 <= self.site_shift_strength <= 2.0:
            problems.append("site_shift_prob must be in [0, 1] and site_shift_strength in [0, 2]")
        unknown = [f for f in self.site_shift_families if f not in FAMILIES]
        if unknown or not self.site_shift_families:
            problems.append(f"site_shift_families must name families of {', '.join(FAMILIES)}; got {unknown or '[]'}")
        if not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            problems.append(f"loader_workers={self.loader_workers!r} must be an integer >= 0")
        if self.site_shift_max_families < 1:
            problems.append(f"site_shift_max_families={self.site_shift_max_families} must be >= 1")
        if self.site_shift_prob > 0 and self.in_channels != 1:
            problems.append("site_shift_prob > 0 needs single-channel images (in_channels 1)")
        if self.site_shift_on_canvas and (self.site_shift_prob <= 0 or self.wide_fov_prob <= 0):
            problems.append("site_shift_on_canvas needs site_shift_prob > 0 and wide_fov_prob > 0 (the canvases "
                            "that meet the sites)")
        if not 0.0 <= self.parent_blend < 1.0:
            problems.append("parent_blend must be in [0, 1): the parent's share of the exported weights")
        if self.anchor_weight < 0:
            problems.append("anchor_weight must be >= 0")
        if self.role not in ("segmenter", "localiser"):
            problems.append(f"role={self.role!r} must be segmenter or localiser")
        if self.cut_whole_scans and self.role == "localiser":
            problems.append("cut_whole_scans is for fine models: a localiser is trained on whole scans")
        if self.cut_whole_scans and self.in_channels != 1:
            problems.append("cut_whole_scans needs single-channel images (multi-modal cases are read whole)")
        if self.compile:
            problems.append("compile=true is not implemented yet (torch.compile of the training networks)")
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
LR_POLICIES = ("constant", "step", "poly", "multistep")
OPTIMIZERS = ("sgd", "adam")
WIDE_FOV_INTENSITIES = ("normalized", "stored")


def preset_names() -> List[str]:
    folder = resources.files("semiseg_la") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> Dict[str, Any]:
    path = resources.files("semiseg_la") / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return _load_yaml_text(path.read_text(), f"preset {name}")


def load_config_file(path: str | Path) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    return _load_yaml_text(p.read_text(), str(p))


def _load_yaml_text(text: str, where: str) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: invalid YAML{pos}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings")
    return data


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """`key=value` pairs, values parsed as YAML; `method_params.x=1` reaches nested settings."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def build_config(*layers: Mapping[str, Any]) -> TrainConfig:
    """Merge layers left to right (defaults < preset < file < flags < overrides) into a checked config."""
    merged: Dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None and key in merged:
                continue
            if key == "method_params" and isinstance(value, Mapping):
                merged.setdefault("method_params", {}).update(value)
            else:
                merged[key] = value
    unknown = sorted(set(merged) - FIELDS)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    config = TrainConfig(**merged)
    config.validate()
    return config


def dump_config(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
