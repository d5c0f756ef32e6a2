"""Intensity normalisation: the LA release's whole-volume z-score (methods.md 1.1.2, step 5), and intensity
standardisation onto a model's reference histogram (Nyul-Udupa), which undoes another scanner's contrast curve."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

#: the model card's `inference.normalization` names (engine/data.py normalize_volume applies them)
NORMALIZATIONS = ("zscore-volume", "stored", "minmax-volume", "standardized-zscore")
#: the normalisations that end in a z-score over the case (whose statistics `TrainCase.stored_image` undoes)
Z_SCORED = ("zscore-volume", "standardized-zscore")


def zscore(array: np.ndarray, eps: float = 1e-8, stats: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """(array - mean) / std over the whole array, as float32; `stats`: its `zscore_stats`, when already known.

    Statistics accumulate in float64 (float32 sums over millions of voxels lose ~3 digits), slice by
    slice so no float64 copy of the volume is made. A constant array maps to zeros (std floored by eps).
    """
    data = np.asarray(array)
    if data.size == 0:
        return data.astype(np.float32)
    mean, std = stats if stats is not None else zscore_stats(data, eps)
    out = data.astype(np.float32, copy=True)
    out -= np.float32(mean)
    out *= np.float32(1.0 / std)
    return out


def zscore_stats(array: np.ndarray, eps: float = 1e-8) -> Tuple[float, float]:
    """(mean, std) of `zscore`. Linear resampling commutes with (x - mean) / std (its weights sum to one), so a
    whole scan can be resampled to a coarse grid first and normalised there with its full-resolution figures."""
    data = np.asarray(array)
    if not data.flags.c_contiguous and data.T.flags.c_contiguous:  # a scan read from a file: a transposed view
        data = data.T  # the same voxels in memory order, so the slabs below are contiguous
    mean = float(np.mean(data, dtype=np.float64))
    squares = sum(float(np.sum(np.square(s.astype(np.float64) - mean))) for s in _slabs(data))
    return mean, max(float(np.sqrt(squares / data.size)), eps)


def _slabs(data: np.ndarray):
    """Views of at most ~4 M voxels along the first axis (bounded float64 temporaries)."""
    if data.ndim == 0:
        yield data.reshape(1)
        return
    step = max(1, (1 << 22) // max(1, data.size // max(1, data.shape[0])))
    for start in range(0, data.shape[0], step):
        yield data[start:start + step]


#: percentiles whose values a standardised scan shares with the model's reference histogram (Nyul-Udupa):
#: 11 from 0.5 to 99.5; 100 follow each scan's own histogram too closely (docs/results.md, "Standardising")
STANDARDIZE_LANDMARKS = 11


def landmarks(array: np.ndarray, count: int = STANDARDIZE_LANDMARKS) -> np.ndarray:
    """`count` percentiles from 0.5 to 99.5 of one volume's intensities (float64)."""
    return np.percentile(np.asarray(array, np.float32).ravel(), np.linspace(0.5, 99.5, count))


def reference_landmarks(arrays, count: int = STANDARDIZE_LANDMARKS) -> np.ndarray:
    """The reference histogram a model is trained on: the mean of its training volumes' own landmarks
    (each volume is read once; no pooled copy of every voxel)."""
    rows = [landmarks(a, count) for a in arrays]
    if not rows:
        raise ValueError("no volume to take reference landmarks from")
    return np.maximum.accumulate(np.mean(rows, axis=0))


def match_quantiles(array: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`array` mapped piecewise-linearly from the `source` landmarks onto the `target` ones, the end segments
    extended beyond them (Nyul-Udupa). Tied landmarks (8-bit scans, a masked background) are nudged apart so
    the map is a function."""
    source = np.maximum.accumulate(np.asarray(source, np.float64)) + 1e-4 * np.arange(len(source))
    target = np.asarray(target, np.float64)
    data = np.asarray(array, np.float64)
    out = np.interp(data, source, target)
    below, above = data < source[0], data > source[-1]
    out[below] = target[0] + (data[below] - source[0]) * (target[1] - target[0]) / (source[1] - source[0])
    out[above] = target[-1] + (data[above] - source[-1]) * (target[-1] - target[-2]) / (source[-1] - source[-2])
    return out.astype(np.float32)


def standardize(array: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """One volume matched onto `reference` by its own landmarks (as many as the reference has): a monotone
    contrast curve, window or gain of another scanner is undone, whatever the site (no label needed)."""
    return match_quantiles(array, landmarks(array, len(reference)), reference)


def check_reference(reference, where: str = "intensity_reference") -> None:
    """A usable reference: at least 3 finite, non-decreasing landmarks with a spread; raises ValueError."""
    values = np.asarray(reference if reference is not None else [], np.float64).ravel()
    if values.size < 3 or not np.all(np.isfinite(values)) or np.any(np.diff(values) < 0) or values[-1] <= values[0]:
        raise ValueError(f"{where} must be at least 3 finite, non-decreasing intensities with a spread; "
                         f"got {list(values)[:5]}{'...' if values.size > 5 else ''}")
