"""A disk that fills during a write: one line that says so, the previous file kept, a run that resumes.

torch.save on a full disk fails with "iostream error" / "unexpected pos" and no errno (seen in this project's
CI); the disk itself is the stand-in here: `shutil.disk_usage` reports what a full disk reports, and the
write fails part-way as torch's does.
"""

from __future__ import annotations

import errno
from collections import namedtuple

import pytest
import torch

from conftest import synthetic_cases
from semiseg_la.cli.main import _fail
from semiseg_la.errors import StorageError
from semiseg_la.io import atomic
from semiseg_la.io.atomic import atomic_path

Usage = namedtuple("Usage", "total used free")


def full_disk(monkeypatch, free_bytes: int = 2**20) -> None:
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30, free_bytes))


def torch_like_failure(path) -> None:
    """What torch.save leaves and raises when the disk fills: part of the file, then a RuntimeError."""
    with open(path, "wb") as handle:
        handle.write(b"PK\x03\x04 part of a checkpoint")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 34210176 vs 34210072")


def test_a_write_that_fills_the_disk_says_so_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous checkpoint")
    full_disk(monkeypatch)
    expected = r"disk is full \(1 MiB free .*the previous file is kept"
    with pytest.raises(StorageError, match=expected) as caught, atomic_path(target) as tmp:
        torch_like_failure(tmp)
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no partial temporary file
    assert _fail(str(caught.value), caught.value.kind, caught.value.exit_code, False) == 6


def test_no_space_from_the_system_is_a_full_disk_whatever_the_free_space(tmp_path):
    with pytest.raises(StorageError, match="nothing was written"), atomic_path(tmp_path / "model.safetensors"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not list(tmp_path.iterdir())


def test_other_write_failures_are_not_called_a_full_disk(tmp_path):
    """With space left, torch's own error stays what it is: the message must not send a user to free space."""
    with pytest.raises(RuntimeError, match="unexpected pos"), atomic_path(tmp_path / "last.pt") as tmp:
        torch_like_failure(tmp)
    assert not list(tmp_path.iterdir())


def test_a_run_whose_disk_fills_stops_with_its_last_checkpoint_and_resumes_once_there_is_space(tmp_path,
                                                                                               monkeypatch):
    from semiseg_la.engine.config import build_config
    from semiseg_la.engine.loop import train
    from semiseg_la.engine.state import load_state

    config = build_config({"method": "supervised", "data": "synthetic", "patch_size": [32, 32, 32],
                           "spacing": [1.0, 1.0, 1.0], "max_iterations": 6, "batch_size": 2, "labeled_bs": 2,
                           "base_lr": 0.01, "lr_policy": "constant", "validate_every": 0, "checkpoint_every": 2,
                           "use_unlabeled": False, "device": "cpu", "output": str(tmp_path / "run"),
                           "method_params": {"dropout": False}})
    cases = synthetic_cases(2, labeled=True)
    real_save, saves = torch.save, []

    def filling_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 1:
            return real_save(obj, path, *args, **kwargs)
        full_disk(monkeypatch)  # the disk fills during the second checkpoint
        torch_like_failure(path)

    monkeypatch.setattr(torch, "save", filling_save)
    with pytest.raises(StorageError, match=r"last\.pt: could not be written.*--resume"):
        train(config, cases, [])
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    monkeypatch.undo()  # space freed
    assert load_state(last)["iteration"] == 2
    assert [p.name for p in last.parent.iterdir()] == ["last.pt"]
    result = train(config, cases, [], resume=True)
    assert load_state(last)["iteration"] == 6 and result is not None


def test_a_run_that_could_not_write_its_first_checkpoint_does_not_start(tmp_path, monkeypatch):
    from semiseg_la.engine import loop
    from semiseg_la.engine.config import build_config

    config = build_config({"method": "mean_teacher", "data": "synthetic", "patch_size": [32, 32, 32],
                           "spacing": [1.0, 1.0, 1.0], "max_iterations": 4, "batch_size": 2, "labeled_bs": 1,
                           "validate_every": 0, "device": "cpu", "output": str(tmp_path / "run")})
    trainer = loop.Trainer(config, synthetic_cases(2, labeled=True), synthetic_cases(2, labeled=False))
    networks = sum(t.numel() * t.element_size() for t in trainer.method.inference_network().state_dict().values())
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30, 4 * networks))
    steps = []
    monkeypatch.setattr(trainer, "train_step", lambda: steps.append(1))
    with pytest.raises(StorageError, match=r"run: \d+ MiB free on its disk, and this run needs about \d+ MiB"):
        trainer.run()
    assert not steps and not (tmp_path / "run" / "checkpoints").exists()
