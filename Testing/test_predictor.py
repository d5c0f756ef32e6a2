"""The Predictor: exact output grid, ROI, probabilities, largest component, legacy mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cli_helpers import oblique_direction
from conftest import sphere_volume
from semiseg_la.errors import InputError
from semiseg_la.inference.predictor import InferenceSpec, Predictor, keep_largest_component, legacy_strides
from semiseg_la.io.volume import Volume
from semiseg_la.models import VNet


class Threshold(torch.nn.Module):
    """A 'network' whose foreground logit is the intensity: deterministic, shift-invariant."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 4 * (x - 0.5)], dim=1)


SPEC = InferenceSpec((32, 32, 32), (1.0, 1.0, 1.0))


def test_output_grid_equals_input_grid_for_oblique_anisotropic_input():
    image, _ = sphere_volume((40, 30, 20))
    vol = Volume(image, (0.8, 1.2, 2.0), (10.0, -5.0, 3.0), oblique_direction(25))
    torch.manual_seed(0)
    pred = Predictor(VNet().eval(), SPEC, device="cpu").predict(vol, want_probability=True)
    assert pred.label.shape == vol.shape and pred.label.array.dtype == np.uint8
    assert pred.label.spacing == vol.spacing and pred.label.origin == vol.origin
    assert pred.label.direction == vol.direction
    assert pred.probability.shape == vol.shape
    assert pred.probability.array.min() >= 0.0 and pred.probability.array.max() <= 1.0


def test_segments_a_bright_sphere_exactly_on_an_identity_grid():
    image, label = sphere_volume((40, 36, 36), radius=9, noise=0.0)
    vol = Volume((image * 0.5 + 0.25).astype(np.float32))
    pred = Predictor(Threshold(), SPEC, device="cpu", mode="sliding").predict(vol)
    # z-scoring keeps the order of intensities; the threshold network then recovers the sphere
    assert np.array_equal(pred.label.array, label)


def test_roi_limits_the_segmentation_to_the_box():
    image, label = sphere_volume((48, 48, 40), radius=10, noise=0.0)
    vol = Volume(image)
    pred = Predictor(Threshold(), SPEC, device="cpu").predict(vol, roi=[8, 8, 4, 40, 40, 36])
    assert pred.label.shape == vol.shape
    assert pred.label.array[:8].sum() == 0 and pred.label.array[40:].sum() == 0


def test_largest_component_drops_islands():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:8, 2:8, 2:8] = 1
    mask[15:17, 15:17, 15:17] = 1
    kept = keep_largest_component(mask)
    assert kept.sum() == 216 and kept[16, 16, 16] == 0


def test_fast_mode_runs_one_window_and_legacy_runs_many():
    image, _ = sphere_volume((120, 120, 84))
    vol = Volume(image, (0.625, 0.625, 0.625))
    spec = InferenceSpec((112, 112, 80), (0.625, 0.625, 0.625))
    fast = Predictor(Threshold(), spec, device="cpu", mode="fast").predict(vol)
    legacy = Predictor(Threshold(), spec, device="cpu", mode="legacy").predict(vol)
    assert fast.windows == 1 and legacy.windows == 2 * 2 * 2  # ceil((120-112)/18)+1 = 2, ceil((84-80)/4)+1 = 2
    assert fast.network_voxels < legacy.network_voxels / 5
    # at another model spacing the legacy strides stay the papers' millimetres (11.25, 11.25, 2.5 mm)
    coarse = InferenceSpec((112, 112, 80), (1.25, 1.25, 1.25))
    assert legacy_strides(coarse.spacing) == (9, 2)


def test_rejects_bad_images_before_running():
    bad = np.ones((10, 10, 10), np.float32)
    bad[1, 1, 1] = np.inf
    with pytest.raises(InputError, match="infinite"):
        Predictor(Threshold(), SPEC, device="cpu").predict(Volume(bad))


def test_flip_tta_and_ensemble_average_probabilities():
    from semiseg_la.inference.predictor import combine_networks

    torch.manual_seed(0)
    net_a, net_b = VNet().eval(), VNet().eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        pa, pb = torch.softmax(net_a(x), 1), torch.softmax(net_b(x), 1)
        ensemble = torch.softmax(combine_networks(net_a, [net_b])(x), 1)
        assert torch.allclose(ensemble, (pa + pb) / 2, atol=1e-5)
        flips = [torch.flip(torch.softmax(net_a(torch.flip(x, d)), 1), d) if d else pa
                 for d in ((), (2,), (3,), (2, 3))]
        tta = torch.softmax(combine_networks(net_a, tta="flip")(x), 1)
        assert torch.allclose(tta, sum(flips) / 4, atol=1e-5)
        mirror = torch.softmax(combine_networks(net_a, tta="mirror")(x), 1)
        assert torch.allclose(mirror, (flips[0] + flips[1]) / 2, atol=1e-5)  # identity and the X flip
        assert not torch.allclose(tta, pa, atol=1e-3)  # the flips do change an asymmetric network's answer
    assert combine_networks(net_a) is net_a
    with pytest.raises(ValueError, match="test-time augmentation"):
        combine_networks(net_a, tta="rotate")
