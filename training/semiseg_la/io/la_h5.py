"""The LA benchmark's h5 release (UA-MT): `<ID>/mri_norm2.h5` with datasets `image` and `label`.

The files store no geometry, so every case gets the challenge's native 0.625 mm isotropic spacing,
a zero origin and the identity direction. Both the shared layout `<root>/<ID>/mri_norm2.h5` and the
upstream one `<root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5` are accepted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

import h5py
import numpy as np

from ..errors import InputError
from .validate import validate_image
from .volume import IDENTITY_DIRECTION, Volume

LA_SPACING = (0.625, 0.625, 0.625)
H5_NAME = "mri_norm2.h5"
#: The folder the upstream repositories (UA-MT, CAML, MC-Net) put the case folders in.
UPSTREAM_FOLDER = "2018LA_Seg_Training Set"

_CASE_ID = re.compile(r"^[^/\\]+$")


def read_case_list(path: str | os.PathLike) -> List[str]:
    """Case IDs of a list file in file order (blank lines and `#` comments skipped, duplicates refused)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: case list not found" if not p.exists() else f"{p}: case list is not a file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: unreadable case list ({exc.__class__.__name__}: {exc})") from None
    cases: List[str] = []
    first_line = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        case = raw.split("#", 1)[0].strip()
        if not case:
            continue
        if case in first_line:
            raise InputError(f"{p}: case {case} is listed twice (lines {first_line[case]} and {number})")
        first_line[case] = number
        cases.append(case)
    if not cases:
        raise InputError(f"{p}: case list names no case")
    return cases


def la_case_candidates(root: str | os.PathLike, case_id: str) -> Tuple[Path, Path]:
    """Where a case may live: the shared layout first, then the upstream one."""
    base = Path(root)
    return base / case_id / H5_NAME, base / UPSTREAM_FOLDER / case_id / H5_NAME


def locate_la_case(root: str | os.PathLike, case_id: str) -> Optional[Path]:
    """Path of a case's h5 file in either layout, or None (also for IDs that are not one folder name)."""
    if not _CASE_ID.match(case_id) or case_id in (".", ".."):
        return None
    return next((c for c in la_case_candidates(root, case_id) if c.is_file()), None)


def find_la_case(root: str | os.PathLike, case_id: str, list_name: Optional[str] = None) -> Path:
    """Path of a case's h5 file under `root`; InputError naming the case (and its list) when absent."""
    if not _CASE_ID.match(case_id) or case_id in (".", ".."):
        where = f" in {list_name}" if list_name else ""
        raise InputError(f"invalid case ID {case_id!r}{where}: an ID names one folder")
    found = locate_la_case(root, case_id)
    if found is not None:
        return found
    named = f" named in {list_name}" if list_name else ""
    raise InputError(f"case {case_id}{named} is missing under {root} "
                     f"(looked for {case_id}/{H5_NAME} and '{UPSTREAM_FOLDER}/{case_id}/{H5_NAME}')")


def list_la_cases(root: str | os.PathLike) -> List[str]:
    """IDs of every case folder holding an h5 file, in either layout, sorted."""
    base = Path(root)
    found = set()
    for folder in (base, base / UPSTREAM_FOLDER):
        if folder.is_dir():
            found.update(p.parent.name for p in folder.glob(f"*/{H5_NAME}") if p.is_file())
    return sorted(found)


def is_la_root(root: str | os.PathLike) -> bool:
    """True if `root` holds at least one `<ID>/mri_norm2.h5` in either layout."""
    base = Path(root)
    if not base.is_dir():
        return False
    for folder in (base, base / UPSTREAM_FOLDER):
        if folder.is_dir() and next(iter(folder.glob(f"*/{H5_NAME}")), None) is not None:
            return True
    return False


def h5_has_label(path: str | os.PathLike) -> bool:
    """Whether an h5 file holds a `label` dataset (cheap: reads only the file's index)."""
    if not Path(path).is_file():
        raise InputError(f"{path}: file not found")
    with _open_h5(Path(path), str(path)) as handle:
        return isinstance(handle.get("label"), h5py.Dataset)


def read_la_h5(path: str | os.PathLike, case_id: Optional[str] = None) -> Tuple[Volume, Optional[Volume]]:
    """Image (float32) and label (uint8, or None without a `label` dataset) on the LA grid; validated image.

    A label that cannot be cast to uint8 losslessly (fractions, NaN, negatives) keeps its stored type so
    that `validate_label` reports the actual values instead of a silently wrapped cast.
    """
    p = Path(path)
    name = f"{p} (case {case_id})" if case_id else str(p)
    if not p.is_file():
        raise InputError(f"{name}: file not found")
    with _open_h5(p, name) as handle:
        image_array = _read_dataset(handle, "image", name)
        label_array = _read_optional(handle, "label", name)
    if label_array is not None and label_array.shape != image_array.shape:
        raise InputError(f"{name}: label shape {label_array.shape} differs from image shape {image_array.shape}")
    if image_array.dtype.kind not in "biuf":
        raise InputError(f"{name}: dataset 'image' has unsupported data type {image_array.dtype}")
    image = Volume(image_array.astype(np.float32, copy=False), LA_SPACING, (0.0, 0.0, 0.0),
                   IDENTITY_DIRECTION, str(p))
    validate_image(image, name)
    label = image.with_array(_as_uint8_if_lossless(label_array)) if label_array is not None else None
    return image, label


def _open_h5(path: Path, name: str) -> h5py.File:
    if path.stat().st_size == 0:
        raise InputError(f"{name}: file is empty")
    if not h5py.is_hdf5(str(path)):
        raise InputError(f"{name}: not an HDF5 file")
    try:
        return h5py.File(str(path), "r")
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{name}: unreadable or truncated HDF5 file ({_short(exc)})") from None


def _read_dataset(handle: h5py.File, key: str, name: str) -> np.ndarray:
    try:
        node = handle.get(key)
        if node is None:
            raise InputError(f"{name}: no '{key}' dataset (found: {', '.join(sorted(handle.keys())) or 'none'})")
        if not isinstance(node, h5py.Dataset):
            raise InputError(f"{name}: '{key}' is not a dataset")
        return np.asarray(node[()])
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"{name}: unreadable or truncated HDF5 file; reading '{key}' failed ({_short(exc)})") from None


def _read_optional(handle: h5py.File, key: str, name: str) -> Optional[np.ndarray]:
    try:
        present = key in handle
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"{name}: unreadable or truncated HDF5 file ({_short(exc)})") from None
    return _read_dataset(handle, key, name) if present else None


def _as_uint8_if_lossless(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "biuf" or array.size == 0:
        return array
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        return array
    low, high = array.min(), array.max()
    if low < 0 or high > 255 or (array.dtype.kind == "f" and np.any(array != np.round(array))):
        return array
    return array.astype(np.uint8)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or exc.__class__.__name__
