"""A compact, lossless training cache of the LA h5 release, small enough to travel to a GPU machine.

Each LA image has fewer than 256 distinct values (the source scans were 8-bit), so it is stored as a
uint8 index array plus the case's sorted lookup table of float32 values; `lut[index]` gives back the
exact float image. The index array is differenced along X (modulo 256: cumsum restores it) and each
array is bzip2-compressed inside a per-case `.npz` (a zip numpy reads natively). Labels in {0, 1} are
bit-packed. The manifest records every case's shape and the SHA-256 of the decoded image and label, and
every read checks them: a cache that reads at all reads bit-exactly.

Folder layout::

    manifest.json          format, spacing, source, parts, and per case: part, shape, hashes
    train.list, test.list  the source's case lists (copied), so `--list train.list` works unchanged
    part-01/<ID>.npz       cases, grouped into parts below a size limit, so that a transfer limited
    part-02/<ID>.npz       per call (64 MiB on the device machine) can bring them part by part

A cache may also hold cases already prepared on a model grid (`semiseg-la`'s z-score + resampling,
e.g. 1.25 mm): those have more than 256 values and use uint16 indices; the manifest's `prepared`
says so, and the cases carry their spacing and origin.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from .atomic import atomic_path, atomic_write_json, atomic_write_text
from .volume import IDENTITY_DIRECTION, Volume

MANIFEST = "manifest.json"
FORMAT = "semiseg-la-cache-1"
CASE_SUFFIX = ".npz"
DEFAULT_PART_BYTES = 40 * 2**20
_PART_NAME = "part-{:02d}"


# ---- encoding -------------------------------------------------------------------------------------
def encode_image(image: np.ndarray) -> Dict[str, np.ndarray]:
    """`index` (uint8 or uint16, X-differenced modulo its range) and `lut` (float32, sorted)."""
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {array.shape}")
    array = np.ascontiguousarray(array, np.float32)
    values, inverse = np.unique(array, return_inverse=True)  # sorted by value: smooth indices compress well
    inverse = inverse.reshape(-1)  # 1-D or the input's shape, depending on the numpy version
    if not np.array_equal(values[inverse].view(np.uint32), array.reshape(-1).view(np.uint32)):
        # -0.0 and 0.0 (or NaN payloads) compare equal as numbers: keep every bit pattern instead
        bits, inverse = np.unique(array.view(np.uint32), return_inverse=True)
        values, inverse = bits.view(np.float32), inverse.reshape(-1)
    if values.size > 2**16:
        raise ValueError(f"image has {values.size} distinct values; the cache stores at most 65536")
    dtype = np.uint8 if values.size <= 256 else np.uint16
    index = inverse.reshape(array.shape).astype(dtype)
    return {"index": np.diff(index, axis=0, prepend=dtype(0)), "lut": values.astype(np.float32)}


def decode_image(index_dx: np.ndarray, lut: np.ndarray) -> np.ndarray:
    index = np.cumsum(index_dx, axis=0, dtype=index_dx.dtype)
    if lut.size == 0 or int(index.max(initial=0)) >= lut.size:
        raise ValueError("index refers past the end of the lookup table")
    return lut[index]


def encode_label(label: np.ndarray) -> Tuple[str, np.ndarray]:
    """("bits", packed) for a {0, 1} label, else ("uint8", the label)."""
    array = np.asarray(label)
    if array.dtype != np.uint8:
        raise ValueError(f"label must be uint8, got {array.dtype}")
    if int(array.max(initial=0)) <= 1:
        return "bits", np.packbits(array.ravel())
    return "uint8", array


def decode_label(kind: str, data: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    if kind == "bits":
        count = int(np.prod(shape))
        return np.unpackbits(data, count=count).reshape(tuple(shape))
    return np.asarray(data, np.uint8).reshape(tuple(shape))


def array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _npz_bytes(arrays: Dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_BZIP2, compresslevel=9) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(name + ".npy", member.getvalue())
    return buffer.getvalue()


# ---- writing --------------------------------------------------------------------------------------
class CacheWriter:
    """Write cases one by one into parts of at most `part_bytes` (a part always takes one case), then
    the manifest last: a folder without manifest.json is an interrupted build, never a short cache."""

    def __init__(self, folder: str | os.PathLike, spacing: Sequence[float], source: str = "",
                 prepared: bool = False, part_bytes: int = DEFAULT_PART_BYTES) -> None:
        self.folder = Path(folder)
        if (self.folder / MANIFEST).exists() or (self.folder.is_dir() and any(self.folder.iterdir())):
            raise InputError(f"{self.folder}: not empty; remove it or choose another folder for the cache")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spacing = [float(s) for s in spacing]
        self.source, self.prepared, self.part_bytes = source, bool(prepared), int(part_bytes)
        self.cases: Dict[str, Dict[str, Any]] = {}
        self.parts: List[Dict[str, Any]] = []

    def add(self, case_id: str, image: np.ndarray, label: Optional[np.ndarray],
            origin: Sequence[float] = (0.0, 0.0, 0.0), spacing: Optional[Sequence[float]] = None) -> int:
        """Store one case; returns its file size in bytes."""
        if case_id in self.cases:
            raise InputError(f"case {case_id} added twice to the cache")
        if "/" in case_id or "\\" in case_id or case_id in ("", ".", ".."):
            raise InputError(f"invalid case ID {case_id!r}")
        image = np.asarray(image, np.float32)
        arrays = encode_image(image)
        entry: Dict[str, Any] = {"shape": list(image.shape), "index_dtype": str(arrays["index"].dtype),
                                 "values": int(arrays["lut"].size), "image_sha256": array_sha256(image),
                                 "origin": [float(o) for o in origin],
                                 "spacing": [float(s) for s in (spacing or self.spacing)], "label": None}
        if label is not None:
            label = np.asarray(label)
            if label.shape != image.shape:
                raise InputError(f"case {case_id}: label shape {label.shape} differs from image shape {image.shape}")
            kind, packed = encode_label(label)
            arrays["label"] = packed
            entry.update(label=kind, label_sha256=array_sha256(label))
        data = _npz_bytes(arrays)
        part = self._part_for(len(data))
        entry["part"] = part["name"]
        entry["bytes"] = len(data)
        with atomic_path(self.folder / part["name"] / (case_id + CASE_SUFFIX)) as tmp:
            tmp.write_bytes(data)
        part["bytes"] += len(data)
        part["cases"] += 1
        self.cases[case_id] = entry
        return len(data)

    def _part_for(self, size: int) -> Dict[str, Any]:
        if not self.parts or (self.parts[-1]["cases"] and self.parts[-1]["bytes"] + size > self.part_bytes):
            self.parts.append({"name": _PART_NAME.format(len(self.parts) + 1), "bytes": 0, "cases": 0})
        return self.parts[-1]

    def close(self, lists: Optional[Dict[str, str]] = None, extra: Optional[Dict[str, Any]] = None) -> Path:
        """Copy the case lists (name -> text) and write manifest.json last."""
        for name, text in (lists or {}).items():
            atomic_write_text(self.folder / name, text)
        manifest = {"format": FORMAT, "source": self.source, "spacing": self.spacing, "prepared": self.prepared,
                    "lists": sorted(lists or {}), "parts": self.parts, "cases": self.cases,
                    "total_bytes": sum(p["bytes"] for p in self.parts), **(extra or {})}
        atomic_write_json(self.folder / MANIFEST, manifest)
        _MANIFESTS.clear()
        return self.folder / MANIFEST


def build_from_h5(la_root: str | os.PathLike, folder: str | os.PathLike, part_bytes: int = DEFAULT_PART_BYTES,
                  cases: Optional[Iterable[str]] = None,
                  progress: Optional[Callable[[int, int, str], None]] = None) -> Path:
    """Cache the LA h5 release at its own resolution (lossless): train.list order first, then every other
    case, sorted. `cases` restricts the cache to those IDs (in that order)."""
    from .la_h5 import LA_SPACING, find_la_case, list_la_cases, read_case_list, read_la_h5

    root = Path(la_root)
    lists = {name: (root / name).read_text(encoding="utf-8") for name in ("train.list", "test.list")
             if (root / name).is_file()}
    if cases is None:
        present = list_la_cases(root)
        ordered = read_case_list(root / "train.list") if "train.list" in lists else []
        ids = [c for c in ordered if c in present] + sorted(set(present) - set(ordered))
    else:
        ids = list(cases)
    if not ids:
        raise InputError(f"{root}: no LA case to cache")
    writer = CacheWriter(folder, LA_SPACING, source=str(root), part_bytes=part_bytes)
    for i, case in enumerate(ids, 1):
        image, label = read_la_h5(find_la_case(root, case), case)
        writer.add(case, image.array, None if label is None else label.array)
        if progress is not None:
            progress(i, len(ids), case)
    return writer.close(lists)


# ---- reading --------------------------------------------------------------------------------------
_MANIFESTS: Dict[Tuple[str, int], Dict[str, Any]] = {}


def is_la_cache(root: str | os.PathLike) -> bool:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return False
    try:
        return read_manifest(root).get("format") == FORMAT
    except InputError:
        return False


def read_manifest(root: str | os.PathLike) -> Dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        key = (str(path.resolve()), path.stat().st_mtime_ns)
    except OSError:
        raise InputError(f"{root}: not a training cache (no {MANIFEST})") from None
    if key not in _MANIFESTS:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: unreadable cache manifest ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("cases"), dict):
            raise InputError(f"{path}: not a {FORMAT} manifest")
        _MANIFESTS[key] = data
    return _MANIFESTS[key]


def case_path(root: str | os.PathLike, case_id: str) -> Path:
    entry = _entry(root, case_id)
    return Path(root) / entry["part"] / (case_id + CASE_SUFFIX)


def list_cases(root: str | os.PathLike) -> List[str]:
    """Case IDs in the manifest's order (the source's train.list order first)."""
    return list(read_manifest(root)["cases"])


def missing_parts(root: str | os.PathLike) -> Dict[str, List[str]]:
    """Part name -> IDs of its cases whose files are absent (a part not yet brought to this machine)."""
    missing: Dict[str, List[str]] = {}
    for case, entry in read_manifest(root)["cases"].items():
        if not (Path(root) / entry["part"] / (case + CASE_SUFFIX)).is_file():
            missing.setdefault(entry["part"], []).append(case)
    return missing


def check_complete(root: str | os.PathLike) -> None:
    missing = missing_parts(root)
    if missing:
        listed = ", ".join(f"{p} ({len(c)} cases)" for p, c in sorted(missing.items()))
        raise InputError(f"{root}: training cache incomplete, missing {listed}; bring every part of the cache "
                         "(on the device machine: carry the parts in earlier calls, they stay there)")


def case_has_label(root: str | os.PathLike, case_id: str) -> bool:
    return _entry(root, case_id).get("label") is not None


def read_cached_case(path: str | os.PathLike, case_id: Optional[str] = None,
                     verify: bool = True) -> Tuple[Volume, Optional[Volume]]:
    """Image (float32, exactly the cached source) and label (uint8 or None) of the case file `path`
    (`<cache>/<part>/<ID>.npz`), with the manifest's geometry. `verify` checks both SHA-256 hashes."""
    p = Path(path)
    root = p.parent.parent
    case = case_id or p.name[: -len(CASE_SUFFIX)]
    entry = _entry(root, case)
    if not p.is_file():
        raise InputError(f"{p}: cached case {case} is missing (part {entry['part']} not here?)")
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{p}: unreadable cached case ({exc.__class__.__name__}: {exc})") from None
    shape = tuple(int(s) for s in entry["shape"])
    try:
        image = decode_image(arrays["index"], arrays["lut"])
        label = decode_label(entry["label"], arrays["label"], shape) if entry.get("label") else None
    except (KeyError, ValueError) as exc:
        raise InputError(f"{p}: corrupt cached case ({exc})") from None
    if image.shape != shape:
        raise InputError(f"{p}: image shape {image.shape} differs from the manifest's {shape}")
    if verify:
        if array_sha256(image) != entry["image_sha256"]:
            raise InputError(f"{p}: decoded image differs from the cached source (SHA-256 mismatch)")
        if label is not None and array_sha256(label) != entry["label_sha256"]:
            raise InputError(f"{p}: decoded label differs from the cached source (SHA-256 mismatch)")
    spacing = entry.get("spacing") or read_manifest(root)["spacing"]
    volume = Volume(image, spacing, entry.get("origin", (0.0, 0.0, 0.0)), IDENTITY_DIRECTION, str(p))
    return volume, volume.with_array(label) if label is not None else None


def _entry(root: str | os.PathLike, case_id: str) -> Dict[str, Any]:
    entry = read_manifest(root)["cases"].get(case_id)
    if entry is None:
        raise InputError(f"{root}: no case {case_id} in the training cache")
    return entry


def cache_summary(root: str | os.PathLike) -> Dict[str, Any]:
    """Sizes for a transfer plan: total and per part (bytes), case counts, the spacing."""
    manifest = read_manifest(root)
    parts = {p["name"]: {"bytes": p["bytes"], "cases": p["cases"]} for p in manifest["parts"]}
    small = [Path(root) / MANIFEST] + [Path(root) / name for name in manifest.get("lists", [])]
    return {"cases": len(manifest["cases"]), "spacing": manifest["spacing"], "prepared": manifest["prepared"],
            "total_bytes": manifest["total_bytes"], "parts": parts,
            "manifest_bytes": sum(p.stat().st_size for p in small if p.is_file())}


def remove_cache(root: str | os.PathLike) -> None:
    """Delete a cache folder (manifest first, so a half-deleted cache is never read as whole)."""
    base = Path(root)
    if (base / MANIFEST).is_file():
        (base / MANIFEST).unlink()
    shutil.rmtree(base, ignore_errors=True)
    _MANIFESTS.clear()
