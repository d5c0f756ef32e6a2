"""Model grid <-> input grid: the geometry round trip of every prediction.

The network sees volumes in one canonical orientation (identity direction: array axes along LPS
x, y, z) at its training spacing. `to_model_grid` builds that grid so that it covers the input's
whole physical extent; `from_model_grid` brings a result back onto the input's exact grid (size,
spacing, origin, direction), so a segmentation overlays its image in any viewer.

Exactness: an input whose direction is a signed permutation (LPS, RAS, axes swapped...) at the model
spacing is reoriented with np.transpose/np.flip only, and the way back inverts those, bit for bit.
Every other input is resampled by SimpleITK (voxel centres at origin + D @ (spacing * index), the
ITK convention), linear for intensities and probabilities, nearest for label maps.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..io.validate import DEFAULT_GEOMETRY_TOLERANCE, MAX_VOXELS
from ..io.volume import IDENTITY_DIRECTION, Volume

Vec3 = Tuple[float, float, float]

#: Direction cosines within this of 0/+-1 count as an exact axis permutation (headers written by
#: Slicer/ITK carry ~1e-7 float noise; a real obliquity of 1e-6 rad moves a 300 mm FOV by 0.3 um).
PERMUTATION_TOLERANCE = 1e-6

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


@dataclasses.dataclass
class ModelGrid:
    """The grid the network works on: canonical orientation (identity direction) at the model spacing."""

    size: Tuple[int, int, int]
    spacing: Vec3
    origin: Vec3
    direction: Tuple[float, ...] = IDENTITY_DIRECTION

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)  # type: ignore[assignment]
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = tuple(float(d) for d in np.asarray(self.direction).ravel())

    def as_volume(self, array: np.ndarray, source: str = "<model grid>") -> Volume:
        """`array` (shape == size) with this grid's geometry."""
        if tuple(np.shape(array)[-3:]) != self.size:
            raise ValueError(f"array shape {np.shape(array)} does not match the model grid size {self.size}")
        return Volume(array, self.spacing, self.origin, self.direction, source)

    def same_as(self, other: ModelGrid, rel_tol: float = DEFAULT_GEOMETRY_TOLERANCE) -> bool:
        """Same size, and spacing/origin/direction equal within rel_tol x the smallest spacing."""
        scale = rel_tol * min(self.spacing)
        return (self.size == other.size
                and np.allclose(self.spacing, other.spacing, rtol=0, atol=scale)
                and np.allclose(self.origin, other.origin, rtol=0, atol=scale)
                and np.allclose(self.direction, other.direction, rtol=0, atol=rel_tol))


@dataclasses.dataclass(frozen=True)
class _Reorientation:
    """Canonical axis r is array axis `axes[r]`, reversed where `flips[r]`. Both ways return a new C-ordered
    array: callers may modify the result without touching the input."""

    axes: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]

    def forward(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.axes)
        flipped = tuple(r for r in range(3) if self.flips[r])
        return np.array(np.flip(out, flipped) if flipped else out, order="C", copy=True)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        flipped = tuple(r for r in range(3) if self.flips[r])
        out = np.flip(array, flipped) if flipped else array
        return np.array(np.transpose(out, tuple(int(a) for a in np.argsort(self.axes))), order="C", copy=True)


def to_model_grid(vol: Volume, spacing: Sequence[float], interpolation: str = "linear",
                  default_value: Optional[float] = None) -> Tuple[Volume, ModelGrid]:
    """`vol` in canonical orientation at `spacing`, on a grid covering its whole physical bounding box.

    Exact (no interpolation) when the direction is a signed permutation and the spacing matches within
    1e-4: the grid is then the input's own voxels, reordered. Otherwise resampled; `default_value` fills
    model-grid voxels outside the input. By default: "linear" (images) uses the image minimum, because
    outside the field of view is dark background and 0, the mean of a z-scored scan, would frame an
    oblique volume with a mid-grey border the network never saw; "nearest" (labels) uses 0, background.
    """
    target = _check_spacing(spacing)
    array = np.asarray(vol.array)
    if array.ndim != 3:
        raise InputError(f"{vol.source}: image is {array.ndim}D; a 3D scalar image is required")
    exact = _exact_plan(vol, target)
    if exact is not None:
        reorientation, grid = exact
        return grid.as_volume(reorientation.forward(array), vol.source), grid
    grid = covering_grid(vol, target)
    if default_value is None:
        default_value = 0.0 if interpolation == "nearest" else float(np.min(array)) if array.size else 0.0
    out = _resample(array, _geometry(vol), grid, interpolation, default_value)
    return grid.as_volume(out, vol.source), grid


def from_model_grid(array: np.ndarray, grid: ModelGrid, reference: Volume, interpolation: str = "linear",
                    default_value: float = 0.0) -> np.ndarray:
    """An array living on `grid` (probabilities, labels, any dtype), brought onto `reference`'s exact grid.

    Inverts `to_model_grid`'s exact paths bit for bit; otherwise resamples ("linear" for probabilities,
    "nearest" for labels). A leading channel axis (C, X, Y, Z) is resampled channel by channel.
    Returns an array of shape reference.shape (plus the channel axis).
    """
    data = np.asarray(array)
    if data.ndim == 4:
        return np.stack([from_model_grid(c, grid, reference, interpolation, default_value) for c in data])
    if tuple(data.shape) != grid.size:
        raise ValueError(f"array shape {data.shape} does not match the model grid size {grid.size}")
    exact = _exact_plan(reference, grid.spacing)
    if exact is not None and exact[1].same_as(grid):
        return exact[0].inverse(data)
    target = ModelGrid(reference.shape[:3], reference.spacing, reference.origin, reference.direction)
    return _resample(data, grid, target, interpolation, default_value)


def covering_grid(vol: Volume, spacing: Sequence[float]) -> ModelGrid:
    """The identity-direction grid at `spacing` whose voxels cover all 8 corners of `vol`'s voxel box.

    Corners are the outer voxel faces (index -0.5 and n - 0.5, ITK's convention); the grid is centred on
    that box. A 1e-3-voxel slack keeps float noise from adding a whole slice.
    """
    target = _check_spacing(spacing)
    matrix = _matrix(vol.direction)
    shape = np.asarray(vol.shape[:3], np.float64)
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape])))
    world = np.asarray(vol.origin) + (corners * np.asarray(vol.spacing)) @ matrix.T
    low, high = world.min(axis=0), world.max(axis=0)
    size = [max(1, math.ceil((h - lo) / s - 1e-3)) for lo, h, s in zip(low, high, target)]
    if int(np.prod(size, dtype=np.int64)) > MAX_VOXELS:
        raise InputError(f"{vol.source}: resampling to spacing {target} would need a {tuple(size)} grid "
                         f"(over 2**31 voxels)")
    centre = (low + high) / 2
    origin = centre - (np.asarray(size) - 1) / 2 * np.asarray(target)
    return ModelGrid(tuple(size), target, tuple(origin), IDENTITY_DIRECTION)


def signed_permutation(direction: Sequence[float], tol: float = PERMUTATION_TOLERANCE
                       ) -> Optional[Tuple[Tuple[int, int, int], Tuple[int, int, int]]]:
    """(world axis of each array axis, its sign) if the direction matrix is a signed permutation, else None."""
    matrix = _matrix(direction)
    world_axes, signs = [], []
    for column in matrix.T:
        r = int(np.argmax(np.abs(column)))
        sign = 1 if column[r] > 0 else -1
        others = np.delete(column, r)
        if abs(column[r] - sign) > tol or np.any(np.abs(others) > tol):
            return None
        world_axes.append(r)
        signs.append(sign)
    if sorted(world_axes) != [0, 1, 2]:
        return None
    return tuple(world_axes), tuple(signs)  # type: ignore[return-value]


def crop_to_roi(vol: Volume, roi_lower: Sequence[int], roi_upper: Sequence[int]) -> Volume:
    """The index box [roi_lower, roi_upper) of `vol` (upper exclusive), origin moved through the direction."""
    lower, upper = _check_roi(vol, roi_lower, roi_upper)
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper))
    origin = np.asarray(vol.origin) + _matrix(vol.direction) @ (np.asarray(lower) * np.asarray(vol.spacing))
    array = np.array(np.asarray(vol.array)[box], copy=True)
    return Volume(array, vol.spacing, tuple(origin), vol.direction, vol.source)


def paste_roi(array: np.ndarray, reference: Volume, roi_lower: Sequence[int], fill: float = 0) -> np.ndarray:
    """Inverse of crop_to_roi: `array` placed at `roi_lower` in a reference-shaped array filled with `fill`."""
    data = np.asarray(array)
    lower = [int(v) for v in roi_lower]
    _check_roi(reference, lower, [lo + s for lo, s in zip(lower, data.shape)])
    full = np.full(reference.shape[:3], fill, dtype=data.dtype)
    full[tuple(slice(lo, lo + s) for lo, s in zip(lower, data.shape))] = data
    return full


def roi_from_physical(vol: Volume, center_mm: Sequence[float], size_mm: Sequence[float]
                      ) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """Index box (lower, upper exclusive) of the voxels whose centres lie in a world-axis-aligned box (LPS mm),
    clipped to the image; InputError when the box misses the image."""
    centre, half = np.asarray(center_mm, np.float64), np.abs(np.asarray(size_mm, np.float64)) / 2
    corners = np.array(list(itertools.product(*[(c - h, c + h) for c, h in zip(centre, half)])))
    inverse = np.linalg.inv(_matrix(vol.direction))
    index = ((corners - np.asarray(vol.origin)) @ inverse.T) / np.asarray(vol.spacing)
    shape = vol.shape[:3]
    lower = [max(0, math.ceil(v - 1e-6)) for v in index.min(axis=0)]
    upper = [min(n, math.floor(v + 1e-6) + 1) for v, n in zip(index.max(axis=0), shape)]
    if any(lo >= hi for lo, hi in zip(lower, upper)):
        raise InputError(f"{vol.source}: the region of {tuple(size_mm)} mm at {tuple(center_mm)} mm "
                         "lies outside the image")
    return tuple(lower), tuple(upper)  # type: ignore[return-value]


def _exact_plan(vol: Volume, spacing: Sequence[float]) -> Optional[Tuple[_Reorientation, ModelGrid]]:
    """The transpose/flip that puts `vol` in canonical orientation, if that alone reaches `spacing`."""
    perm = signed_permutation(vol.direction)
    if perm is None:
        return None
    world_axes, signs = perm
    axes = tuple(world_axes.index(r) for r in range(3))
    flips = tuple(signs[a] < 0 for a in axes)
    new_spacing = np.asarray([vol.spacing[a] for a in axes])
    target = np.asarray(spacing, np.float64)
    if np.any(np.abs(new_spacing - target) > DEFAULT_GEOMETRY_TOLERANCE * target):
        return None
    first = np.array([vol.shape[i] - 1 if signs[i] < 0 else 0 for i in range(3)], np.float64)
    origin = np.asarray(vol.origin) + _matrix(vol.direction) @ (first * np.asarray(vol.spacing))
    size = tuple(int(vol.shape[a]) for a in axes)
    grid = ModelGrid(size, tuple(new_spacing), tuple(origin), IDENTITY_DIRECTION)
    return _Reorientation(axes, flips), grid  # type: ignore[arg-type]


def _resample(array: np.ndarray, source: ModelGrid, target: ModelGrid, interpolation: str,
              default_value: float) -> np.ndarray:
    """SimpleITK resampling of `array` (on `source`) onto `target`, identity transform."""
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"unknown interpolation {interpolation!r}; use 'linear' or 'nearest'")
    data = np.asarray(array)
    was_bool = data.dtype == np.bool_
    if was_bool:
        data = data.astype(np.uint8)
    elif data.dtype == np.float16 or (interpolation == "linear" and data.dtype.kind != "f"):
        data = data.astype(np.float32)
    image = _sitk_view(data, source)
    result = sitk.Resample(image, [int(s) for s in target.size[::-1]], sitk.Transform(),
                           _INTERPOLATORS[interpolation], target.origin, target.spacing[::-1],
                           _axes_reversed(target.direction), float(default_value), image.GetPixelID())
    out = sitk.GetArrayFromImage(result)  # already (X, Y, Z)
    return out.astype(bool) if was_bool and interpolation == "nearest" else out


def _sitk_view(data: np.ndarray, grid: ModelGrid) -> sitk.Image:
    """`data` (X, Y, Z) on `grid` as a SimpleITK image, without a transposed copy in either memory layout: a
    C-ordered array is declared with reversed axes (`_axes_reversed`); an array read from a file is the
    transposed view of SimpleITK's own (Z, Y, X) layout, which goes back as it came, with the plain geometry."""
    if not data.flags.c_contiguous and data.T.flags.c_contiguous:
        image = sitk.GetImageFromArray(data.T)
        image.SetSpacing(grid.spacing)
        image.SetDirection(grid.direction)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(data))
        image.SetSpacing(grid.spacing[::-1])
        image.SetDirection(_axes_reversed(grid.direction))
    image.SetOrigin(grid.origin)
    return image


def _axes_reversed(direction: Sequence[float]) -> Tuple[float, ...]:
    """The direction matrix of the same grid with its index axes in reverse order (columns reversed).

    SimpleITK reads a C-ordered numpy array (X, Y, Z) as an image whose first index axis is our Z. Declaring
    that image with reversed spacing and direction columns describes the same voxels in the same places, so
    whole scans go in and out without the transposed copies (over a second for a 576 x 576 x 88 scan)."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return tuple(float(v) for v in matrix[:, ::-1].ravel())


def _geometry(vol: Volume) -> ModelGrid:
    """A Volume's grid as a ModelGrid-shaped record (any direction), for _resample."""
    return ModelGrid(vol.shape[:3], vol.spacing, vol.origin, vol.direction)


def _check_spacing(spacing: Sequence[float]) -> Vec3:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"model spacing must be 3 finite positive values, got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def _check_roi(vol: Volume, roi_lower: Sequence[int], roi_upper: Sequence[int]
               ) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    lower, upper = tuple(int(v) for v in roi_lower), tuple(int(v) for v in roi_upper)
    shape = vol.shape[:3]
    if len(lower) != 3 or len(upper) != 3 or any(not 0 <= lo < hi <= n for lo, hi, n in zip(lower, upper, shape)):
        raise InputError(f"{vol.source}: region [{lower}, {upper}) is empty or outside the image of size {shape}")
    return lower, upper


def _matrix(direction: Sequence[float]) -> np.ndarray:
    return np.asarray(direction, np.float64).reshape(3, 3)
