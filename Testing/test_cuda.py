"""Tests that need a CUDA GPU (`pytest -m cuda`; scripts/gpu_run.sh runs them first on a GPU machine).

Without a GPU they report skipped. What they check on a real card: bf16 autocast in a training step, the
out-of-memory fallback of `segment` with a real allocation filling the card, and GPU inference equal to CPU
inference within the tolerance of bf16 arithmetic.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from conftest import REPO, sphere_volume

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by scripts/gpu_run.sh)")]


def _default_model():
    from semiseg_la.cli.common import inference_spec, load_catalog_model

    network, card, _ = load_catalog_model(None)
    return network, inference_spec(card)


def _scan(shape, seed=0):
    from semiseg_la.io.volume import Volume

    image, label = sphere_volume(shape, radius=min(shape) / 4, noise=0.3, seed=seed)
    return Volume(image, (0.625, 0.625, 0.625)), label


def _real_case_or_scan(shape):
    """The last case of the training cache when it is here (the GPU run carries cache/la), else a sphere."""
    from semiseg_la.io.datasets import open_dataset
    from semiseg_la.io.la_cache import is_la_cache, missing_parts

    cache = REPO / "cache" / "la"
    if is_la_cache(cache) and not missing_parts(cache):
        image, label = open_dataset(cache)[-1].load()
        return image, label.array
    return _scan(shape, seed=1)


def test_bf16_autocast_training_step_on_the_gpu():
    from semiseg_la.engine.precision import amp_dtype
    from semiseg_la.methods import Batch, build_method

    device = torch.device("cuda")
    dtype = amp_dtype(device)
    assert dtype is (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    method = build_method("supervised", {}, 100).to(device)
    method.train(True)
    image = torch.randn(4, 1, 64, 64, 48, device=device)
    label = (torch.rand(4, 64, 64, 48, device=device) > 0.7).long()
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: seen.append(output.dtype) if isinstance(module, torch.nn.Conv3d) else None)
    try:
        with torch.autocast("cuda", dtype=dtype):
            loss = method.training_step(Batch(image, label, 2), 0).loss
    finally:
        hook.remove()
    loss.backward()
    assert torch.isfinite(loss)
    assert seen and all(d == dtype for d in seen), "convolutions must run in the autocast dtype"
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_gpu_inference_equals_cpu_inference():
    from semiseg_la.inference.predictor import Predictor

    network, spec = _default_model()
    volume, _ = _real_case_or_scan((160, 144, 88))
    cpu = Predictor(network, spec, device="cpu").predict(volume, want_probability=True)
    gpu = Predictor(network, spec, device="cuda").predict(volume, want_probability=True)
    assert gpu.device.startswith("cuda") and cpu.device == "cpu"
    assert gpu.label.array.shape == cpu.label.array.shape == volume.shape
    difference = np.abs(gpu.probability.array.astype(np.float32) - cpu.probability.array.astype(np.float32))
    assert float(difference.max()) < 0.1, "bf16 autocast may move a probability by a few hundredths, not more"
    a, b = gpu.label.array > 0, cpu.label.array > 0
    dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()) if a.sum() + b.sum() else 1.0
    assert dice > (0.99 if a.sum() > 20000 else 0.97), "only voxels at the decision boundary may differ"
    assert np.mean(a == b) > 0.999


def test_segment_out_of_memory_fallback_with_a_real_allocation():
    """Fill the card until 256 MiB are free: the whole-scan window (over 1 GiB of activations) cannot fit;
    the fallback must still return the segmentation (training-size windows on the GPU, or the CPU), and say so."""
    from semiseg_la.cli import segment
    from semiseg_la.progress import ProgressReporter

    class Recorder(ProgressReporter):
        def __init__(self):
            self.messages = []

        def log(self, message):
            self.messages.append(message)

    network, spec = _default_model()
    volume, _ = _scan((576, 576, 88), seed=2)
    args = argparse.Namespace(device="cuda", overlap=0.5, mode="fast", legacy=False, sw_batch_size=2,
                              no_largest_component=False, probabilities=None)
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    blocker = torch.empty(max(0, free - 256 * 2**20), dtype=torch.uint8, device="cuda")
    try:
        reporter = Recorder()
        prediction, device, fell_back = segment.predict_with_fallback(network, spec, volume, args, None, reporter)
    finally:
        del blocker
        torch.cuda.empty_cache()
    assert prediction.label.array.shape == volume.shape
    assert any("out of memory" in m for m in reporter.messages), reporter.messages
    assert fell_back == (device == "cpu")
