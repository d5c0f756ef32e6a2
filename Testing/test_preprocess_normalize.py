"""Whole-volume z-score (the LA release's normalisation)."""

from __future__ import annotations

import numpy as np

from semiseg_la.preprocess import zscore


def test_zscore_statistics_and_dtype():
    data = np.random.default_rng(0).normal(40.0, 7.0, (30, 20, 10))
    out = zscore(data)
    assert out.dtype == np.float32 and out.shape == data.shape
    assert abs(float(out.mean(dtype=np.float64))) < 1e-5
    assert abs(float(out.std(dtype=np.float64)) - 1.0) < 1e-5


def test_zscore_is_accurate_for_large_offsets():
    """float32 accumulation would lose the small spread on top of a large offset."""
    rng = np.random.default_rng(1)
    data = (10_000.0 + rng.normal(0.0, 0.01, (64, 64, 32))).astype(np.float32)
    reference = (data.astype(np.float64) - data.mean(dtype=np.float64)) / data.std(dtype=np.float64)
    np.testing.assert_allclose(zscore(data), reference, atol=2e-3)


def test_zscore_constant_and_integer_inputs():
    np.testing.assert_array_equal(zscore(np.full((4, 4, 4), 7, np.int16)), np.zeros((4, 4, 4), np.float32))
    ints = np.arange(27, dtype=np.uint8).reshape(3, 3, 3)
    np.testing.assert_allclose(zscore(ints), (ints - 13.0) / ints.std(), atol=1e-6)
