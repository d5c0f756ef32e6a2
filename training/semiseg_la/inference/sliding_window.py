"""Sliding-window inference for 3D segmentation networks (docs/methods.md 1.6; conventions.md 1.4, 2.1).

Pure tensor functions: no file I/O, no model loading. Windows follow the LA papers' placement rule
(n = ceil((D - P) / s) + 1 positions, the last one snapped to the border), so the legacy procedure
(uniform averaging, strides 18/18/4) is one call, and the project default (Gaussian weighting,
50 % overlap, tiles batched, autocast on CUDA) uses the same code path. Because the V-Net is fully
convolutional, the fast default may also run ONE window covering the whole volume
(`plan_whole_volume_window`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..engine.precision import amp_dtype as precision_dtype

Tensor = torch.Tensor
Window = Tuple[slice, ...]
ProgressCallback = Callable[[int, int], None]

WINDOW_MULTIPLE = 16  # V-Net downsamples 4 times
MIN_IMPORTANCE = 1e-3  # Gaussian floor: border voxels keep a small, non-zero weight
BLEND_MODES = ("gaussian", "constant")
PAD_MODES = ("constant", "reflect", "replicate")


def gaussian_importance_map(patch: Sequence[int], sigma_scale: float = 0.125,
                            min_weight: float = MIN_IMPORTANCE) -> Tensor:
    """Separable Gaussian (sigma = sigma_scale * patch per axis), max 1, floored at `min_weight`.

    The floor keeps voxels covered only by window borders from being divided by ~0.
    """
    if sigma_scale <= 0 or not 0 < min_weight <= 1:
        raise ValueError("sigma_scale must be > 0 and min_weight in (0, 1]")
    weights = torch.ones((), dtype=torch.float64)
    for axis, size in enumerate(_positive_ints(patch, "patch")):
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
        profile = torch.exp(-0.5 * (coords / (size * sigma_scale)) ** 2)
        shape = [1] * len(patch)
        shape[axis] = size
        weights = weights * profile.reshape(shape)
    weights = weights / weights.max()
    return weights.clamp_(min=min_weight).to(torch.float32)


def window_starts(size: int, patch: int, stride: int) -> List[int]:
    """Start offsets along one axis: ceil((size - patch) / stride) + 1 windows, the last one snapped
    to the border; a single window at 0 when size <= patch (the volume is padded to the patch)."""
    if size < 1 or patch < 1 or stride < 1:
        raise ValueError(f"size, patch and stride must be >= 1, got {size}, {patch}, {stride}")
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(count)]


def strides_from_overlap(patch: Sequence[int], overlap: float) -> Tuple[int, ...]:
    """Stride per axis = floor(patch * (1 - overlap)), at least 1; overlap must lie in [0, 1)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return tuple(max(1, int(math.floor(p * (1.0 - overlap) + 1e-9))) for p in patch)


def count_windows(shape: Sequence[int], patch: Sequence[int], strides: Optional[Sequence[int]] = None,
                  overlap: float = 0.5) -> int:
    """Number of windows (network input tiles) for a volume; `strides` overrides `overlap`."""
    steps = _resolve_strides(patch, overlap, strides)
    return math.prod(len(window_starts(int(d), int(p), s)) for d, p, s in zip(shape, patch, steps))


def count_network_voxels(shape: Sequence[int], patch: Sequence[int],
                         strides: Optional[Sequence[int]] = None, overlap: float = 0.5) -> int:
    """Voxels the network processes in total (windows x patch voxels); divide by the volume's voxel
    count for "network passes per voxel"."""
    _check_dims(shape, patch)
    return count_windows(shape, patch, strides, overlap) * math.prod(int(p) for p in patch)


def plan_whole_volume_window(shape: Sequence[int], patch: Sequence[int], max_voxels: int,
                             multiple: int = WINDOW_MULTIPLE) -> Optional[Tuple[int, ...]]:
    """One window covering the whole volume, or None if it would exceed `max_voxels`.

    Each axis is max(volume, patch) rounded up to `multiple`: never less context than one training
    patch, and a volume that fits in one patch is padded exactly as the sliding path would pad it.
    """
    _check_dims(shape, patch)
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    window = tuple(_round_up(max(int(d), int(p)), multiple) for d, p in zip(shape, patch))
    return window if math.prod(window) <= max_voxels else None


def sliding_window_inference(image: Tensor, network: Callable[[Tensor], Tensor], patch: Sequence[int],
                             overlap: float = 0.5, mode: str = "gaussian", sw_batch_size: int = 4,
                             strides: Optional[Sequence[int]] = None, pad_mode: str = "constant",
                             accumulate_device: Optional[torch.device] = None,
                             on_window: Optional[ProgressCallback] = None, sigma_scale: float = 0.125,
                             amp: bool = True) -> Tensor:
    """Softmax probabilities (1, K, X, Y, Z), float32 on `accumulate_device` (default: image's device).

    `image` is (1, C, X, Y, Z), normalised, on the compute device. Dimensions smaller than the patch
    are padded symmetrically (left = pad // 2) and cropped back. `mode` "gaussian" weighs each window
    by `gaussian_importance_map`, "constant" averages uniformly (legacy). `strides` overrides
    `overlap`. `on_window(done, total)` is called after each batch of windows. On CUDA with `amp`
    the network runs under autocast (bf16 where supported, else fp16); a batch whose output is not
    finite is recomputed in float32. Accumulation is always float32.
    """
    patch = _positive_ints(patch, "patch")
    _check_image(image, patch)
    steps = _resolve_strides(patch, overlap, strides)
    _check_options(mode, pad_mode, sw_batch_size)
    acc_device = torch.device(accumulate_device) if accumulate_device is not None else image.device
    pads = _symmetric_pads(image.shape[2:], patch)
    with torch.inference_mode():
        padded = _pad(image, pads, pad_mode)
        windows = _windows(padded.shape[2:], patch, steps)
        weight = _window_weight(mode, len(windows), patch, sigma_scale, image.device)
        probs = _accumulate(padded, network, windows, weight, int(sw_batch_size), acc_device,
                            precision_dtype(image.device) if amp else None, on_window)
        return _crop(probs, pads)


def legacy_la_inference(image: Tensor, network: Callable[[Tensor], Tensor],
                        patch: Sequence[int] = (112, 112, 80), stride_xy: int = 18, stride_z: int = 4,
                        sw_batch_size: int = 4, accumulate_device: Optional[torch.device] = None,
                        on_window: Optional[ProgressCallback] = None, amp: bool = False) -> Tensor:
    """The LA papers' procedure: uniform averaging of softmax over windows with strides 18/18/4.

    `amp` defaults to False because the published numbers were produced in float32.
    """
    return sliding_window_inference(image, network, patch, mode="constant", sw_batch_size=sw_batch_size,
                                    strides=(stride_xy, stride_xy, stride_z), pad_mode="constant",
                                    accumulate_device=accumulate_device, on_window=on_window, amp=amp)


# --- helpers -------------------------------------------------------------------------------------


def _positive_ints(values: Sequence[int], name: str) -> Tuple[int, ...]:
    result = tuple(int(v) for v in values)
    if not result or any(v < 1 for v in result):
        raise ValueError(f"{name} must hold positive integers, got {tuple(values)}")
    return result


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_dims(shape: Sequence[int], patch: Sequence[int]) -> None:
    if len(shape) != len(patch):
        raise ValueError(f"shape {tuple(shape)} and patch {tuple(patch)} differ in dimensionality")


def _check_image(image: Tensor, patch: Tuple[int, ...]) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 5 or image.shape[0] != 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (1, C, X, Y, Z) tensor, got {shape}")
    if len(patch) != 3:
        raise ValueError(f"patch must have 3 sizes, got {patch}")


def _check_options(mode: str, pad_mode: str, sw_batch_size: int) -> None:
    if mode not in BLEND_MODES:
        raise ValueError(f"mode must be one of {BLEND_MODES}, got {mode!r}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if int(sw_batch_size) < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")


def _resolve_strides(patch: Sequence[int], overlap: float,
                     strides: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if strides is None:
        return strides_from_overlap(patch, overlap)
    steps = _positive_ints(strides, "strides")
    if len(steps) != len(patch):
        raise ValueError(f"strides {steps} and patch {tuple(patch)} differ in dimensionality")
    return steps


def _symmetric_pads(shape: Sequence[int], patch: Sequence[int]) -> List[Tuple[int, int]]:
    """(left, right) padding per axis so every axis is at least the patch; left = pad // 2."""
    pads = []
    for size, p in zip(shape, patch):
        total = max(int(p) - int(size), 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _pad(image: Tensor, pads: List[Tuple[int, int]], pad_mode: str) -> Tensor:
    if not any(left or right for left, right in pads):
        return image
    flat = [amount for left_right in reversed(pads) for amount in left_right]  # F.pad: last axis first
    if pad_mode == "constant":
        return F.pad(image, flat, mode="constant", value=0.0)
    return F.pad(image, flat, mode=pad_mode)


def _crop(volume: Tensor, pads: List[Tuple[int, int]]) -> Tensor:
    index = (slice(None), slice(None)) + tuple(
        slice(left, volume.shape[2 + axis] - right) for axis, (left, right) in enumerate(pads))
    return volume[index].contiguous()


def _windows(shape: Sequence[int], patch: Sequence[int], strides: Sequence[int]) -> List[Window]:
    """All window slices in C order (x slowest), the order batches and progress follow."""
    starts = [window_starts(int(d), p, s) for d, p, s in zip(shape, patch, strides)]
    return [tuple(slice(o, o + p) for o, p in zip(origin, patch)) for origin in itertools.product(*starts)]


def _window_weight(mode: str, n_windows: int, patch: Sequence[int], sigma_scale: float,
                   device: torch.device) -> Optional[Tensor]:
    """Per-window weight, or None for uniform averaging (also for a single window, where any weight
    cancels exactly and skipping it saves a full-volume multiply)."""
    if mode == "constant" or n_windows == 1:
        return None
    return gaussian_importance_map(patch, sigma_scale).to(device)


def _autocast(device_type: str, dtype: Optional[torch.dtype]) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def _softmax_forward(network: Callable[[Tensor], Tensor], batch: Tensor,
                     amp_dtype: Optional[torch.dtype]) -> Tensor:
    """float32 softmax of one batch; reruns without autocast if reduced precision overflowed."""
    with _autocast(batch.device.type, amp_dtype):
        logits = network(batch)
    _check_logits(logits, batch)
    if amp_dtype is not None and not bool(torch.isfinite(logits).all()):
        logits = network(batch)
    return torch.softmax(logits.float(), dim=1)


def _check_logits(logits: object, batch: Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"network must return one logits tensor, got {type(logits).__name__}")
    if logits.ndim != 5 or logits.shape[0] != batch.shape[0] or logits.shape[2:] != batch.shape[2:]:
        raise ValueError(f"network output {tuple(logits.shape)} does not match input "
                         f"{tuple(batch.shape)} as (B, K, X, Y, Z)")


def _accumulate(padded: Tensor, network: Callable[[Tensor], Tensor], windows: List[Window],
                weight: Optional[Tensor], sw_batch_size: int, acc_device: torch.device,
                amp_dtype: Optional[torch.dtype], on_window: Optional[ProgressCallback]) -> Tensor:
    """Weighted sum of window probabilities divided by the summed weights, on `acc_device`."""
    spatial = tuple(padded.shape[2:])
    weight_sum = torch.zeros((1, 1) + spatial, dtype=torch.float32, device=acc_device)
    acc_weight = weight.to(acc_device) if weight is not None else None
    total: Optional[Tensor] = None
    for first in range(0, len(windows), sw_batch_size):
        batch_windows = windows[first:first + sw_batch_size]
        batch = torch.cat([padded[(slice(None), slice(None)) + w] for w in batch_windows])
        probs = _softmax_forward(network, batch, amp_dtype)
        if weight is not None:
            probs = probs * weight
        probs = probs.to(acc_device)
        if total is None:
            total = torch.zeros((1, probs.shape[1]) + spatial, dtype=torch.float32, device=acc_device)
        for i, window in enumerate(batch_windows):
            index = (slice(None), slice(None)) + window
            total[index] += probs[i:i + 1]
            weight_sum[index] += acc_weight if acc_weight is not None else 1.0
        if on_window is not None:
            on_window(first + len(batch_windows), len(windows))
    assert total is not None  # at least one window always exists
    return total.div_(weight_sum)
