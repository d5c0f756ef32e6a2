"""Model folders: safetensors weights (optionally sharded, optionally float16) + card.json.

Why this shape: safetensors cannot execute code, the card's SHA-256 makes tampering or a torn
download a clear error instead of a silently wrong segmentation, and writing card.json last makes
it the completion marker (a folder without it is an interrupted save, never a half model).
No pickle is used anywhere here.
"""

from __future__ import annotations

import json
import platform
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .. import __version__
from ..errors import CheckpointError
from ..io.atomic import atomic_write_bytes
from ..models.vnet import VNet
from .card import (
    CARD_FILE,
    INDEX_FILE,
    SINGLE_WEIGHTS,
    WEIGHT_DTYPES,
    ModelCard,
    parse_json_text,
    sha256_bytes,
    utc_now_iso,
)

DEFAULT_MAX_SHARD_BYTES = 16 * 2**20
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_STALE_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")

CardLike = Union[ModelCard, Mapping[str, Any]]
Builder = Callable[[Mapping[str, Any]], nn.Module]


# ---- architectures ------------------------------------------------------------------------------
_VNET_KEYS = ("in_channels", "n_classes", "base", "norm", "has_dropout", "up_type", "input_adapter")


def _build_vnet(config: Mapping[str, Any]) -> nn.Module:
    unknown = sorted(set(config) - set(_VNET_KEYS))
    if unknown:
        raise CheckpointError(f"architecture vnet: unknown config key(s) {', '.join(unknown)}")
    kwargs = dict(config)
    kwargs["has_dropout"] = False  # dropout is a training-time device only
    return VNet(**kwargs)


def _build_crln_rectified(config: Dict[str, Any]) -> nn.Module:
    from ..models.crln import build_crln_inference

    return build_crln_inference(config)


ARCHITECTURES: Dict[str, Builder] = {"vnet": _build_vnet, "crln-rectified": _build_crln_rectified}


def register_architecture(name: str, builder: Builder) -> None:
    """Let a method add its exported network (`builder(config) -> nn.Module`) under a card name."""
    ARCHITECTURES[name] = builder


def build_network(card: CardLike) -> nn.Module:
    """The network a card describes, in eval mode, with freshly initialised weights."""
    card = ModelCard.coerce(card)
    name = card.architecture["name"]
    builder = ARCHITECTURES.get(name)
    if builder is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise CheckpointError(f"model {card.id}: unknown architecture {name!r} (known: {known})")
    try:
        net = builder(dict(card.architecture.get("config", {})))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"model {card.id}: cannot build {name} from its config ({exc})") from exc
    return net.eval()


def check_state_dict(expected: Mapping[str, Any], state: Mapping[str, torch.Tensor], source: str,
                     what: str = "weights do not fit the network") -> None:
    """Strict key and shape comparison; every difference is listed in one line (never strict=False)."""
    if isinstance(expected, nn.Module):
        expected = expected.state_dict()
    problems: List[str] = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {list(state[k].shape)} vs expected {list(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_short(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: {what} ({'; '.join(problems)})")


def _short(items: List[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


# ---- saving -------------------------------------------------------------------------------------
def software_versions() -> Dict[str, str]:
    return {"semiseg_la": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def save_model(folder: Union[str, Path], state_dict: Mapping[str, torch.Tensor], card: CardLike,
               dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
               overwrite: bool = False, check_architecture: bool = True) -> Path:
    """Write weights (each file atomically), then card.json last with their SHA-256 and shapes.

    `overwrite=True` replaces a complete model in place: its card is removed first, so a crash
    midway leaves an incomplete folder rather than a card describing the wrong weights.
    """
    folder = Path(folder)
    card = ModelCard.coerce(card)
    if dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"model {card.id}: dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    if max_shard_bytes <= 0:
        raise CheckpointError(f"model {card.id}: max_shard_bytes must be positive")
    tensors = _prepare_tensors(state_dict, _TORCH_DTYPES[dtype], card.id)
    if check_architecture and card.architecture["name"] in ARCHITECTURES:
        check_state_dict(build_network(card), tensors, f"model {card.id}")
    _claim_folder(folder, overwrite)
    files = _write_weights(folder, tensors, max_shard_bytes)
    _remove_stale_weights(folder, files)
    card.weights = {"files": files, "dtype": dtype,
                    "tensors": {name: list(t.shape) for name, t in tensors.items()}}
    _fill_provenance(card)
    card.save(folder / CARD_FILE)
    return folder


def _prepare_tensors(state_dict: Mapping[str, torch.Tensor], float_dtype: torch.dtype,
                     model_id: str) -> OrderedDict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies; floats in the stored dtype, other dtypes untouched."""
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(f"model {model_id}: the state dict is empty or not a mapping")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in state_dict.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"model {model_id}: state dict entry {name!r} is not a named tensor")
        if tensor.layout != torch.strided:
            raise CheckpointError(f"model {model_id}: tensor {name} is not dense ({tensor.layout})")
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            converted = tensor.to(float_dtype)
            if float_dtype == torch.float16 and bool((torch.isfinite(tensor) & ~torch.isfinite(converted)).any()):
                raise CheckpointError(f"model {model_id}: tensor {name} exceeds the float16 range; "
                                      "save with dtype='float32'")
            tensor = converted
        out[name] = tensor.clone(memory_format=torch.contiguous_format)
    return out


def _claim_folder(folder: Path, overwrite: bool) -> None:
    card_path = folder / CARD_FILE
    if card_path.exists():
        if not overwrite:
            raise CheckpointError(f"{folder}: already holds a model (card.json); pass overwrite=True to replace it")
        card_path.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> List[List[str]]:
    """Greedy split in state-dict order; a tensor larger than the limit gets a shard of its own."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_weights(folder: Path, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> Dict[str, str]:
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        return {SINGLE_WEIGHTS: _write_safetensors(folder / SINGLE_WEIGHTS, tensors)}
    files: Dict[str, str] = {}
    weight_map: Dict[str, str] = {}
    count = len(shards)
    for i, names in enumerate(shards, start=1):
        shard_name = f"model-{i:05d}-of-{count:05d}.safetensors"
        files[shard_name] = _write_safetensors(folder / shard_name, {n: tensors[n] for n in names})
        weight_map.update({n: shard_name for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    data = (json.dumps(index, indent=2) + "\n").encode("utf-8")
    atomic_write_bytes(folder / INDEX_FILE, data)
    files[INDEX_FILE] = sha256_bytes(data)
    return files


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """Serialise in memory so the hash is of exactly the bytes written (no re-read race)."""
    data = st_save(dict(tensors), metadata={"format": "pt"})
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def _remove_stale_weights(folder: Path, keep: Iterable[str]) -> None:
    """An overwrite with a different shard count must not leave old shards lying around."""
    keep = set(keep)
    for path in folder.iterdir():
        if path.is_file() and _STALE_RE.match(path.name) and path.name not in keep:
            path.unlink()


def _fill_provenance(card: ModelCard) -> None:
    versions = software_versions()
    versions.update(card.software or {})
    card.software = versions
    card.created = card.created or utc_now_iso()
    lineage = dict(card.lineage or {})
    lineage.setdefault("parent", None)
    lineage.setdefault("parent_sha256", None)
    lineage.setdefault("created", card.created)
    card.lineage = lineage


# ---- loading ------------------------------------------------------------------------------------
def load_model_weights(folder: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], ModelCard]:
    """Verified weights (float tensors as float32) and the card; any inconsistency is a CheckpointError."""
    folder = Path(folder)
    card = ModelCard.load(folder)
    blobs = {name: _read_verified(folder / name, digest) for name, digest in card.weight_files.items()}
    if card.is_sharded:
        tensors = _parse_sharded(folder, blobs)
    else:
        tensors = _parse_safetensors(folder / SINGLE_WEIGHTS, blobs[SINGLE_WEIGHTS])
    _check_against_card(folder, tensors, card)
    ordered = {name: _as_float32(tensors[name]) for name in card.weights["tensors"]}
    return ordered, card


def _read_verified(path: Path, digest: str) -> bytes:
    """Read once and hash those bytes, so what is parsed is exactly what was verified."""
    if not path.is_file():
        raise CheckpointError(f"weights {path} listed in card.json are missing")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"weights {path}: cannot read ({exc})") from exc
    if sha256_bytes(data) != digest:
        raise CheckpointError(f"weights {path} do not match the SHA-256 in card.json (file changed or corrupted)")
    return data


def _parse_safetensors(path: Path, data: bytes) -> Dict[str, torch.Tensor]:
    try:
        return dict(st_load(data))
    except Exception as exc:  # untrusted bytes: any parser failure is the same user-facing problem
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"weights {path} are not a readable safetensors file ({reason})") from exc


def _parse_sharded(folder: Path, blobs: Mapping[str, bytes]) -> Dict[str, torch.Tensor]:
    index_path = folder / INDEX_FILE
    weight_map = _read_index(index_path, blobs[INDEX_FILE])
    shard_files = sorted(name for name in blobs if name != INDEX_FILE)
    referenced = sorted(set(weight_map.values()))
    if referenced != shard_files:
        raise CheckpointError(f"{index_path}: shard index names {referenced} but card.json lists {shard_files}")
    tensors: Dict[str, torch.Tensor] = {}
    for shard in shard_files:
        part = _parse_safetensors(folder / shard, blobs[shard])
        expected = {n for n, s in weight_map.items() if s == shard}
        if set(part) != expected:
            diff = sorted(set(part) ^ expected)
            raise CheckpointError(f"{index_path}: shard index disagrees with {shard} about {_short(diff)}")
        tensors.update(part)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    declared = _index_total(index_path, blobs[INDEX_FILE])
    if declared is not None and declared != total:
        raise CheckpointError(f"{index_path}: metadata.total_size {declared} differs from the shards' {total} bytes")
    return tensors


def _read_index(path: Path, data: bytes) -> Dict[str, str]:
    index = parse_json_text(data.decode("utf-8", errors="replace"), str(path))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: not a shard index (needs a non-empty 'weight_map' of name -> shard file)")
    return weight_map


def _index_total(path: Path, data: bytes) -> Optional[int]:
    meta = json.loads(data).get("metadata") or {}
    total = meta.get("total_size") if isinstance(meta, dict) else None
    return total if isinstance(total, int) else None


def _check_against_card(folder: Path, tensors: Mapping[str, torch.Tensor], card: ModelCard) -> None:
    declared = card.weights["tensors"]
    check_state_dict({k: _Shape(v) for k, v in declared.items()}, tensors, str(folder),
                     "weights differ from the tensors recorded in card.json")
    stored = _TORCH_DTYPES[card.weights["dtype"]]
    wrong = [f"{n} ({t.dtype})" for n, t in tensors.items() if t.is_floating_point() and t.dtype != stored]
    if wrong:
        raise CheckpointError(f"{folder}: card.json says {card.weights['dtype']} but found {_short(wrong)}")


class _Shape:
    """Stands in for a tensor when comparing against the shapes recorded in the card."""

    def __init__(self, shape: List[int]) -> None:
        self.shape = tuple(shape)


def _as_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def load_network(folder: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, ModelCard]:
    """Verified weights loaded strictly into the card's network, in eval mode on `device`."""
    weights, card = load_model_weights(folder)
    net = build_network(card)
    check_state_dict(net, weights, str(folder))
    net.load_state_dict(weights, strict=True)
    return net.to(device).eval(), card
