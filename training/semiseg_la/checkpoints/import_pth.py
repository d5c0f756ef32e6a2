"""Import official LA V-Net weights (UA-MT, MC-Net, CAML, SSL4MIS style `.pth`) as a catalog model.

Only `torch.load(..., weights_only=True)` is ever used: a file that needs pickle to load is refused,
whatever it claims to be. The official networks wrap each block's layers in `.conv` (an
nn.Sequential), optionally under `encoder`/`encoder1` and `decoder`/`decoder1`; this project's V-Net
uses the Sequential directly. Layer indices are matched by order of the layers that hold weights,
so the mapping also works where the two differ in parameter-free layers (e.g. normalization 'none').
"""

from __future__ import annotations

import functools
import pickle
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load as st_load

from ..errors import CheckpointError
from ..models.vnet import VNet
from .card import ModelCard, default_classes, default_inference, sha256_file, utc_now_iso
from .catalog import new_local_model_dir, unique_model_id
from .store import check_state_dict, save_model

_WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict", "network")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_ENCODER_GROUPS = ("", "encoder", "encoder1")  # "" = flat keys (UA-MT / SSL4MIS VNet)
_DECODER_GROUPS = ("", "decoder", "decoder1")  # CAML / MC-Net: decoder1 is the V (transposed-conv) branch

KeyParts = Tuple[str, str, str, Optional[int], str]  # part, group, block, layer index, leaf


def import_pth(path: Union[str, Path], dest_id: Optional[str] = None, method: str = "supervised",
               patch_size: Sequence[int] = (112, 112, 80), spacing: Sequence[float] = (0.625,) * 3,
               up_type: Optional[int] = None, norm: Optional[str] = None, description: str = "") -> Path:
    """Safely load, map and strictly check a V-Net checkpoint, then save it as a local model folder.

    `up_type`/`norm` override what is inferred from the weights (trilinear vs nearest upsampling and
    parameter-free norms such as non-affine instance norm cannot be told apart from shapes).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    source_sha = sha256_file(path)
    state = strip_prefixes(unwrap_state_dict(safe_load(path), path), path)
    mapped, config, dropped = convert_official_state_dict(state, up_type=up_type, norm=norm, source=str(path))
    net = VNet(**config)
    check_state_dict(net, mapped, str(path))
    net.load_state_dict(mapped, strict=True)
    model_id = dest_id or unique_model_id(f"imported-{path.stem}")
    card = _import_card(model_id, path, source_sha, method, config, patch_size, spacing, dropped, description)
    folder = new_local_model_dir(model_id)
    try:
        save_model(folder, net.state_dict(), card)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


# ---- safe loading -------------------------------------------------------------------------------
def safe_load(path: Path) -> Any:
    """weights_only torch.load (or safetensors); never falls back to full unpickling."""
    if path.suffix == ".safetensors":
        try:
            return st_load(path.read_bytes())
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing {path}: it needs pickle to load (not a plain state dict); "
                              "only weights_only-loadable files are imported") from exc
    except Exception as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise CheckpointError(f"refusing {path}: it needs pickle to load (not a plain state dict); "
                                  "only weights_only-loadable files are imported") from exc
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unwrap_state_dict(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    """A plain {name: tensor} dict, or one found under 'state_dict' / 'model' / 'net' (nested ok)."""
    for _ in range(4):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        inner = [obj[k] for k in _WRAPPER_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)]
        if not inner:
            break
        obj = inner[0]
    keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(f"{path}: no state dict found (expected name -> tensor, or one under "
                          f"'state_dict', 'model' or 'net'; found {keys})")


def strip_prefixes(state: Mapping[str, torch.Tensor], path: Path) -> Dict[str, torch.Tensor]:
    """Drop DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        while new.startswith(_STRIP_PREFIXES):
            new = new.split(".", 1)[1]
        if new in out:
            raise CheckpointError(f"{path}: key {new!r} appears twice once prefixes are stripped")
        out[new] = value
    return out


# ---- key mapping --------------------------------------------------------------------------------
@functools.cache
def _block_names() -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """Encoder and decoder block names, read from this project's V-Net rather than hard-coded."""
    template = VNet(base=2, norm="none")

    def names(module: torch.nn.Module) -> Tuple[str, ...]:
        return tuple(n for n, m in module.named_children() if any(True for _ in m.parameters()))
    return names(template.encoder), names(template.decoder)


def parse_key(key: str) -> Optional[KeyParts]:
    """(part, group, block, layer index, leaf) for a V-Net key in official or native naming, else None."""
    encoder_blocks, decoder_blocks = _block_names()
    tokens = key.split(".")
    group = ""
    if tokens[0] not in encoder_blocks + decoder_blocks:
        group, tokens = tokens[0], tokens[1:]
    if not tokens or tokens[0] not in encoder_blocks + decoder_blocks:
        return None
    part = "encoder" if tokens[0] in encoder_blocks else "decoder"
    block, rest = tokens[0], tokens[1:]
    if len(rest) >= 3 and rest[0] == "conv" and rest[1].isdigit():
        return part, group, block, int(rest[1]), ".".join(rest[2:])
    if len(rest) >= 2 and rest[0].isdigit():
        return part, group, block, int(rest[0]), ".".join(rest[1:])
    if len(rest) == 1:  # out_conv.weight: a bare layer
        return part, group, block, None, rest[0]
    return None


def convert_official_state_dict(state: Mapping[str, torch.Tensor], up_type: Optional[int] = None,
                                norm: Optional[str] = None, source: str = "checkpoint"
                                ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], List[str]]:
    """(state dict in this project's names, inferred VNet config, dropped top-level groups)."""
    parsed: Dict[str, KeyParts] = {}
    unrelated: List[str] = []
    for key in state:
        parts = parse_key(key)
        if parts is None:
            unrelated.append(key)
        else:
            parsed[key] = parts
    enc_group = _choose_group(parsed, "encoder", _ENCODER_GROUPS, source)
    dec_group = _choose_group(parsed, "decoder", _DECODER_GROUPS, source)
    selected = {k: p for k, p in parsed.items() if p[1] == (enc_group if p[0] == "encoder" else dec_group)}
    loose = [k for k in unrelated if "." not in k or k.split(".", 1)[0] in (enc_group, dec_group)]
    if loose:
        raise CheckpointError(f"{source}: cannot map key(s) to the V-Net: {', '.join(loose[:5])}")
    dropped = sorted({k.split(".", 1)[0] for k in state if k not in selected})
    config = infer_vnet_config(state, selected, up_type, norm, source)
    return _rename(state, selected, config, source), config, dropped


def _choose_group(parsed: Mapping[str, KeyParts], part: str, preferred: Sequence[str], source: str) -> str:
    groups = sorted({p[1] for p in parsed.values() if p[0] == part})
    for name in preferred:
        if name in groups:
            return name
    if len(groups) == 1:
        return groups[0]
    found = ", ".join(groups) if groups else "none"
    raise CheckpointError(f"{source}: cannot tell which V-Net {part} to import (found: {found})")


def infer_vnet_config(state: Mapping[str, torch.Tensor], selected: Mapping[str, KeyParts],
                      up_type: Optional[int], norm: Optional[str], source: str) -> Dict[str, Any]:
    """in_channels/base from the first conv, n_classes from out_conv, up_type and norm from layers."""
    first = _layer_weight(state, selected, "block_one", source)
    out = _layer_weight(state, selected, "out_conv", source)
    up = _layer_weight(state, selected, "block_five_up", source)
    inferred_up = 0 if up.dim() == 5 and tuple(up.shape[2:]) == (2, 2, 2) else 1
    return {"in_channels": int(first.shape[1]), "n_classes": int(out.shape[0]), "base": int(first.shape[0]),
            "norm": norm or _infer_norm(selected), "has_dropout": False,
            "up_type": inferred_up if up_type is None else int(up_type)}


def _layer_weight(state: Mapping[str, torch.Tensor], selected: Mapping[str, KeyParts], block: str,
                  source: str) -> torch.Tensor:
    """The weight of the first weighted layer of `block` (its convolution)."""
    candidates = sorted(((p[3] or 0), k) for k, p in selected.items() if p[2] == block and p[4] == "weight")
    if not candidates:
        raise CheckpointError(f"{source}: no {block} weights found; is this a V-Net checkpoint?")
    return state[candidates[0][1]]


def _infer_norm(selected: Mapping[str, KeyParts]) -> str:
    leaves = {p[4] for p in selected.values() if p[2] == "block_one"}
    layers = {p[3] for p in selected.values() if p[2] == "block_one"}
    if "running_mean" in leaves:
        return "batchnorm"
    return "groupnorm" if len(layers) > 1 else "none"


def _rename(state: Mapping[str, torch.Tensor], selected: Mapping[str, KeyParts], config: Mapping[str, Any],
            source: str) -> Dict[str, torch.Tensor]:
    """Map each block's weighted layers, in order, onto the target V-Net's weighted layers."""
    target = _target_layers(config)
    ours: Dict[Tuple[str, str], List[int]] = {}
    for part, _, block, index, _ in selected.values():
        if index is not None:
            ours.setdefault((part, block), [])
            if index not in ours[(part, block)]:
                ours[(part, block)].append(index)
    out: Dict[str, torch.Tensor] = OrderedDict()
    for key, (part, _, block, index, leaf) in selected.items():
        if index is None:
            out[f"{part}.{block}.{leaf}"] = state[key]
            continue
        theirs = sorted(ours[(part, block)])
        mine = target.get((part, block), [])
        if len(theirs) != len(mine):
            raise CheckpointError(f"{source}: {part} {block} has {len(theirs)} weighted layers, "
                                  f"this V-Net has {len(mine)} (different architecture or norm)")
        out[f"{part}.{block}.{mine[theirs.index(index)]}.{leaf}"] = state[key]
    return out


def _target_layers(config: Mapping[str, Any]) -> Dict[Tuple[str, str], List[int]]:
    """Indices of the weighted layers in each block of the V-Net the config describes."""
    layers: Dict[Tuple[str, str], List[int]] = {}
    for key in VNet(**config).state_dict():
        match = re.match(r"^(encoder|decoder)\.(\w+)\.(\d+)\.", key)
        if match:
            idx = layers.setdefault((match.group(1), match.group(2)), [])
            if int(match.group(3)) not in idx:
                idx.append(int(match.group(3)))
    return {k: sorted(v) for k, v in layers.items()}


# ---- card ---------------------------------------------------------------------------------------
def _import_card(model_id: str, path: Path, source_sha: str, method: str, config: Mapping[str, Any],
                 patch_size: Sequence[int], spacing: Sequence[float], dropped: List[str],
                 description: str) -> ModelCard:
    version = re.search(r"-v(\d+\.\d+\.\d+)$", model_id)
    name = model_id[: version.start()] if version else model_id
    classes = default_classes()
    for label in range(2, int(config["n_classes"])):
        classes[str(label)] = {"name": f"class {label}"}
    inference = default_inference(patch_size, spacing)
    inference["in_channels"] = int(config["in_channels"])
    imported = {"file": path.name, "sha256": source_sha, "dropped_groups": dropped,
                "inferred_config": dict(config)}
    notes = ("Imported from an external checkpoint; training data and validation are not known to "
             "semiseg-la. Check the patch size, spacing and normalization against the source.")
    return ModelCard(
        id=model_id, name=name, version=version.group(1) if version else "0.1.0", method=method,
        description=description or f"Imported from {path.name}",
        architecture={"name": "vnet", "config": dict(config)}, inference=inference, classes=classes,
        training={"source": "imported", "imported_from": imported, "notes": notes}, validation={},
        lineage={"parent": None, "parent_sha256": None, "imported_from": {"file": path.name, "sha256": source_sha},
                 "created": utc_now_iso()})
