"""Pool several `bench_finetune.py --json` runs: is a fine-tune ahead of supervised-only over training seeds?

One run of the fine-tune benchmark scores 8 validation cases once; one training seed moves a fine-tune's site
Dice by about half a point (docs/results.md, "How much one training seed moves these figures"), which is the
size of the difference the issue asks about. So runs of the same site with other training seeds
(`--set seed=N`) are read together:

    python bench/pool_finetune.py RUN.json [RUN.json ...] [--against supervised]

Runs are grouped by what they measured (site family and strength, crops or whole scans, case counts, base
model, budget); in each group the table gives each fine-tune's mean over the runs, and the comparison with
`--against` gives every run's difference, the cases won after averaging each case over the runs, and a
bootstrap interval over the cases of those run-averaged differences. A last line pools every group's cases.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from semiseg_la.metrics import paired_interval


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench_finetune.py --json files")
    parser.add_argument("--against", default="supervised", help="the fine-tune the others are compared with")
    args = parser.parse_args(argv)
    groups = group_runs([load_run(path) for path in args.runs])
    pooled: Dict[str, List[float]] = defaultdict(list)
    for key, runs in groups.items():
        print_group(key, runs)
        for method, case_diffs in compare(runs, args.against).items():
            print_comparison(method, args.against, case_diffs, run_differences(runs, method, args.against))
            pooled[method].extend(case_diffs)
        print()
    if len(groups) > 1:
        for method, case_diffs in pooled.items():
            print_comparison(method, args.against, case_diffs, [], prefix=f"all {len(groups)} groups, ")
    return 0


def load_run(path: Path) -> Dict:
    run = json.loads(path.read_text())
    if "runs" not in run or "base" not in run:
        raise SystemExit(f"{path}: not a bench_finetune.py --json file")
    run["file"] = path.name
    return run


def group_key(run: Dict) -> Tuple:
    """What a run measured, apart from its training seed and its methods' parameters (see `method_label`)."""
    setting = tuple(sorted(o for o in run.get("overrides", []) if not _seed_or_method(o)))
    return (run["shift"], "whole scans" if run.get("whole") else "crops", run["labeled"], run["unlabeled"],
            Path(run["base"]["model"]).name, run["budget_s"], run.get("tta", "flip"), run.get("device", "cpu"),
            setting)


def method_label(run: Dict, method: str) -> str:
    """A fine-tune run with `--set method_params.X=...` is another method of its group: `default[X=...]`."""
    params = sorted(o.split(".", 1)[1] for o in run.get("overrides", []) if o.startswith("method_params."))
    return f"{method}[{','.join(params)}]" if params else method


def _seed_or_method(override: str) -> bool:
    return override.startswith(("seed=", "method_params."))


def group_runs(runs: Sequence[Dict]) -> Dict[Tuple, List[Dict]]:
    groups: Dict[Tuple, List[Dict]] = defaultdict(list)
    for run in runs:
        groups[group_key(run)].append(run)
    for key, members in groups.items():
        if len({tuple(r["validation"]) for r in members}) > 1:
            raise SystemExit(f"{key}: the runs scored different validation cases; pool them separately")
    return dict(groups)


def scored(run: Dict) -> Dict[str, Dict]:
    return {method_label(run, row["method"]): row for row in run["runs"] if "shifted" in row}


def print_group(key: Tuple, runs: List[Dict]) -> None:
    shift, kind, labeled, unlabeled, model, budget, tta, device, setting = key
    base = runs[0]["base"]
    print(f"{shift}, {kind}, {labeled} labelled + {unlabeled} unlabelled, base {model}, {budget:g} s, --tta {tta}, "
          f"{device}{''.join(f', --set {o}' for o in setting)}: {len(runs)} run(s) "
          f"({', '.join(r['file'] for r in runs)})")
    print(f"  base: {base['unshifted']:.4f} unshifted, {base['shifted']:.4f} at the site")
    methods = sorted({m for r in runs for m in scored(r)}, key=lambda m: (m != "default", m))
    for method in methods:
        rows = [scored(r)[method] for r in runs if method in scored(r)]
        better = sum(row.get("guard", {}).get("verdict", "").startswith("better") for row in rows)
        print(f"  {method:12s} site {mean(rows, 'shifted'):.4f}  recovered {100 * mean(rows, 'recovered'):5.1f}%  "
              f"unshifted {100 * mean(rows, 'unshifted_change'):+.2f}p  guard better in {better} of {len(rows)}  "
              f"(runs: {' '.join(format(row['shifted'], '.4f') for row in rows)})")


def mean(rows: Sequence[Dict], key: str) -> float:
    return float(np.mean([row[key] for row in rows]))


def compare(runs: Sequence[Dict], against: str) -> Dict[str, List[float]]:
    """Per method, each scored case's difference from `against`, averaged over the runs that have both."""
    result = {}
    for method in sorted({m for r in runs for m in scored(r)} - {against}):
        pairs = paired(runs, method, against)
        if pairs:
            diffs = np.mean([np.subtract(a["shifted_cases"], b["shifted_cases"]) for a, b in pairs], axis=0)
            result[method] = diffs.tolist()
    return result


def paired(runs: Sequence[Dict], method: str, against: str) -> List[Tuple[Dict, Dict]]:
    """(method, against) rows of each run that has the method: `against` from the same run, or else from a run
    of the group trained with the same seed (a run of one variant, `--methods default --set method_params...`)."""
    pairs = []
    for run in runs:
        rows = scored(run)
        if method not in rows:
            continue
        partner = rows if against in rows else next(
            (scored(r) for r in runs if training_seed(r) == training_seed(run) and against in scored(r)), None)
        if partner is not None:
            pairs.append((rows[method], partner[against]))
    return pairs


def training_seed(run: Dict) -> str:
    return next((o for o in run.get("overrides", []) if o.startswith("seed=")), "seed of the preset")


def run_differences(runs: Sequence[Dict], method: str, against: str) -> List[float]:
    return [a["shifted"] - b["shifted"] for a, b in paired(runs, method, against)]


def print_comparison(method: str, against: str, case_diffs: Sequence[float], run_diffs: Sequence[float],
                     prefix: str = "  ") -> None:
    diffs = np.asarray(case_diffs)
    low, high = paired_interval(diffs)
    per_run = [d for d in run_diffs if d == d]
    runs = f" (runs: {' '.join(f'{100 * d:+.2f}' for d in per_run)})" if per_run else ""
    print(f"{prefix}{method} vs {against}: {100 * diffs.mean():+.2f} Dice points{runs}; better on "
          f"{int((diffs > 0).sum())} of {diffs.size} cases averaged over the runs; 95 % interval "
          f"{100 * low:+.2f} to {100 * high:+.2f}")


if __name__ == "__main__":
    sys.exit(main())
