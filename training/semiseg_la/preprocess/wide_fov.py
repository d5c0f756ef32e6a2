"""A wide field-of-view generator: atrium-centred crops placed in whole-scan-sized canvases.

The LA benchmark holds only atrium-centred crops (92-152 x 82-100 mm in-plane, z not cropped), but a
clinician loads a whole scan (360-400 mm in-plane). No whole-scan LA data exist here, so whole-scan-like
cases are built: the crop sits at a random place in a wider canvas tiled with real cardiac tissue from
other cases, whose atria are painted out (so the canvas holds one left atrium), with intensity
differences between the tiles. Optional decoys paste another case's atrium, mirrored, beside the target
where a right atrium would sit: a region that is bright and atrium-shaped but is not the left atrium.

Arrays are (X, Y, Z) on one grid (any spacing: 2.5 mm for a localiser, 0.625 mm for benchmarks). The
canvas keeps the crops' z extent: the crops were never cut in z.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..errors import InputError

#: the in-plane size of a whole LA scan (576 x 576 voxels of 0.625 mm)
WHOLE_SCAN_MM = 360.0
#: the margin `segment --region auto` leaves around the atrium it found (inference/localise.py): the fine
#: model sees a whole scan through a box this much larger than the atrium on each side
REGION_MARGIN_MM = 15.0
#: `segment --region auto` segments images no larger than this (mm, every axis) whole: the training crops were
#: 92-152 x 82-100 x 55 mm, so such an image already is a region around the atrium; a larger one is a whole scan
AUTO_WHOLE_MAX_MM = 170.0


def patch_mm(patch_size: Sequence[int], spacing: Sequence[float]) -> List[float]:
    """A fine model's patch in mm: the smallest region it is given (a smaller box is grown to it)."""
    return [float(p) * float(s) for p, s in zip(patch_size, spacing)]


def is_whole_scan(shape: Sequence[int], spacing: Sequence[float]) -> bool:
    """Larger than an atrium crop along some axis: `segment --region auto` cuts a region out of it."""
    return max(float(n) * float(s) for n, s in zip(shape[:3], spacing)) > AUTO_WHOLE_MAX_MM


@dataclasses.dataclass
class Donor:
    """A case that lends tissue to canvases: its image with the atrium painted out, and (for decoys) the
    original image and label."""

    tissue: np.ndarray
    image: np.ndarray
    label: np.ndarray


@dataclasses.dataclass
class WideCase:
    """A canvas, its label (the target's atrium only) and where the target crop sits (lower corner)."""

    image: np.ndarray
    label: np.ndarray
    offset: Tuple[int, int, int]
    decoy_voxels: int = 0


def paint_out_atrium(image: np.ndarray, label: np.ndarray, spacing: Sequence[float],
                     rng: np.random.Generator, smooth_mm: float = 5.0) -> np.ndarray:
    """The image with its labelled atrium (dilated by ~2 mm) replaced by the smoothed surrounding tissue
    plus noise of the tissue's own spread: no left atrium remains, and no flat hole marks where it was."""
    _check_pair(image, label)
    mask = ndimage.binary_dilation(label > 0, iterations=max(1, int(round(2.0 / float(spacing[0])))))
    if not mask.any():
        return image.astype(np.float32, copy=True)
    sigma = [smooth_mm / float(s) for s in spacing]
    keep = (~mask).astype(np.float32)
    weight = ndimage.gaussian_filter(keep, sigma)
    smooth = ndimage.gaussian_filter(image.astype(np.float32) * keep, sigma) / np.maximum(weight, 1e-3)
    outside = image[~mask]
    fill_value = float(np.median(outside)) if outside.size else 0.0
    smooth = np.where(weight > 1e-3, smooth, fill_value)
    spread = float(np.std(outside)) if outside.size else 0.0
    painted = image.astype(np.float32, copy=True)
    painted[mask] = smooth[mask] + rng.normal(0.0, 0.5 * spread, int(mask.sum())).astype(np.float32)
    return painted


def make_donor(image: np.ndarray, label: np.ndarray, spacing: Sequence[float], seed: int = 0) -> Donor:
    tissue = paint_out_atrium(image, label, spacing, np.random.default_rng(seed))
    return Donor(tissue, image.astype(np.float32, copy=False), (label > 0).astype(np.uint8))


def random_canvas_shape(crop_shape: Sequence[int], spacing: Sequence[float], rng: np.random.Generator,
                        max_mm: float = WHOLE_SCAN_MM) -> Tuple[int, int, int]:
    """In-plane size uniform between the crop's and `max_mm` (never smaller than the crop); z kept."""
    shape = []
    for axis in (0, 1):
        largest = max(int(crop_shape[axis]), int(round(max_mm / float(spacing[axis]))))
        shape.append(int(rng.integers(int(crop_shape[axis]), largest + 1)))
    return shape[0], shape[1], int(crop_shape[2])


def build_wide_case(image: np.ndarray, label: np.ndarray, donors: Sequence[Donor],
                    canvas_shape: Sequence[int], rng: np.random.Generator, decoy: bool = False,
                    contrast: Tuple[float, float] = (0.75, 1.33), shift: float = 0.3) -> WideCase:
    """The crop (`image`, `label`) inside a canvas of `canvas_shape` tiled with donors' tissue.

    Each tile gets its own intensity scale (log-uniform in `contrast`) and shift (uniform in +-`shift`)
    so the crop differs from its surroundings as scans of one patient differ between series.
    """
    _check_pair(image, label)
    if not donors:
        raise InputError("a wide field of view needs at least one donor case")
    canvas_shape = tuple(int(s) for s in canvas_shape)
    if any(c < s for c, s in zip(canvas_shape, image.shape)):
        raise InputError(f"canvas {canvas_shape} is smaller than the crop {image.shape}")
    canvas = _tile(donors, canvas_shape, rng, contrast, shift)
    offset = tuple(int(rng.integers(0, c - s + 1)) for c, s in zip(canvas_shape, image.shape))
    box = tuple(slice(o, o + s) for o, s in zip(offset, image.shape))
    canvas[box] = image
    target = np.zeros(canvas_shape, np.uint8)
    target[box] = label > 0
    decoy_voxels = _place_decoy(canvas, target, donors, rng) if decoy else 0
    return WideCase(canvas, target, offset, decoy_voxels)


def region_around(label: np.ndarray, spacing: Sequence[float], margins_mm: Sequence[float],
                  min_size: Sequence[int] = (0, 0, 0)) -> Tuple[slice, ...]:
    """The box `segment --region auto` cuts around an atrium: the label's bounding box grown by
    `margins_mm` (6 values: the lower faces along X, Y, Z, then the upper ones), grown about its centre to
    at least `min_size` voxels (the fine model's patch), clipped to the array."""
    if len(margins_mm) != 6:
        raise InputError(f"region margins need 6 values (lower X Y Z, upper X Y Z), got {len(margins_mm)}")
    lo, hi = _bounds(label)
    box = []
    for axis, size in enumerate(label.shape):
        low = lo[axis] - int(round(float(margins_mm[axis]) / float(spacing[axis])))
        high = hi[axis] + int(round(float(margins_mm[axis + 3]) / float(spacing[axis])))
        grow = max(int(min_size[axis]) - (high - low), 0)
        low, high = low - grow // 2, high + grow - grow // 2
        box.append(slice(max(low, 0), min(high, int(size))))
    return tuple(box)


def _tile(donors: Sequence[Donor], shape: Tuple[int, int, int], rng: np.random.Generator,
          contrast: Tuple[float, float], shift: float) -> np.ndarray:
    """Rows of randomly chosen, randomly flipped donor tiles, starting at a random phase, covering `shape`."""
    canvas = np.zeros(shape, np.float32)
    log_low, log_high = np.log(contrast[0]), np.log(contrast[1])
    x = -int(rng.integers(0, donors[0].tissue.shape[0]))
    while x < shape[0]:
        width = None
        y = -int(rng.integers(0, donors[0].tissue.shape[1]))
        while y < shape[1]:
            tile = donors[int(rng.integers(len(donors)))].tissue
            if rng.random() < 0.5:
                tile = tile[::-1]
            if rng.random() < 0.5:
                tile = tile[:, ::-1]
            tile = tile * float(np.exp(rng.uniform(log_low, log_high))) + float(rng.uniform(-shift, shift))
            _paste_clipped(canvas, _fit_z(tile, shape[2]), (x, y, 0))
            width = tile.shape[0] if width is None else min(width, tile.shape[0])
            y += tile.shape[1]
        x += width
    return canvas


def _place_decoy(canvas: np.ndarray, target: np.ndarray, donors: Sequence[Donor], rng: np.random.Generator) -> int:
    """Another case's atrium, mirrored left-right, beside the target's along X (where a right atrium
    lies on an axial slice), with its own intensities; the label stays background there."""
    with_atrium = [d for d in donors if d.label.any()]
    if not with_atrium or not target.any():
        return 0
    donor = with_atrium[int(rng.integers(len(with_atrium)))]
    lo, hi = _bounds(donor.label)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    mask = donor.label[box][::-1].astype(bool)
    patch = donor.image[box][::-1]
    t_lo, t_hi = _bounds(target)
    gap = int(rng.integers(0, max(1, mask.shape[0] // 4) + 1))
    side = rng.choice([-1, 1])
    x = t_hi[0] + gap if side > 0 else t_lo[0] - gap - mask.shape[0]
    if x < 0 or x + mask.shape[0] > canvas.shape[0]:  # no room on that side: the other
        x = t_lo[0] - gap - mask.shape[0] if side > 0 else t_hi[0] + gap
    x = int(np.clip(x, 0, max(0, canvas.shape[0] - mask.shape[0])))
    y = int(np.clip((t_lo[1] + t_hi[1] - mask.shape[1]) // 2 + rng.integers(-4, 5), 0,
                    max(0, canvas.shape[1] - mask.shape[1])))
    z = int(np.clip((t_lo[2] + t_hi[2] - mask.shape[2]) // 2, 0, max(0, canvas.shape[2] - mask.shape[2])))
    region = tuple(slice(o, min(o + s, c)) for o, s, c in zip((x, y, z), mask.shape, canvas.shape))
    sizes = tuple(r.stop - r.start for r in region)
    mask = mask[: sizes[0], : sizes[1], : sizes[2]] & (target[region] == 0)
    canvas[region][mask] = patch[: sizes[0], : sizes[1], : sizes[2]][mask]
    return int(mask.sum())


def _bounds(mask: np.ndarray) -> Tuple[List[int], List[int]]:
    where = np.nonzero(mask)
    return [int(w.min()) for w in where], [int(w.max()) + 1 for w in where]


def _fit_z(tile: np.ndarray, depth: int) -> np.ndarray:
    """Crop or edge-pad a tile to `depth` slices (crops of one grid share their z extent; this covers
    rounding on other grids)."""
    if tile.shape[2] >= depth:
        return tile[:, :, :depth]
    return np.pad(tile, ((0, 0), (0, 0), (0, depth - tile.shape[2])), mode="edge")


def _paste_clipped(canvas: np.ndarray, tile: np.ndarray, corner: Sequence[int]) -> None:
    src, dst = [], []
    for c, t, size in zip(corner, tile.shape, canvas.shape):
        lo, hi = max(c, 0), min(c + t, size)
        if hi <= lo:
            return
        src.append(slice(lo - c, hi - c))
        dst.append(slice(lo, hi))
    canvas[tuple(dst)] = tile[tuple(src)]


def _check_pair(image: np.ndarray, label: Optional[np.ndarray]) -> None:
    if image.ndim != 3:
        raise InputError(f"wide field of view needs a 3D image, got shape {image.shape}")
    if label is not None and label.shape != image.shape:
        raise InputError(f"image {image.shape} and label {label.shape} differ in shape")


__all__ = ["WHOLE_SCAN_MM", "Donor", "WideCase", "paint_out_atrium", "make_donor", "random_canvas_shape",
           "build_wide_case", "REGION_MARGIN_MM", "region_around"]
