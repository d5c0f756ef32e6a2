"""The compact training cache (io/la_cache.py): lossless on real LA cases, parts, and a dataset like the h5 root."""

from __future__ import annotations

import json

import numpy as np
import pytest

from semiseg_la.errors import InputError
from semiseg_la.io import la_cache
from semiseg_la.io.datasets import open_dataset, open_unlabeled_folder
from semiseg_la.io.la_h5 import find_la_case, read_case_list, read_la_h5


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_encoding_round_trip_keeps_every_bit():
    rng = np.random.default_rng(0)
    image = rng.choice(np.linspace(-2, 5, 200).astype(np.float32), size=(20, 17, 9))
    image[0, 0, 0], image[1, 0, 0] = -0.0, 0.0  # equal as numbers, different bits
    arrays = la_cache.encode_image(image)
    assert arrays["index"].dtype == np.uint8 and arrays["lut"].dtype == np.float32
    assert _same_bits(la_cache.decode_image(arrays["index"], arrays["lut"]), image)
    wide = rng.normal(size=(30, 20, 10)).astype(np.float32).round(3)  # thousands of values: uint16
    arrays = la_cache.encode_image(wide)
    assert arrays["index"].dtype == np.uint16
    assert _same_bits(la_cache.decode_image(arrays["index"], arrays["lut"]), wide)
    label = (rng.random((7, 5, 3)) > 0.5).astype(np.uint8)
    kind, packed = la_cache.encode_label(label)
    assert kind == "bits" and packed.nbytes == -(-label.size // 8)
    assert np.array_equal(la_cache.decode_label(kind, packed, label.shape), label)
    multi = rng.integers(0, 3, (7, 5, 3)).astype(np.uint8)
    assert np.array_equal(la_cache.decode_label(*la_cache.encode_label(multi), multi.shape), multi)


@pytest.fixture(scope="module")
def real_cache(la_root, module_tmp):
    ids = read_case_list(la_root / "train.list")[-3:]
    folder = module_tmp / "la"
    la_cache.build_from_h5(la_root, folder, part_bytes=2 * 2**20, cases=ids)
    return folder, ids


def test_real_cases_round_trip_losslessly(la_root, real_cache):
    folder, ids = real_cache
    manifest = la_cache.read_manifest(folder)
    assert list(manifest["cases"]) == ids and manifest["prepared"] is False
    assert len(manifest["parts"]) >= 2, "2 MiB parts must split three ~1.2 MiB cases"
    assert (folder / "train.list").read_text() == (la_root / "train.list").read_text()
    cached_bytes = 0
    for case in ids:
        image, label = read_la_h5(find_la_case(la_root, case), case)
        cached, cached_label = la_cache.read_cached_case(la_cache.case_path(folder, case))
        assert _same_bits(cached.array, image.array) and _same_bits(cached_label.array, label.array)
        assert cached.spacing == image.spacing and cached.origin == image.origin
        assert cached.direction == image.direction
        cached_bytes += la_cache.case_path(folder, case).stat().st_size
        assert manifest["cases"][case]["values"] < 256 and manifest["cases"][case]["index_dtype"] == "uint8"
    h5_bytes = sum(find_la_case(la_root, c).stat().st_size for c in ids)
    assert cached_bytes < 0.7 * h5_bytes


def test_cache_reads_as_a_dataset_like_the_h5_root(la_root, real_cache):
    from semiseg_la.engine.data import prepare_case

    folder, ids = real_cache
    records = open_dataset(folder)
    assert [r.case_id for r in records] == ids and all(r.kind == "la_cache" for r in records)
    h5 = {r.case_id: r for r in open_dataset(la_root, "train.list")}
    mine, theirs = prepare_case(records[0], (1.25, 1.25, 1.25)), prepare_case(h5[ids[0]], (1.25, 1.25, 1.25))
    assert _same_bits(mine.image, theirs.image) and np.array_equal(mine.label, theirs.label)
    assert [r.case_id for r in open_unlabeled_folder(folder)] == ids
    with pytest.raises(InputError, match="missing from the cache"):
        open_dataset(folder, "train.list")  # the source's list names 77 cases this cache does not hold


def test_missing_part_and_corruption_are_clear_errors(real_cache, tmp_path):
    import shutil

    folder, ids = real_cache
    copy = tmp_path / "la"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "part-02")
    with pytest.raises(InputError, match="incomplete, missing part-02"):
        open_dataset(copy)
    path = la_cache.case_path(copy, ids[0])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["cases"][ids[0]]["image_sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="SHA-256 mismatch"):
        la_cache.read_cached_case(path)
    with pytest.raises(InputError, match="not empty"):
        la_cache.CacheWriter(copy, (1, 1, 1))
