"""Is `segment`'s uncertainty warning worth its threshold? Pool the whole-scan results of `bench_finetune.py` runs.

On a whole scan `segment --region auto` computes two labels: the first pass that settles the region and the result
written; below `SCOUT_AGREEMENT_WARN` (cli/segment.py) the Dice between the two makes it warn that the result is
uncertain. `bench_finetune.py --whole` records that agreement beside each scored case's Dice (the reference is
known there). This reads such runs and says, for each threshold, how many results it flags, how good the flagged
and the unflagged ones were, and how many poor results it misses:

    python bench/pool_scout_agreement.py RUN.json [RUN.json ...] [--cuts 0.80 0.85 0.90] [--poor 0.80]

A model scored on the same scans in several runs (the base, in runs of one site with other training seeds; every
model's unshifted scans are the same canvases at every site) counts once. Crops, and a model that settles its own
region without a first pass, have no agreement and are left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pool_finetune import load_run  # noqa: E402

from semiseg_la.cli.segment import SCOUT_AGREEMENT_WARN  # noqa: E402

#: a result at or above this Dice is "good": a warning on it is a false alarm
GOOD_DICE = 0.85


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench_finetune.py --whole ... --json files")
    parser.add_argument("--cuts", nargs="+", type=float, default=[0.80, SCOUT_AGREEMENT_WARN, 0.90],
                        help=f"thresholds to compare (segment warns below {SCOUT_AGREEMENT_WARN:g})")
    parser.add_argument("--poor", type=float, default=0.80, help="a result below this Dice should be flagged")
    args = parser.parse_args(argv)
    results = pooled_results([load_run(path) for path in args.runs])
    if not results:
        raise SystemExit("no whole-scan result with a scout agreement in these runs (bench_finetune.py --whole)")
    figures = np.array([r["dice"] for r in results])
    agreements = np.array([r["agreement"] for r in results])
    print(f"{len(results)} results; rank correlation of agreement and Dice "
          f"{spearmanr(agreements, figures)[0]:.2f}")
    for cut in args.cuts:
        print(describe_cut(figures, agreements, cut, args.poor))
    print()
    print(format_table(results, SCOUT_AGREEMENT_WARN))
    return 0


def pooled_results(runs: Sequence[Dict]) -> List[Dict]:
    """Every scored whole scan with an agreement, once per (acquisition, model, case): dicts with where (the site,
    or "unshifted"), model, case, dice, agreement."""
    seen: Dict[Tuple, Dict] = {}
    for run in runs:
        for model, row in scored_models(run):
            for kind in ("unshifted", "shifted"):
                where = run["shift"] if kind == "shifted" else "unshifted"
                cases = zip(run["validation"], row.get(f"{kind}_cases", []),
                            row.get(f"{kind}_scout_agreement") or [])
                for case, value, agreement in cases:
                    if agreement is not None:
                        seen.setdefault((where, run.get("whole"), model, case), {
                            "where": where, "model": model, "case": case, "dice": float(value),
                            "agreement": float(agreement)})
    return list(seen.values())


def scored_models(run: Dict) -> List[Tuple[str, Dict]]:
    """(model, its figures) for the base and each fine-tune of a run that finished."""
    rows = [(run["base"]["model"], run["base"])]
    return rows + [(row["model_dir"], row) for row in run["runs"] if "shifted_cases" in row]


def describe_cut(figures: np.ndarray, agreements: np.ndarray, cut: float, poor: float) -> str:
    flagged = agreements < cut
    kept = figures[~flagged]
    mark = " (segment's)" if abs(cut - SCOUT_AGREEMENT_WARN) < 1e-9 else ""
    parts = [f"below {cut:.2f}{mark}: {int(flagged.sum())} flagged"]
    if flagged.any():
        parts.append(f"Dice {figures[flagged].mean():.3f} on average, at most {figures[flagged].max():.3f}; "
                     f"{int((figures[flagged] >= GOOD_DICE).sum())} of {GOOD_DICE:g} or more")
    parts.append(f"{kept.size} not flagged" + (f", Dice at least {kept.min():.3f}" if kept.size else ""))
    parts.append(f"missed {int((kept < poor).sum())} of the {int((figures < poor).sum())} below {poor:g}")
    return "; ".join(parts)


def format_table(results: Sequence[Dict], cut: float) -> str:
    """Markdown, one row per (site, model): results, mean Dice, those flagged below `cut`, agreement range."""
    groups: Dict[Tuple[str, str], List[Dict]] = {}
    for r in results:
        groups.setdefault((r["where"], r["model"]), []).append(r)
    lines = [f"| site | model | results | mean Dice | flagged (< {cut:g}) | flagged: case, Dice / agreement "
             "| agreement range |", "|---|---|---|---|---|---|---|"]
    for (where, model), rows in groups.items():
        flagged = [r for r in rows if r["agreement"] < cut]
        named = ", ".join(f"{r['case'][:6]} {r['dice']:.2f}/{r['agreement']:.2f}" for r in flagged) or "–"
        low, high = min(r["agreement"] for r in rows), max(r["agreement"] for r in rows)
        lines.append(f"| {where} | {model_name(model)} | {len(rows)} | {np.mean([r['dice'] for r in rows]):.4f} "
                     f"| {len(flagged)} | {named} | {low:.2f}–{high:.2f} |")
    return "\n".join(lines)


def model_name(model: str) -> str:
    """A fine-tune's model folder by its run (`<work>/home/models/<id>` -> `<work>: <id>`), a base by its id."""
    path = Path(model)
    if path.parent.name == "models" and path.parent.parent.name == "home":
        return f"{path.parents[2].name}: {path.name}"
    return path.name


if __name__ == "__main__":
    sys.exit(main())
