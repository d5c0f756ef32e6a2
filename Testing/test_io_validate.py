"""validate_image / validate_label: every problem reported at once, on one line, naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import sphere_volume
from semiseg_la.errors import InputError
from semiseg_la.io import DEFAULT_GEOMETRY_TOLERANCE, MAX_VOXELS, Volume, validate_image, validate_label


def _pair(shape=(20, 18, 12)):
    image, label = sphere_volume(shape, radius=5.0)
    vol = Volume(image, (0.7, 0.9, 2.5), (10.0, -5.0, 3.0), source="case.nrrd")
    return vol, vol.with_array(label, source="case_label.nrrd")


def _message(call) -> str:
    with pytest.raises(InputError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    return text


def test_valid_pair_passes_and_label_comes_back_uint8():
    image, label = _pair()
    validate_image(image)
    out = validate_label(label.with_array(label.array.astype(np.int32)), image)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 1}


@pytest.mark.parametrize("shape,dims", [((20, 18), "2D"), ((20, 18, 12, 2), "4D")])
def test_wrong_dimensionality(shape, dims):
    vol = Volume(np.random.default_rng(0).random(shape).astype(np.float32), source="x.nrrd")
    text = _message(lambda: validate_image(vol))
    assert text.startswith("x.nrrd:") and f"image is {dims}" in text and "a 3D scalar image is required" in text


def test_nan_inf_and_all_problems_at_once():
    image, _ = _pair()
    array = image.array.copy()
    array[0, 0, :3] = np.nan
    array[1, 1, 1] = np.inf
    bad = Volume(array, (0.0, 0.9, 2.5), (np.nan, 0.0, 0.0), source="case.nrrd")
    text = _message(lambda: validate_image(bad))
    for part in ("3 NaN voxels", "1 infinite voxel", "spacing", "origin"):
        assert part in text, text


@pytest.mark.parametrize("array,expected", [
    (np.full((8, 8, 8), 3.0, np.float32), "constant"),
    (np.zeros((0, 8, 8), np.float32), "empty"),
    (np.random.default_rng(1).random((8, 1, 8)), "implausible size"),
    (np.full((4, 4, 4), np.nan, np.float32), "no finite voxel"),
])
def test_degenerate_arrays(array, expected):
    assert expected in _message(lambda: validate_image(Volume(array, source="x.nrrd")))


def test_too_many_voxels_is_reported_without_scanning():
    huge = np.broadcast_to(np.float32(0), (2048, 1024, 1025))  # a zero-stride view: no memory used
    assert huge.size > MAX_VOXELS
    assert "2**31" in _message(lambda: validate_image(Volume(huge)))


@pytest.mark.parametrize("spacing,origin,direction,expected", [
    ((-1.0, 1.0, 1.0), (0, 0, 0), None, "spacing"),
    ((1.0, np.inf, 1.0), (0, 0, 0), None, "spacing"),
    ((1.0, 1.0, 1.0), (0, 0, np.inf), None, "origin"),
    ((1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 0, np.nan, 0, 0, 0, 1), "direction"),
    ((1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 1, 0, 0, 0, 0, 1), "singular"),
])
def test_bad_geometry_fields(spacing, origin, direction, expected):
    image, _ = _pair()
    vol = Volume(image.array, spacing, origin, direction if direction is not None else image.direction)
    assert expected in _message(lambda: validate_image(vol, name="case 7"))


def test_name_defaults_to_source_and_can_be_overridden():
    vol = Volume(np.zeros((4, 4, 4), np.float32), source="/data/a.nrrd")
    assert _message(lambda: validate_image(vol)).startswith("/data/a.nrrd:")
    assert _message(lambda: validate_image(vol, name="case A")).startswith("case A:")


def test_empty_label_unless_allowed():
    image, label = _pair()
    empty = label.with_array(np.zeros_like(label.array))
    assert "empty" in _message(lambda: validate_label(empty, image))
    assert validate_label(empty, image, allow_empty=True).sum() == 0


def test_label_values_outside_classes_are_listed():
    image, label = _pair()
    twos = label.with_array(label.array * 2)
    text = _message(lambda: validate_label(twos, image))
    assert "{2}" in text and "[0, 1]" in text
    assert validate_label(twos, image, classes=(0, 1, 2)).max() == 2


def test_a_mask_of_0_and_255_is_told_how_to_fix_it_and_a_multi_class_label_is_not():
    image, label = _pair()
    mask = label.with_array(label.array * 255)
    assert "(a mask of 0 and 255? store the atrium as 1)" in _message(lambda: validate_label(mask, image))
    several = label.array.copy()
    several[0] = 3
    text = _message(lambda: validate_label(label.with_array(several), image))
    assert "{3}" in text and "a mask of" not in text
    text = _message(lambda: validate_label(mask, image, classes=(0, 1, 2)))
    assert "{255}" in text and "a mask of" not in text


def test_label_nan_and_fractions():
    image, label = _pair()
    values = label.array.astype(np.float32)
    values[0, 0, 0] = np.nan
    values[1, 1, 1] = 0.5
    text = _message(lambda: validate_label(label.with_array(values), image))
    assert "1 NaN voxel" in text and "non-integer" in text


def test_geometry_mismatch_names_every_field_and_values():
    image, label = _pair()
    moved = Volume(label.array, (0.7, 0.9, 2.0), (11.0, -5.0, 3.0), source="lab.nrrd")
    text = _message(lambda: validate_label(moved, image))
    assert text.startswith("lab.nrrd:")
    assert "spacing (0.7, 0.9, 2.5) vs (0.7, 0.9, 2)" in text or "spacing (0.7, 0.9, 2) vs (0.7, 0.9, 2.5)" in text
    assert "origin (11, -5, 3) vs (10, -5, 3)" in text and "tolerance 0.0001" in text
    resized = Volume(label.array[:-1], image.spacing, image.origin)
    assert "size" in _message(lambda: validate_label(resized, image))


def test_geometry_noise_below_tolerance_passes():
    image, label = _pair()
    noisy = Volume(label.array, np.add(image.spacing, 1e-6), np.add(image.origin, 1e-5), image.direction)
    assert DEFAULT_GEOMETRY_TOLERANCE == 1e-4
    validate_label(noisy, image)


def test_bool_label_is_accepted():
    image, label = _pair()
    assert validate_label(label.with_array(label.array.astype(bool)), image).dtype == np.uint8
