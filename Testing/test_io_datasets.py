"""Dataset layout detection on tiny synthetic NRRD folders: nnU-Net, images/+labels/, plain folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import sphere_volume
from semiseg_la.errors import InputError
from semiseg_la.io import (
    DEFAULT_LABELS,
    CaseRecord,
    Volume,
    dataset_labels,
    open_dataset,
    open_unlabeled_folder,
    write_volume,
)

SHAPE = (12, 10, 6)
SPACING = (0.8, 0.8, 2.0)


def _image(seed: int = 0, spacing=SPACING) -> Volume:
    image, _ = sphere_volume(SHAPE, radius=3.0, seed=seed)
    return Volume(image, spacing, (5.0, -3.0, 1.0))


def _label(value: int = 1) -> Volume:
    _, label = sphere_volume(SHAPE, radius=3.0)
    return Volume(label * value, SPACING, (5.0, -3.0, 1.0))


def _nnunet(root: Path, cases=("la_003", "la_004"), channels=1, labels=True, ending=".nrrd") -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {str(c): f"MRI{c}" for c in range(channels)},
            "labels": {"background": 0, "left atrium": 1}, "numTraining": len(cases), "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(meta))
    for i, case in enumerate(cases):
        for c in range(channels):
            write_volume(_image(i + c), root / "imagesTr" / f"{case}_{c:04d}{ending}")
        if labels:
            write_volume(_label(), root / "labelsTr" / f"{case}{ending}")
    return root


def test_nnunet_single_channel(tmp_path):
    records = open_dataset(_nnunet(tmp_path / "Dataset002_Heart"))
    assert [r.case_id for r in records] == ["la_003", "la_004"]
    assert records[0].kind == "file" and records[0].classes == (0, 1) and records[0].n_channels == 1
    image, label = records[0].load()
    assert image.shape == SHAPE and label is not None and label.array.dtype == np.uint8
    assert label.same_grid(image)


def test_nnunet_two_channels(tmp_path):
    records = open_dataset(_nnunet(tmp_path / "ds", cases=("a",), channels=2))
    record = records[0]
    assert [p.name for p in record.image_paths] == ["a_0000.nrrd", "a_0001.nrrd"]
    images, label = record.load_channels()
    assert len(images) == 2 and label is not None
    second, _ = record.load(channel=1)
    np.testing.assert_array_equal(second.array, images[1].array)
    with pytest.raises(InputError, match="2 image channels"):
        record.load()


def test_nnunet_channels_on_different_grids(tmp_path):
    root = _nnunet(tmp_path / "ds", cases=("a",), channels=2)
    write_volume(_image(spacing=(0.8, 0.8, 3.0)), root / "imagesTr" / "a_0001.nrrd")
    expected = r"case a: channels do not share the grid of a_0000\.nrrd: a_0001\.nrrd: spacing"
    with pytest.raises(InputError, match=expected):
        open_dataset(root)[0].load_channels()


def test_nnunet_missing_label(tmp_path):
    root = _nnunet(tmp_path / "ds")
    (root / "labelsTr" / "la_004.nrrd").unlink()
    with pytest.raises(InputError, match="no label for 1 case of imagesTr/: la_004"):
        open_dataset(root)
    records = open_dataset(root, labeled=False)
    assert records[0].label_path is not None and records[1].label_path is None


def test_nnunet_naming_problems_all_at_once(tmp_path):
    root = _nnunet(tmp_path / "ds", channels=2)
    write_volume(_image(), root / "imagesTr" / "stray.nrrd")
    (root / "imagesTr" / "la_004_0001.nrrd").unlink()
    with pytest.raises(InputError) as info:
        open_dataset(root)
    text = str(info.value)
    assert "stray.nrrd lacks the _XXXX channel suffix" in text and "case la_004 has channels _0000" in text


def test_nnunet_test_subset(tmp_path):
    root = _nnunet(tmp_path / "ds")
    (root / "imagesTs").mkdir()
    write_volume(_image(), root / "imagesTs" / "t1_0000.nrrd")
    records = open_dataset(root, labeled=False, subset="test")
    assert [(r.case_id, r.label_path) for r in records] == [("t1", None)]


def test_malformed_dataset_json(tmp_path):
    root = _nnunet(tmp_path / "ds")
    (root / "dataset.json").write_text('{\n  "labels": {"background": 0,\n  "file_ending" ".nrrd"\n}\n')
    with pytest.raises(InputError, match=r"dataset\.json: invalid JSON at line 3, column 17: Expecting ':' delimiter"):
        open_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "la": 1}}))
    with pytest.raises(InputError, match="'channel_names' must be.*'file_ending' must be"):
        open_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"la": [1, 2]},
                                                   "file_ending": ".nrrd"}))
    with pytest.raises(InputError, match="non-negative integers"):
        open_dataset(root)


def test_dataset_labels(tmp_path):
    assert dataset_labels(tmp_path) == DEFAULT_LABELS == {"background": 0, "left_atrium": 1}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "left atrium"}}))
    assert dataset_labels(tmp_path) == {"background": 0, "left atrium": 1}  # v1 / MSD direction flipped


def test_list_file_restricts_orders_and_names_missing_cases(tmp_path):
    root = _nnunet(tmp_path / "ds", cases=("a", "b", "c"))
    (root / "pick.list").write_text("c\na\n")
    assert [r.case_id for r in open_dataset(root, "pick.list")] == ["c", "a"]
    (tmp_path / "bad.list").write_text("a\nzz\n")
    with pytest.raises(InputError, match=r"case zz named in .*bad\.list is missing under"):
        open_dataset(root, tmp_path / "bad.list")
    with pytest.raises(InputError, match="case list not found"):
        open_dataset(root, "nope.list")


def test_label_problems_surface_at_load(tmp_path):
    root = _nnunet(tmp_path / "ds", cases=("a",))
    write_volume(_label(value=2), root / "labelsTr" / "a.nrrd")
    with pytest.raises(InputError, match=r"a\.nrrd: invalid label: values \{2\}"):
        open_dataset(root)[0].load()
    shifted = _label()
    shifted.origin = (6.0, -3.0, 1.0)
    write_volume(shifted, root / "labelsTr" / "a.nrrd")
    with pytest.raises(InputError, match="label grid differs from the image .*origin"):
        open_dataset(root)[0].load()


def test_paired_images_and_labels(tmp_path):
    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for name in ("p1", "p2"):
        write_volume(_image(), tmp_path / "images" / f"{name}.nrrd")
    write_volume(_label(), tmp_path / "labels" / "p1.nrrd")
    with pytest.raises(InputError, match="no label for 1 case of images/: p2"):
        open_dataset(tmp_path)
    write_volume(_label(), tmp_path / "labels" / "p2.nrrd")
    records = open_dataset(tmp_path)
    assert [(r.case_id, r.label_path.name) for r in records] == [("p1", "p1.nrrd"), ("p2", "p2.nrrd")]
    assert records[1].load()[1] is not None


def _write_dicom_series(folder: Path, depth: int = 3) -> None:
    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(np.arange(depth * 6 * 5, dtype=np.int16).reshape(depth, 6, 5))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(depth):
        piece = image[:, :, k]
        for tag, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.7"), ("0020|0013", str(k)),
                           ("0020|0032", f"0\\0\\{2.0 * k}"), ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0008|0060", "MR")):
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(piece)


def test_plain_folder_is_unlabelled(tmp_path):
    write_volume(_image(), tmp_path / "x.nii.gz")
    write_volume(_image(), tmp_path / "y.mha")
    _write_dicom_series(tmp_path / "series1")
    (tmp_path / "notes.txt").write_text("ignored")
    records = open_dataset(tmp_path, labeled=False)
    assert [(r.case_id, r.label_path) for r in records] == [("series1", None), ("x", None), ("y", None)]
    image, label = records[0].load()
    assert image.shape == (5, 6, 3) and label is None
    with pytest.raises(InputError, match="3 images but no labels"):
        open_dataset(tmp_path)
    assert [r.case_id for r in open_unlabeled_folder(tmp_path)] == ["series1", "x", "y"]


def test_unlabelled_folder_groups_channels_only_when_unambiguous(tmp_path):
    for case in ("a", "b"):
        for c in range(2):
            write_volume(_image(), tmp_path / "multi" / f"{case}_{c:04d}.nrrd")
    records = open_unlabeled_folder(tmp_path / "multi")
    assert [(r.case_id, r.n_channels) for r in records] == [("a", 2), ("b", 2)]
    for n in (1, 2):
        write_volume(_image(), tmp_path / "seq" / f"patient_{n:04d}.nrrd")
    assert [r.case_id for r in open_unlabeled_folder(tmp_path / "seq")] == ["patient_0001", "patient_0002"]


def test_unlabelled_single_file_and_labelled_layouts(tmp_path):
    path = write_volume(_image(), tmp_path / "scan.nii.gz")
    assert open_unlabeled_folder(path) == [CaseRecord("scan", (path,), None, "file")]
    root = _nnunet(tmp_path / "ds")
    assert all(r.label_path is None for r in open_unlabeled_folder(root))


def test_unknown_layout_and_missing_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="unrecognised dataset layout; accepted layouts: .*an LA h5 folder"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(InputError, match="dataset folder not found"):
        open_dataset(tmp_path / "absent")
    with pytest.raises(InputError, match="no volume files"):
        open_unlabeled_folder(tmp_path / "empty")
