"""The site benchmark's histogram standardisation: quantile matching undoes a monotone contrast curve, and
8-bit scans (tied landmarks) still map monotonically."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/bench_site_shift.py")


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


def test_written_matched_cases_read_back_as_an_la_dataset(bench, tmp_path):
    from semiseg_la.io.datasets import open_dataset
    from semiseg_la.io.volume import Volume

    class Record:
        def __init__(self, case_id, seed):
            rng = np.random.default_rng(seed)
            self.case_id = case_id
            self.image = Volume(rng.gamma(2.0, 1.0 + seed, size=(20, 18, 12)).astype(np.float32), (0.625,) * 3)
            self.label = Volume((rng.random((20, 18, 12)) > 0.8).astype(np.uint8), (0.625,) * 3)

        def load(self):
            return self.image, self.label

    records = [Record("CASEA", 0), Record("CASEB", 3)]
    reference = bench.landmarks([np.linspace(-1.0, 3.0, 1000)], 11)
    bench.write_matched(records, tmp_path, reference)
    read = open_dataset(tmp_path, "train.list")
    assert [r.case_id for r in read] == ["CASEA", "CASEB"]
    for original, record in zip(records, read):
        image, label = record.load()
        np.testing.assert_array_equal(label.array, original.label.array)
        np.testing.assert_allclose(bench.landmarks([image.array], 11), reference, atol=0.05)  # both now alike
