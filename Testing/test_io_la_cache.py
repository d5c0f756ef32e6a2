"""The compact training cache (io/la_cache.py): lossless on real LA cases, parts, and a dataset like the h5 root."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_a_cache_of_stored_intensities_on_the_model_grid_and_a_scan_built_from_it(la_root, tmp_path):
    """`build_la_cache.py --spacing ... --normalization stored` holds each case resampled with its stored
    intensities (what a standardising recipe normalises itself), and the GPU run's scan built from such a
    cache keeps its spacing, so the label still covers the atrium (a 0.625 mm canvas made it half-size)."""
    import subprocess
    import sys

    from semiseg_la.engine.data import prepare_case
    from semiseg_la.io.volume import read_volume

    repo = Path(__file__).resolve().parents[1]
    folder = tmp_path / "la125"
    subprocess.run([sys.executable, str(repo / "scripts" / "build_la_cache.py"), str(la_root), str(folder),
                    "--spacing", "1.25", "1.25", "1.25", "--normalization", "stored", "--cases", "2"],
                   check=True, capture_output=True)
    manifest = la_cache.read_manifest(folder)
    assert manifest["prepared"] and manifest["normalization"] == "stored" and manifest["spacing"] == [1.25] * 3
    record = open_dataset(folder)[0]
    h5 = {r.case_id: r for r in open_dataset(la_root, "train.list")}[record.case_id]
    cached = prepare_case(record, (1.25, 1.25, 1.25), normalization="stored")
    direct = prepare_case(h5, (1.25, 1.25, 1.25), normalization="stored")
    assert _same_bits(cached.image, direct.image) and np.array_equal(cached.label, direct.label)
    zscored = prepare_case(h5, (1.25, 1.25, 1.25), normalization="zscore-volume")
    assert not np.allclose(cached.image, zscored.image, atol=1e-3)  # the stored intensities, not z-scored

    scan, label = tmp_path / "scan.nrrd", tmp_path / "label.nrrd"
    out = subprocess.run([sys.executable, str(repo / "scripts" / "gpu_run.py"), "scan", str(scan), str(label),
                          "--shape", "192", "192", "80", "--data", str(folder)], check=True, capture_output=True,
                         text=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["spacing"] == [1.25] * 3 and info["shape"] == [96, 96, 40]
    written = read_volume(label)
    assert tuple(written.spacing) == (1.25, 1.25, 1.25) and written.array.shape == (96, 96, 40)
    assert int(written.array.sum()) > 0
