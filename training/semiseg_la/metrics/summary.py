"""Aggregation of per-case metrics into mean ± std with explicit missing counts (conventions.md point 9).

Means and standard deviations ignore NaN (nanmean / population nanstd) and every metric reports how
many cases were missing, so an empty prediction is visible instead of silently scored.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from .segmentation import METRIC_DEFINITIONS, METRIC_KEYS, is_missing

NAN = float("nan")
FLAG_KEYS = ("pred_empty",)

# key -> (row label, scale, number format); Dice/Jaccard shown in %, distances with units.
_DISPLAY: Dict[str, Tuple[str, float]] = {
    "dice": ("Dice (%)", 100.0),
    "jaccard": ("Jaccard (%)", 100.0),
    "hd95_mm": ("HD95 (mm)", 1.0),
    "asd_mm": ("ASSD (mm)", 1.0),
    "dice_legacy": ("Dice, LA-table (%)", 100.0),
    "jaccard_legacy": ("Jaccard, LA-table (%)", 100.0),
    "hd95_vox_legacy": ("95HD, LA-table (vox)", 1.0),
    "asd_vox_legacy": ("ASD, LA-table (vox)", 1.0),
}


def _metric_keys(cases: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """Known metrics in canonical order, then any extra numeric keys sorted; flags excluded."""
    present = {key for case in cases.values() for key in case if key not in FLAG_KEYS}
    return [k for k in METRIC_KEYS if k in present] + sorted(present - set(METRIC_KEYS))


def _values(cases: Mapping[str, Mapping[str, Any]], key: str) -> np.ndarray:
    """One float per case; absent or non-numeric entries become NaN."""
    return np.array([NAN if is_missing(case.get(key)) else float(case[key]) for case in cases.values()],
                    dtype=np.float64)


def _mean_std(values: np.ndarray) -> Tuple[float, float]:
    """NaN-aware mean and population std; NaN (without a warning) when nothing is present."""
    present = values[~np.isnan(values)]
    if present.size == 0:
        return NAN, NAN
    return float(np.mean(present)), float(np.std(present))


def summarize(cases: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """mean/std/n_missing per metric over cases (id -> evaluate_case dict), with definitions."""
    keys = _metric_keys(cases)
    mean: Dict[str, float] = {}
    std: Dict[str, float] = {}
    n_missing: Dict[str, int] = {}
    for key in keys:
        values = _values(cases, key)
        mean[key], std[key] = _mean_std(values)
        n_missing[key] = int(np.count_nonzero(np.isnan(values)))
    definitions = {k: METRIC_DEFINITIONS[k] for k in ("surface", *keys) if k in METRIC_DEFINITIONS}
    return {"n_cases": len(cases),
            "n_empty_predictions": sum(bool(case.get("pred_empty", False)) for case in cases.values()),
            "mean": mean, "std": std, "n_missing": n_missing,
            "std_kind": "population (ddof=0), NaN values excluded",
            "definitions": definitions}


def _cell(mean: float, std: float, scale: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean * scale:.2f} ± {std * scale:.2f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """Plain-text mean ± std table for logs and reports, followed by the definitions used."""
    n_cases = int(summary["n_cases"])
    rows = [(_DISPLAY.get(key, (key, 1.0))[0],
             _cell(summary["mean"][key], summary["std"][key], _DISPLAY.get(key, (key, 1.0))[1]),
             f"{summary['n_missing'][key]}/{n_cases}")
            for key in summary["mean"]]
    header = ("Metric", "mean ± std", "missing")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"{n_cases} cases, {summary['n_empty_predictions']} empty prediction(s); "
                 "means and std (population) ignore missing values.")
    lines += [f"  {key}: {text}" for key, text in summary.get("definitions", {}).items()]
    return "\n".join(lines)


def paired_interval(diffs, resamples: int = 10000, seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap (95 %) of the mean per-case difference between two models on the same cases: with
    a handful of cases one case can move the mean by a point, so a difference is read against this interval,
    not alone."""
    diffs = np.asarray(diffs, dtype=float)
    picks = np.random.default_rng(seed).integers(0, diffs.size, size=(resamples, diffs.size))
    means = diffs[picks].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
