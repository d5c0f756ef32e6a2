"""CPU rehearsal of the GPU session (issue 12): `scripts/gpu_run.sh OUTDIR --dry-run` runs every step with tiny
sizes, and OUTDIR holds what the real run returns: logs, bench JSON, segment JSON and model folders that the
catalog lists under $SEMISEG_LA_MODELS, as fp16 shards with complete cards; the pack comes back whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cli_helpers import run_cli
from conftest import REPO, load_script

SCRIPT = REPO / "scripts" / "gpu_run.sh"


@pytest.fixture(scope="module")
def dry_run(module_tmp):
    base = module_tmp
    out, pack, work = base / "out", base / "pack", base / "work"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run", "--pack", str(pack), "--work", str(work)],
                          capture_output=True, text=True, timeout=900, env=env)  # ~75 s of CPU; more on a busy core
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, pack, base, proc.stdout


def test_dry_run_runs_every_step(dry_run):
    out, _, _, stdout = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == ["data", "setup", "env", "cuda-tests", "bench", "loader", "segment", "train", "finetune",
                           "pack"]
    assert steps["finetune"]["status"] == "skipped"  # only with --finetune GRID
    failed = {k: v for k, v in steps.items() if v["status"] != "ok" and k != "finetune"}
    assert not failed, failed
    assert "skipped" in steps["cuda-tests"]["result"]  # no GPU here: the CUDA tests report skipped
    for log in ("gpu_run.log", "env.log", "cuda-tests.log", "bench.log", "segment.log"):
        assert (out / "logs" / log).stat().st_size > 0, log
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] and env["cuda_available"] is False
    assert "step" in stdout and "total" in stdout  # the closing table the device tool's output tail shows


def test_dry_run_bench_and_segment_reports(dry_run):
    out = dry_run[0]
    bench = json.loads((out / "bench" / "train.json").read_text())
    rows = {r["label"]: r for r in bench["rows"]}
    assert set(rows) == {"supervised-la-8", "mean-teacher-la-8", "caml-la-8", "crln-la-8", "semicml-la-8",
                         "supervised-la-cpu"}
    assert all(r.get("it_per_s", 0) > 0 and r.get("peak_mib", 0) > 0 for r in rows.values()), rows
    assert {p["preset"] for p in bench["projections"]} >= set(rows)
    loader = json.loads((out / "bench" / "loader.json").read_text())
    assert loader["device"] == "cpu" and loader["plain_s_per_it"] > 0 and loader["prefetch_s_per_it"] > 0
    segment = json.loads((out / "segment.json").read_text())
    assert segment["shape"] == [96, 96, 40] and segment["runs"][0]["rc"] == 0
    assert segment["runs"][0]["device"] == "cpu" and segment["runs"][0]["timings"]["total_s"] > 0
    assert segment["agreement"]["label_voxels"] > 0


def test_dry_run_models_are_listed_by_the_catalog(dry_run):
    from semiseg_la.checkpoints import load_network

    out = dry_run[0]
    train = json.loads((out / "train.json").read_text())
    assert set(train) == {"supervised-la-gpu", "caml-la-8-gpu"}
    models = sorted(p for p in (out / "models").iterdir() if p.is_dir())
    assert [m.name.rsplit("-v", 1)[0] for m in models] == ["caml-la-8-gpu", "supervised-la-gpu"]
    for folder in models:
        card = json.loads((folder / "card.json").read_text())
        assert card["weights"]["dtype"] == "float16" and card["gpu_run"]["weights"].startswith("float16")
        assert card["validation"].get("dice") is not None and card["training"]["labeled_cases"] >= 2
        assert all((folder / f).stat().st_size < 16 * 2**20 for f in card["weights"]["files"])
        load_network(folder)  # hashes, shapes, dtypes
        assert (out / "runs" / card["name"] / "config.yaml").is_file()
    listed = run_cli(["models", "list", "--json"], env_extra={"SEMISEG_LA_MODELS": str(out / "models")})
    assert listed.returncode == 0, listed.stderr
    entries = {e["id"]: e for e in json.loads(listed.stdout)}
    for folder in models:
        assert entries[folder.name]["source"] == "site" and entries[folder.name]["error"] is None


def test_pack_fits_the_return_limits_and_unpacks(dry_run):
    out, pack, base, _ = dry_run
    files = sorted(pack.iterdir())
    assert 2 <= len(files) <= 8 and all(f.stat().st_size < 16 * 2**20 for f in files)
    back = base / "back"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_run.py"), "unpack", str(pack), str(back)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for rel in ("summary.json", "env.json", "bench/train.json", "segment.json", "train.json", "logs/gpu_run.log"):
        assert (back / rel).is_file(), rel
    assert sorted(p.name for p in (back / "models").iterdir()) == sorted(p.name for p in (out / "models").iterdir())


def test_fp16_copy_of_the_bundled_model_is_sharded_below_16_mib(tmp_path):
    """The real V-Net (9.45 M parameters): two fp16 shards below 15 MiB each, card complete, weights equal."""
    import torch

    from semiseg_la.checkpoints import load_model_weights, resolve_model

    source = resolve_model(None)
    env = dict(os.environ, PYTHONPATH=str(REPO / "training"))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_run.py"), "fp16", str(source), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    copied = json.loads(proc.stdout.strip().splitlines()[-1])
    shards = [n for n in copied["files"] if n.endswith(".safetensors")]
    assert len(shards) >= 2 and all(copied["files"][n] < 15 * 2**20 + 2**16 for n in shards)
    original, _ = load_model_weights(source)
    weights, card = load_model_weights(tmp_path / copied["id"])
    assert card.weights["dtype"] == "float16" and card.validation == load_model_weights(source)[1].validation
    for key, value in original.items():  # floats round-trip through fp16; integer buffers stay exact
        expected = value.half().float() if value.is_floating_point() else value  # (4550 batches: not an fp16)
        assert torch.equal(expected, weights[key]), key


def test_salvage_command_resumes_without_the_budget():
    """A run stopped before its export is exported by resuming it at its checkpoint's iteration (no training)."""
    gpu_run = load_script("scripts/gpu_run.py")
    cmd = ["python", "-m", "semiseg_la.cli.main", "train", "--preset", "caml-la-8", "--time-budget", "230",
           "--set", "fit_to_budget=true", "--set", "device_data=true", "--iterations", "20000"]
    assert gpu_run._without_budget_flags(cmd) == ["python", "-m", "semiseg_la.cli.main", "train", "--preset",
                                                  "caml-la-8", "--set", "device_data=true", "--iterations", "20000"]


def test_every_fine_tune_benchmark_of_a_grid_is_a_valid_bench_command():
    """The grids run unattended on a lent GPU: each benchmark's real and dry flags must parse, name distinct
    JSON files and pair every variant with a run of the same training seed."""
    gpu_run = load_script("scripts/gpu_run.py")
    bench = load_script("bench/bench_finetune.py")
    for grid in gpu_run.FINETUNE_GRIDS.values():
        assert len({b.name for b in grid}) == len(grid)
        for flags in [b.real for b in grid] + [b.dry for b in grid if b.dry]:
            args = bench.parse_args(["--data", "d", *flags])
            assert args.methods and any(o.startswith("seed=") for o in args.overrides), flags
        assert any(b.dry for b in grid)  # the dry run rehearses the grid
