"""Input validation run before training and before inference (docs/conventions.md 4.2).

Every check collects its problems first and raises ONE InputError listing all of them, so a user
fixes a bad case in one go instead of one error per run (nnU-Net's integrity-check style).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..errors import InputError
from .volume import Volume, geometry_mismatches

#: Image/label grids may differ by this much, relative to the smallest voxel spacing (origin and
#: spacing) or absolutely (direction cosines). 1e-4 sits above the ~1e-5 noise that Slicer/NRRD
#: round trips leave in headers (which ITK's default 1e-6 rejects) and far below any real
#: misregistration (1e-4 of a 0.625 mm voxel is 62.5 nm).
DEFAULT_GEOMETRY_TOLERANCE = 1e-4

#: Above this many voxels an image cannot be indexed by 32-bit code paths and will not fit a GPU.
MAX_VOXELS = 2**31

_MAX_LISTED = 10


def image_problems(vol: Volume) -> List[str]:
    """Every problem of an image, as short phrases; empty when the image is usable."""
    array = np.asarray(vol.array)
    problems = _shape_problems(array)
    if array.size <= MAX_VOXELS:  # scanning billions of voxels for NaN would take longer than it helps
        problems += _value_problems(array)
    return problems + _geometry_field_problems(vol)


def validate_image(vol: Volume, name: Optional[str] = None) -> None:
    """Raise one InputError listing all problems of `vol` (3D scalar, finite, non-constant, sane grid)."""
    problems = image_problems(vol)
    if problems:
        raise InputError(_one_line(name or vol.source, "invalid image", problems))


def label_problems(label: Volume, image: Volume, classes: Sequence[int] = (0, 1), allow_empty: bool = False,
                   rel_tol: float = DEFAULT_GEOMETRY_TOLERANCE) -> List[str]:
    """Every problem of a label map for `image`, as short phrases; empty when the label is usable."""
    array = np.asarray(label.array)
    problems: List[str] = []
    if array.ndim != 3:
        problems.append(f"label is {array.ndim}D (shape {tuple(array.shape)}); a 3D label map is required")
    elif np.asarray(image.array).ndim == 3:
        mismatches = geometry_mismatches(label, image, rel_tol)
        if mismatches:
            problems.append(f"label grid differs from the image {image.source} (tolerance {rel_tol:g} x spacing): "
                            + ", ".join(mismatches))
    if array.dtype.kind not in "biuf":
        problems.append(f"label has unsupported data type {array.dtype}")
        return problems
    problems += _label_value_problems(array, classes, allow_empty)
    return problems


def validate_label(label: Volume, image: Volume, classes: Sequence[int] = (0, 1), allow_empty: bool = False,
                   name: Optional[str] = None, rel_tol: float = DEFAULT_GEOMETRY_TOLERANCE) -> np.ndarray:
    """Check a label map against its image and return it as a uint8 array; one InputError listing all problems.

    Background is class 0; a label without any non-zero voxel is an error unless `allow_empty`
    (an empty mask trains the network to miss the atrium and makes Dice undefined).
    """
    bad_classes = [int(c) for c in classes if not 0 <= int(c) <= 255]
    problems = label_problems(label, image, classes, allow_empty, rel_tol)
    if bad_classes:
        problems.append(f"declared classes {bad_classes} do not fit uint8 (0-255)")
    if problems:
        raise InputError(_one_line(name or label.source, "invalid label", problems))
    return np.asarray(label.array).astype(np.uint8, copy=False)


def _shape_problems(array: np.ndarray) -> List[str]:
    problems = []
    if array.ndim != 3:
        problems.append(f"image is {array.ndim}D (shape {tuple(array.shape)}); a 3D scalar image is required")
    if array.size == 0:
        problems.append(f"image is empty (0 voxels, shape {tuple(array.shape)})")
    elif array.ndim == 3 and min(array.shape) < 2:
        problems.append(f"implausible size {tuple(array.shape)}: every axis needs at least 2 voxels")
    if array.size > MAX_VOXELS:
        problems.append(f"implausible size {tuple(array.shape)}: {array.size} voxels exceeds the 2**31 limit")
    return problems


def _value_problems(array: np.ndarray) -> List[str]:
    if array.dtype.kind not in "biuf":
        return [f"unsupported data type {array.dtype}; a real-valued scalar image is required"]
    if array.size == 0:
        return []
    problems = []
    finite_values = array
    if array.dtype.kind == "f":
        nan = int(np.count_nonzero(np.isnan(array)))
        finite = np.isfinite(array)
        inf = int(array.size - np.count_nonzero(finite)) - nan
        if nan:
            problems.append(f"{nan} NaN voxel{'s' * (nan != 1)}")
        if inf:
            problems.append(f"{inf} infinite voxel{'s' * (inf != 1)}")
        if nan or inf:
            finite_values = array[finite]
    if finite_values.size == 0:
        problems.append("no finite voxel")
    elif finite_values.min() == finite_values.max():
        problems.append(f"image is constant (every finite voxel = {float(finite_values.min()):g})")
    return problems


def _geometry_field_problems(vol: Volume) -> List[str]:
    problems = []
    spacing, origin, direction = (np.asarray(v, np.float64) for v in (vol.spacing, vol.origin, vol.direction))
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        problems.append(f"spacing {_fmt(spacing)} must be 3 finite positive values")
    if origin.size != 3 or not np.all(np.isfinite(origin)):
        problems.append(f"origin {_fmt(origin)} must be 3 finite values")
    if direction.size != 9 or not np.all(np.isfinite(direction)):
        problems.append(f"direction {_fmt(direction)} must be 9 finite values")
    elif abs(np.linalg.det(direction.reshape(3, 3))) < 1e-6:
        problems.append(f"direction {_fmt(direction)} is singular (axes are not independent)")
    return problems


def _label_value_problems(array: np.ndarray, classes: Sequence[int], allow_empty: bool) -> List[str]:
    problems = []
    values = array
    if array.dtype.kind == "f":
        nan = int(np.count_nonzero(np.isnan(array)))
        if nan:
            problems.append(f"{nan} NaN voxel{'s' * (nan != 1)}")
            values = array[~np.isnan(array)]
        fractional = values[np.isfinite(values) & (values != np.round(values))] if values.size else values
        if fractional.size:
            problems.append(f"{fractional.size} voxels have non-integer values (e.g. {float(fractional[0]):g})")
        infinite = int(values.size - np.count_nonzero(np.isfinite(values)))
        if infinite:
            problems.append(f"{infinite} infinite voxel{'s' * (infinite != 1)}")
    present = _present_values(values)
    allowed = {int(c) for c in classes}
    unexpected = [v for v in present if v not in allowed]
    if unexpected:
        shown = ", ".join(f"{v:g}" for v in unexpected[:_MAX_LISTED])
        more = f" and {len(unexpected) - _MAX_LISTED} more" if len(unexpected) > _MAX_LISTED else ""
        problems.append(f"values {{{shown}{more}}} are not among the declared classes {sorted(allowed)}"
                        + _binary_mask_hint(present, allowed))
    if not allow_empty and array.size and not any(v != 0 for v in present):
        problems.append("label is empty (no foreground voxel)")
    return problems


def _binary_mask_hint(present: Sequence[float], allowed: set) -> str:
    """A mask saved with one other foreground value (0/255 from an image editor, a Slicer label value of 2 ...)
    is the common case of a bad binary label: say how to fix it rather than only what is wrong."""
    foreground = [v for v in present if v != 0]
    if allowed != {0, 1} or len(foreground) != 1:
        return ""
    return f" (a mask of 0 and {foreground[0]:g}? store the atrium as 1)"


def _present_values(values: np.ndarray) -> List[float]:
    """Distinct integral values (bincount for small non-negative ints: ~10x faster than np.unique)."""
    if values.size == 0:
        return []
    if values.dtype.kind in "bu" and values.dtype.itemsize <= 2:
        counts = np.bincount(values.ravel().astype(np.int64, copy=False))
        return [float(v) for v in np.flatnonzero(counts)]
    integral = values[np.isfinite(values) & (values == np.round(values))] if values.dtype.kind == "f" else values
    return [float(v) for v in np.unique(integral)]


def _one_line(name: str, what: str, problems: Sequence[str]) -> str:
    return " ".join(f"{name}: {what}: {'; '.join(problems)}".split())


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in np.ravel(values)) + ")"
