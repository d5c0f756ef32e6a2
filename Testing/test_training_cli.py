"""Training as a user runs it: train, kill -9 and resume, fine-tune with lineage, DDP with 2 CPU processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from cli_helpers import json_lines, nnunet_dataset, run_cli, save_tiny_model
from conftest import REPO


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "training") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train_args(data, unl, out, iterations=30, method="mean_teacher"):
    return ["train", "--method", method, "--data", str(data), "--unlabeled", str(unl), "--labeled", "2",
            "--val", "1", "--iterations", str(iterations), "--patch", "32", "32", "32", "--spacing", "1", "1", "1",
            "--validate-every", "10", "--set", "checkpoint_every=5", "--output", str(out), "--device", "cpu",
            "--progress", "json"]


@pytest.fixture()
def dataset(tmp_path):
    data = tmp_path / "Dataset001_Tiny"
    unl = nnunet_dataset(data, n_labeled=3, n_unlabeled=2)
    return data, unl


def test_kill_9_then_resume_loses_nothing(tmp_path, dataset):
    data, unl = dataset
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "semiseg_la.cli.main", *_train_args(data, unl, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8",
                            env=_env())
    killed_at = None
    for line in proc.stdout:
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("stage") == "train" and record.get("step", 0) >= 13:
            killed_at = record["step"]
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert 10 <= state["iteration"] <= killed_at
    again = run_cli(_train_args(data, unl, out), timeout=600)
    assert again.returncode != 0 and "--resume" in again.stderr  # never overwrites a run silently
    resumed = run_cli(_train_args(data, unl, out) + ["--resume"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    records = json_lines(resumed.stdout)
    assert any("resumed from" in r.get("message", "") for r in records)
    assert records[-1]["stage"] == "done" and records[-1]["iterations"] == 30 and records[-1]["model_id"]
    with open(out / "train_log.csv") as handle:
        iterations = [int(float(r["iteration"])) for r in csv.DictReader(handle)]
    assert iterations == sorted(set(iterations)), "log rows after the checkpoint must not be duplicated"
    assert iterations[-1] == 30


def test_finetune_records_parent_and_never_touches_the_base(tmp_path, dataset):
    data, unl = dataset
    base = save_tiny_model("base-tiny-v0.1.0")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    proc = run_cli(["finetune", "--from", "base-tiny-v0.1.0", "--data", str(data), "--unlabeled", str(unl),
                    "--iterations", "4", "--name", "site-a", "--output", str(tmp_path / "ft"), "--device", "cpu",
                    "--progress", "json"], timeout=600)
    assert proc.returncode == 0, proc.stderr
    done = json_lines(proc.stdout)[-1]
    assert done["stage"] == "done" and done["model_id"].startswith("site-a")
    listing = {r["id"]: r for r in json.loads(run_cli(["models", "list", "--json"]).stdout)}
    assert listing[done["model_id"]]["parent"] == "base-tiny-v0.1.0"
    assert listing[done["model_id"]]["labeled_cases"] == 2  # the third is held out for the guard rail
    assert listing[done["model_id"]]["dice_kind"] == "site hold-out"
    assert done["guard"]["verdict"] in ("worse", "better or equal")
    lineage = run_cli(["models", "lineage", done["model_id"]])
    assert lineage.stdout.strip() == f"{done['model_id']} <- base-tiny-v0.1.0"
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    assert run_cli(["models", "remove", done["model_id"]]).returncode == 0
    assert done["model_id"] not in {r["id"] for r in json.loads(run_cli(["models", "list", "--json"]).stdout)}


def test_ddp_two_cpu_processes(tmp_path, dataset):
    data, unl = dataset
    out = tmp_path / "ddp"
    args = _train_args(data, unl, out, iterations=6, method="supervised")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "semiseg_la.cli.main", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", timeout=600,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = json.loads((out / "environment.json").read_text())
    assert env["world_size"] == 2
    done = [r for r in json_lines(proc.stdout) if r.get("stage") == "done"]
    assert len([d for d in done if d.get("model_id")]) == 1  # rank 0 exports once
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == 6


def test_multimodal_semicml_trains_from_a_two_channel_folder_and_exports_one_modality(tmp_path):
    from semiseg_la.io.synthetic import write_two_channel_nnunet

    data = write_two_channel_nnunet(tmp_path / "Dataset002_TwoContrast", n_cases=5, shape=(40, 36, 32),
                                    n_unlabeled=1)
    proc = run_cli(["train", "--preset", "semicml-mm", "--data", str(data), "--labeled", "2", "--val", "2",
                    "--iterations", "4", "--patch", "32", "32", "32", "--validate-every", "0",
                    "--set", "method_params.base=8", "--output", str(tmp_path / "run"), "--device", "cpu",
                    "--progress", "json"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = json_lines(proc.stdout)[-1]
    card = json.loads(run_cli(["models", "show", done["model_id"]]).stdout)
    assert card["inference"]["in_channels"] == 1  # one modality at inference
    assert card["inference"]["channel_names"]["0"] in ("channel 0 (T1)", "channel 1 (T2)")
    assert card["training"]["modalities"] == ["T1", "T2"]


def test_a_misspelt_method_param_stops_the_command_before_the_cases_load(tmp_path):
    """The data folder does not exist: the method setting is what the command must complain about first."""
    result = run_cli(["train", "--method", "mean_teacher", "--data", str(tmp_path / "no-such-data"),
                      "--set", "method_params.consistensy=0", "--output", str(tmp_path / "run"), "--device", "cpu"])
    assert result.returncode != 0
    assert "unknown method_params consistensy" in result.stderr
    assert not (tmp_path / "run").exists()
