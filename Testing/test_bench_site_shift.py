"""The site benchmark's histogram standardisation: quantile matching undoes a monotone contrast curve, and
8-bit scans (tied landmarks) still map monotonically."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_site_shift.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_site_shift", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matching_undoes_a_monotone_contrast_curve(bench):
    original = np.random.default_rng(0).gamma(2.0, 1.0, size=(24, 24, 16)).astype(np.float32)
    curved = original ** 0.4 * 3.0 + 1.0  # another site's contrast: monotone, non-linear
    restored = bench.match_quantiles(curved, bench.landmarks([curved]), bench.landmarks([original]))
    assert np.abs(curved - original).mean() > 0.5
    assert np.abs(restored - original).mean() < 0.02


def test_tied_landmarks_of_an_8_bit_scan_still_map_monotonically(bench):
    scan = np.random.default_rng(1).integers(0, 6, size=(16, 16, 8)).astype(np.float32)  # 6 values, 100 landmarks
    out = bench.match_quantiles(scan, bench.landmarks([scan]), np.linspace(-2.0, 2.0, 100))
    order = np.argsort(scan.ravel(), kind="stable")
    assert np.isfinite(out).all() and np.all(np.diff(out.ravel()[order]) >= 0)
