"""Aggregation: NaN-aware mean/std, missing and empty counts, definitions, the text table."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from semiseg_la.metrics import METRIC_DEFINITIONS, evaluate_case, format_table, summarize

NAN = float("nan")


def _cases():
    return {
        "a": {"dice": 0.9, "hd95_mm": 2.0, "hd95_vox_legacy": 3.2, "pred_empty": False},
        "b": {"dice": 0.7, "hd95_mm": 4.0, "hd95_vox_legacy": 6.4, "pred_empty": False},
        "c": {"dice": 0.0, "hd95_mm": NAN, "hd95_vox_legacy": 0.0, "pred_empty": True},
    }


def test_summary_means_ignore_missing_and_std_is_population():
    summary = summarize(_cases())
    assert summary["n_cases"] == 3 and summary["n_empty_predictions"] == 1
    assert summary["mean"]["dice"] == pytest.approx(1.6 / 3)
    assert summary["std"]["dice"] == pytest.approx(np.std([0.9, 0.7, 0.0]))
    assert summary["mean"]["hd95_mm"] == pytest.approx(3.0)
    assert summary["std"]["hd95_mm"] == pytest.approx(1.0)  # population std of {2, 4}
    assert summary["n_missing"] == {"dice": 0, "hd95_mm": 1, "hd95_vox_legacy": 0}
    assert summary["mean"]["hd95_vox_legacy"] == pytest.approx(3.2)  # legacy keeps the flattering 0


def test_summary_keys_and_definitions():
    summary = summarize(_cases())
    assert list(summary["mean"]) == ["dice", "hd95_mm", "hd95_vox_legacy"]  # canonical order, no flags
    for key in ("dice", "hd95_mm", "hd95_vox_legacy", "surface"):
        assert summary["definitions"][key] == METRIC_DEFINITIONS[key]


def test_absent_key_counts_as_missing():
    summary = summarize({"a": {"dice": 0.8}, "b": {"dice": 0.6, "asd_mm": 1.5}})
    assert summary["n_missing"]["asd_mm"] == 1
    assert summary["mean"]["asd_mm"] == pytest.approx(1.5) and summary["std"]["asd_mm"] == 0.0


def test_all_missing_metric_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = summarize({"a": {"asd_mm": NAN}, "b": {"asd_mm": NAN}})
    assert math.isnan(summary["mean"]["asd_mm"]) and math.isnan(summary["std"]["asd_mm"])
    assert summary["n_missing"]["asd_mm"] == 2
    assert "n/a" in format_table(summary)


def test_summary_of_evaluate_case_output():
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[2:6, 2:6, 2:6] = 1
    cases = {"same": evaluate_case(gt, gt, (0.625,) * 3), "empty": evaluate_case(0 * gt, gt, (0.625,) * 3)}
    summary = summarize(cases)
    assert summary["mean"]["dice"] == pytest.approx(0.5)
    assert summary["mean"]["hd95_mm"] == 0.0 and summary["n_missing"]["hd95_mm"] == 1
    assert summary["n_missing"]["hd95_vox_legacy"] == 0 and summary["n_empty_predictions"] == 1


def test_format_table_units_and_percent():
    table = format_table(summarize(_cases()))
    assert "Dice (%)" in table and "53.33 ± " in table
    assert "HD95 (mm)" in table and "3.00 ± 1.00" in table and "1/3" in table
    assert "(vox)" in table
    assert "1 empty prediction" in table
    assert METRIC_DEFINITIONS["hd95_mm"] in table


def test_one_case_does_not_make_a_paired_difference_certain():
    from semiseg_la.metrics import paired_interval

    low, high = paired_interval([0.08, 0, 0, 0, 0, 0, 0, 0])
    assert low == pytest.approx(0.0) and high > 0.02


def test_a_paired_difference_every_case_shares_is_certain():
    from semiseg_la.metrics import paired_interval

    low, high = paired_interval([0.011, 0.009, 0.010, 0.012, 0.008, 0.010, 0.011, 0.009])
    assert 0.008 < low < 0.010 < high < 0.012
