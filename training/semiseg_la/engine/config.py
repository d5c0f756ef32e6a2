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
    lr_policy: str = "step"  # constant | step | poly
    lr_step: int = 2500
    lr_gamma: float = 0.1
    poly_power: float = 0.9
    # augmentation
    rot_flip: bool = True
    intensity_scale: List[float] = dataclasses.field(default_factory=lambda: [0.6, 1.6])
    intensity_shift: List[float] = dataclasses.field(default_factory=lambda: [-0.3, 1.0])
    intensity_prob: float = 0.8
    # run control
    seed: int = 1337
    deterministic: bool = False
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    sync_batchnorm: bool = False  # under torchrun: BatchNorm statistics over every rank's batch
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
    init_from: Optional[str] = None
    freeze: List[str] = dataclasses.field(default_factory=list)  # parameter-name prefixes kept fixed
    train_only: Optional[str] = None  # "norm": train the normalisation layers' parameters only
    method_params: Dict[str, Any] = dataclasses.field(default_factory=dict)

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
        if self.lr_policy not in ("constant", "step", "poly"):
            problems.append(f"lr_policy={self.lr_policy!r} must be constant, step or poly")
        if self.labeled_num < 1:
            problems.append("labeled_num must be >= 1")
        if self.compile:
            problems.append("compile=true is not implemented yet (torch.compile of the training networks)")
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


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
