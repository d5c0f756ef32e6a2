"""Command lines and environments for the core's CLI (``semiseg-la``), in one injectable place.

The module never looks ``semiseg-la`` up on PATH: it runs ``<python> -m semiseg_la.cli.main ...`` with
the Python it is given (``PythonSlicer`` inside Slicer). Tests swap the entry point for a stand-in script.
"""

import os
import shutil
import sys
from typing import Dict, List, Mapping, Optional, Sequence

DEVICES = ("auto", "cuda", "cpu")
CORE_MODULE = "semiseg_la.cli.main"


class CommandSpec:
    """argv + environment of one child process."""

    def __init__(self, argv: Sequence[str], env: Dict[str, str], cwd: Optional[str] = None) -> None:
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd

    def __repr__(self) -> str:
        return f"CommandSpec({self.argv!r})"


def findPythonSlicer() -> str:
    """``PythonSlicer`` when it is on PATH (inside Slicer), else the running interpreter."""
    found = shutil.which("PythonSlicer")
    return found or sys.executable


def normalizeDevice(device: str) -> str:
    value = (device or "auto").strip().lower()
    aliases = {"gpu": "cuda", "cuda:0": "cuda"}
    value = aliases.get(value, value)
    if value not in DEVICES:
        raise ValueError(f"Unknown device '{device}': choose one of {', '.join(DEVICES)}")
    return value


def regionArguments(region) -> List[str]:
    """``--region`` as the core reads it; nothing for "auto" (its default, so an older core still runs)."""
    if region is None or (isinstance(region, str) and region.strip().lower() == "auto"):
        return []
    if isinstance(region, str):
        if region.strip().lower() == "whole":
            return ["--region", "whole"]
        raise ValueError(f"Unknown region '{region}': auto, whole or a voxel box")
    box = [int(v) for v in region]
    if len(box) != 6 or any(lo < 0 or lo >= hi for lo, hi in zip(box[:3], box[3:])):
        raise ValueError(f"A region box is six voxel indices i0 j0 k0 i1 j1 k1 with i0 < i1 etc., not {list(region)}")
    return ["--region"] + [str(v) for v in box]


class CommandFactory:
    """Builds every command the module runs.

    ``pythonExecutable``: the interpreter (default: ``PythonSlicer`` or ``sys.executable``).
    ``entry``: what follows the interpreter; default ``["-m", "semiseg_la.cli.main"]``.
    ``baseEnvironment``: callable or mapping for the child's environment (default: ``os.environ`` at call
    time; inside Slicer the widget passes Slicer's startup environment).
    ``extraEnvironment``: added to every child's environment.
    ``pythonPaths``: folders prepended to ``PYTHONPATH`` (e.g. a source checkout of the core).
    """

    def __init__(self, pythonExecutable: Optional[str] = None, entry: Optional[Sequence[str]] = None,
                 baseEnvironment=None, extraEnvironment: Optional[Mapping[str, str]] = None,
                 pythonPaths: Sequence[str] = ()) -> None:
        self.pythonExecutable = pythonExecutable or findPythonSlicer()
        self.entry = list(entry) if entry is not None else ["-m", CORE_MODULE]
        self.baseEnvironment = baseEnvironment
        self.extraEnvironment = dict(extraEnvironment or {})
        self.pythonPaths = [str(p) for p in pythonPaths]

    # -- environment -------------------------------------------------------------------------------------
    def environment(self, device: str = "auto") -> Dict[str, str]:
        base = self.baseEnvironment() if callable(self.baseEnvironment) else self.baseEnvironment
        env = {str(k): str(v) for k, v in (base if base is not None else os.environ).items()}
        env.update(self.extraEnvironment)
        env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are written
        env["PYTHONIOENCODING"] = "utf-8"
        if self.pythonPaths:
            old = env.get("PYTHONPATH", "")
            env["PYTHONPATH"] = os.pathsep.join(self.pythonPaths + ([old] if old else []))
        if normalizeDevice(device) == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"  # hide every GPU from the child
        return env

    def _argv(self, args: Sequence[str]) -> List[str]:
        return [self.pythonExecutable, *self.entry, *[str(a) for a in args]]

    # -- commands --------------------------------------------------------------------------------------
    def segment(self, inputPath: str, outputPath: str, model: Optional[str] = None, device: str = "auto",
                overlap: Optional[float] = None, region=None, firstPassPath: Optional[str] = None) -> CommandSpec:
        """``region``: None or "auto" (the core's default: it finds the atrium), "whole", or a voxel box of
        the input file [i0, j0, k0, i1, j1, k1] (upper bounds exclusive). ``firstPassPath``: where the core also
        writes the first pass that settled an automatic region (``--first-pass-out``)."""
        device = normalizeDevice(device)
        args = ["segment", str(inputPath), "-o", str(outputPath)]
        if model:
            args += ["--model", str(model)]
        args += ["--device", device]
        if overlap is not None:
            args += ["--overlap", f"{float(overlap):g}"]
        args += regionArguments(region)
        if firstPassPath:
            args += ["--first-pass-out", str(firstPassPath)]
        args += ["--progress", "json"]
        return CommandSpec(self._argv(args), self.environment(device))

    def finetune(self, baseModel: str, datasetDir: str, method: str, unlabeledDir: Optional[str] = None,
                 iterations: Optional[int] = None, timeBudgetSeconds: Optional[float] = None,
                 name: Optional[str] = None, device: str = "auto") -> CommandSpec:
        device = normalizeDevice(device)
        if not baseModel:
            raise ValueError("Choose a base model to fine-tune from")
        if not method:
            raise ValueError("Choose a method preset")
        args = ["finetune", "--from", str(baseModel), "--data", str(datasetDir)]
        if unlabeledDir:
            args += ["--unlabeled", str(unlabeledDir)]
        args += ["--method", str(method)]
        if iterations:
            args += ["--iterations", str(int(iterations))]
        if timeBudgetSeconds:
            args += ["--time-budget", f"{float(timeBudgetSeconds):g}"]
        if name:
            args += ["--name", str(name)]
        args += ["--device", device, "--progress", "json"]
        return CommandSpec(self._argv(args), self.environment(device))

    def modelsList(self) -> CommandSpec:
        return CommandSpec(self._argv(["models", "list", "--json"]), self.environment())

    def modelsRemove(self, modelId: str) -> CommandSpec:
        return CommandSpec(self._argv(["models", "remove", str(modelId)]), self.environment())

    def modelsImport(self, path: str) -> CommandSpec:
        return CommandSpec(self._argv(["models", "import", str(path)]), self.environment())

    def modelsPresets(self) -> CommandSpec:
        return CommandSpec(self._argv(["models", "presets", "--json"]), self.environment())
