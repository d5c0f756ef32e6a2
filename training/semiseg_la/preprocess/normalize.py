"""Intensity normalisation: the LA release's whole-volume z-score (methods.md 1.1.2, step 5)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


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
