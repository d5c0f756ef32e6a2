"""Training batches made on the device: every case held there once, augmentation and cropping done there.

On a GPU the per-step host work of `Augmentation` (rotate and flip a whole case, crop, scale, copy to
pinned memory, transfer) becomes a few tensor operations on data already in device memory. The random
draws are the same, in the same order, from the same generator as `Augmentation`'s, and the operations are
exact (rot90, flip, zero pad, crop) or the same float32 arithmetic (the intensity affine), so a run with
`device_data: true` draws bit-identical batches: resume, seeds and figures stay comparable.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Augmentation, TrainCase


class DeviceBatcher:
    """Cases uploaded once (images float32, labels uint8); `batch()` returns (image, label) on the device."""

    def __init__(self, labeled: Sequence[TrainCase], unlabeled: Sequence[TrainCase], augment: Augmentation,
                 device: torch.device) -> None:
        self.device = device
        self.augment = augment
        self.labeled = [self._upload(c) for c in labeled]
        self.unlabeled = [self._upload(c) for c in unlabeled]

    def _upload(self, case: TrainCase):
        image = torch.from_numpy(np.ascontiguousarray(case.image, np.float32)).to(self.device)
        label = None if case.label is None else torch.from_numpy(np.ascontiguousarray(case.label, np.uint8)).to(
            self.device)
        return image, label

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.labeled + self.unlabeled for t in pair if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def batch(self, labeled_ids: Sequence[int], unlabeled_ids: Sequence[int], rng: np.random.Generator):
        images: List[torch.Tensor] = []
        labels: List[torch.Tensor] = []
        for image, label in [self.labeled[i] for i in labeled_ids] + [self.unlabeled[i] for i in unlabeled_ids]:
            image, label = self.augment_one(image, label, rng)
            images.append(image)
            labels.append(label)
        return torch.stack(images), torch.stack(labels).long()

    def augment_one(self, image: torch.Tensor, label: Optional[torch.Tensor], rng: np.random.Generator):
        """`Augmentation.__call__` on device tensors: the same draws, in the same order."""
        aug = self.augment
        if label is None:
            label = torch.zeros(image.shape[1:], dtype=torch.uint8, device=image.device)
        if aug.rot_flip:
            k = int(rng.integers(0, 4))
            axis = int(rng.integers(0, 2))
            image = torch.flip(torch.rot90(image, k, dims=(1, 2)), dims=(axis + 1,))
            label = torch.flip(torch.rot90(label, k, dims=(0, 1)), dims=(axis,))
        image, label = _random_crop(image, label, aug.patch_size, rng)
        if aug.intensity_prob > 0 and rng.random() < aug.intensity_prob:
            low, high = np.log(aug.intensity_scale[0]), np.log(aug.intensity_scale[1])
            scale = float(np.exp(rng.uniform(low, high)))
            shift = float(rng.uniform(*aug.intensity_shift))
            image = image * scale + shift
        return image.contiguous(), label.contiguous()


def _random_crop(image: torch.Tensor, label: torch.Tensor, patch: Sequence[int], rng: np.random.Generator):
    """`data.random_crop` on tensors: zero-pad axes not larger than the patch, then a uniform crop."""
    pads = [max((int(p) - s) // 2 + 3, 0) if s <= int(p) else 0 for s, p in zip(label.shape, patch)]
    if any(pads):
        widths = [w for pad in reversed(pads) for w in (pad, pad)]  # F.pad: last axis first
        image = F.pad(image, widths)
        label = F.pad(label, widths)
    starts = [int(rng.integers(0, s - int(p) + 1)) for s, p in zip(label.shape, patch)]
    box = tuple(slice(a, a + int(p)) for a, p in zip(starts, patch))
    return image[(slice(None),) + box], label[box]
