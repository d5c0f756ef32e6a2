"""The GPU session of issue 12 as one rehearsed command: measure the GPU paths, train the release models.

    python3 scripts/gpu_run.py run OUTDIR [--dry-run] [--pack DIR] [--data cache/la] [--budget 540]
        [--jobs release|sites] [--finetune seeds|more|ema] [--skip STEP ...]
    python3 scripts/gpu_run.py unpack DIR OUTDIR     # here, on what the device tool brought back
    python3 scripts/gpu_run.py plan [--data cache/la] # the device-tool calls that carry cache and SimpleITK
    python3 scripts/gpu_run.py deps                   # .whl/simpleitk-*.tar.xz from a downloaded wheel

`run` (what scripts/gpu_run.sh calls) works through these steps in order. Each is a child process with a
time box cut to what is left of `--budget` seconds, and a failure is logged and skipped, never fatal:

1. setup: SimpleITK from `.whl/` when the machine lacks it, `pip install -e training` (no network, no deps);
2. env + cuda-tests: torch, CUDA, GPU name and memory (env.json), then `pytest -m cuda`;
3. bench: `bench/bench_train.py` per preset (it/s, peak memory, projected full runs) -> bench/train.json,
   and `bench/bench_loader.py` (the step without and with the loader thread) -> bench/loader.json;
4. segment: `semiseg-la segment` on a 576 x 576 x 88 scan built around a validation case -> segment.json;
5. train: the default clinical model (supervised-la-cpu recipe at 1.25 mm, schedule fitted to the time left)
   and caml-la-8, concurrently on one GPU, each with `--time-budget` (the whole command fits it); each export
   is copied into OUTDIR/models/<id> as fp16 shards below 16 MiB as soon as its process ends, and a run
   cut off before its export is exported from its last checkpoint when time allows. `--jobs sites` trains
   instead the bundled default pair further with its recipe (three fine-tunes, loader processes each).
6. finetune (with --finetune GRID; issue 10): a grid of `bench/bench_finetune.py` runs, all at once on the GPU,
   the host's cores shared out, each JSON rewritten after every fine-tune; `bench/pool_finetune.py` reads them
   into OUTDIR/finetune/pool.txt. Reads a source-resolution cache of the site and validation cases.
7. pack (with --pack DIR): OUTDIR as a tar.gz in at most 7 parts below 15 MiB plus a manifest (the device
   tool returns 8 files of 16 MiB at most); `unpack` rebuilds OUTDIR from them.

`--skip` leaves steps out. `--dry-run` runs every step with tiny sizes on the CPU (a synthetic cache unless
--data is given), so the real run needs no edit. This file imports only the standard library; the steps run
in child processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CLI = [PY, "-m", "semiseg_la.cli.main"]
MiB = 2**20
PACK_RESERVE_S = 15.0          # kept at the end for the fp16 copies' bookkeeping and the pack
PART_BYTES = 15 * MiB          # returned files stay below the device tool's 16 MiB
MAX_RETURN_FILES = 8
MAX_RETURN_BYTES = 60 * MiB    # of the device tool's 64 MiB together
SHARD_BYTES = 15 * MiB         # fp16 safetensors shards
BENCH_PRESETS = ["supervised-la-8", "mean-teacher-la-8", "caml-la-8", "crln-la-8", "semicml-la-8",
                 "supervised-la-cpu"]
FULL_SCAN = (576, 576, 88)
DRY_SCAN = (96, 96, 40)


@dataclasses.dataclass
class TrainJob:
    """One model: a preset, the model name, the flags of the real and the dry run, and, for a fine-tune,
    the bundled parent it continues. `host_bound`: its batches are made on the host (simulated sites,
    wide-FOV canvases), so it gets loader processes (`loader_workers`) from the machine's cores."""

    name: str
    preset: str
    real: List[str]
    dry: List[str]
    parent: Optional[str] = None
    host_bound: bool = False

    def command(self) -> List[str]:
        if self.parent:
            return ["finetune", "--from", self.parent, "--preset", self.preset]
        return ["train", "--preset", self.preset]


DRY_TRAIN = ["--iterations", "2", "--patch", "32", "32", "32", "--set", "validate_every=1000",
             "--set", "checkpoint_every=1"]

# release (issue 12): the default clinical model first (issue 13's recipe, at 1.25 mm: a perfect 1.25 mm model
# still scores Dice 0.993 at 0.625 mm, and 8x fewer voxels buy 8x more iterations in the window), then caml-la-8.
RELEASE_JOBS = [
    TrainJob("supervised-la-gpu", "supervised-la-cpu",
             ["--iterations", "20000", "--set", "validate_every=1000", "--set", "checkpoint_every=500"],
             [*DRY_TRAIN, "--labeled", "3", "--val", "1"]),
    TrainJob("caml-la-8-gpu", "caml-la-8",
             ["--set", "checkpoint_every=200"],
             [*DRY_TRAIN, "--labeled", "2", "--val", "1"]),
]

# sites (issue 10): the bundled default pair trained further with its own recipe (simulated sites on 0.8 of
# the samples, up to four families; wide-FOV canvases), the validation run with and without the site met over
# the whole canvas, and the 80-case model with it. Needs a cache of stored intensities
# (`build_la_cache.py --spacing 1.25 1.25 1.25 --normalization stored`): the recipe standardises.
SITES_RECIPE = ["--lr", "0.003", "--set", "site_shift_prob=0.8", "--set", "site_shift_max_families=4",
                "--set", "wide_fov_prob=0.5", "--set", "wide_fov_decoy_prob=0.3",
                "--set", "wide_fov_intensities=stored", "--set", "wide_fov_region_mm=[5,25]",
                "--set", "normalization=standardized-zscore"]
SITES_REAL = [*SITES_RECIPE, "--iterations", "20000", "--set", "validate_every=1000", "--set", "checkpoint_every=250"]
SITES_DRY = [*SITES_RECIPE, *DRY_TRAIN]
CANVAS = ["--set", "site_shift_on_canvas=true"]
SITES_JOBS = [
    TrainJob("canvas-sites-gpu", "supervised-la-cpu", [*SITES_REAL, *CANVAS, "--labeled", "72", "--val", "8"],
             [*SITES_DRY, *CANVAS, "--labeled", "3", "--val", "1"], "supervised-la-cpu-sites-v0.1.0", True),
    TrainJob("sites-gpu", "supervised-la-cpu", [*SITES_REAL, "--labeled", "72", "--val", "8"],
             [*SITES_DRY, "--labeled", "3", "--val", "1"], "supervised-la-cpu-sites-v0.1.0", True),
    TrainJob("canvas-all-sites-gpu", "supervised-la-cpu", [*SITES_REAL, *CANVAS, "--labeled", "80", "--val", "0"],
             [*SITES_DRY, *CANVAS, "--labeled", "4", "--val", "0"], "supervised-la-cpu-all-sites-v0.1.0", True),
]

JOB_SETS = {"release": RELEASE_JOBS, "sites": SITES_JOBS}


@dataclasses.dataclass
class FinetuneBench:
    """One `bench/bench_finetune.py` run of a grid: its name (the JSON's) and its flags, real and dry."""

    name: str
    real: List[str]
    dry: List[str]


# seeds (issue 10): does the button's semi-supervised fine-tune beat supervised-only at the `scanner` site, over
# eight training seeds instead of three (the 50-iteration button, which a GPU runs as a CPU does, only faster),
# and does it with 10 times the iterations, where a GPU user could afford them (with the consistency weight at 0
# beside it: what the unlabelled scans add)? Needs a source-resolution cache holding the site's 16 cases and the
# 8 validation cases, in train.list order (README, "GPU run"). At a site twice as far (`--strength 2`) the parent's
# predictions on the unlabelled scans are poorer: the long runs there too.
SITE = ["--shift", "scanner", "--budget", "420"]
DRY_SITE = ["--shift", "scanner", "--budget", "150", "--labeled", "3", "--unlabeled", "1", "--val", "1",
            "--set", "max_iterations=2"]
BOTH = ["--methods", "default", "supervised"]
LONG = ["--set", "max_iterations=500"]
WITHOUT_CONSISTENCY = ["--methods", "default", "--set", "method_params.consistency=0"]
FAR = ["--strength", "2"]
SEEDS_GRID = (
    [FinetuneBench(f"button-s{seed}", [*SITE, *BOTH, "--set", f"seed={seed}"],
                   [*DRY_SITE, *BOTH, "--set", f"seed={seed}"] if seed == 1337 else [])
     for seed in (1337, 2, 3, 4, 5, 6, 7, 8)]
    + [FinetuneBench(f"long-s{seed}", [*SITE, *BOTH, *LONG, "--set", f"seed={seed}"], []) for seed in (1337, 2, 3)]
    + [FinetuneBench(f"long-c0-s{seed}", [*SITE, *WITHOUT_CONSISTENCY, *LONG, "--set", f"seed={seed}"],
                     [*DRY_SITE, *WITHOUT_CONSISTENCY, "--set", f"seed={seed}"] if seed == 1337 else [])
       for seed in (1337, 2, 3)]
    + [FinetuneBench(f"far-long-s{seed}", [*SITE, *FAR, *BOTH, *LONG, "--set", f"seed={seed}"], [])
       for seed in (1337, 2)]
)
# more (issue 10, after `seeds`): the button at the far site over eight training seeds, the far site's long runs
# without the consistency weight (what its unlabelled scans add there), six more seeds of the button at `scanner`.
MORE_GRID = (
    [FinetuneBench(f"far-button-s{seed}", [*SITE, *FAR, *BOTH, "--set", f"seed={seed}"],
                   [*DRY_SITE, *FAR, *BOTH, "--set", f"seed={seed}"] if seed == 1337 else [])
     for seed in (1337, 2, 3, 4, 5, 6, 7, 8)]
    + [FinetuneBench(f"far-long-c0-s{seed}", [*SITE, *FAR, *WITHOUT_CONSISTENCY, *LONG, "--set", f"seed={seed}"], [])
       for seed in (1337, 2)]
    + [FinetuneBench(f"button-s{seed}", [*SITE, *BOTH, "--set", f"seed={seed}"], []) for seed in range(9, 15)]
)
# ema (issue 10, after `more`): where the button's lead over supervised-only comes from. Without unlabelled scans
# the mean teacher trains on labelled patches alone (4 a step, as supervised-only) and still exports its EMA
# teacher: supervised-only with an averaged export. At `scanner` and at the far site, eight seeds each.
NO_UNLABELLED = ["--unlabeled", "0"]
EMA_GRID = [FinetuneBench(f"{where}ema-s{seed}", [*SITE, *site, *NO_UNLABELLED, *BOTH, "--set", f"seed={seed}"],
                          [*DRY_SITE, *site, *NO_UNLABELLED, *BOTH, "--set", f"seed={seed}"] if seed == 1337 else [])
            for where, site in (("", []), ("far-", FAR)) for seed in (1337, 2, 3, 4, 5, 6, 7, 8)]
FINETUNE_GRIDS = {"seeds": SEEDS_GRID, "more": MORE_GRID, "ema": EMA_GRID}
STEPS = ("setup", "env", "cuda-tests", "bench", "loader", "segment", "train", "finetune")


# ---- the session ---------------------------------------------------------------------------------
class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = bool(args.dry_run)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + float(args.budget)
        self.out = Path(args.outdir).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or (tempfile.mkdtemp(prefix="semiseg-gpu-dry-") if self.dry
                                       else "/tmp/semiseg-gpu-work")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.site = self.work / "site"
        self.data: Optional[Path] = Path(args.data).resolve() if args.data else None
        self.steps: List[Dict[str, Any]] = []
        self.device = "cpu" if self.dry else "auto"
        self.cuda = False
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["SEMISEG_LA_HOME"] = str(self.work / "home")  # exports land here; no user catalog is read
        self._set_pythonpath()
        self.main_log = open(self.logs / "gpu_run.log", "a", encoding="utf-8")  # noqa: SIM115 - the session's

    # -- bookkeeping ------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {message}"
        print(line, flush=True)
        self.main_log.write(line + "\n")
        self.main_log.flush()

    def left(self) -> float:
        """Seconds left for steps (the pack's reserve excluded)."""
        return self.deadline - time.monotonic() - PACK_RESERVE_S

    def _set_pythonpath(self) -> None:
        paths = [str(REPO / "training")]
        if self.site.is_dir():
            paths.insert(0, str(self.site))
        old = self.env.get("PYTHONPATH", "")
        self.env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))

    def step(self, name: str, fn, *args) -> None:
        started = time.monotonic()
        self.say(f"== {name}")
        record: Dict[str, Any] = {"step": name}
        try:
            detail = fn(*args) or {}
            record.update(status=detail.pop("status", "ok"), **detail)
        except Exception as exc:  # noqa: BLE001 - a failed step is logged and skipped, never fatal
            record.update(status="failed", error=f"{exc.__class__.__name__}: {exc}")
            (self.logs / f"{name}.traceback.log").write_text(traceback.format_exc(), encoding="utf-8")
        record["seconds"] = round(time.monotonic() - started, 1)
        self.steps.append(record)
        self.say(f"-- {name}: {record['status']} in {record['seconds']} s"
                 + (f" ({record['error']})" if record.get("error") else ""))
        self.write_summary()

    def write_summary(self) -> None:
        summary = {"dry_run": self.dry, "budget_s": self.args.budget,
                   "elapsed_s": round(time.monotonic() - self.t0, 1), "data": str(self.data) if self.data else None,
                   "steps": self.steps}
        _write_json(self.out / "summary.json", summary)

    # -- child processes -----------------------------------------------------------------------------
    def start(self, cmd: Sequence[str], log: Path, env: Optional[Dict[str, str]] = None,
              cwd: Optional[Path] = None) -> subprocess.Popen:
        handle = open(log, "a", encoding="utf-8")  # noqa: SIM115 - closed by finish()
        handle.write(f"$ {' '.join(map(str, cmd))}\n")
        handle.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=handle, stderr=subprocess.STDOUT,
                                env=env or self.env, cwd=str(cwd or REPO), start_new_session=True)
        proc.log_handle = handle  # type: ignore[attr-defined]
        return proc

    def call(self, cmd: Sequence[str], log: Path, timeout: float, env: Optional[Dict[str, str]] = None,
             cwd: Optional[Path] = None) -> Dict[str, Any]:
        """Run to completion or to `timeout` (cut to the time left); rc None when it was stopped."""
        limit = min(timeout, self.left())
        if limit < 3:
            return {"rc": None, "timed_out": True, "skipped": "no time left"}
        proc = self.start(cmd, log, env, cwd)
        return finish(proc, limit)


def finish(proc: subprocess.Popen, timeout: float) -> Dict[str, Any]:
    started = time.monotonic()
    try:
        rc = proc.wait(timeout=max(timeout, 0.1))
        timed_out = False
    except subprocess.TimeoutExpired:
        stop(proc)
        rc, timed_out = None, True
    proc.log_handle.close()  # type: ignore[attr-defined]
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(time.monotonic() - started, 1)}


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the child's own process group, then SIGKILL (the child is a session leader)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---- steps ---------------------------------------------------------------------------------------
def step_setup(s: Session) -> Dict[str, Any]:
    detail: Dict[str, Any] = {}
    mods = ["torch", "numpy", "SimpleITK", "skimage", "scipy", "h5py", "safetensors", "yaml", "tqdm", "semiseg_la"]
    missing = _missing_modules(s, mods)
    if "SimpleITK" in missing:
        detail["simpleitk"] = install_simpleitk(s)
        s._set_pythonpath()
    if s.dry:
        detail["pip"] = "dry run: nothing installed (PYTHONPATH=training)"
    else:
        res = s.call([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                      "-e", str(REPO / "training")], s.logs / "setup.log", 150)
        detail["pip"] = "installed -e training" if res["rc"] == 0 else f"pip failed ({res}); using PYTHONPATH"
    if missing:
        missing = _missing_modules(s, mods)
    detail["missing_modules"] = missing
    if missing:
        detail["status"] = "failed"
        detail["error"] = "missing Python modules: " + ", ".join(missing)
    return detail


def install_simpleitk(s: Session) -> str:
    """SimpleITK into WORK/site: from .whl/simpleitk-*.tar.xz (see `deps`) or a wheel in .whl/."""
    packed = sorted((REPO / ".whl").glob("simpleitk-*.tar.xz"))
    wheels = sorted((REPO / ".whl").glob("[Ss]imple[Ii][Tt][Kk]-*.whl"))
    s.site.mkdir(parents=True, exist_ok=True)
    parts = sorted((REPO / ".whl").glob("simpleitk-*.tar.xz.[0-9][0-9]"))
    if not packed and parts:  # carried in parts, call by call (`deps --part-mib`)
        joined = s.work / parts[0].name[:-3]
        with open(joined, "wb") as whole:
            for part in parts:
                whole.write(part.read_bytes())
        packed = [joined]
    if packed:
        with tarfile.open(packed[-1], "r:xz") as archive:
            _safe_extract(archive, s.site)
        return f"unpacked {packed[-1].name} into {s.site}"
    if wheels:
        res = s.call([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
                      str(s.site), str(wheels[-1])], s.logs / "setup.log", 120)
        return f"pip install {wheels[-1].name}: rc {res['rc']}"
    return "SimpleITK missing and no .whl/simpleitk-*.tar.xz or wheel to install"


def _missing_modules(s: Session, modules: Sequence[str]) -> List[str]:
    """The modules a child Python (with the session's PYTHONPATH) cannot import."""
    code = "\n".join(["import importlib, json", "missing = []", f"for name in {list(modules)!r}:",
                      "    try:", "        importlib.import_module(name)", "    except Exception:",
                      "        missing.append(name)", "print(json.dumps(missing))"])
    try:
        proc = subprocess.run([PY, "-c", code], env=s.env, cwd=str(REPO), capture_output=True, text=True,
                              timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return list(modules)


def step_env(s: Session) -> Dict[str, Any]:
    res = s.call([PY, __file__, "env", s.out / "env.json"], s.logs / "env.log", 60)
    if shutil.which("nvidia-smi"):
        s.call(["nvidia-smi"], s.logs / "nvidia-smi.log", 20)
    info = _read_json(s.out / "env.json") or {}
    s.cuda = bool(info.get("cuda_available"))
    if s.cuda and not s.dry:
        s.device = "cuda"
    return {"rc": res["rc"], "cuda": s.cuda, "gpu": info.get("gpu_name"), "torch": info.get("torch")}


def step_cuda_tests(s: Session) -> Dict[str, Any]:
    files = sorted(p.name for p in (REPO / "Testing").glob("test_*.py")
                   if "mark.cuda" in p.read_text(encoding="utf-8", errors="replace"))
    if not files:
        return {"status": "skipped", "error": "no test carries the cuda marker"}
    log = s.logs / "cuda-tests.log"
    res = s.call([PY, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                  f"--junitxml={s.logs / 'cuda-tests.xml'}", *files], log, 150, cwd=REPO / "Testing")
    last = _last_line(log, ("passed", "skipped", "failed", "error", "deselected", "no tests"))
    return {"status": "ok" if res["rc"] in (0, 5) else "failed", "rc": res["rc"], "files": files, "result": last}


def step_bench(s: Session) -> Dict[str, Any]:
    out = s.out / "bench" / "train.json"
    if s.dry:
        extra = ["--patch", "32", "32", "32", "--steps", "1", "--warmup", "0", "--seconds", "0"]
    else:
        extra = ["--steps", "5", "--warmup", "3", "--seconds", str(s.args.bench_seconds)]
    cmd = [PY, REPO / "bench" / "bench_train.py", "--presets", *BENCH_PRESETS, *extra, "--json", out,
           "--device", s.device]
    timeout = len(BENCH_PRESETS) * (float(s.args.bench_seconds) + 15) + 30 if not s.dry else 240
    res = s.call(cmd, s.logs / "bench.log", timeout)
    report = _read_json(out)
    if report is None:
        return {"status": "failed", "error": f"no bench JSON ({res})"}
    rows = {r["label"]: {k: r.get(k) for k in ("it_per_s", "peak_mib", "projected_min", "error")}
            for r in report.get("rows", [])}
    return {"status": "ok" if res["rc"] == 0 else "failed", "rc": res["rc"], "rows": rows}


def step_loader(s: Session) -> Dict[str, Any]:
    """bench/bench_loader.py: the training step without and with the loader thread (issue 16)."""
    out = s.out / "bench" / "loader.json"
    sizes = (["--iterations", "1", "--cases", "2", "--workers", "1"] if s.dry
             else ["--iterations", "30", "--workers", str(max(1, (os.cpu_count() or 2) // 2 - 1)),
                   "--site-shift", "0.8", "--wide-fov", "0.5"])
    cmd = [PY, REPO / "bench" / "bench_loader.py", "--device", s.device, *sizes, "--json", out]
    res = s.call(cmd, s.logs / "loader.log", 240 if s.dry else 120)
    report = _read_json(out)
    if report is None:
        return {"status": "failed", "error": f"no loader JSON ({res})"}
    return {"status": "ok" if res["rc"] == 0 else "failed", "rc": res["rc"], "ratio": report.get("ratio"),
            **{k: report.get(k) for k in ("host_batch_s", "plain_s_per_it", "prefetch_s_per_it", "workers",
                                          "workers_s_per_it")}}


def step_segment(s: Session) -> Dict[str, Any]:
    shape = DRY_SCAN if s.dry else FULL_SCAN
    folder = s.work / "segment"
    folder.mkdir(parents=True, exist_ok=True)
    scan, label, seg = folder / "scan.nrrd", folder / "scan-label.nrrd", folder / "scan-seg.nrrd"
    build = [PY, __file__, "scan", scan, label, "--shape", *map(str, shape)]
    if s.data is not None:
        build += ["--data", str(s.data)]
    res = s.call(build, s.logs / "segment.log", 120)
    if res["rc"] != 0:
        return {"status": "failed", "error": f"could not build the scan ({res})"}
    runs = []
    for _ in range(1 if s.dry else 3):
        log = s.logs / "segment.log"
        out_json = folder / "segment-out.jsonl"
        cmd = [*CLI, "segment", scan, "-o", seg, "--device", s.device, "--progress", "json"]
        t0 = time.monotonic()
        proc = s.start(cmd, out_json, cwd=REPO)
        result = finish(proc, min(120, s.left()))
        done = _last_record(out_json, "done")
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(out_json.read_text(encoding="utf-8", errors="replace"))
        out_json.unlink()
        runs.append({"wall_s": round(time.monotonic() - t0, 2), "rc": result["rc"],
                     **({k: done.get(k) for k in ("device", "fell_back_to_cpu", "timings", "voxels", "warnings")}
                        if done else {})})
        if result["rc"] != 0:
            break
    report = {"shape": list(shape), "runs": runs, "scan": _read_json(folder / "scan.json")}
    if seg.is_file():
        report["agreement"] = _json_from(s, [PY, __file__, "dice", seg, label], s.logs / "segment.log")
    _write_json(s.out / "segment.json", report)
    ok = bool(runs) and all(r["rc"] == 0 for r in runs)
    return {"status": "ok" if ok else "failed", "runs": [{k: r.get(k) for k in ("wall_s", "rc", "device")}
                                                         for r in runs],
            "dice": (report.get("agreement") or {}).get("dice")}


def step_train(s: Session) -> Dict[str, Any]:
    data = _training_data(s)
    check = _json_from(s, [PY, __file__, "check-data", data], s.logs / "train.log")
    if not check or not check.get("ok"):
        return {"status": "failed", "error": f"training data not usable: {(check or {}).get('error', 'unknown')}"}
    env = dict(s.env)
    cores = os.cpu_count() or 1
    parallel = not s.args.no_parallel
    jobs = JOB_SETS[s.args.jobs]
    share = max(1, cores // len(jobs)) if parallel else cores
    if parallel and not s.dry:
        env["OMP_NUM_THREADS"] = str(share)
    margin = 20.0 if s.dry else 40.0  # past the budget before a child is stopped (it ends its export)
    salvage_s = 0.0 if s.dry else 35.0  # kept for exporting a stopped run's last checkpoint
    results: Dict[str, Any] = {}
    pending = list(jobs)
    running: List[tuple] = []
    while pending or running:
        while pending and (parallel or not running):
            job = pending.pop(0)
            budget = s.left() - margin - salvage_s
            if not parallel:
                budget = budget / (len(pending) + 1)
            if budget < (20 if s.dry else 60):
                results[job.name] = {"status": "skipped", "error": f"only {budget:.0f} s left"}
                continue
            run_dir = s.work / "runs" / job.name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            workers = (1 if s.dry else max(1, share - 1)) if job.host_bound else 0
            cmd = [*CLI, *job.command(), "--data", data, "--output", run_dir, "--name", job.name,
                   "--device", s.device, "--time-budget", f"{budget:.0f}", "--set", "fit_to_budget=true",
                   "--set", "device_data=true", "--set", f"loader_workers={workers}", "--progress", "json",
                   *(job.dry if s.dry else job.real)]
            s.say(f"train {job.name}: {' '.join(job.command())}, budget {budget:.0f} s, {workers} loader processes")
            proc = s.start(cmd, s.logs / f"train-{job.name}.log", env)
            running.append((job, proc, time.monotonic() + budget + margin, run_dir, cmd))
        time.sleep(0.5)
        for item in list(running):
            job, proc, until, run_dir, cmd = item
            if proc.poll() is None and time.monotonic() < until:
                continue
            running.remove(item)
            result = finish(proc, max(0.1, until - time.monotonic()))
            results[job.name] = collect_model(s, job, result, run_dir, cmd, env)
    _write_json(s.out / "train.json", results)
    ok = all(r.get("model") for r in results.values())
    return {"status": "ok" if ok else "failed", "models": {k: v.get("model") for k, v in results.items()},
            **({} if ok else {"error": "; ".join(f"{k}: {v.get('error')}" for k, v in results.items()
                                                 if not v.get("model"))})}


def step_finetune(s: Session) -> Dict[str, Any]:
    """The grid's fine-tune benchmarks all at once on the one GPU, the cores shared out; each writes its JSON after
    every fine-tune, so one stopped at the deadline keeps what it finished. Then pool_finetune.py reads them."""
    if not s.args.finetune:
        return {"status": "skipped", "note": "no --finetune GRID asked"}
    data = _training_data(s)
    benches = [b for b in FINETUNE_GRIDS[s.args.finetune] if (b.dry if s.dry else b.real)]
    out = s.out / "finetune"
    out.mkdir(parents=True, exist_ok=True)
    env = dict(s.env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // len(benches))))
    limit = s.left() - 20.0  # kept for the pooling
    running = []
    for bench in benches:
        work = s.work / "finetune" / bench.name
        shutil.rmtree(work, ignore_errors=True)
        cmd = [PY, REPO / "bench" / "bench_finetune.py", "--data", data, "--device", s.device, "--work", work,
               "--json", out / f"{bench.name}.json", *(bench.dry if s.dry else bench.real)]
        running.append((bench, s.start(cmd, s.logs / f"finetune-{bench.name}.log", env)))
    s.say(f"finetune: {len(running)} benchmarks started, {env['OMP_NUM_THREADS']} thread(s) each, {limit:.0f} s")
    until = time.monotonic() + limit
    results = {bench.name: finish(proc, max(1.0, until - time.monotonic())) for bench, proc in running}
    runs = sorted(out.glob("*.json"))
    if runs:
        s.call([PY, REPO / "bench" / "pool_finetune.py", *runs], out / "pool.txt", 15)
    finished = {name: sum(1 for row in (_read_json(out / f"{name}.json") or {}).get("runs", []) if "shifted" in row)
                for name in results}
    ok = all(r["rc"] == 0 for r in results.values())
    return {"status": "ok" if ok else "failed", "fine_tunes_scored": finished,
            **({} if ok else {"error": "; ".join(f"{k}: {v}" for k, v in results.items() if v["rc"] != 0)})}


def collect_model(s: Session, job: TrainJob, result: Dict[str, Any], run_dir: Path, cmd: List[str],
                  env: Dict[str, str]) -> Dict[str, Any]:
    """The finished (or stopped) run's export as fp16 shards in OUTDIR/models; salvage when it has none."""
    log = s.logs / f"train-{job.name}.log"
    done = _last_record(log, "done")
    record: Dict[str, Any] = {"rc": result["rc"], "timed_out": result["timed_out"], "wall_s": result.get("wall_s")}
    if done:
        record.update({k: done.get(k) for k in ("iterations", "stopped_early", "best_iteration", "model_id")})
        record["validation_dice"] = (done.get("validation") or {}).get("dice")
    model_dir = done.get("model_dir") if done else None
    if not model_dir and (run_dir / "checkpoints" / "last.pt").is_file() and s.left() > 40:
        s.say(f"train {job.name}: no export; exporting its last checkpoint")
        iteration = _json_from(s, [PY, __file__, "checkpoint-iteration", run_dir], log) or {}
        if iteration.get("iteration"):
            salvage = [*_without_budget_flags(cmd), "--resume", "--iterations", str(iteration["iteration"]),
                       "--set", "fit_to_budget=false"]
            res = s.call(salvage, log, max(30.0, s.left() - 5), env)
            done = _last_record(log, "done")
            model_dir = done.get("model_dir") if done else None
            record["salvaged"] = {"rc": res["rc"], "iteration": iteration["iteration"]}
    _copy_run_files(run_dir, s.out / "runs" / job.name)
    if not model_dir:
        record["error"] = _last_record(log, "error").get("message") if _last_record(log, "error") else (
            "stopped before its export" if result["timed_out"] else f"exit code {result['rc']}")
        return record
    copied = _json_from(s, [PY, __file__, "fp16", model_dir, s.out / "models"], log)
    if copied and copied.get("id"):
        record["model"] = copied["id"]
        record["files"] = copied.get("files")
        s.say(f"train {job.name}: model {copied['id']} saved ({copied.get('files')})")
    else:
        record["error"] = "fp16 copy failed"
    return record


def _without_budget_flags(cmd: List[str]) -> List[str]:
    out, skip = [], 0
    for i, part in enumerate(cmd):
        if skip:
            skip -= 1
            continue
        if part == "--time-budget":
            skip = 1
            continue
        if part == "--set" and i + 1 < len(cmd) and cmd[i + 1].startswith("fit_to_budget"):
            skip = 1
            continue
        out.append(part)
    return out


def _copy_run_files(run_dir: Path, dest: Path) -> None:
    """The run's small files (config, logs, curves); checkpoints stay in the work folder."""
    if not run_dir.is_dir():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for path in run_dir.iterdir():
        if path.is_file() and path.stat().st_size < 4 * MiB and path.suffix not in (".pt", ".safetensors"):
            shutil.copy2(path, dest / path.name)


def _training_data(s: Session) -> Path:
    if s.data is not None:
        return s.data
    if s.dry:
        synthetic = s.work / "synthetic-cache"
        if not (synthetic / "manifest.json").is_file():
            subprocess.run([PY, __file__, "synth-cache", synthetic], env=s.env, check=True, timeout=120,
                           stdout=subprocess.DEVNULL)
        s.data = synthetic
        return synthetic
    return REPO / "cache" / "la"


# ---- the run -------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run and args.budget is None:
        args.budget = 300.0
    args.budget = float(args.budget or 540.0)
    s = Session(args)
    s.say(f"gpu_run {'DRY RUN (CPU, tiny sizes)' if s.dry else 'real run'}: out {s.out}, work {s.work}, "
          f"budget {args.budget:.0f} s")
    if not s.dry and args.data is None:
        s.data = REPO / "cache" / "la"
    if s.dry and s.data is None:
        s.step("data", lambda: {"synthetic_cache": str(_training_data(s))})
    steps = {"setup": step_setup, "env": step_env, "cuda-tests": step_cuda_tests, "bench": step_bench,
             "loader": step_loader, "segment": step_segment, "train": step_train, "finetune": step_finetune}
    for name in STEPS:
        if name in args.skip:
            s.steps.append({"step": name, "status": "skipped", "seconds": 0.0, "note": "--skip"})
        else:
            s.step(name, steps[name], s)
    s.write_summary()
    if args.pack:
        s.step("pack", lambda: _pack_step(s, Path(args.pack)))
    _print_table(s)
    s.main_log.close()
    if s.dry and not args.work:
        shutil.rmtree(s.work, ignore_errors=True)
    return 0


def _pack_step(s: Session, dest: Path) -> Dict[str, Any]:
    """The summary in the pack already lists this step (as 'packed'); the one left in OUTDIR gets the figures."""
    s.steps.append({"step": "pack", "status": "ok", "seconds": 0.0, "note": "packed with this summary"})
    s.write_summary()
    s.steps.pop()
    return pack(s.out, dest)


def _print_table(s: Session) -> None:
    print("\nstep         status    seconds  detail")
    for r in s.steps:
        detail = {k: v for k, v in r.items() if k not in ("step", "status", "seconds")}
        print(f"{r['step']:12s} {r['status']:9s} {r['seconds']:7.1f}  {json.dumps(detail)[:300]}")
    print(f"total {time.monotonic() - s.t0:.1f} s; outputs in {s.out}")


# ---- pack / unpack -------------------------------------------------------------------------------
def pack(outdir: Path, dest: Path) -> Dict[str, Any]:
    """OUTDIR -> DEST/gpu-run.tar.gz.NN (each < 15 MiB) + DEST/gpu-run.manifest.json: at most 8 files and
    60 MiB, which the device tool brings back. Models that do not fit are left out (said in the manifest)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("gpu-run.*"):
        old.unlink()
    models = sorted(p for p in (outdir / "models").iterdir() if p.is_dir()) if (outdir / "models").is_dir() else []
    left_out: List[str] = []
    while True:
        blob = _targz(outdir, exclude={m.name for m in models if m.name in left_out})
        count = -(-len(blob) // PART_BYTES)
        if (count <= MAX_RETURN_FILES - 1 and len(blob) <= MAX_RETURN_BYTES) or len(left_out) == len(models):
            break
        left_out.append(models[-1 - len(left_out)].name)  # by name, the last first
    parts = []
    for i in range(0, max(1, len(blob)), PART_BYTES):
        name = f"gpu-run.tar.gz.{i // PART_BYTES:02d}"
        (dest / name).write_bytes(blob[i:i + PART_BYTES])
        parts.append({"name": name, "bytes": len(blob[i:i + PART_BYTES]),
                      "sha256": hashlib.sha256(blob[i:i + PART_BYTES]).hexdigest()})
    manifest = {"format": "semiseg-la-gpu-run-pack-1", "bytes": len(blob), "parts": parts,
                "sha256": hashlib.sha256(blob).hexdigest(), "left_out_models": left_out}
    _write_json(dest / "gpu-run.manifest.json", manifest)
    return {"parts": len(parts), "bytes": len(blob), "left_out_models": left_out}


def _targz(outdir: Path, exclude: set) -> bytes:
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:  # fp16 weights barely compress
        for path in sorted(outdir.rglob("*")):
            rel = path.relative_to(outdir)
            if rel.parts[:1] == ("models",) and len(rel.parts) > 1 and rel.parts[1] in exclude:
                continue
            if path.is_file():
                archive.add(path, arcname=str(Path(outdir.name) / rel), recursive=False)
    return buffer.getvalue()


def unpack(src: Path, outdir: Path) -> Path:
    manifest = json.loads((src / "gpu-run.manifest.json").read_text(encoding="utf-8"))
    blob = b""
    for part in manifest["parts"]:
        data = (src / part["name"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise SystemExit(f"{part['name']}: SHA-256 mismatch (incomplete transfer?)")
        blob += data
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise SystemExit("archive SHA-256 mismatch")
    import io

    outdir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as archive:
        names = archive.getnames()
        top = names[0].split("/")[0] if names else ""
        with tempfile.TemporaryDirectory(dir=outdir) as tmp:
            _safe_extract(archive, Path(tmp))
            for item in (Path(tmp) / top).iterdir():
                target = outdir / item.name
                if target.exists():
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                shutil.move(str(item), target)
    if manifest.get("left_out_models"):
        print(f"left out of the pack (over the return limit): {', '.join(manifest['left_out_models'])}")
    return outdir


def _safe_extract(archive: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        archive.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in archive.getmembers():
        target = (dest / member.name).resolve()
        if root not in target.parents and target != root or member.issym() or member.islnk():
            raise SystemExit(f"refusing to extract {member.name}")
    archive.extractall(dest)


# ---- transfer plan -------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    """Which `carry` paths each device call takes: every call below 64 MiB with what travels anyway (the
    checkout), at most 8 paths, the fewest calls (first fit, largest first). The last call runs the session."""
    limit = 64 * MiB - int(args.margin_mib * MiB)
    repo = _travelling_bytes()
    data = Path(args.data).resolve()
    small = [p for p in [data / "manifest.json", data / "train.list", data / "test.list"] if p.is_file()]
    fixed = [str(p.relative_to(REPO)) for p in small]
    room = limit - repo - sum(_size(p) for p in small)
    sitk = (sorted((REPO / ".whl").glob("simpleitk-*.tar.xz.[0-9][0-9]"))
            or sorted((REPO / ".whl").glob("simpleitk-*.tar.xz")))
    items = [(str(p.relative_to(REPO)), _size(p)) for p in sitk]
    items += [(str(p.relative_to(REPO)), _size(p)) for p in sorted(data.glob("part-*")) if p.is_dir()]
    bins: List[Dict[str, Any]] = []
    for name, nbytes in sorted(items, key=lambda item: -item[1]):
        if nbytes > room:
            raise SystemExit(f"{name} ({nbytes / MiB:.1f} MiB) alone exceeds one call's {room / MiB:.1f} MiB; "
                             "rebuild the cache with a smaller --part-mib")
        target = next((b for b in bins if b["bytes"] + nbytes <= room and len(b["items"]) + len(fixed) < 8), None)
        if target is None:
            target = {"items": [], "bytes": 0}
            bins.append(target)
        target["items"].append(name)
        target["bytes"] += nbytes
    bins.sort(key=lambda b: -b["bytes"])  # the lightest call last: it also runs the session
    session = GPU_COMMAND + ("" if data == REPO / "cache" / "la" else f" --data {data.relative_to(REPO)}")
    calls = []
    for i, b in enumerate(bins, 1):
        last = i == len(bins)
        calls.append({"carry": fixed + sorted(b["items"]), "mib": round((repo + b["bytes"]) / MiB, 1),
                      "command": session if last else "du -sh cache .whl  # leaves these files on the machine",
                      "timeout_s": 600 if last else 120})
    report = {"repo_mib": round(repo / MiB, 1), "room_per_call_mib": round(room / MiB, 1), "calls": calls,
              "note": "make the calls back to back (the machine is given back 30 s after a call, and the files "
                      "left on it with it); then give_back"}
    print(json.dumps(report, indent=2))
    return 0


GPU_COMMAND = "bash scripts/gpu_run.sh /tmp/gpu-run --pack $OUT"


def _travelling_bytes() -> int:
    """Tracked files plus untracked files that git does not ignore: what every device call sends."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode().split("\0")
    return sum(_size(REPO / p) for p in out if p and (REPO / p).is_file())


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- SimpleITK for the device machine --------------------------------------------------------------
def cmd_deps(args: argparse.Namespace) -> int:
    """.whl/simpleitk-<version>.tar.xz: the wheel's files, the extension's unneeded symbols stripped, xz -9e
    (about 27 MiB instead of the wheel's 50; takes about 15 minutes of one core)."""
    import lzma
    import zipfile

    wheels = sorted((REPO / ".whl").glob("[Ss]imple[Ii][Tt][Kk]-*.whl"))
    if not wheels:
        raise SystemExit("no SimpleITK wheel in .whl/; download one as the device README says (python 3.12, "
                         "manylinux x86_64), e.g. SimpleITK==2.5.3")
    wheel = wheels[-1]
    version = wheel.name.split("-")[1]
    target = REPO / ".whl" / f"simpleitk-{version}.tar.xz"
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tmp)
        if shutil.which("strip") and not args.no_strip:
            for so in Path(tmp).rglob("*.so"):
                subprocess.run(["strip", "--strip-unneeded", str(so)], check=True)
        partial = target.with_name(target.name + ".partial")
        with tarfile.open(partial, "w:xz", preset=args.preset | lzma.PRESET_EXTREME) as packed:
            for path in sorted(Path(tmp).iterdir()):
                packed.add(path, arcname=path.name)
        os.replace(partial, target)
    print(f"{target} ({target.stat().st_size / MiB:.1f} MiB); carry it instead of the wheel")
    if args.part_mib:
        for old in target.parent.glob(target.name + ".[0-9][0-9]"):
            old.unlink()
        data, size = target.read_bytes(), int(args.part_mib * MiB)
        for i in range(0, len(data), size):
            target.with_name(f"{target.name}.{i // size:02d}").write_bytes(data[i:i + size])
        print(f"and in {-(-len(data) // size)} parts of at most {args.part_mib:g} MiB ({target.name}.NN), for "
              "calls that cannot carry it whole; `plan` carries the parts when they exist")
    return 0


# ---- small child commands (run with the package importable) ------------------------------------------
def cmd_env(args: argparse.Namespace) -> int:
    import platform

    info: Dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpu_count": os.cpu_count()}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            free, total = torch.cuda.mem_get_info(0)
            info.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                        capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                        memory_total_mib=round(total / MiB), memory_free_mib=round(free / MiB),
                        bf16=torch.cuda.is_bf16_supported())
    except Exception as exc:  # noqa: BLE001 - the report says what failed
        info["torch_error"] = f"{exc.__class__.__name__}: {exc}"
    versions = {}
    for name in ("numpy", "SimpleITK", "scipy", "skimage", "h5py", "safetensors", "yaml", "semiseg_la"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", None) or getattr(module, "Version", lambda: "?")()
        except Exception as exc:  # noqa: BLE001
            versions[name] = f"missing ({exc.__class__.__name__})"
    info["packages"] = versions
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["git_commit"] = None
    _write_json(Path(args.output), info)
    print(json.dumps(info, indent=2))
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    """A scan-sized volume: a validation case (last labelled case of --data) inside noise, or a synthetic
    bright ellipsoid; writes the scan, its label and scan.json beside them."""
    import numpy as np

    from semiseg_la.io.volume import Volume, write_volume

    shape = tuple(args.shape)
    spacing = (0.625, 0.625, 0.625)
    case = None
    if args.data:
        from semiseg_la.io.datasets import open_dataset

        labelled = [r for r in open_dataset(args.data, labeled=False) if r.label_path is not None]
        case = labelled[-1] if labelled else None
    if case is not None:
        crop, crop_label = case.load()
        if tuple(crop.spacing) != spacing:  # a prepared cache: the same field of view in its voxels
            spacing = tuple(float(s) for s in crop.spacing)
            shape = tuple(max(1, round(n * 0.625 / s)) for n, s in zip(shape, spacing))
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 0.3, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    info: Dict[str, Any] = {"shape": list(shape), "spacing": list(spacing)}
    if case is not None:
        box = [min(a, b) for a, b in zip(crop.shape, shape)]
        starts = [(s - b) // 2 for s, b in zip(shape, box)]
        where = tuple(slice(a, a + b) for a, b in zip(starts, box))
        image[where] = crop.array[tuple(slice(0, b) for b in box)]
        label[where] = crop_label.array[tuple(slice(0, b) for b in box)]
        info.update(case=case.case_id, placed_at=starts)
    else:
        grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        radii = [n / 5 for n in shape]
        inside = sum(((g - n / 2) / r) ** 2 for g, n, r in zip(grid, shape, radii)) < 1
        image[inside] += 2.0
        label[inside] = 1
        info["case"] = "synthetic ellipsoid"
    write_volume(Volume(image, spacing), args.scan, compress=False)
    write_volume(Volume(label, spacing), args.label)
    _write_json(Path(args.scan).parent / "scan.json", info)
    print(json.dumps(info))
    return 0


def cmd_dice(args: argparse.Namespace) -> int:
    import numpy as np

    from semiseg_la.io.volume import read_volume

    seg, ref = read_volume(args.seg).array > 0, read_volume(args.label).array > 0
    denominator = int(seg.sum()) + int(ref.sum())
    print(json.dumps({"dice": 2.0 * int(np.logical_and(seg, ref).sum()) / denominator if denominator else None,
                      "seg_voxels": int(seg.sum()), "label_voxels": int(ref.sum())}))
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from semiseg_la.errors import SemiSegError
    from semiseg_la.io.datasets import open_dataset

    try:
        records = open_dataset(args.data, labeled=False)
    except SemiSegError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 0
    print(json.dumps({"ok": True, "cases": len(records),
                      "labelled": sum(r.label_path is not None for r in records)}))
    return 0


def cmd_checkpoint_iteration(args: argparse.Namespace) -> int:
    from semiseg_la.engine.state import load_state

    state = load_state(Path(args.run_dir) / "checkpoints" / "last.pt")
    print(json.dumps({"iteration": int(state["iteration"])}))
    return 0


def cmd_fp16(args: argparse.Namespace) -> int:
    """A catalog model folder -> DEST/<id>: fp16 safetensors shards below 15 MiB, the card complete."""
    from semiseg_la.checkpoints import ModelCard, load_model_weights, load_network, save_model

    weights, card = load_model_weights(args.model_dir)
    data = card.to_dict()
    data["gpu_run"] = {"weights": "float16 copy of the exported float32 weights, made by scripts/gpu_run.py; "
                                  "the validation figures were measured with the float32 weights"}
    target = Path(args.dest) / card.id
    if target.exists():
        shutil.rmtree(target)
    save_model(target, weights, ModelCard.coerce(data), dtype="float16", max_shard_bytes=SHARD_BYTES)
    load_network(target)  # verifies hashes, shapes and dtype
    files = {p.name: p.stat().st_size for p in sorted(target.iterdir())}
    print(json.dumps({"id": card.id, "folder": str(target), "files": files}))
    return 0


def cmd_synth_cache(args: argparse.Namespace) -> int:
    """A tiny training cache of spheres in noise (6 labelled cases), for the dry run."""
    import numpy as np

    from semiseg_la.io.la_cache import CacheWriter

    writer = CacheWriter(args.output, (0.625, 0.625, 0.625), source="synthetic (gpu_run dry run)")
    rng = np.random.default_rng(0)
    ids = [f"SYN{i:02d}" for i in range(6)]
    for i, case in enumerate(ids):
        shape = (64, 56, 40)
        grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        center = [n / 2 + rng.uniform(-4, 4) for n in shape]
        label = (sum((g - c) ** 2 for g, c in zip(grid, center)) < (10 + i % 3) ** 2).astype(np.uint8)
        levels = np.linspace(-1.0, 3.0, 200).astype(np.float32)  # few distinct values, like the LA scans
        noisy = label * 100 + rng.integers(0, 80, shape)
        writer.add(case, levels[np.clip(noisy, 0, 199)], label)
    writer.close({"train.list": "\n".join(ids) + "\n"})
    print(args.output)
    return 0


# ---- helpers ---------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _records(path: Path) -> List[Dict[str, Any]]:
    out = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _last_record(path: Path, stage: str) -> Dict[str, Any]:
    found = [r for r in _records(path) if r.get("stage") == stage]
    return found[-1] if found else {}


def _json_from(s: Session, cmd: Sequence[Any], log: Path, timeout: float = 120) -> Optional[Dict[str, Any]]:
    """Run a child that prints one JSON object last; log its output; None when it fails."""
    limit = min(timeout, max(5.0, s.left()))
    try:
        proc = subprocess.run([str(c) for c in cmd], env=s.env, cwd=str(REPO), capture_output=True, text=True,
                              timeout=limit)
    except subprocess.TimeoutExpired:
        return None
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None
    try:
        return json.loads(lines[-1])
    except ValueError:
        return None


def _last_line(path: Path, words: Sequence[str]) -> Optional[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    hits = [line.strip() for line in lines if any(w in line for w in words)]
    return hits[-1] if hits else None


# ---- command line ------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the GPU session (what scripts/gpu_run.sh calls)")
    run.add_argument("outdir")
    run.add_argument("--dry-run", action="store_true", help="every step with tiny sizes on the CPU")
    run.add_argument("--pack", default=None, help="also pack OUTDIR into this folder (the device tool's $OUT)")
    run.add_argument("--data", default=None, help="training data: a cache or LA h5 root (default cache/la; "
                                                  "dry run: a synthetic cache)")
    run.add_argument("--budget", type=float, default=None, help="wall-clock seconds for the whole run "
                                                                "(default 540; dry run 300)")
    run.add_argument("--work", default=None, help="scratch folder: checkpoints, scan (default "
                                                  "/tmp/semiseg-gpu-work; dry run: a temporary one)")
    run.add_argument("--bench-seconds", type=float, default=15.0, help="time box per benchmarked preset")
    run.add_argument("--no-parallel", action="store_true", help="train the models one after the other")
    run.add_argument("--jobs", choices=sorted(JOB_SETS), default="release",
                     help="the models to train: release (issue 12) or sites (issue 10: the default pair further)")
    run.add_argument("--finetune", choices=sorted(FINETUNE_GRIDS), default=None,
                     help="also run this grid of bench/bench_finetune.py benchmarks (issue 10), all at once")
    run.add_argument("--skip", nargs="*", default=[], choices=[n for n in STEPS if n not in ("setup", "env")],
                     help="steps to leave out (the window's time goes to the rest)")
    run.set_defaults(handler=cmd_run)
    up = sub.add_parser("unpack", help="rebuild OUTDIR from the packed parts the device tool returned")
    up.add_argument("src")
    up.add_argument("outdir")
    up.set_defaults(handler=lambda a: print(unpack(Path(a.src), Path(a.outdir))) or 0)
    pk = sub.add_parser("pack", help="pack OUTDIR into DEST (at most 8 files below 16 MiB)")
    pk.add_argument("outdir")
    pk.add_argument("dest")
    pk.set_defaults(handler=lambda a: print(json.dumps(pack(Path(a.outdir), Path(a.dest)))) or 0)
    plan = sub.add_parser("plan", help="the device calls that carry the cache and SimpleITK")
    plan.add_argument("--data", default=str(REPO / "cache" / "la"))
    plan.add_argument("--margin-mib", type=float, default=1.5, help="kept below the 64 MiB of each call")
    plan.set_defaults(handler=cmd_plan)
    deps = sub.add_parser("deps", help="pack the SimpleITK wheel in .whl/ as .whl/simpleitk-<v>.tar.xz")
    deps.add_argument("--preset", type=int, default=9)
    deps.add_argument("--no-strip", action="store_true", help="keep the extension's symbol tables")
    deps.add_argument("--part-mib", type=float, default=9.0, help="also write it in parts of this size (0: no)")
    deps.set_defaults(handler=cmd_deps)
    env = sub.add_parser("env")
    env.add_argument("output")
    env.set_defaults(handler=cmd_env)
    scan = sub.add_parser("scan")
    scan.add_argument("scan")
    scan.add_argument("label")
    scan.add_argument("--shape", type=int, nargs=3, default=list(FULL_SCAN))
    scan.add_argument("--data", default=None)
    scan.set_defaults(handler=cmd_scan)
    dice = sub.add_parser("dice")
    dice.add_argument("seg")
    dice.add_argument("label")
    dice.set_defaults(handler=cmd_dice)
    chk = sub.add_parser("check-data")
    chk.add_argument("data")
    chk.set_defaults(handler=cmd_check_data)
    it = sub.add_parser("checkpoint-iteration")
    it.add_argument("run_dir")
    it.set_defaults(handler=cmd_checkpoint_iteration)
    fp = sub.add_parser("fp16")
    fp.add_argument("model_dir")
    fp.add_argument("dest")
    fp.set_defaults(handler=cmd_fp16)
    syn = sub.add_parser("synth-cache")
    syn.add_argument("output")
    syn.set_defaults(handler=cmd_synth_cache)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
