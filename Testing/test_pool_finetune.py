"""Pooling fine-tune benchmark runs over training seeds: each case's difference is averaged over the runs of
one site before the interval is drawn, and runs that measured different things are not pooled."""

from __future__ import annotations

import json

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def pool():
    return load_script("bench/pool_finetune.py")


def bench_run(shift: str, default_cases, supervised_cases, validation=("a", "b", "c")) -> dict:
    def row(method, cases):
        return {"method": method, "shifted": sum(cases) / len(cases), "shifted_cases": list(cases),
                "recovered": 0.5, "unshifted_change": -0.004, "guard": {"verdict": "better or equal"}}
    return {"shift": shift, "whole": 0, "labeled": 4, "unlabeled": 12, "budget_s": 600.0, "tta": "flip",
            "validation": list(validation), "base": {"model": "/x/base-v0.1.0", "unshifted": 0.9, "shifted": 0.85},
            "runs": [row("default", default_cases), row("supervised", supervised_cases)]}


def write(tmp_path, name: str, run: dict):
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return path


def test_seeds_of_one_site_are_averaged_per_case(pool, tmp_path, capsys):
    one = write(tmp_path, "s1.json", bench_run("scanner", [0.90, 0.80, 0.70], [0.88, 0.80, 0.70]))
    two = write(tmp_path, "s2.json", bench_run("scanner", [0.90, 0.80, 0.70], [0.90, 0.78, 0.70]))
    pool.main([str(one), str(two)])
    out = capsys.readouterr().out
    assert "2 run(s)" in out
    # case a: +2 and 0 -> +1; case b: 0 and +2 -> +1; case c: 0 -> the mean over cases is +0.67 points
    assert "default vs supervised: +0.67 Dice points (runs: +0.67 +0.67)" in out
    assert "better on 2 of 3 cases" in out


def test_other_sites_are_other_groups_and_pooled_only_at_the_end(pool, tmp_path, capsys):
    one = write(tmp_path, "s.json", bench_run("scanner", [0.9, 0.8, 0.7], [0.9, 0.8, 0.7]))
    two = write(tmp_path, "p.json", bench_run("piecewise", [0.9, 0.8, 0.73], [0.9, 0.8, 0.7]))
    pool.main([str(one), str(two)])
    out = capsys.readouterr().out
    assert out.count("1 run(s)") == 2
    assert "all 2 groups, default vs supervised: +0.50 Dice points" in out and "of 6 cases" in out


def test_runs_that_scored_other_cases_are_refused(pool, tmp_path):
    one = write(tmp_path, "s1.json", bench_run("scanner", [0.9, 0.8, 0.7], [0.9, 0.8, 0.7]))
    two = write(tmp_path, "s2.json", bench_run("scanner", [0.9, 0.8, 0.7], [0.9, 0.8, 0.7], ("a", "b", "d")))
    with pytest.raises(SystemExit, match="different validation cases"):
        pool.main([str(one), str(two)])


def test_a_file_that_is_not_a_bench_run_is_named(pool, tmp_path):
    other = write(tmp_path, "other.json", {"dice": 0.9})
    with pytest.raises(SystemExit, match="other.json: not a bench_finetune.py --json file"):
        pool.main([str(other)])


def test_method_parameters_make_another_method_and_other_settings_another_group(pool, tmp_path, capsys):
    """`--set method_params.consistency=0` is a variant of the method, compared within its group; a run with
    `--set max_iterations=500` measured something else (its own group); a variant run alone is paired with
    the run of the same training seed."""
    plain = bench_run("scanner", [0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    plain["overrides"] = ["seed=2"]
    ablated = bench_run("scanner", [0.92, 0.8, 0.7], [0.9, 0.8, 0.7])
    ablated["overrides"] = ["seed=2", "method_params.consistency=0"]
    ablated["runs"] = ablated["runs"][:1]
    longer = bench_run("scanner", [0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    longer["overrides"], longer["device"] = ["seed=2", "max_iterations=500"], "cuda"
    files = [write(tmp_path, f"{name}.json", run) for name, run in (("a", plain), ("b", ablated), ("c", longer))]
    pool.main([str(f) for f in files])
    out = capsys.readouterr().out
    assert "flip, cpu: 2 run(s)" in out and "flip, cuda, --set max_iterations=500: 1 run(s)" in out
    assert "default[consistency=0] vs supervised: +0.67 Dice points" in out
