"""Training under torchrun with 2 CPU processes (gloo): every method to the end of a run that stops on a
validation iteration, resume with each rank's own batches, and a non-finite loss on one rank."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import json_lines, nnunet_dataset
from conftest import REPO

METHOD_FLAGS = {
    "supervised": [],
    "mean_teacher": [],
    "caml": ["--set", "method_params.memory_slots=2"],  # C3's detach: A's heads go without gradients
    "crln": ["--set", "method_params.patch_size=[32,32,32]", "--set", "method_params.iterations_per_epoch=2",
             "--set", "method_params.rectify_from_epoch=1", "--set", "method_params.num_anchors=16",
             "--set", "method_params.num_negatives=32"],
    "semicml_la": [],
}


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "training") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def torchrun(args, extra_env=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "semiseg_la.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                          env=_env(extra_env))


def train_args(data, unl, out, method, iterations=4, validate_every=2):
    return ["train", "--method", method, "--data", str(data), "--unlabeled", str(unl), "--labeled", "2",
            "--val", "1", "--iterations", str(iterations), "--patch", "32", "32", "32", "--spacing", "1", "1", "1",
            "--validate-every", str(validate_every), "--lr", "0.01", "--set", "lr_policy=constant",
            "--set", "checkpoint_every=2", "--output", str(out), "--device", "cpu", "--progress", "json",
            "--no-export", *METHOD_FLAGS[method]]


@pytest.fixture(scope="module")
def dataset(module_tmp):
    data = module_tmp / "Dataset001_Tiny"
    unl = nnunet_dataset(data, n_labeled=3, n_unlabeled=2)
    return data, unl


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_every_method_trains_to_the_end_of_a_run_that_stops_on_a_validation(method, dataset, tmp_path):
    data, unl = dataset
    out = tmp_path / method
    proc = torchrun(train_args(data, unl, out, method))
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [r for r in json_lines(proc.stdout) if r.get("stage") == "done"]
    assert len(done) == 1 and done[0]["iterations"] == 4
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == 4 and len(state["rank_states"]) == 2
    assert state["rank_states"][0]["sampler"] != state["rank_states"][1]["sampler"]


def test_resume_keeps_each_rank_s_batches(dataset, tmp_path):
    """4 + 4 iterations with a stop and --resume in between give the weights of 8 iterations in one go: if
    the ranks had resumed with rank 0's streams, both would draw the same batches and the weights would differ."""
    data, unl = dataset
    straight, split = tmp_path / "straight", tmp_path / "split"
    whole = torchrun(train_args(data, unl, straight, "mean_teacher", iterations=8, validate_every=0))
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = torchrun(train_args(data, unl, split, "mean_teacher", iterations=4, validate_every=0))
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(train_args(data, unl, split, "mean_teacher", iterations=8, validate_every=0) + ["--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    a = torch.load(straight / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert a["iteration"] == b["iteration"] == 8
    for name, tensor in a["networks"]["student"].items():
        assert torch.equal(tensor, b["networks"]["student"][name]), name


def test_a_resume_with_another_process_count_is_refused(dataset, tmp_path):
    data, unl = dataset
    out = tmp_path / "run"
    assert torchrun(train_args(data, unl, out, "supervised", iterations=2, validate_every=0)).returncode == 0
    single = subprocess.run([sys.executable, "-m", "semiseg_la.cli.main",
                             *train_args(data, unl, out, "supervised", iterations=4, validate_every=0), "--resume"],
                            capture_output=True, text=True, encoding="utf-8", timeout=600, env=_env())
    assert single.returncode != 0


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_one_message(dataset, tmp_path):
    data, unl = dataset
    proc = torchrun(train_args(data, unl, tmp_path / "run", "supervised", iterations=6, validate_every=0),
                    extra_env={"SEMISEG_LA_INJECT_NONFINITE": "1:2"})
    assert proc.returncode != 0
    messages = [line for line in proc.stderr.splitlines() if line.startswith("semiseg-la: error:")]
    assert len(messages) == 1, proc.stderr[-3000:]
    assert "at iteration 2 on rank(s) 1" in messages[0]
    assert "Expected to have finished reduction" not in proc.stderr and "Connection closed" not in proc.stderr


def test_collectives_use_the_rank_s_device(monkeypatch):
    """NCCL has no CPU backend: every tensor in a collective must live on the rank's device."""
    from semiseg_la.engine import distributed

    seen = []
    monkeypatch.setattr(distributed.dist, "broadcast", lambda tensor, src: seen.append(tensor.device))
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor: seen.append(tensor.device))
    ctx = distributed.DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("meta"))
    for call in (lambda: distributed.broadcast_flag(ctx, True), lambda: distributed.broadcast_values(ctx, [1.0]),
                 lambda: distributed.ranks_where(ctx, False)):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # meta tensors have no values to read
            call()
    assert seen and all(device.type == "meta" for device in seen)


def test_caml_asks_ddp_for_parameters_without_gradients():
    from semiseg_la.methods import build_method

    assert build_method("caml", {"memory_slots": 2}, 10).ddp_find_unused_parameters
    assert not build_method("caml", {"memory_slots": 2, "detach_correlation_target": False}, 10) \
        .ddp_find_unused_parameters
    assert not getattr(build_method("supervised", {}, 10), "ddp_find_unused_parameters", False)


def test_init_distributed_binds_the_local_gpu(monkeypatch):
    from semiseg_la.engine import distributed

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    ctx = distributed.init_distributed("cuda")
    assert calls == {"device": 1, "backend": "nccl"} and ctx.device == torch.device("cuda", 1)
    assert json.dumps(ctx.rank) == "1"
