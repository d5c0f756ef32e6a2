"""Volumes with their geometry, read and written through SimpleITK.

Array axes are (X, Y, Z) = ITK index order (i, j, k), the order of the LA h5 release; SimpleITK's
numpy view is (Z, Y, X), so reading and writing transpose. Geometry follows ITK: origin and
direction in LPS world coordinates, direction as 9 numbers in row-major order, columns = axes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .atomic import atomic_path

Vec3 = Tuple[float, float, float]
IDENTITY_DIRECTION: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


@dataclasses.dataclass
class Volume:
    """A 3D scalar array on a physical grid."""

    array: np.ndarray
    spacing: Vec3 = (1.0, 1.0, 1.0)
    origin: Vec3 = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = IDENTITY_DIRECTION
    source: str = "<array>"

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = tuple(float(d) for d in np.asarray(self.direction).ravel())

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.array.shape)

    def with_array(self, array: np.ndarray, source: Optional[str] = None) -> Volume:
        """Same geometry, other voxels (e.g. a label map for this image)."""
        return Volume(array, self.spacing, self.origin, self.direction, source or self.source)

    def same_grid(self, other: Volume, rel_tol: float = 1e-4) -> bool:
        return not geometry_mismatches(self, other, rel_tol)

    def to_sitk(self) -> sitk.Image:
        """SimpleITK image; bool masks become uint8 and float16 becomes float32 (SimpleITK has neither)."""
        array = np.asarray(self.array)
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        elif array.dtype == np.float16:
            array = array.astype(np.float32)
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image, source: str = "<sitk>") -> Volume:
        array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
        return cls(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), source)


def geometry_mismatches(a: Volume, b: Volume, rel_tol: float = 1e-4) -> list[str]:
    """Every way two grids differ, beyond a tolerance relative to the voxel spacing.

    1e-4 of the spacing sits above the ~1e-5 noise of Slicer/NRRD round trips, which ITK's default
    1e-6 rejects (docs/conventions.md 4.2).
    """
    problems = []
    if a.shape[:3] != b.shape[:3]:
        problems.append(f"size {a.shape[:3]} vs {b.shape[:3]}")
        return problems
    scale = float(np.min(a.spacing))
    if np.max(np.abs(np.subtract(a.spacing, b.spacing))) > rel_tol * scale:
        problems.append(f"spacing {_fmt(a.spacing)} vs {_fmt(b.spacing)}")
    if np.max(np.abs(np.subtract(a.origin, b.origin))) > rel_tol * scale:
        problems.append(f"origin {_fmt(a.origin)} vs {_fmt(b.origin)}")
    if np.max(np.abs(np.subtract(a.direction, b.direction))) > rel_tol:
        problems.append(f"direction {_fmt(a.direction)} vs {_fmt(b.direction)}")
    return problems


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and any(name.endswith(s) for s in VOLUME_SUFFIXES)


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NRRD/NIfTI/MHA file or a DICOM series folder; one-line InputError on failure."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    if p.is_dir():
        image = _read_dicom_series(p)
    else:
        if p.stat().st_size == 0:
            raise InputError(f"{p}: file is empty")
        try:
            image = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise InputError(f"{p}: unreadable or truncated image ({_first_line(exc)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{p}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a scalar (single-channel) 3D image is required")
    if image.GetDimension() != 3:
        raise InputError(f"{p}: image is {image.GetDimension()}D (size {image.GetSize()}); a 3D image is required")
    try:
        return Volume.from_sitk(image, source=str(p))
    except RuntimeError as exc:
        raise InputError(f"{p}: unreadable or truncated image ({_first_line(exc)})") from None


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise InputError(f"{folder}: folder holds {len(series)} DICOM series; point to a folder with one")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: unreadable DICOM series ({_first_line(exc)})") from None


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically; the format follows the extension (NRRD, NIfTI, MHA)."""
    target = Path(path)
    if not any(target.name.lower().endswith(s) for s in VOLUME_SUFFIXES):
        raise InputError(f"{target}: unknown output format; use .nrrd, .nii.gz, .nii or .mha")
    with atomic_path(target) as tmp:
        sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=compress)
    return target


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("sitk::", "Exception thrown"))]
    return (useful or lines or ["unknown error"])[-1][:200]
