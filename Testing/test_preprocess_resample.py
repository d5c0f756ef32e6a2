"""Acceptance tests of the model-grid round trip: results land on the input's exact grid.

Signed-permutation inputs (LPS, RAS, swapped axes) at the model spacing must round-trip bit for bit;
oblique and anisotropic inputs go through interpolation and must keep Dice > 0.95.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from semiseg_la.errors import InputError
from semiseg_la.io import IDENTITY_DIRECTION, Volume, read_volume, write_volume
from semiseg_la.preprocess import (
    ModelGrid,
    covering_grid,
    crop_to_roi,
    from_model_grid,
    paste_roi,
    roi_from_physical,
    signed_permutation,
    to_model_grid,
)

ANISO = (0.7, 0.9, 2.5)
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
# columns = array axes: axis 0 -> world z, axis 1 -> world -x, axis 2 -> world -y
SWAPPED = (0.0, -1.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0, 0.0)


def _rotation(x_deg: float, y_deg: float) -> np.ndarray:
    a, b = np.radians(x_deg), np.radians(y_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rx @ ry


OBLIQUE = tuple(_rotation(20, 20).ravel())
OBLIQUE_RAS = tuple((np.diag([-1.0, -1.0, 1.0]) @ _rotation(20, -15)).ravel())


def _world(vol: Volume, index: np.ndarray) -> np.ndarray:
    """World (LPS mm) positions of voxel indices (N, 3)."""
    matrix = np.asarray(vol.direction).reshape(3, 3)
    return np.asarray(vol.origin) + (np.asarray(index) * np.asarray(vol.spacing)) @ matrix.T


def _all_indices(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)


def _ball(shape, spacing, direction, origin=(-20.0, 15.0, 7.5), radius_mm=9.0, seed=0):
    """A ball in world coordinates, off the grid centre (so half-voxel shifts show): (image, label) Volumes."""
    vol = Volume(np.zeros(shape, np.float32), spacing, origin, direction, "ball.nrrd")
    points = _world(vol, _all_indices(shape))
    centre = _world(vol, (np.asarray(shape) - 1)[None] / 2)[0] + np.array([2.3, -2.1, 1.7])
    label = (np.linalg.norm(points - centre, axis=1) < radius_mm).reshape(shape).astype(np.uint8)
    noise = np.random.default_rng(seed).normal(0, 0.1, shape).astype(np.float32)
    return vol.with_array(label * 2.0 + noise + 5.0), vol.with_array(label)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _assert_same_grid_exactly(array: np.ndarray, reference: Volume) -> None:
    assert array.shape == reference.shape
    back = reference.with_array(array)
    assert back.spacing == reference.spacing and back.origin == reference.origin
    assert back.direction == reference.direction


def test_identity_at_model_spacing_is_an_exact_copy():
    image, _ = _ball((30, 28, 12), ANISO, IDENTITY_DIRECTION)
    model, grid = to_model_grid(image, ANISO)
    np.testing.assert_array_equal(model.array, image.array)
    assert not np.shares_memory(model.array, image.array)
    assert grid == ModelGrid(image.shape, image.spacing, image.origin, IDENTITY_DIRECTION)
    back = from_model_grid(model.array, grid, image)
    np.testing.assert_array_equal(back, image.array)


def test_spacing_within_tolerance_takes_the_exact_path():
    image, _ = _ball((20, 20, 10), (0.625 * (1 + 2e-5),) * 3, IDENTITY_DIRECTION)
    model, grid = to_model_grid(image, (0.625, 0.625, 0.625))
    np.testing.assert_array_equal(model.array, image.array)
    assert grid.spacing == image.spacing


@pytest.mark.parametrize("direction", [RAS, SWAPPED], ids=["RAS", "swapped-axes"])
def test_signed_permutations_round_trip_bit_exact(direction):
    image, label = _ball((30, 26, 12), ANISO, direction)
    perm = signed_permutation(direction)
    assert perm is not None
    spacing = [0.0] * 3
    for axis, world_axis in enumerate(perm[0]):
        spacing[world_axis] = ANISO[axis]
    model, grid = to_model_grid(image, spacing)
    assert grid.direction == IDENTITY_DIRECTION
    # every voxel keeps its world position and value
    index = _all_indices(image.shape)[::97]
    canonical = np.rint((_world(image, index) - np.asarray(grid.origin)) / np.asarray(grid.spacing)).astype(int)
    np.testing.assert_array_equal(model.array[tuple(canonical.T)], image.array[tuple(index.T)])
    # the way back is bit-exact, for images, labels and float probabilities alike
    _assert_same_grid_exactly(back := from_model_grid(model.array, grid, image), image)
    np.testing.assert_array_equal(back, image.array)
    label_model, label_grid = to_model_grid(label, spacing, interpolation="nearest")
    np.testing.assert_array_equal(from_model_grid(label_model.array, label_grid, label, "nearest"), label.array)
    probs = np.random.default_rng(2).random(grid.size).astype(np.float32)
    again, _ = to_model_grid(image.with_array(from_model_grid(probs, grid, image)), spacing)
    np.testing.assert_array_equal(again.array, probs)


def test_lps_and_ras_copies_of_one_scan_meet_on_the_model_grid():
    image, _ = _ball((24, 20, 10), (0.625,) * 3, IDENTITY_DIRECTION)
    far_corner = _world(image, np.array([[image.shape[0] - 1, image.shape[1] - 1, 0]]))[0]
    ras = Volume(np.ascontiguousarray(image.array[::-1, ::-1, :]), image.spacing, tuple(far_corner), RAS)
    lps_model, lps_grid = to_model_grid(image, (0.625,) * 3)
    ras_model, ras_grid = to_model_grid(ras, (0.625,) * 3)
    np.testing.assert_array_equal(ras_model.array, lps_model.array)
    assert ras_grid.same_as(lps_grid)


@pytest.mark.parametrize("direction,spacing,model_spacing", [
    (OBLIQUE, ANISO, (1.0, 1.0, 1.0)),
    (IDENTITY_DIRECTION, ANISO, (1.0, 1.0, 1.0)),
    (OBLIQUE_RAS, (1.1, 0.8, 1.6), (0.9, 0.9, 0.9)),
    (SWAPPED, ANISO, (1.0, 1.0, 1.0)),
], ids=["oblique-aniso", "aniso", "oblique-RAS", "swapped-resampled"])
def test_resampled_label_round_trip(direction, spacing, model_spacing, tmp_path):
    image, label = _ball((40, 36, 14), spacing, direction)
    model, grid = to_model_grid(label, model_spacing, interpolation="nearest")
    assert grid.direction == IDENTITY_DIRECTION and grid.spacing == tuple(model_spacing)
    assert model.array.dtype == np.uint8
    back = from_model_grid(model.array, grid, label, interpolation="nearest")
    _assert_same_grid_exactly(back, label)
    assert _dice(back, label.array) > 0.95
    # the predictor's path: a float probability, linear both ways, thresholded on the input grid
    prob_model, prob_grid = to_model_grid(label.with_array(label.array.astype(np.float32)), model_spacing)
    assert prob_grid == grid
    prob_back = from_model_grid(prob_model.array, grid, label)
    assert prob_back.dtype == np.float32 and _dice(prob_back >= 0.5, label.array) > 0.99  # a half-voxel shift fails
    # the ball keeps its world position on the model grid (centroid within half a model voxel)
    centroid_in = _world(label, np.argwhere(label.array)).mean(axis=0)
    centroid_model = _world(model, np.argwhere(model.array)).mean(axis=0)
    assert np.linalg.norm(centroid_in - centroid_model) < 0.5 * max(model_spacing)
    # written and read back, the result still overlays the input header-exactly
    written = read_volume(write_volume(label.with_array(back.astype(np.uint8)), tmp_path / "seg.nrrd"))
    assert written.same_grid(label, rel_tol=1e-6)


def test_covering_grid_contains_all_corners():
    image, _ = _ball((40, 36, 14), ANISO, OBLIQUE)
    grid = covering_grid(image, (1.0, 1.0, 1.0))
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in image.shape])))
    world = _world(image, corners)
    low = np.asarray(grid.origin) - 0.5 * np.asarray(grid.spacing)
    high = low + np.asarray(grid.size) * np.asarray(grid.spacing)
    assert np.all(world >= low - 1e-9) and np.all(world <= high + 1e-9)
    assert np.all(high - low - (world.max(0) - world.min(0)) < np.asarray(grid.spacing))


def test_outside_fill_is_image_minimum_and_label_background():
    image, label = _ball((30, 30, 10), ANISO, OBLIQUE)
    model, _ = to_model_grid(image, (1.0, 1.0, 1.0))
    assert model.array[0, 0, 0] == pytest.approx(float(image.array.min()))
    label_model, _ = to_model_grid(label, (1.0, 1.0, 1.0), interpolation="nearest")
    assert label_model.array[0, 0, 0] == 0


def test_from_model_grid_with_channels_and_shape_check():
    image, _ = _ball((20, 18, 8), ANISO, OBLIQUE)
    _, grid = to_model_grid(image, (1.0, 1.0, 1.0))
    probs = np.random.default_rng(3).random((2, *grid.size)).astype(np.float32)
    assert from_model_grid(probs, grid, image).shape == (2, *image.shape)
    with pytest.raises(ValueError, match="does not match the model grid"):
        from_model_grid(probs[0, :-1], grid, image)


def test_crop_and_paste_roi():
    image, _ = _ball((20, 18, 8), ANISO, OBLIQUE)
    lower, upper = (2, 3, 1), (10, 12, 5)
    crop = crop_to_roi(image, lower, upper)
    assert crop.shape == (8, 9, 4) and crop.direction == image.direction
    np.testing.assert_allclose(_world(crop, np.zeros((1, 3))), _world(image, np.array([lower])), atol=1e-9)
    full = paste_roi(crop.array, image, lower, fill=-1)
    np.testing.assert_array_equal(full[2:10, 3:12, 1:5], image.array[2:10, 3:12, 1:5])
    assert full[0, 0, 0] == -1
    for bad in (((0, 0, 0), (0, 5, 5)), ((-1, 0, 0), (5, 5, 5)), ((0, 0, 0), (21, 5, 5))):
        with pytest.raises(InputError, match="empty or outside the image"):
            crop_to_roi(image, *bad)


def test_roi_from_physical():
    image, _ = _ball((20, 20, 10), (1.0, 1.0, 2.0), IDENTITY_DIRECTION, origin=(0.0, 0.0, 0.0))
    assert roi_from_physical(image, (10.0, 10.0, 10.0), (4.0, 4.0, 4.0)) == ((8, 8, 4), (13, 13, 7))
    assert roi_from_physical(image, (0.0, 0.0, 0.0), (4.0, 4.0, 4.0)) == ((0, 0, 0), (3, 3, 2))
    with pytest.raises(InputError, match="outside the image"):
        roi_from_physical(image, (500.0, 0.0, 0.0), (4.0, 4.0, 4.0))


def test_signed_permutation_detection():
    assert signed_permutation(IDENTITY_DIRECTION) == ((0, 1, 2), (1, 1, 1))
    assert signed_permutation(RAS) == ((0, 1, 2), (-1, -1, 1))
    assert signed_permutation(SWAPPED) == ((2, 0, 1), (1, -1, -1))
    assert signed_permutation(OBLIQUE) is None
    noisy = np.asarray(IDENTITY_DIRECTION) + np.r_[0, 5e-7, 0, 0, 0, 0, 0, 0, 0]
    assert signed_permutation(noisy) == ((0, 1, 2), (1, 1, 1))


@pytest.mark.parametrize("layout", ["C", "F"])
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_resampling_without_transposed_copies_matches_simpleitk_on_the_transposed_array(interpolation, layout):
    """`_resample` hands SimpleITK the (X, Y, Z) array without a transposed copy: a C-ordered array with reversed
    axes declared, a transposed view (a scan read from a file, "F") as it lies in memory. On an oblique,
    anisotropic grid both give what resampling the transposed copy with the plain geometry gives."""
    import SimpleITK as sitk

    from semiseg_la.preprocess.resample import ModelGrid, _resample

    rng = np.random.default_rng(5)
    angle = 0.4
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    flip = np.diag([1.0, -1.0, 1.0])  # an improper direction (determinant -1) too
    source = ModelGrid((23, 19, 11), (0.7, 0.9, 2.1), (3.0, -4.0, 1.5), tuple((rotation @ flip).ravel()))
    target = ModelGrid((17, 15, 13), (1.1, 1.0, 1.3), (-2.0, -12.0, -1.0))
    array = (rng.integers(0, 5, source.size) if interpolation == "nearest"
             else rng.normal(size=source.size)).astype(np.float32)
    reference = source.as_volume(array).to_sitk()
    if layout == "F":
        array = np.asfortranarray(array)
    expected = sitk.Resample(reference, list(target.size), sitk.Transform(),
                             sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor,
                             target.origin, target.spacing, target.direction, -7.0, reference.GetPixelID())
    expected = np.transpose(sitk.GetArrayFromImage(expected), (2, 1, 0))
    out = _resample(array, source, target, interpolation, -7.0)
    assert out.shape == target.size and (out == -7.0).any() and (out != -7.0).any()
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
