"""Batches made on the device (engine/device_data.py) equal the host pipeline's bit for bit; checked on the CPU
device here, and the same tensor operations run on a GPU (scripts/gpu_run.sh trains with device_data: true)."""

from __future__ import annotations

import numpy as np
import torch

from conftest import synthetic_cases
from semiseg_la.engine.data import Augmentation
from semiseg_la.engine.device_data import DeviceBatcher
from semiseg_la.engine.loop import Trainer
from test_engine import tiny_config


def test_device_augmentation_equals_the_host_one_bit_for_bit():
    cases = synthetic_cases(3, True) + synthetic_cases(2, False, seed=10)  # (1, 40, 36, 36) images
    for patch in ([32, 32, 32], [48, 24, 40]):  # crop only; pad on some axes
        augment = Augmentation(patch, intensity_prob=0.8)
        batcher = DeviceBatcher(cases[:3], cases[3:], augment, torch.device("cpu"))
        host_rng, device_rng = np.random.default_rng(7), np.random.default_rng(7)
        for i in range(24):
            case = cases[i % 5]
            image, label = augment(case.image, case.label, host_rng)
            on_device = batcher.labeled[i % 5] if i % 5 < 3 else batcher.unlabeled[i % 5 - 3]
            d_image, d_label = batcher.augment_one(*on_device, device_rng)
            assert d_image.dtype == torch.float32 and d_label.dtype == torch.uint8
            assert np.array_equal(d_image.numpy().view(np.uint32), image.view(np.uint32))
            assert np.array_equal(d_label.numpy(), label)
        assert host_rng.bit_generator.state == device_rng.bit_generator.state


def test_trainer_with_device_data_draws_the_same_batches(tmp_path):
    labeled, unlabeled = synthetic_cases(2, True), synthetic_cases(3, False, seed=5)
    host = Trainer(tiny_config(tmp_path / "a", batch_size=4, labeled_bs=2), labeled, unlabeled)
    device = Trainer(tiny_config(tmp_path / "b", batch_size=4, labeled_bs=2, device_data=True), labeled, unlabeled)
    assert host.device_batcher is None and device.device_batcher is not None
    assert device.device_batcher.nbytes > 0
    for _ in range(4):
        a, b = host.next_batch(), device.next_batch()
        assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label) and a.label.dtype == b.label.dtype
        assert a.labeled_bs == b.labeled_bs
