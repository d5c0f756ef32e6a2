"""Pooling the whole-scan results' scout agreement over bench_finetune runs: each (acquisition, model, case) once,
results without an agreement left out, and a threshold's flagged and missed results counted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def pool():
    return load_script("bench/pool_scout_agreement.py")


def _run(path, site_seed, child, child_dice, child_agreement):
    """A bench_finetune --whole JSON: the same base scored at one site, and one fine-tune."""
    base = {"model": "/models/base-v1", "unshifted_cases": [0.9, 0.88], "shifted_cases": [0.8, 0.4],
            "unshifted_scout_agreement": [0.95, 0.93], "shifted_scout_agreement": [0.9, 0.5]}
    row = {"method": "default", "model_dir": f"/work/{child}/home/models/bench-default-v0.1.0",
           "shifted": float(np.mean(child_dice)), "shifted_cases": child_dice, "unshifted_cases": [0.9, 0.9],
           "shifted_scout_agreement": child_agreement, "unshifted_scout_agreement": [None, 0.96]}
    failed = {"method": "supervised", "error": "exit 2"}
    path.write_text(json.dumps({"shift": f"scanner (strength 1, seed {site_seed})", "whole": 448,
                                "validation": ["caseA", "caseB"], "base": base, "runs": [row, failed]}))
    return path


def test_a_model_scored_twice_counts_once(pool, tmp_path):
    runs = [pool.load_run(_run(tmp_path / f"s{seed}.json", 1, f"site1-s{seed}", [0.82, 0.3], [0.9, 0.2]))
            for seed in (3, 8)]
    results = pool.pooled_results(runs)
    # the base: 2 unshifted + 2 at the site, once; each child: 2 at the site + 1 unshifted with an agreement
    assert len(results) == 4 + 2 * 3
    assert {r["where"] for r in results} == {"unshifted", "scanner (strength 1, seed 1)"}
    other_site = pool.load_run(_run(tmp_path / "other.json", 2, "site2-s3", [0.8, 0.8], [0.9, 0.9]))
    assert len(pool.pooled_results(runs + [other_site])) == 10 + 2 + 3  # the base at another site counts again


def test_a_threshold_counts_what_it_flags_and_misses(pool):
    figures = np.array([0.9, 0.86, 0.7, 0.3, 0.78])
    agreements = np.array([0.95, 0.84, 0.8, 0.2, 0.9])
    text = pool.describe_cut(figures, agreements, 0.85, 0.80)
    assert "3 flagged" in text and "at most 0.860" in text and "1 of 0.85 or more" in text
    assert "2 not flagged, Dice at least 0.780" in text and "missed 1 of the 3 below 0.8" in text


def test_the_table_names_flagged_cases_by_run(pool, tmp_path, capsys):
    path = _run(tmp_path / "s3.json", 3, "site3-s3", [0.82, 0.01], [0.9, 0.21])
    assert pool.main([str(path), "--cuts", "0.85"]) == 0
    out = capsys.readouterr().out
    assert "7 results" in out and "below 0.85 (segment's): 2 flagged" in out
    assert "| site3-s3: bench-default-v0.1.0 | 2 | 0.4150 | 1 | caseB 0.01/0.21 | 0.21–0.90 |" in out
    with pytest.raises(SystemExit, match="no whole-scan result"):
        crops = tmp_path / "crops.json"
        crops.write_text(json.dumps({"shift": "x", "validation": ["a"], "runs": [],
                                     "base": {"model": "m", "shifted_cases": [0.9], "unshifted_cases": [0.9]}}))
        pool.main([str(crops)])
