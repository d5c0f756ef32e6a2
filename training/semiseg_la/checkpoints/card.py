"""The model card: `card.json`, the data-only description that travels with a model's weights.

The card is plain JSON (never code or expressions) so that a clinician's Slicer, the CLI and a
reviewer can all read it, and so that loading a model never executes anything. It is also the
completion marker of a model folder and the trust anchor for the weights (their SHA-256).
This module imports no torch, so the Slicer module can list models without loading it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..errors import CheckpointError
from ..io.atomic import atomic_write_text
from ..preprocess.normalize import NORMALIZATIONS, check_reference

FORMAT_VERSION = 1
CARD_FILE = "card.json"
SINGLE_WEIGHTS = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_DTYPES = ("float16", "float32")

# Model ids become folder names: no separators, no leading dot, nothing a shell or Windows dislikes.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The only file names a card may point at, so a crafted card cannot read files outside its folder.
_WEIGHT_NAME_RE = re.compile(
    r"^(model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json)$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

KEY_ORDER = ("format_version", "id", "name", "version", "method", "description", "architecture", "inference",
             "classes", "training", "validation", "weights", "lineage", "software", "created")
REQUIRED_KEYS = ("format_version", "id", "name", "version", "method", "architecture", "inference", "classes")

LEFT_ATRIUM_TERMINOLOGY = {"category": "SCT^123037004^Anatomical Structure", "type": "SCT^82471001^Left atrium"}


def default_classes() -> Dict[str, Dict[str, Any]]:
    """Background + left atrium, coded in SNOMED CT so Slicer names and colours the segment correctly."""
    return {"0": {"name": "background"},
            "1": {"name": "Left atrium", "terminology": dict(LEFT_ATRIUM_TERMINOLOGY), "color": [205, 95, 80]}}


def default_inference(patch_size: Sequence[int] = (112, 112, 80),
                      spacing: Sequence[float] = (0.625, 0.625, 0.625)) -> Dict[str, Any]:
    """The LA benchmark's preprocessing contract (whole-volume z-score, 0.625 mm, MR, one channel)."""
    return {"patch_size": [int(p) for p in patch_size], "spacing": [float(s) for s in spacing],
            "orientation": "identity (LPS-aligned index axes)", "normalization": "zscore-volume",
            "in_channels": 1, "modality": "MR", "channel_names": {"0": "LGE-MRI"}}


def utc_now_iso() -> str:
    """Timestamps in cards are UTC with seconds, so they sort and compare across sites."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def is_valid_model_id(model_id: str) -> bool:
    return isinstance(model_id, str) and bool(_ID_RE.match(model_id)) and ".." not in model_id


def check_model_id(model_id: str) -> str:
    """Ids are folder names: reject anything that could escape the models folder."""
    if not is_valid_model_id(model_id):
        raise CheckpointError(f"invalid model id {model_id!r}: use letters, digits, '.', '_' or '-' "
                              "(starting with a letter or digit, at most 128 characters)")
    return model_id


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: os.PathLike | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelCard:
    """Typed view of card.json; unknown top-level keys are kept in `extra` and written back."""

    id: str
    name: str
    version: str
    method: str
    architecture: Dict[str, Any]
    inference: Dict[str, Any]
    classes: Dict[str, Any]
    description: str = ""
    training: Dict[str, Any] = field(default_factory=dict)
    validation: Dict[str, Any] = field(default_factory=dict)
    weights: Dict[str, Any] = field(default_factory=dict)
    lineage: Dict[str, Any] = field(default_factory=lambda: {"parent": None, "parent_sha256": None})
    software: Dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str:
        """"segmenter", or "localiser" for a whole-scan atrium finder (`segment --region auto` uses one)."""
        return str(self.extra.get("role") or "segmenter")

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        ordered = {key: copy.deepcopy(getattr(self, key)) for key in KEY_ORDER}
        for key, value in self.extra.items():
            ordered.setdefault(key, copy.deepcopy(value))
        return ordered

    def to_json(self) -> str:
        """Strict JSON (no NaN/Infinity tokens: non-finite numbers become null)."""
        try:
            return json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False, default=_json_default) + "\n"
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"model card {self.id!r} holds non-JSON data: {exc}") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "card", require_weights: bool = True) -> ModelCard:
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source}: a model card must be a JSON object, got {type(data).__name__}")
        _validate(data, source, require_weights)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: copy.deepcopy(v) for k, v in data.items() if k in known}
        extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, text: str, source: str = "card.json", require_weights: bool = True) -> ModelCard:
        return cls.from_dict(parse_json_text(text, source), source, require_weights)

    @classmethod
    def coerce(cls, card: ModelCard | Mapping[str, Any], require_weights: bool = False) -> ModelCard:
        """Accept a ModelCard or a plain dict (as callers build them) and validate it."""
        if isinstance(card, ModelCard):
            card = card.to_dict()
        return cls.from_dict(card, f"model card {card.get('id', '?')!r}" if isinstance(card, Mapping) else "card",
                             require_weights)

    @classmethod
    def load(cls, folder_or_file: os.PathLike | str, require_weights: bool = True) -> ModelCard:
        """Read `<folder>/card.json` (or the named file); every problem is a one-line CheckpointError."""
        path = Path(folder_or_file)
        if path.is_dir():
            path = path / CARD_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: not found (a model folder needs card.json; "
                                  "a folder without it is an incomplete or interrupted save)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read ({exc})") from exc
        return cls.from_json(text, str(path), require_weights)

    def save(self, folder_or_file: os.PathLike | str) -> Path:
        """Atomic write, so a reader never sees half a card (card.json marks a complete model)."""
        path = Path(folder_or_file)
        if path.is_dir() or path.suffix != ".json":
            path = path / CARD_FILE
        atomic_write_text(path, self.to_json())
        return path

    # ---- convenience accessors ---------------------------------------------------------------
    @property
    def patch_size(self) -> List[int]:
        return [int(v) for v in self.inference["patch_size"]]

    @property
    def spacing(self) -> List[float]:
        return [float(v) for v in self.inference["spacing"]]

    @property
    def parent(self) -> Optional[str]:
        return (self.lineage or {}).get("parent")

    @property
    def labeled_cases(self) -> Any:
        return (self.training or {}).get("labeled_cases")

    @property
    def validation_dice(self) -> Optional[float]:
        return find_dice(self.validation)

    @property
    def dice_kind(self) -> str:
        """What `validation_dice` measures: "validation" (held-out cases of the training data), "site
        hold-out" (a site's labelled case kept out of its fine-tune), "training fit" (cases it was trained
        on: optimistic) or "none"; older cards without `figure` are read from their `split` text."""
        validation = self.validation or {}
        if self.validation_dice is None:
            return "none"
        figure = validation.get("figure")
        if isinstance(figure, str) and figure:
            return figure
        return "training fit" if "training fit" in str(validation.get("split", "")) else "validation"

    @property
    def weight_files(self) -> Dict[str, str]:
        return dict((self.weights or {}).get("files", {}))

    @property
    def is_sharded(self) -> bool:
        return INDEX_FILE in self.weight_files


def find_dice(validation: Mapping[str, Any] | None) -> Optional[float]:
    """The card's validation Dice, whether stored as a number or as {"mean": ...}."""
    for key, value in (validation or {}).items():
        if str(key).lower() not in ("dice", "dice_mean", "mean_dice"):
            continue
        if isinstance(value, Mapping):
            value = value.get("mean")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def weights_fingerprint(card: ModelCard) -> str:
    """One hash for a model's weights: the file's SHA-256, or a hash over the shard hashes.

    Used as `lineage.parent_sha256`, so a child records exactly which parent weights it started from.
    """
    files = card.weight_files
    if len(files) == 1:
        return next(iter(files.values()))
    listing = "".join(f"{name}:{files[name]}\n" for name in sorted(files))
    return sha256_bytes(listing.encode("utf-8"))


def parse_json_text(text: str, source: str) -> Any:
    """json.loads with an error that names the file, line and column (a stray comma must be findable)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc


# ---- validation -------------------------------------------------------------------------------
def _validate(data: Mapping[str, Any], source: str, require_weights: bool) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if require_weights and "weights" not in data:
        missing.append("weights")
    if missing:
        raise CheckpointError(f"{source}: missing required key(s): {', '.join(missing)}")
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{source}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {version} is newer than this semiseg-la supports "
                              f"({FORMAT_VERSION}); upgrade semiseg-la")
    if not is_valid_model_id(data["id"]):
        raise CheckpointError(f"{source}: invalid id {data['id']!r} (letters, digits, '.', '_', '-')")
    for key in ("name", "version", "method"):
        _expect(isinstance(data[key], str) and data[key] != "", source, key, "a non-empty string")
    for key in ("description", "created"):
        _expect(isinstance(data.get(key, ""), str), source, key, "a string")
    for key in ("training", "validation", "software", "lineage"):
        _expect(isinstance(data.get(key, {}), Mapping), source, key, "an object")
    _validate_architecture(data["architecture"], source)
    _validate_inference(data["inference"], source)
    _validate_classes(data["classes"], source)
    if require_weights or data.get("weights"):
        _validate_weights(data.get("weights"), source)


def _expect(ok: bool, source: str, key: str, what: str) -> None:
    if not ok:
        raise CheckpointError(f"{source}: {key} must be {what}")


def _validate_architecture(arch: Any, source: str) -> None:
    _expect(isinstance(arch, Mapping), source, "architecture", "an object {name, config}")
    _expect(isinstance(arch.get("name"), str) and arch["name"] != "", source, "architecture.name",
            "a non-empty string")
    _expect(isinstance(arch.get("config", {}), Mapping), source, "architecture.config", "an object")


def _validate_inference(inf: Any, source: str) -> None:
    _expect(isinstance(inf, Mapping), source, "inference", "an object")
    for key in ("patch_size", "spacing"):
        if key not in inf:
            raise CheckpointError(f"{source}: missing required key(s): inference.{key}")
    patch = inf["patch_size"]
    _expect(_is_list_of(patch, int, 3) and all(p > 0 for p in patch), source, "inference.patch_size",
            "three positive integers")
    spacing = inf["spacing"]
    _expect(_is_list_of(spacing, (int, float), 3) and all(math.isfinite(s) and s > 0 for s in spacing),
            source, "inference.spacing", "three positive numbers (mm)")
    if "in_channels" in inf:
        _expect(isinstance(inf["in_channels"], int) and inf["in_channels"] > 0, source, "inference.in_channels",
                "a positive integer")
    normalization = inf.get("normalization", "zscore-volume")
    _expect(normalization in NORMALIZATIONS, source, "inference.normalization", "one of " + ", ".join(NORMALIZATIONS))
    if normalization == "standardized-zscore" or "intensity_reference" in inf:
        reference = inf.get("intensity_reference")
        _expect(_is_list_of(reference, (int, float), None), source, "inference.intensity_reference",
                "a list of numbers (standardized-zscore's landmarks)")
        try:
            check_reference(reference, "inference.intensity_reference")
        except ValueError as exc:
            raise CheckpointError(f"{source}: {exc}") from None


def _validate_classes(classes: Any, source: str) -> None:
    _expect(isinstance(classes, Mapping) and len(classes) > 0, source, "classes", "a non-empty object")
    for key, value in classes.items():
        _expect(str(key).isdigit(), source, f"classes key {key!r}", "a label value (digits)")
        _expect(isinstance(value, Mapping) and isinstance(value.get("name"), str), source, f"classes.{key}",
                "an object with a 'name'")
        if "color" in value:
            _expect(_is_list_of(value["color"], int, 3) and all(0 <= c <= 255 for c in value["color"]),
                    source, f"classes.{key}.color", "three integers 0-255")


def _validate_weights(weights: Any, source: str) -> None:
    _expect(isinstance(weights, Mapping), source, "weights", "an object {files, dtype, tensors}")
    files = weights.get("files")
    _expect(isinstance(files, Mapping) and len(files) > 0, source, "weights.files", "a non-empty object")
    for name, digest in files.items():
        if not _WEIGHT_NAME_RE.match(str(name)):
            raise CheckpointError(f"{source}: weights.files names {name!r}, which is not a model weight file name")
        _expect(isinstance(digest, str) and bool(_SHA_RE.match(digest)), source, f"weights.files[{name!r}]",
                "a lowercase hex SHA-256")
    sharded = INDEX_FILE in files
    if sharded == (SINGLE_WEIGHTS in files):
        raise CheckpointError(f"{source}: weights.files must list either {SINGLE_WEIGHTS} or {INDEX_FILE} "
                              "with its shards")
    if not sharded and len(files) != 1:
        raise CheckpointError(f"{source}: weights.files lists shards without {INDEX_FILE}")
    _expect(weights.get("dtype") in WEIGHT_DTYPES, source, "weights.dtype", "'float16' or 'float32'")
    tensors = weights.get("tensors")
    _expect(isinstance(tensors, Mapping) and len(tensors) > 0, source, "weights.tensors", "a non-empty object")
    for name, shape in tensors.items():
        _expect(_is_list_of(shape, int, None) and all(s >= 0 for s in shape), source,
                f"weights.tensors[{name!r}]", "a list of non-negative integers")


def _is_list_of(value: Any, kind: Any, length: Optional[int]) -> bool:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        return False
    return all(isinstance(v, kind) and not isinstance(v, bool) for v in value)


def _finite(value: Any) -> Any:
    """Replace NaN/inf by None: JSON has no such numbers and strict parsers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():  # numpy / torch scalars
        return _finite(item())
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON data")
