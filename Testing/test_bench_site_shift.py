"""The site benchmark's histogram standardisation writes matched cases that read back as an LA dataset (the
matching itself: test_standardize.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/bench_site_shift.py")


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
    reference = bench.pooled_landmarks([np.linspace(-1.0, 3.0, 1000)], 11)
    bench.write_matched(records, tmp_path, reference)
    read = open_dataset(tmp_path, "train.list")
    assert [r.case_id for r in read] == ["CASEA", "CASEB"]
    for original, record in zip(records, read):
        image, label = record.load()
        np.testing.assert_array_equal(label.array, original.label.array)
        np.testing.assert_allclose(bench.pooled_landmarks([image.array], 11), reference, atol=0.05)  # both now alike
