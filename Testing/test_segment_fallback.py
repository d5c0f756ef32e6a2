"""GPU out-of-memory handling of `semiseg-la segment`, driven without a GPU by a stand-in predictor."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
import torch

from semiseg_la.cli import segment
from semiseg_la.progress import ProgressReporter


class Recorder(ProgressReporter):
    def __init__(self):
        self.messages = []

    def log(self, message):
        self.messages.append(message)


def _args():
    return argparse.Namespace(device="auto", overlap=0.5, mode="fast", legacy=False, sw_batch_size=2,
                              no_largest_component=False, probabilities=None)


@pytest.mark.parametrize("failures,expected_device,fell_back", [
    (0, "cuda", False),   # fits on the GPU
    (1, "cuda", False),   # fits with training-size windows, accumulation on the CPU
    (2, "cpu", True),     # runs on the CPU, and says so
])
def test_oom_falls_back_step_by_step(monkeypatch, failures, expected_device, fell_back):
    attempts = []

    def fake_predictor(network, spec, args, device, accumulate_on_cpu, mode):
        attempts.append((device, accumulate_on_cpu, mode))

        def predict(image, roi=None, want_probability=False, reporter=None):
            if len(attempts) <= failures:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return SimpleNamespace(device="cuda" if device == "auto" else device)

        return SimpleNamespace(predict=predict)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(segment, "make_predictor", fake_predictor)
    reporter = Recorder()
    _, device, fell = segment.predict_with_fallback(None, None, object(), _args(), None, reporter)
    assert (device, fell) == (expected_device, fell_back)
    expected = [("auto", False, "fast"), ("cuda", True, "sliding"), ("cpu", False, "fast")]
    assert attempts[: failures + 1] == expected[: failures + 1]
    assert len(reporter.messages) == failures
    if fell_back:
        assert reporter.messages[-1] == "CUDA out of memory: retrying on the CPU"


def test_oom_everywhere_is_reported(monkeypatch):
    def always_oom(network, spec, args, device, accumulate_on_cpu, mode):
        def predict(*a, **k):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        return SimpleNamespace(predict=predict)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(segment, "make_predictor", always_oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        segment.predict_with_fallback(None, None, object(), _args(), None, Recorder())
