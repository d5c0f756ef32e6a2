"""The model catalog: bundled (shipped, immutable), site (institution-wide) and local (user) models.

Every model is a folder `<root>/<id>/` holding card.json + weights. Lookups go bundled -> site ->
local, so a user folder can never shadow a shipped model. Listing never fails on one broken
folder: that entry carries an `error` instead, so the Slicer dropdown and `semiseg-la models`
still show everything else. No torch import here (the Slicer module lists models at load).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import CheckpointError
from .card import CARD_FILE, ModelCard, check_model_id, is_valid_model_id, parse_json_text

# The package's bundled models; tests monkeypatch this to a temporary folder.
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "catalog" / "bundled"
DEFAULT_FILE = "default.json"
HOME_ENV = "SEMISEG_LA_HOME"
SITE_ENV = "SEMISEG_LA_MODELS"
DEFAULT_ENV = "SEMISEG_LA_DEFAULT_MODEL"
LOCALISER_ENV = "SEMISEG_LA_LOCALISER"  # the localiser `segment --region auto` uses (a model id or folder)
DEFAULT_ALIAS = "default"  # accepted wherever a model id is: the current default model
NO_MODEL_MESSAGE = "no model installed; train one with `semiseg-la train` or pass --model"


@dataclass
class CatalogEntry:
    """One catalog row; `error` is set (and the other fields may be empty) for a broken folder."""

    id: str
    source: str  # "bundled" | "site" | "local"
    path: Path
    name: Optional[str] = None
    version: Optional[str] = None
    method: Optional[str] = None
    description: str = ""
    labeled_cases: Any = None
    unlabeled_cases: Any = None
    validation_dice: Optional[float] = None
    dice_kind: str = "none"  # what the Dice measures: validation | site hold-out | training fit | none
    parent: Optional[str] = None
    created: Optional[str] = None
    role: str = "segmenter"  # "localiser": finds the atrium in whole scans for `segment --region auto`
    error: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["dice"] = self.validation_dice  # the short name `models list --json` readers use
        return data


# ---- where models live --------------------------------------------------------------------------
def bundled_dir() -> Path:
    return BUNDLED_DIR


def models_home() -> Path:
    """`$SEMISEG_LA_HOME`, else `~/.semiseg-la`: outside any Slicer install, shared across versions."""
    env = os.environ.get(HOME_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".semiseg-la"


def local_models_dir() -> Path:
    return models_home() / "models"


def site_model_dirs() -> List[Path]:
    """`$SEMISEG_LA_MODELS`: one or more (os.pathsep-separated) institution-wide model folders."""
    env = os.environ.get(SITE_ENV, "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]


def catalog_roots() -> List[Tuple[str, Path]]:
    """(source, folder) in lookup precedence order."""
    return [("bundled", bundled_dir())] + [("site", p) for p in site_model_dirs()] + [("local", local_models_dir())]


# ---- listing ------------------------------------------------------------------------------------
def list_models() -> List[CatalogEntry]:
    """All models, bundled first; a later folder reusing an earlier id is listed with an error."""
    entries: List[CatalogEntry] = []
    seen: Dict[str, CatalogEntry] = {}
    for source, root in catalog_roots():
        for entry in _scan(root, source):
            first = seen.setdefault(entry.id, entry)
            if first is not entry and entry.error is None:
                entry.error = f"id already used by the {first.source} model at {first.path}; this copy is ignored"
            entries.append(entry)
    return entries


def _scan(root: Path, source: str) -> List[CatalogEntry]:
    if not root.is_dir():
        return []
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [read_entry(child, source) for child in children]


def read_entry(folder: Path, source: str) -> CatalogEntry:
    """A catalog row from a folder's card; cheap (no hashing), problems go to `error`."""
    try:
        card = ModelCard.load(folder)
    except CheckpointError as exc:
        return CatalogEntry(id=folder.name, source=source, path=folder, error=str(exc))
    entry = CatalogEntry(id=card.id, source=source, path=folder, name=card.name, version=card.version,
                         method=card.method, description=card.description, labeled_cases=card.labeled_cases,
                         unlabeled_cases=(card.training or {}).get("unlabeled_cases"),
                         validation_dice=card.validation_dice, dice_kind=card.dice_kind, parent=card.parent,
                         created=card.created or None, role=card.role)
    missing = [name for name in card.weight_files if not (folder / name).is_file()]
    if source != "path" and card.id != folder.name:
        entry.error = f"{folder / CARD_FILE}: id {card.id!r} differs from the folder name {folder.name!r}"
    elif missing:
        entry.error = f"{folder}: weight file(s) listed in card.json are missing: {', '.join(missing)}"
    return entry


def find_model(model_id: str) -> Optional[CatalogEntry]:
    """The entry that `model_id` resolves to (bundled, then site, then local), or None."""
    if not is_valid_model_id(model_id):
        return None
    for source, root in catalog_roots():
        if (root / model_id).is_dir():
            return read_entry(root / model_id, source)
    return None


# ---- resolution ---------------------------------------------------------------------------------
def validation_model_id(model: Optional[str] = None) -> str:
    """`model` (default: the default model), or the validation run its card names (`validation.validation_run`):
    a final model trained on every labelled case would score its own training cases on the validation split,
    so benchmarks that score that split take its validation run instead."""
    card = ModelCard.load(resolve_model(model))
    return str((card.validation or {}).get("validation_run") or card.id)


def default_model_id() -> str:
    """`$SEMISEG_LA_DEFAULT_MODEL`, else bundled default.json, else the first bundled model."""
    env = os.environ.get(DEFAULT_ENV, "").strip()
    if env:
        return env
    default_file = bundled_dir() / DEFAULT_FILE
    if default_file.is_file():
        return _read_default_file(default_file)
    usable = [e for e in _scan(bundled_dir(), "bundled") if e.error is None]
    if usable:
        return usable[0].id
    raise CheckpointError(NO_MODEL_MESSAGE)


def default_localiser_id() -> Optional[str]:
    """`$SEMISEG_LA_LOCALISER`, else bundled default.json's "localiser", else the first usable model whose
    card says role "localiser" (bundled, site, then local); None when no localiser is installed."""
    env = os.environ.get(LOCALISER_ENV, "").strip()
    if env:
        return env
    default_file = bundled_dir() / DEFAULT_FILE
    if default_file.is_file():
        data = parse_json_text(default_file.read_text(encoding="utf-8"), str(default_file))
        named = data.get("localiser") if isinstance(data, dict) else None
        if isinstance(named, str) and is_valid_model_id(named):
            return named
    found = [e.id for e in list_models() if e.error is None and e.role == "localiser"]
    return found[0] if found else None


def _read_default_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    data = parse_json_text(text, str(path))
    model_id = data.get("default") if isinstance(data, dict) else None
    if not isinstance(model_id, str) or not is_valid_model_id(model_id):
        raise CheckpointError(f"{path}: must be {{\"default\": \"<model id>\"}}, got {text.strip()[:80]!r}")
    return model_id


def resolve_model(model_id: Optional[str] = None) -> Path:
    """The folder of a catalog id, of an explicit model folder path, or (None) of the default model."""
    if model_id is None or model_id == DEFAULT_ALIAS:
        model_id = default_model_id()
    if _looks_like_path(model_id):
        return _model_folder(Path(model_id))
    entry = find_model(model_id)
    if entry is not None:
        if entry.error is not None:
            raise CheckpointError(f"model {model_id} ({entry.source}) is broken: {entry.error}")
        return entry.path
    if Path(model_id).is_dir():
        return _model_folder(Path(model_id))
    known = [e.id for e in list_models() if e.error is None]
    listing = ", ".join(known) if known else "none"
    raise CheckpointError(f"unknown model {model_id!r}; installed: {listing} (see `semiseg-la models`)")


def _looks_like_path(text: str) -> bool:
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    return any(s in text for s in seps) or text.startswith(("~", "."))


def _model_folder(path: Path) -> Path:
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist")
    if not (path / CARD_FILE).is_file():
        raise CheckpointError(f"{path}: not a model folder (no card.json; an incomplete save?)")
    return path


# ---- local models -------------------------------------------------------------------------------
def new_local_model_dir(model_id: str) -> Path:
    """Create and return `<home>/models/<id>/`; an id already in use anywhere is refused."""
    check_model_id(model_id)
    entry = find_model(model_id)
    if entry is not None:
        raise CheckpointError(f"model id {model_id!r} already exists ({entry.source}: {entry.path}); "
                              "choose another id (see unique_model_id)")
    root = local_models_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / model_id
    try:
        folder.mkdir()
    except FileExistsError as exc:
        raise CheckpointError(f"model id {model_id!r} already exists ({folder})") from exc
    return folder


def remove_local_model(model_id: str) -> Path:
    """Delete a local model (even a broken one); bundled and site models are refused."""
    check_model_id(model_id)
    folder = local_models_dir() / model_id
    if not folder.is_dir():
        entry = find_model(model_id)
        if entry is not None and entry.source == "bundled":
            raise CheckpointError(f"cannot remove {model_id}: bundled models are immutable")
        if entry is not None and entry.source == "site":
            raise CheckpointError(f"cannot remove {model_id}: it is in the site folder {entry.path.parent}, "
                                  "which its administrators manage")
        raise CheckpointError(f"unknown local model {model_id!r} (see `semiseg-la models`)")
    # Rename first (atomic) so the model vanishes from listings at once, even if rmtree is interrupted.
    trash = folder.with_name(f".removing-{model_id}-{uuid.uuid4().hex[:8]}")
    os.replace(folder, trash)
    shutil.rmtree(trash)
    return folder


def lineage(model_id: str) -> List[str]:
    """[model, parent, grandparent, ...]; stops at a root or at an ancestor that is not installed."""
    entry = _entry_for(model_id)
    if entry.error is not None:
        raise CheckpointError(f"model {model_id}: {entry.error}")
    chain = [entry.id]
    while entry is not None and entry.error is None and entry.parent:
        if entry.parent in chain:
            raise CheckpointError(f"lineage of {model_id} loops back to {entry.parent}: {' -> '.join(chain)}")
        chain.append(entry.parent)
        entry = find_model(entry.parent)
    return chain


def _entry_for(model_id: str) -> CatalogEntry:
    if model_id == DEFAULT_ALIAS:
        model_id = default_model_id()
    if _looks_like_path(model_id):
        folder = _model_folder(Path(model_id))
        return read_entry(folder, "path")
    entry = find_model(model_id)
    if entry is None:
        raise CheckpointError(f"unknown model {model_id!r} (see `semiseg-la models`)")
    return entry


def unique_model_id(base_name: str) -> str:
    """`<base>-v0.1.N` with the smallest N not used by any catalog folder (broken ones included).

    A trailing `-vX.Y.Z` on `base_name` is dropped, so "caml-la-v0.1.0" gives the next caml-la version.
    """
    base = re.sub(r"-v\d+\.\d+\.\d+$", "", base_name.strip())
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._")[:100] or "model"
    taken = {p.name for _, root in catalog_roots() if root.is_dir() for p in root.iterdir()}
    n = 0
    while f"{base}-v0.1.{n}" in taken:
        n += 1
    return f"{base}-v0.1.{n}"
