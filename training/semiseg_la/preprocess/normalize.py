"""Intensity normalisation: the LA release's whole-volume z-score (methods.md 1.1.2, step 5)."""

from __future__ import annotations

import numpy as np


def zscore(array: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """(array - mean) / std over the whole array, as float32.

    Statistics accumulate in float64 (float32 sums over millions of voxels lose ~3 digits), slice by
    slice so no float64 copy of the volume is made. A constant array maps to zeros (std floored by eps).
    """
    data = np.asarray(array)
    if data.size == 0:
        return data.astype(np.float32)
    mean = float(np.mean(data, dtype=np.float64))
    squares = sum(float(np.sum(np.square(s.astype(np.float64) - mean))) for s in _slabs(data))
    std = max(float(np.sqrt(squares / data.size)), eps)
    out = data.astype(np.float32, copy=True)
    out -= np.float32(mean)
    out *= np.float32(1.0 / std)
    return out


def _slabs(data: np.ndarray):
    """Views of at most ~4 M voxels along the first axis (bounded float64 temporaries)."""
    if data.ndim == 0:
        yield data.reshape(1)
        return
    step = max(1, (1 << 22) // max(1, data.size // max(1, data.shape[0])))
    for start in range(0, data.shape[0], step):
        yield data[start:start + step]
