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


class FakeGpuPredictor:
    """A Predictor stand-in: on the GPU without CPU accumulation it runs out of memory; elsewhere it returns
    the case's own label as its foreground probability (and label map)."""

    made = []

    def __init__(self, network, spec, device="cpu", mode="fast", accumulate_on_cpu=False, **_):
        self.where = (device, accumulate_on_cpu, mode)
        FakeGpuPredictor.made.append(self.where)

    def _fits(self):
        if self.where[0] != "cpu" and not self.where[1]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    def probabilities(self, array, reporter=None):
        self._fits()
        return (array > 0.5).astype("float32"), 1, array.size

    def predict(self, image, roi=None):  # the real Predictor.predict's region argument (unused: crop-sized cases)
        self._fits()
        return SimpleNamespace(label=image.with_array((image.array > 0.5).astype("uint8")))


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    FakeGpuPredictor.made = []
    return FakeGpuPredictor


def test_validation_falls_back_on_oom_and_later_cases_start_where_it_fitted(monkeypatch, fake_gpu):
    from conftest import synthetic_cases
    from semiseg_la.inference import validation

    monkeypatch.setattr(validation, "Predictor", fake_gpu)
    cases = synthetic_cases(3, True)
    for case in cases:  # the stand-in's "prediction" is the bright sphere: the label itself
        case.image[0] = case.label.astype("float32")
    messages = []
    validate = validation.make_validator(cases, (32, 32, 32), (1, 1, 1), device="cuda", log=messages.append)
    scores = validate(None)
    assert scores["dice"] == pytest.approx(1.0)
    # case 1 fails on the GPU and fits with GPU windows + CPU accumulation; cases 2 and 3 start there
    assert fake_gpu.made == [("cuda", False, "fast"), ("cuda", True, "sliding"), ("cuda", True, "sliding"),
                             ("cuda", True, "sliding")]
    assert messages == ["CUDA out of memory: retrying on the GPU with training-size windows, accumulating on the CPU"]


def test_the_exports_evaluation_falls_back_on_oom(monkeypatch, fake_gpu):
    from conftest import sphere_volume
    from semiseg_la.cli import export
    from semiseg_la.io.volume import Volume

    monkeypatch.setattr(export, "Predictor", fake_gpu)
    image, label = sphere_volume((32, 32, 24))
    record = SimpleNamespace(case_id="c1", load=lambda: (Volume(label.astype("float32"), (1.0, 1.0, 1.0)),
                                                         Volume(label, (1.0, 1.0, 1.0))))
    config = SimpleNamespace(patch_size=(32, 32, 16), spacing=(1.0, 1.0, 1.0), normalization="zscore-volume",
                             intensity_reference=None, device="cuda", cut_whole_scans=False)
    reporter = Recorder()
    reporter.start = reporter.update = reporter.end = lambda *a, **k: None
    result = export.evaluate_records(None, config, [record], reporter)
    assert result["dice"] == pytest.approx(1.0)
    assert fake_gpu.made == [("cuda", False, "fast"), ("cuda", True, "sliding")]
    assert reporter.messages == ["CUDA out of memory: retrying on the GPU with training-size windows, accumulating "
                                 "on the CPU"]
