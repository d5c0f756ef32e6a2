"""The site-shift simulator: every family changes the image and keeps its grid, reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import sphere_volume
from semiseg_la.errors import InputError
from semiseg_la.io.volume import Volume
from semiseg_la.preprocess.site_shift import FAMILIES, SiteShift, shift_families

OBLIQUE = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def scan(seed: int = 0) -> Volume:
    image, _ = sphere_volume((40, 36, 24), radius=8, noise=0.3, seed=seed)
    return Volume(image, (0.7, 0.7, 1.4), (-12.0, 30.5, 7.0), OBLIQUE, "scan")


@pytest.mark.parametrize("family", shift_families())
def test_each_family_changes_the_image_and_keeps_the_grid(family):
    volume = scan()
    moved = SiteShift(family, 1.0, seed=3).apply(volume, case_seed=1)
    assert moved.shape == volume.shape
    assert moved.same_grid(volume)
    assert (moved.spacing, moved.origin, moved.direction) == (volume.spacing, volume.origin, volume.direction)
    assert moved.array.dtype == np.float32 and np.isfinite(moved.array).all()
    change = np.abs(moved.array - volume.array).mean() / volume.array.std()
    assert change > 0.01, f"{family} barely changed the image ({change:.4f} of a standard deviation)"


@pytest.mark.parametrize("family", shift_families())
def test_strength_zero_is_the_identity_and_strength_grows_the_change(family):
    volume = scan()
    unchanged = SiteShift(family, 0.0, seed=3).apply(volume, case_seed=1)
    np.testing.assert_allclose(unchanged.array, volume.array, atol=1e-5)
    weak = np.abs(SiteShift(family, 0.3, seed=3).apply(volume, 1).array - volume.array).mean()
    strong = np.abs(SiteShift(family, 1.0, seed=3).apply(volume, 1).array - volume.array).mean()
    assert strong > weak


def test_the_seed_fixes_the_site_and_the_case_seed_varies_scans():
    volume = scan()
    a = SiteShift("scanner", 1.0, seed=5).apply(volume, case_seed=0).array
    b = SiteShift("scanner", 1.0, seed=5).apply(volume, case_seed=0).array
    np.testing.assert_array_equal(a, b)
    other_scan = SiteShift("scanner", 1.0, seed=5).apply(volume, case_seed=1).array
    other_site = SiteShift("scanner", 1.0, seed=6).apply(volume, case_seed=0).array
    assert not np.allclose(a, other_scan) and not np.allclose(a, other_site)
    # a contrast curve belongs to the site: the same for every scan
    curve_a = SiteShift("piecewise", 1.0, seed=5).apply(volume, case_seed=0).array
    curve_b = SiteShift("piecewise", 1.0, seed=5).apply(volume, case_seed=9).array
    np.testing.assert_array_equal(curve_a, curve_b)


def test_thick_slices_blur_only_through_the_plane():
    volume = scan()
    moved = SiteShift("thick-slices", 1.0).apply(volume).array
    # the thickest axis (z, 1.4 mm) loses detail; an in-plane profile at a fixed z-plane is smoother only
    # through z: differences along z shrink much more than along x
    dz_before, dz_after = np.abs(np.diff(volume.array, axis=2)).mean(), np.abs(np.diff(moved, axis=2)).mean()
    dx_before, dx_after = np.abs(np.diff(volume.array, axis=0)).mean(), np.abs(np.diff(moved, axis=0)).mean()
    assert dz_after / dz_before < 0.7 * (dx_after / dx_before)


def test_inversion_is_not_monotone():
    ramp = Volume(np.linspace(0, 1, 40 * 8 * 8, dtype=np.float32).reshape(40, 8, 8))
    moved = SiteShift("inversion", 1.0, seed=2).apply(ramp).array.ravel()
    assert (np.diff(moved) < -1e-6).any()


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(InputError, match="unknown site-shift family 'mri7'"):
        SiteShift("mri7")
    with pytest.raises(InputError, match="strength"):
        SiteShift("bias", -1.0)
    with pytest.raises(InputError, match="strength"):
        SiteShift("bias", float("nan"))
    with pytest.raises(InputError, match="3D image"):
        SiteShift("bias").apply(Volume(np.zeros((4, 4), np.float32)))


def test_the_combined_families_chain_their_parts():
    assert len(FAMILIES["scanner"]) > 1 and len(FAMILIES["protocol"]) > 1 and len(FAMILIES["artefacts"]) > 1
