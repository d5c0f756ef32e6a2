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
        """`Augmentation.__call__` on device tensors: the same plan, drawn by `Augmentation.plan`."""
        if label is None:
            label = torch.zeros(image.shape[1:], dtype=torch.uint8, device=image.device)
        plan = self.augment.plan(tuple(label.shape), rng)
        if plan.rotation is not None:
            k, axis = plan.rotation
            image = torch.flip(torch.rot90(image, k, dims=(1, 2)), dims=(axis + 1,))
            label = torch.flip(torch.rot90(label, k, dims=(0, 1)), dims=(axis,))
        if any(plan.pads):
            widths = [w for pad in reversed(plan.pads) for w in (pad, pad)]  # F.pad: last axis first
            image = F.pad(image, widths)
            label = F.pad(label, widths)
        image, label = image[(slice(None),) + plan.box], label[plan.box]
        if plan.affine is not None:
            image = image * plan.affine[0] + plan.affine[1]
        return image.contiguous(), label.contiguous()
