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


def test_resampling_first_and_z_scoring_after_gives_the_z_scored_resampling():
    """What the localiser relies on: linear resampling commutes with the whole scan's z-score, the fill value
    outside the scan (its minimum) included, on an oblique grid."""
    from semiseg_la.io import Volume
    from semiseg_la.preprocess import to_model_grid
    from semiseg_la.preprocess.normalize import zscore, zscore_stats

    rng = np.random.default_rng(2)
    angle = 0.3
    direction = (np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1)
    scan = Volume(rng.gamma(2.0, 50.0, (40, 36, 20)).astype(np.float32), (0.625, 0.625, 1.25), (5, -3, 2),
                  direction)
    before, _ = to_model_grid(scan.with_array(zscore(scan.array)), (4.0, 4.0, 4.0), "linear")
    mean, std = zscore_stats(scan.array)
    after, _ = to_model_grid(scan, (4.0, 4.0, 4.0), "linear")
    np.testing.assert_allclose((after.array - mean) / std, before.array, rtol=0, atol=1e-4)
