"""Build the compact training cache of the LA h5 release (see training/semiseg_la/io/la_cache.py).

    python scripts/build_la_cache.py ../shared/data/LA cache/la [--part-mib 12] [--spacing 1.25 1.25 1.25]
        [--normalization zscore-volume|stored] [--cases N] [--check]

Default: the source resolution (0.625 mm), lossless (uint8 indices + per-case lookup table, bzip2),
split into parts of at most --part-mib MiB so the device tool can carry them call by call.
With --spacing, the cases are stored prepared on that model grid instead (z-scored over the case and
resampled, exactly what `semiseg-la train` computes from the h5 files: the training input, bit for bit),
which is much smaller and still reads as a dataset. `--normalization stored` resamples without normalising:
for recipes that normalise otherwise (`standardized-zscore`), which then normalise the resampled case (close
to, not bit for bit, what they compute from the h5 files). The cache folder is git-ignored (`cache/`).
`--check` reads every case back and compares it with the source (the manifest's hashes are checked on
every read anyway). Prints a JSON summary: sizes in bytes and MiB, per part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from semiseg_la.io import la_cache
from semiseg_la.io.la_h5 import find_la_case, list_la_cases, read_case_list, read_la_h5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("la_root")
    parser.add_argument("output")
    parser.add_argument("--part-mib", type=float, default=12.0, help="largest part, MiB (default 12)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None,
                        help="store cases prepared on this model grid (mm) instead of at the source resolution")
    parser.add_argument("--normalization", choices=("zscore-volume", "stored"), default="zscore-volume",
                        help="with --spacing: z-score each case (the default recipe's training input) or keep its "
                             "stored intensities (for recipes that normalise otherwise)")
    parser.add_argument("--cases", type=int, default=None, help="only the first N cases (tests, rehearsals)")
    parser.add_argument("--check", action="store_true", help="read every case back and compare with the source")
    args = parser.parse_args(argv)
    root, out = Path(args.la_root), Path(args.output)
    ids = _case_ids(root)[: args.cases]
    part_bytes = int(args.part_mib * 2**20)
    t0 = time.perf_counter()
    if args.spacing is None:
        la_cache.build_from_h5(root, out, part_bytes, ids, progress=_progress)
    else:
        _build_prepared(root, out, ids, args.spacing, part_bytes, args.normalization)
    build_s = time.perf_counter() - t0
    if args.check:
        _check(root, out, ids, args.spacing)
    summary = la_cache.cache_summary(out)
    h5_bytes = sum(find_la_case(root, c).stat().st_size for c in ids)
    report = {"cache": str(out), "cases": summary["cases"], "spacing": summary["spacing"],
              "prepared": summary["prepared"], "total_bytes": summary["total_bytes"],
              "total_mib": round(summary["total_bytes"] / 2**20, 2),
              "per_case_mib": round(summary["total_bytes"] / 2**20 / max(1, summary["cases"]), 3),
              "h5_mib": round(h5_bytes / 2**20, 2), "build_s": round(build_s, 1),
              "parts": {k: {"mib": round(v["bytes"] / 2**20, 2), "cases": v["cases"]}
                        for k, v in summary["parts"].items()},
              "checked": bool(args.check)}
    print(json.dumps(report, indent=2))
    return 0


def _case_ids(root: Path):
    present = list_la_cases(root)
    ordered = read_case_list(root / "train.list") if (root / "train.list").is_file() else []
    return [c for c in ordered if c in present] + sorted(set(present) - set(ordered))


def _progress(i: int, n: int, case: str) -> None:
    print(f"[{i}/{n}] {case}", file=sys.stderr, flush=True)


def _build_prepared(root: Path, out: Path, ids, spacing, part_bytes: int, normalization: str) -> None:
    from semiseg_la.engine.data import prepare_case
    from semiseg_la.io.datasets import CaseRecord

    lists = {name: (root / name).read_text(encoding="utf-8") for name in ("train.list", "test.list")
             if (root / name).is_file()}
    writer = la_cache.CacheWriter(out, spacing, source=str(root), prepared=True, part_bytes=part_bytes)
    for i, case in enumerate(ids, 1):
        path = find_la_case(root, case)
        record = CaseRecord(case, (path,), path, "la_h5")
        prepared = prepare_case(record, spacing, with_label=True, normalization=normalization)
        writer.add(case, prepared.image[0], prepared.label, origin=_grid_origin(record, spacing))
        _progress(i, len(ids), case)
    note = ("cases z-scored and resampled to the model grid (training input)" if normalization == "zscore-volume"
            else "cases resampled to the model grid, stored intensities (normalised at training)")
    writer.close(lists, extra={"note": note, "normalization": normalization})


def _grid_origin(record, spacing):
    from semiseg_la.preprocess.resample import to_model_grid

    image, _ = record.load()
    _, grid = to_model_grid(image.with_array(np.zeros(image.shape, np.float32)), spacing)
    return grid.origin


def _check(root: Path, out: Path, ids, spacing) -> None:
    for case in ids:
        cached, cached_label = la_cache.read_cached_case(la_cache.case_path(out, case), case)
        if spacing is None:
            image, label = read_la_h5(find_la_case(root, case), case)
            same = (np.array_equal(cached.array.view(np.uint32), image.array.view(np.uint32))
                    and np.array_equal(cached_label.array, label.array))
            if not same:
                raise SystemExit(f"{case}: cached case differs from the source")
    print(f"checked {len(ids)} cases: identical to the source", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
