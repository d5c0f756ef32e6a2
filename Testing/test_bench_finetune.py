"""The fine-tune benchmark's paired comparison: a difference carried by one case gets an interval that
spans zero; a difference every case shares does not."""

from __future__ import annotations

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/bench_finetune.py")


def test_one_case_does_not_make_a_difference_certain(bench):
    low, high = bench.paired_interval([0.08, 0, 0, 0, 0, 0, 0, 0])
    assert low == pytest.approx(0.0) and high > 0.02


def test_a_shared_difference_is_certain(bench):
    low, high = bench.paired_interval([0.011, 0.009, 0.010, 0.012, 0.008, 0.010, 0.011, 0.009])
    assert 0.008 < low < 0.010 < high < 0.012


def test_summary_names_the_cases_each_side_wins(bench, capsys):
    rows = [{"method": "default", "shifted": 0.85, "shifted_cases": [0.9, 0.8], "step_s": 5.5},
            {"method": "supervised", "shifted": 0.84, "shifted_cases": [0.85, 0.83], "step_s": 5.0}]
    bench.print_summary({}, rows)
    out = capsys.readouterr().out
    assert "+1.00 Dice points" in out and "better on 1 of 2 cases" in out and "1.10x" in out


@pytest.mark.parametrize("unlabeled", [0, 12])
def test_a_site_without_unlabelled_scans_is_fine_tuned_without_the_flag(bench, monkeypatch, tmp_path, unlabeled):
    """`finetune --unlabeled` refuses an empty folder, so `--unlabeled 0` must not pass one."""
    import argparse
    import subprocess

    seen = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: seen.append(command) or
                        subprocess.CompletedProcess(command, 2, "", "stopped here"))
    args = argparse.Namespace(model="m", budget=600.0, device="cpu", overrides=[], unlabeled=unlabeled)
    run = bench.run_finetune("default", args, tmp_path, tmp_path / "site", tmp_path / "unlabeled")
    assert run["error"] == "exit 2: stopped here"
    assert ("--unlabeled" in seen[0]) == bool(unlabeled)
