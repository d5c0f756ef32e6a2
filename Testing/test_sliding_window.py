"""Sliding-window inference: window placement, blending, padding, batching, progress, V-Net shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from semiseg_la.inference.sliding_window import (
    _softmax_forward,
    count_network_voxels,
    count_windows,
    gaussian_importance_map,
    legacy_la_inference,
    plan_whole_volume_window,
    sliding_window_inference,
    window_starts,
)
from semiseg_la.models.vnet import VNet


class PositionNet(nn.Module):
    """Elementwise but NOT shift-invariant: logits depend on each voxel's position inside the window,
    so any mistake in window placement, weighting or stitching changes the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = x.shape[2:]
        ramp = sum(torch.arange(s, dtype=x.dtype).reshape([-1 if a == i else 1 for a in range(3)]) * (i + 1)
                   for i, s in enumerate(sizes)) / 10.0
        return torch.cat([x[:, :1] + ramp, -x[:, :1]], dim=1)


class ConstantNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.tensor([0.3, -0.2, 1.1], dtype=x.dtype).reshape(1, 3, 1, 1, 1)
        return logits.expand(x.shape[0], 3, *x.shape[2:]).clone()


def _pointwise_net(in_ch: int = 2, out_ch: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv3d(in_ch, out_ch, 1).eval()


def _image(shape=(13, 11, 9), channels=1, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, channels) + tuple(shape), generator=generator)


def _starts(size, patch, stride):
    """The legacy rule written out independently: ceil((D-P)/s)+1 positions, last one snapped."""
    if size <= patch:
        return [0]
    return [min(stride * i, size - patch) for i in range(math.ceil((size - patch) / stride) + 1)]


def _gaussian_np(patch, sigma_scale=0.125, floor=1e-3):
    axes = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / (p * sigma_scale)) ** 2) for p in patch]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weights / weights.max(), floor)


def _reference(image, net, patch, strides, gaussian=False):
    """Naive triple loop over windows with symmetric zero padding, as in the LA papers' test code."""
    x = image[0].numpy()
    pads = [max(p - s, 0) for s, p in zip(x.shape[1:], patch)]
    x = np.pad(x, [(0, 0)] + [(p // 2, p - p // 2) for p in pads])
    weight = _gaussian_np(patch) if gaussian else np.ones(patch)
    score = np.zeros((0,) + x.shape[1:])
    count = np.zeros(x.shape[1:])
    for sx in _starts(x.shape[1], patch[0], strides[0]):
        for sy in _starts(x.shape[2], patch[1], strides[1]):
            for sz in _starts(x.shape[3], patch[2], strides[2]):
                win = (slice(sx, sx + patch[0]), slice(sy, sy + patch[1]), slice(sz, sz + patch[2]))
                with torch.no_grad():
                    out = torch.softmax(net(torch.from_numpy(x[(slice(None),) + win][None])), 1)[0].numpy()
                if score.shape[0] == 0:
                    score = np.zeros((out.shape[0],) + x.shape[1:])
                score[(slice(None),) + win] += out * weight
                count[win] += weight
    result = score / count
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, image.shape[2:]))
    return result[(slice(None),) + crop][None]


# --- window placement -----------------------------------------------------------------------------


def test_window_starts_legacy_example():
    starts = window_starts(200, 112, 18)
    assert len(starts) == 6 and starts[-1] == 88
    assert starts == [0, 18, 36, 54, 72, 88]


@pytest.mark.parametrize("size, patch, stride, expected", [
    (50, 112, 18, [0]),  # smaller than the patch: padded, one window
    (112, 112, 18, [0]),  # exactly one patch
    (113, 112, 18, [0, 1]),  # one voxel more: last window snapped to the border
    (10, 4, 3, [0, 3, 6]),  # exact fit: no duplicate window
    (10, 4, 100, [0, 6]),  # stride larger than the remainder
])
def test_window_starts_edge_cases(size, patch, stride, expected):
    assert window_starts(size, patch, stride) == expected


def test_window_starts_rejects_bad_arguments():
    for args in [(0, 4, 2), (10, 0, 2), (10, 4, 0)]:
        with pytest.raises(ValueError):
            window_starts(*args)


def test_window_counts():
    assert count_windows((200, 200, 100), (112, 112, 80), strides=(18, 18, 4)) == 6 * 6 * 6
    assert count_network_voxels((200, 200, 100), (112, 112, 80), strides=(18, 18, 4)) == 216 * 112 * 112 * 80
    # overlap 0.5 -> strides 56/56/40: 3 x 3 x 2 windows
    assert count_windows((200, 200, 100), (112, 112, 80)) == 18
    assert count_network_voxels((40, 36, 20), (48, 48, 32)) == 48 * 48 * 32


def test_plan_whole_volume_window():
    assert plan_whole_volume_window((40, 36, 20), (32, 32, 16), 10 ** 6) == (48, 48, 32)
    assert plan_whole_volume_window((40, 36, 20), (32, 32, 16), 48 * 48 * 32 - 1) is None
    assert plan_whole_volume_window((10, 10, 10), (32, 32, 16), 10 ** 6) == (32, 32, 16)  # never < patch
    assert plan_whole_volume_window((148, 132, 88), (112, 112, 80), 10 ** 7) == (160, 144, 96)


def test_gaussian_importance_map():
    weights = gaussian_importance_map((9, 8, 7))
    assert weights.shape == (9, 8, 7) and weights.dtype == torch.float32
    assert weights.max().item() == pytest.approx(1.0) and weights[4, 3:5, 3].min().item() == pytest.approx(1.0)
    assert weights.min().item() == pytest.approx(1e-3)  # floored, never 0
    assert torch.equal(weights, torch.flip(weights, dims=(0, 1, 2)))
    np.testing.assert_allclose(weights.numpy(), _gaussian_np((9, 8, 7)), rtol=1e-6)


# --- stitching ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_constant_network_gives_its_softmax_everywhere(mode):
    probs = sliding_window_inference(_image(), ConstantNet(), (6, 6, 4), mode=mode)
    expected = torch.softmax(torch.tensor([0.3, -0.2, 1.1]), 0).reshape(1, 3, 1, 1, 1)
    assert probs.shape == (1, 3, 13, 11, 9)
    torch.testing.assert_close(probs, expected.expand_as(probs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_shift_invariant_network_is_reproduced_exactly(mode):
    image, net = _image(channels=2), _pointwise_net()
    probs = sliding_window_inference(image, net, (6, 5, 4), overlap=0.5, mode=mode, sw_batch_size=3)
    with torch.no_grad():
        expected = torch.softmax(net(image), dim=1)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_matches_naive_reference_for_position_dependent_network(mode):
    image, patch, strides = _image(), (6, 5, 4), (3, 2, 3)
    probs = sliding_window_inference(image, PositionNet(), patch, mode=mode, strides=strides)
    expected = _reference(image, PositionNet(), patch, strides, gaussian=mode == "gaussian")
    np.testing.assert_allclose(probs.numpy(), expected, rtol=0, atol=1e-6)


def test_legacy_wrapper_is_uniform_averaging_with_its_strides():
    image = _image((14, 12, 10))
    probs = legacy_la_inference(image, PositionNet(), patch=(8, 8, 6), stride_xy=3, stride_z=2)
    expected = _reference(image, PositionNet(), (8, 8, 6), (3, 3, 2))
    np.testing.assert_allclose(probs.numpy(), expected, rtol=0, atol=1e-6)


def test_padding_is_symmetric_and_cropped_back():
    image = _image((5, 6, 7))
    probs = sliding_window_inference(image, PositionNet(), (8, 8, 8), mode="constant")
    assert probs.shape == (1, 2, 5, 6, 7)
    expected = _reference(image, PositionNet(), (8, 8, 8), (4, 4, 4))
    np.testing.assert_allclose(probs.numpy(), expected, rtol=0, atol=1e-6)
    # voxel (0, 0, 0) sits at window position (3 // 2, 2 // 2, 1 // 2) = (1, 1, 0)
    # logits (x + ramp, -x) -> p0 = sigmoid(2x + ramp), ramp = (1 * 1 + 1 * 2 + 0 * 3) / 10
    expected_p0 = torch.sigmoid(2 * image[0, 0, 0, 0, 0] + 0.3).item()
    assert probs[0, 0, 0, 0, 0].item() == pytest.approx(expected_p0, abs=1e-6)


@pytest.mark.parametrize("pad_mode", ["reflect", "replicate"])
def test_other_pad_modes_keep_shape(pad_mode):
    probs = sliding_window_inference(_image((5, 6, 7)), PositionNet(), (8, 8, 8), pad_mode=pad_mode)
    assert probs.shape == (1, 2, 5, 6, 7)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_batch_size_does_not_change_results(mode):
    """Same windows, same accumulation order; only vectorised kernels (softmax, conv) may differ in the
    last bit with the batch size, so the tolerance is float32 rounding."""
    image, net = _image(channels=2), _pointwise_net()
    one = sliding_window_inference(image, net, (6, 5, 4), mode=mode, sw_batch_size=1)
    three = sliding_window_inference(image, net, (6, 5, 4), mode=mode, sw_batch_size=3)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-6)
    one = sliding_window_inference(image, PositionNet(), (6, 5, 4), mode=mode, sw_batch_size=1)
    three = sliding_window_inference(image, PositionNet(), (6, 5, 4), mode=mode, sw_batch_size=3)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 100])
def test_on_window_reports_every_batch(batch):
    calls = []
    sliding_window_inference(_image(), PositionNet(), (6, 5, 4), sw_batch_size=batch,
                             on_window=lambda done, total: calls.append((done, total)))
    total = count_windows((13, 11, 9), (6, 5, 4))
    assert total > 1
    assert all(t == total for _, t in calls)
    assert [d for d, _ in calls] == [min(batch * (i + 1), total) for i in range(math.ceil(total / batch))]


def test_output_is_float32_on_the_accumulate_device():
    image = _image().double()
    probs = sliding_window_inference(image, PositionNet(), (6, 5, 4), accumulate_device=torch.device("cpu"))
    assert probs.dtype == torch.float32 and probs.device.type == "cpu"


def test_invalid_arguments_raise_value_error():
    image = _image()
    net = PositionNet()
    with pytest.raises(ValueError, match="1, C, X, Y, Z"):
        sliding_window_inference(image[0], net, (4, 4, 4))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(image, net, (4, 4, 4), overlap=1.0)
    with pytest.raises(ValueError, match="mode"):
        sliding_window_inference(image, net, (4, 4, 4), mode="median")
    with pytest.raises(ValueError, match="sw_batch_size"):
        sliding_window_inference(image, net, (4, 4, 4), sw_batch_size=0)
    with pytest.raises(ValueError, match="network"):
        sliding_window_inference(image, lambda x: (x, x), (4, 4, 4))


# --- mixed precision fallback ---------------------------------------------------------------------


class OverflowUnderAutocast(nn.Module):
    """Returns inf whenever CPU autocast is active, so only a float32 recomputation is finite."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled("cpu")
        self.calls.append(autocast)
        logits = torch.cat([x, -x], dim=1)
        return torch.full_like(logits, float("inf")) if autocast else logits


def test_non_finite_autocast_output_is_recomputed_in_float32():
    net, batch = OverflowUnderAutocast(), _image((4, 4, 4))
    probs = _softmax_forward(net, batch, torch.bfloat16)
    assert net.calls == [True, False]
    torch.testing.assert_close(probs, torch.softmax(torch.cat([batch, -batch], 1), 1))


def test_no_autocast_on_cpu_images():
    net = OverflowUnderAutocast()
    probs = sliding_window_inference(_image((4, 4, 4)), net, (4, 4, 4), amp=True)
    assert net.calls == [False] and torch.isfinite(probs).all()


# --- the real V-Net -------------------------------------------------------------------------------


def test_tiny_vnet_whole_volume_and_sliding():
    torch.manual_seed(0)
    net = VNet(base=4).eval()
    image = _image((40, 36, 20))
    window = plan_whole_volume_window((40, 36, 20), (32, 32, 16), max_voxels=10 ** 6)
    calls = []
    whole = sliding_window_inference(image, net, window, on_window=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 1)]
    sliding = sliding_window_inference(image, net, (32, 32, 16), overlap=0.5, sw_batch_size=3)
    for probs in (whole, sliding):
        assert probs.shape == (1, 2, 40, 36, 20) and probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 40, 36, 20))
        assert bool(((probs >= 0) & (probs <= 1)).all())
