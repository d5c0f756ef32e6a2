"""Per-case metrics: hand-computed cases, both conventions' empty policies, cropping, references."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from conftest import REPO
from semiseg_la.metrics import (
    METRIC_DEFINITIONS,
    asd,
    assd,
    dice,
    evaluate_case,
    hd95,
    jaccard,
    surface,
    surface_distances,
)

EXPECTED_KEYS = {"dice", "jaccard", "hd95_mm", "asd_mm", "dice_legacy", "jaccard_legacy",
                 "hd95_vox_legacy", "asd_vox_legacy", "pred_empty"}


def _voxels(shape, coords) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    for c in coords:
        mask[c] = 1
    return mask


def _cube(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def _blob(shape, seed, threshold=0.3, sigma=2.0) -> np.ndarray:
    """Random smooth blob(s), reproducible; some touch the array border."""
    noise = np.random.default_rng(seed).normal(size=shape)
    smooth = ndimage.gaussian_filter(noise, sigma)
    return smooth > threshold * smooth.std()


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a 6-neighbour that is background or outside the array."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = np.ones_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            rolled = np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
            interior &= rolled
    return mask & ~interior


def _brute_distances(a, b, spacing):
    """d(a->b) and d(b->a) by explicit pairwise distances between surface voxel coordinates."""
    pa = np.argwhere(_brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(_brute_surface(b)) * np.asarray(spacing)
    pairwise = cdist(pa, pb)
    return pairwise.min(axis=1), pairwise.min(axis=0)


# --- surfaces -------------------------------------------------------------------------------------


def test_surface_of_cube_excludes_interior():
    cube = _cube((7, 7, 7), (1, 1, 1), 5)
    assert surface(cube).sum() == 5 ** 3 - 3 ** 3
    assert not surface(cube)[3, 3, 3]


def test_surface_counts_array_border_as_background():
    full = np.ones((3, 3, 3), dtype=bool)  # touches every border: only the centre is interior
    assert surface(full).sum() == 26
    assert not surface(full)[1, 1, 1]


def test_surface_matches_brute_force_on_random_blobs():
    for seed in range(3):
        mask = _blob((14, 12, 10), seed)
        np.testing.assert_array_equal(surface(mask), _brute_surface(mask))


# --- hand-computed distances ----------------------------------------------------------------------

SHAPE = (9, 3, 3)
A_ONE = _voxels(SHAPE, [(1, 1, 1)])  # one voxel
B_TWO = _voxels(SHAPE, [(4, 1, 1), (5, 1, 1)])  # two voxels, 3 and 4 voxels away
# d(A->B) = {3}; d(B->A) = {3, 4}; pooled {3, 3, 4}: 95th percentile = 3 + 0.9 * (4 - 3) = 3.9


def test_hand_computed_single_voxel_vs_pair():
    assert hd95(A_ONE, B_TWO) == pytest.approx(3.9)
    assert asd(A_ONE, B_TWO) == pytest.approx(3.0)
    assert asd(B_TWO, A_ONE) == pytest.approx(3.5)
    assert assd(A_ONE, B_TWO) == pytest.approx(3.25)
    assert assd(B_TWO, A_ONE) == pytest.approx(3.25)


def test_asd_legacy_is_directed_and_mm_is_symmetric():
    ab = evaluate_case(A_ONE, B_TWO, (1.0, 1.0, 1.0))
    ba = evaluate_case(B_TWO, A_ONE, (1.0, 1.0, 1.0))
    assert ab["asd_vox_legacy"] == pytest.approx(3.0)
    assert ba["asd_vox_legacy"] == pytest.approx(3.5)
    assert ab["asd_mm"] == pytest.approx(ba["asd_mm"]) == pytest.approx(3.25)
    assert ab["hd95_mm"] == pytest.approx(ba["hd95_mm"]) == pytest.approx(3.9)


def test_anisotropic_spacing_hand_computed():
    result = evaluate_case(A_ONE, B_TWO, (2.0, 1.0, 1.0))  # the offset lies along axis 0
    assert result["hd95_mm"] == pytest.approx(7.8)
    assert result["asd_mm"] == pytest.approx(6.5)
    assert result["hd95_vox_legacy"] == pytest.approx(3.9)  # legacy ignores spacing
    assert result["asd_vox_legacy"] == pytest.approx(3.0)


@pytest.mark.parametrize("k", [3, 4, 6])
def test_cubes_offset_by_k_voxels(k):
    """3-voxel cubes, B shifted by k >= 3 along x. Surface layers of A (x = 0, 1, 2 locally) hold
    9, 8 and 9 voxels (the centre is interior) at distances k, k-1 and k-2 from B's near face; B is the
    mirror image. Pooled: 18 x (k-2), 16 x (k-1), 18 x k, so the 95th percentile (index 48.45 of 52)
    is k, and every directed mean is (9k + 8(k-1) + 9(k-2)) / 26 = k - 1."""
    shape = (k + 6, 5, 5)
    a, b = _cube(shape, (1, 1, 1), 3), _cube(shape, (1 + k, 1, 1), 3)
    spacing = (0.5, 2.0, 3.0)
    result = evaluate_case(a, b, spacing)
    assert result["hd95_vox_legacy"] == pytest.approx(k)
    assert result["asd_vox_legacy"] == pytest.approx(k - 1)
    assert result["hd95_mm"] == pytest.approx(0.5 * k)
    assert result["asd_mm"] == pytest.approx(0.5 * (k - 1))
    assert result["dice"] == 0.0 and result["pred_empty"] is False


def test_dice_and_jaccard_hand_computed():
    a = _voxels((4, 4, 4), [(0, 0, 0), (0, 0, 1)])
    b = _voxels((4, 4, 4), [(0, 0, 1), (0, 0, 2), (0, 0, 3)])
    assert dice(a, b) == pytest.approx(2 * 1 / 5)
    assert jaccard(a, b) == pytest.approx(1 / 4)
    assert dice(a, a) == jaccard(a, a) == 1.0


def test_isotropic_spacing_scales_distances():
    pred, gt = _blob((20, 18, 16), 1), _blob((20, 18, 16), 2)
    result = evaluate_case(pred, gt, (0.625, 0.625, 0.625))
    assert result["hd95_mm"] == pytest.approx(0.625 * result["hd95_vox_legacy"], rel=1e-12)
    assert result["asd_mm"] == pytest.approx(0.625 * assd(pred, gt), rel=1e-12)
    assert result["dice_legacy"] == result["dice"] and result["jaccard_legacy"] == result["jaccard"]


# --- empty-mask policies --------------------------------------------------------------------------


def test_empty_prediction_policies():
    gt = _cube((6, 6, 6), (1, 1, 1), 3)
    result = evaluate_case(np.zeros_like(gt), gt, (0.625,) * 3)
    assert set(result) == EXPECTED_KEYS
    assert result["pred_empty"] is True
    assert result["dice"] == 0.0 and result["jaccard"] == 0.0
    assert math.isnan(result["hd95_mm"]) and math.isnan(result["asd_mm"])
    for key in ("dice_legacy", "jaccard_legacy", "hd95_vox_legacy", "asd_vox_legacy"):
        assert result[key] == 0.0


def test_both_empty_policies():
    empty = np.zeros((5, 5, 5), dtype=np.uint8)
    result = evaluate_case(empty, empty, (1.0, 1.0, 1.0))
    assert result["dice"] == 1.0 and result["jaccard"] == 1.0
    assert math.isnan(result["hd95_mm"]) and math.isnan(result["asd_mm"])
    assert result["dice_legacy"] == 0.0 and result["hd95_vox_legacy"] == 0.0


def test_empty_ground_truth_policies():
    pred = _cube((6, 6, 6), (1, 1, 1), 2)
    result = evaluate_case(pred, np.zeros_like(pred), (1.0, 1.0, 1.0))
    assert result["pred_empty"] is False
    assert result["dice"] == 0.0 and result["dice_legacy"] == 0.0
    for key in ("hd95_mm", "asd_mm", "hd95_vox_legacy", "asd_vox_legacy"):
        assert math.isnan(result[key])
    assert math.isnan(hd95(pred, np.zeros_like(pred))) and math.isnan(asd(pred, np.zeros_like(pred)))


# --- cropping and borders -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounding_box_crop_is_identical_to_full_array(seed):
    shape = (30, 26, 22)
    pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
    pred[5:20, 3:18, 2:15] = _blob((15, 15, 13), seed)
    gt[8:24, 4:26, 0:12] = _blob((16, 22, 12), seed + 10)  # touches the y and z borders
    for spacing in (None, (0.625, 0.625, 0.625), (0.7, 1.3, 2.5)):
        cropped = surface_distances(pred, gt, spacing, crop=True)
        full = surface_distances(pred, gt, spacing, crop=False)
        for c, f in zip(cropped, full):
            np.testing.assert_array_equal(c, f)


def test_distances_match_brute_force_pairwise():
    for seed in range(3):
        pred, gt = _blob((12, 11, 9), seed), _blob((12, 11, 9), seed + 5)
        spacing = (0.8, 1.1, 2.0)
        ours = surface_distances(pred, gt, spacing)
        brute = _brute_distances(pred, gt, spacing)
        for o, b in zip(ours, brute):
            np.testing.assert_allclose(o, b, rtol=1e-12, atol=1e-12)


def test_border_touching_mask_equals_zero_padded_copy():
    pred = _cube((8, 8, 8), (0, 0, 0), 5)  # touches three borders
    gt = _cube((8, 8, 8), (2, 1, 0), 6)
    padded = [np.pad(m, 3) for m in (pred, gt)]
    spacing = (0.625, 0.625, 1.25)
    assert evaluate_case(pred, gt, spacing) == evaluate_case(*padded, spacing)


# --- inputs ---------------------------------------------------------------------------------------


def test_integer_and_bool_masks_are_accepted():
    a = _cube((6, 6, 6), (1, 1, 1), 3)
    labels = a.astype(np.int64) * 2  # any non-zero value is foreground
    assert evaluate_case(labels, a.astype(np.uint8), [1, 1, 1])["dice"] == 1.0
    assert evaluate_case(a, a, 1.0)["hd95_mm"] == 0.0


def test_invalid_inputs_raise_value_error():
    a = _cube((6, 6, 6), (1, 1, 1), 3)
    with pytest.raises(ValueError, match="dtype"):
        evaluate_case(a.astype(np.float32), a, (1, 1, 1))
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate_case(a, a[:-1], (1, 1, 1))
    with pytest.raises(ValueError, match="3 values"):
        evaluate_case(a, a, (1, 1))
    with pytest.raises(ValueError, match="positive"):
        evaluate_case(a, a, (1, 0, 1))
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(a, a, None)


def test_every_reported_metric_has_a_definition():
    assert EXPECTED_KEYS - {"pred_empty"} <= set(METRIC_DEFINITIONS)


def test_metrics_do_not_import_torch():
    env = dict(os.environ, PYTHONPATH=str(REPO / "training"))
    code = "import sys, semiseg_la.metrics; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_cross_check_against_medpy():
    binary = pytest.importorskip("medpy.metric.binary")
    spacing = (0.625, 0.9, 1.5)
    for seed in range(3):
        pred, gt = _blob((20, 18, 14), seed), _blob((20, 18, 14), seed + 7)
        result = evaluate_case(pred, gt, spacing)
        assert result["dice"] == pytest.approx(binary.dc(pred, gt))
        assert result["jaccard"] == pytest.approx(binary.jc(pred, gt))
        assert result["hd95_mm"] == pytest.approx(binary.hd95(pred, gt, voxelspacing=spacing))
        assert result["asd_mm"] == pytest.approx(binary.assd(pred, gt, voxelspacing=spacing))
        assert result["hd95_vox_legacy"] == pytest.approx(binary.hd95(pred, gt))
        assert result["asd_vox_legacy"] == pytest.approx(binary.asd(pred, gt))
