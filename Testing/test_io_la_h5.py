"""The LA h5 release: case lists, both folder layouts, h5 reading and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import sphere_volume
from semiseg_la.errors import InputError
from semiseg_la.io import (
    H5_NAME,
    IDENTITY_DIRECTION,
    LA_SPACING,
    UPSTREAM_FOLDER,
    find_la_case,
    is_la_root,
    open_dataset,
    read_case_list,
    read_la_h5,
)


def _write_h5(path: Path, shape=(24, 20, 8), label=True, image=True, label_shape=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img, lab = sphere_volume(shape, radius=4.0)
    with h5py.File(path, "w") as handle:
        if image:
            handle.create_dataset("image", data=img, compression="gzip")
        if label:
            lab = lab if label_shape is None else np.ones(label_shape, np.uint8)
            handle.create_dataset("label", data=lab, compression="gzip")
    return path


def test_read_synthetic_h5(tmp_path):
    image, label = read_la_h5(_write_h5(tmp_path / "A" / H5_NAME))
    assert image.array.dtype == np.float32 and image.shape == (24, 20, 8)
    assert label is not None and label.array.dtype == np.uint8 and set(np.unique(label.array)) == {0, 1}
    assert image.spacing == LA_SPACING and image.origin == (0.0, 0.0, 0.0)
    assert image.direction == IDENTITY_DIRECTION and image.source == str(tmp_path / "A" / H5_NAME)
    assert label.same_grid(image)


def test_h5_without_label(tmp_path):
    _, label = read_la_h5(_write_h5(tmp_path / "x.h5", label=False))
    assert label is None


def test_h5_errors(tmp_path):
    with pytest.raises(InputError, match="no 'image' dataset"):
        read_la_h5(_write_h5(tmp_path / "noimage.h5", image=False), case_id="C1")
    with pytest.raises(InputError, match=r"label shape \(3, 3, 3\) differs from image shape"):
        read_la_h5(_write_h5(tmp_path / "shape.h5", label_shape=(3, 3, 3)))
    (tmp_path / "text.h5").write_text("not hdf5 at all\n")
    with pytest.raises(InputError, match="text.h5: not an HDF5 file"):
        read_la_h5(tmp_path / "text.h5")
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_la_h5(tmp_path / "empty.h5")
    with pytest.raises(InputError, match="not found"):
        read_la_h5(tmp_path / "absent.h5")


def test_truncated_h5(tmp_path):
    full = _write_h5(tmp_path / "full.h5")
    cut = tmp_path / "cut.h5"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut\.h5 \(case X\): unreadable or truncated HDF5 file"):
        read_la_h5(cut, case_id="X")


def test_h5_image_with_nan_is_rejected(tmp_path):
    path = tmp_path / "nan.h5"
    with h5py.File(path, "w") as handle:
        data = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
        data[0, 0, 0] = np.nan
        handle["image"] = data
    with pytest.raises(InputError, match="1 NaN voxel"):
        read_la_h5(path)


def test_read_case_list(tmp_path):
    path = tmp_path / "train.list"
    path.write_text("# labelled first\nA\n\n  B  \r\nC # trailing comment\n")
    assert read_case_list(path) == ["A", "B", "C"]
    with pytest.raises(InputError, match="case list not found"):
        read_case_list(tmp_path / "missing.list")
    (tmp_path / "blank.list").write_text("\n# nothing\n")
    with pytest.raises(InputError, match="names no case"):
        read_case_list(tmp_path / "blank.list")
    (tmp_path / "dup.list").write_text("A\nB\nA\n")
    with pytest.raises(InputError, match="listed twice"):
        read_case_list(tmp_path / "dup.list")
    with pytest.raises(InputError, match="not a file"):
        read_case_list(tmp_path)


def test_find_case_in_both_layouts(tmp_path):
    shared = _write_h5(tmp_path / "shared" / "A" / H5_NAME)
    upstream = _write_h5(tmp_path / "up" / UPSTREAM_FOLDER / "B" / H5_NAME)
    assert find_la_case(tmp_path / "shared", "A") == shared
    assert find_la_case(tmp_path / "up", "B") == upstream
    assert is_la_root(tmp_path / "shared") and is_la_root(tmp_path / "up") and not is_la_root(tmp_path)
    with pytest.raises(InputError, match=r"case Z named in test\.list is missing under"):
        find_la_case(tmp_path / "shared", "Z", "test.list")
    with pytest.raises(InputError, match="invalid case ID"):
        find_la_case(tmp_path / "shared", "../A")


def test_list_naming_a_missing_case(tmp_path):
    root = tmp_path / "LA"
    _write_h5(root / "A" / H5_NAME)
    (root / "train.list").write_text("A\nGHOST\n")
    with pytest.raises(InputError, match=r"case GHOST named in .*train\.list is missing under"):
        open_dataset(root, "train.list")
    (root / "two.list").write_text("GHOST\nSPOOK\n")
    with pytest.raises(InputError, match=r"2 cases named in .*two\.list are missing under .*: GHOST, SPOOK"):
        open_dataset(root, "two.list")


def test_la_dataset_without_list_and_unlabelled_cases(tmp_path):
    root = tmp_path / "LA"
    _write_h5(root / "B" / H5_NAME)
    _write_h5(root / "A" / H5_NAME, label=False)
    with pytest.raises(InputError, match="1 case without a 'label' dataset: A"):
        open_dataset(root)
    records = open_dataset(root, labeled=False)
    assert [r.case_id for r in records] == ["A", "B"]
    assert records[0].label_path is None and records[1].label_path == root / "B" / H5_NAME
    image, label = records[0].load()
    assert label is None and image.shape == (24, 20, 8)


def _two_real_cases(la_root: Path):
    return read_case_list(la_root / "train.list")[:2]


def _check_real(records, ids):
    assert [r.case_id for r in records] == ids
    for record in records:
        image, label = record.load()
        assert image.array.dtype == np.float32 and image.shape[2] == 88 and len(image.shape) == 3
        assert label is not None and label.array.dtype == np.uint8 and set(np.unique(label.array)) == {0, 1}
        assert image.spacing == LA_SPACING


def test_real_cases_shared_layout(la_root, tmp_path):
    ids = _two_real_cases(la_root)
    (tmp_path / "two.list").write_text("\n".join(ids) + "\n")
    _check_real(open_dataset(la_root, tmp_path / "two.list"), ids)


def test_real_cases_upstream_layout(la_root, tmp_path):
    ids = _two_real_cases(la_root)
    data = tmp_path / "data"
    (data / UPSTREAM_FOLDER).mkdir(parents=True)
    for case in ids:
        (data / UPSTREAM_FOLDER / case).symlink_to(la_root / case, target_is_directory=True)
    (data / "train.list").write_text("\n".join(reversed(ids)) + "\n")
    _check_real(open_dataset(data, "train.list"), list(reversed(ids)))
