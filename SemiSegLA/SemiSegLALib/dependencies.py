"""What the child process needs in Slicer's Python, and how it gets there (after a confirmation).

* The **core** (``semiseg-la``, import ``semiseg_la``) ships inside the module
  (``Resources/semiseg-la/training``, copied there by CMake; a source checkout's ``training/`` also
  works). It is pip-installed with ``--no-deps`` (no download of the core itself) from a copy in a short
  temporary folder: pip builds a local folder in place (``build/``, ``*.egg-info``), which inside the
  extension folder fails when that folder is read-only and can exceed Windows' 260-character path limit.
* Its third-party requirements (``Resources/requirements.txt``: scikit-image, safetensors, ...) are
  pip-installed with a constraints file that pins Slicer's own numpy, SimpleITK and vtk (and an existing
  torch) to their installed versions, so pip can never replace them.
* **torch** comes only from the PyTorch extension's ``PyTorchUtils`` module.
* numpy, SimpleITK, vtk and torch are never pip-installed by this module (``FORBIDDEN_PIP_NAMES``).

Nothing here imports torch, or the core: versions are read from package metadata.
"""

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple

from .paths import shortAsciiTempRoot

CORE_DISTRIBUTION = "semiseg-la"
CORE_PACKAGE = "semiseg_la"
TORCH_REQUIREMENT = ">=2.4"  # the core's pyproject: CRLN uses torch.is_autocast_enabled(device_type)

# what pip, setuptools and Python leave in a source folder: never copied into the build copy
BUILD_LEFTOVERS = ("build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache")

# Slicer ships numpy, SimpleITK and vtk (with custom builds/plugins): replacing them breaks Slicer.
# torch (and its companions) must come from PyTorch Utils, which picks the right CUDA build.
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "vtk", "torch", "torchvision", "torchaudio")
FORBIDDEN_PIP_NAMES = frozenset(name.lower() for name in PROTECTED_DISTRIBUTIONS)

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;#]*)")
_CLAUSE = re.compile(r"^\s*(~=|==|!=|<=|>=|<|>|===)\s*([^\s,]+)\s*$")


class DependencyError(RuntimeError):
    """A missing dependency the user must act on; the message says what to do."""

    def __init__(self, message: str, restartRequired: bool = False) -> None:
        super().__init__(message)
        self.restartRequired = restartRequired


def normalizeName(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def isForbidden(name: str) -> bool:
    return normalizeName(name) in FORBIDDEN_PIP_NAMES


class Requirement:
    def __init__(self, name: str, specifier: str = "", raw: str = "") -> None:
        self.name = name
        self.specifier = specifier.replace(" ", "")
        self.raw = raw or f"{name}{self.specifier}"

    @property
    def key(self) -> str:
        return normalizeName(self.name)

    def __str__(self) -> str:
        return f"{self.name}{self.specifier}"

    def __repr__(self) -> str:
        return f"Requirement({str(self)!r})"


def parseRequirement(line: str) -> Optional[Requirement]:
    text = line.split("#", 1)[0].strip()
    if not text or text.startswith("-"):
        return None
    match = _REQ.match(text)
    if not match:
        return None
    return Requirement(match.group(1), match.group(3).strip(), text)


def parseRequirements(text: str) -> List[Requirement]:
    result = []
    for line in text.splitlines():
        req = parseRequirement(line)
        if req is not None:
            result.append(req)
    return result


def versionTuple(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group(0)))
    return tuple(parts)


def _cmp(a: Tuple[int, ...], b: Tuple[int, ...]) -> int:
    length = max(len(a), len(b))
    a = a + (0,) * (length - len(a))
    b = b + (0,) * (length - len(b))
    return (a > b) - (a < b)


def satisfies(version: str, specifier: str) -> bool:
    """Minimal PEP 440 check for the clauses requirements files use (>=, >, <=, <, ==, !=, ~=)."""
    if not specifier:
        return True
    have = versionTuple(version)
    for clause in specifier.split(","):
        if not clause.strip():
            continue
        match = _CLAUSE.match(clause)
        if not match:
            return False
        op, target = match.groups()
        if op in ("==", "===") and target.endswith(".*"):
            prefix = versionTuple(target[:-2])
            if have[: len(prefix)] != prefix:
                return False
            continue
        want = versionTuple(target)
        c = _cmp(have, want)
        ok = {"==": c == 0, "===": c == 0, "!=": c != 0, "<=": c <= 0, ">=": c >= 0, "<": c < 0,
              ">": c > 0, "~=": c >= 0 and have[: max(len(want) - 1, 1)] == want[: max(len(want) - 1, 1)]}[op]
        if not ok:
            return False
    return True


def installedVersion(distribution: str) -> Optional[str]:
    """Version from package metadata (no import), None when not installed."""
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def locateBundledCore(moduleDir: str) -> Optional[str]:
    """The core's source folder (holding pyproject.toml and semiseg_la/) next to the module, if any."""
    candidates = [
        os.path.join(moduleDir, "Resources", "semiseg-la", "training"),  # installed extension (CMake)
        os.path.join(moduleDir, os.pardir, "training"),  # source checkout
    ]
    for folder in candidates:
        if (os.path.isfile(os.path.join(folder, "pyproject.toml"))
                and os.path.isfile(os.path.join(folder, CORE_PACKAGE, "__init__.py"))):
            return os.path.normpath(folder)
    return None


def copyCoreForBuild(coreDir: str, buildRoot: str) -> str:
    """Copy the core's source (without build leftovers) to ``<buildRoot>/training`` and return that folder.

    Files are copied without their permission bits, so the copy is writable even when the extension folder
    is read-only. A README beside the core folder comes along (a pyproject may name ``../README.md``)."""
    import fnmatch

    target = os.path.join(buildRoot, "training")
    for folder, dirs, files in os.walk(coreDir):
        dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, pattern) for pattern in BUILD_LEFTOVERS)]
        relative = os.path.relpath(folder, coreDir)
        destination = os.path.normpath(os.path.join(target, relative))
        os.makedirs(destination, exist_ok=True)
        for name in files:
            if not any(fnmatch.fnmatch(name, pattern) for pattern in BUILD_LEFTOVERS):
                shutil.copyfile(os.path.join(folder, name), os.path.join(destination, name))
    readme = os.path.join(coreDir, os.pardir, "README.md")
    if os.path.isfile(readme):
        shutil.copyfile(readme, os.path.join(buildRoot, "README.md"))
    return target


def bundledCoreVersion(coreDir: Optional[str]) -> Optional[str]:
    if not coreDir:
        return None
    try:
        with open(os.path.join(coreDir, "pyproject.toml"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    match = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1) if project else "", re.M)
    return match.group(1) if match else None


def defaultPyTorchLogic():
    """``PyTorchUtils.PyTorchUtilsLogic()`` when the PyTorch extension is installed, else None."""
    try:
        import PyTorchUtils  # the PyTorch extension's module; only inside Slicer
    except ImportError:
        return None
    return PyTorchUtils.PyTorchUtilsLogic()


class DependencyStatus:
    def __init__(self) -> None:
        self.coreDir: Optional[str] = None
        self.bundledVersion: Optional[str] = None
        self.coreVersion: Optional[str] = None
        self.coreImportable = False
        self.missing: List[Requirement] = []
        self.skipped: List[Requirement] = []
        self.torchVersion: Optional[str] = None
        self.torchRequirement = TORCH_REQUIREMENT

    @property
    def coreNeedsInstall(self) -> bool:
        if self.coreVersion is None:
            # importable without metadata: a developer's PYTHONPATH checkout; leave it alone
            return not self.coreImportable
        return bool(self.bundledVersion) and self.coreVersion != self.bundledVersion

    @property
    def torchOk(self) -> bool:
        return self.torchVersion is not None and satisfies(self.torchVersion, self.torchRequirement)

    @property
    def ready(self) -> bool:
        return not self.coreNeedsInstall and not self.missing and self.torchOk

    def describe(self) -> str:
        core = self.coreVersion or ("importable (source checkout)" if self.coreImportable else "not installed")
        lines = [
            f"SemiSegLA core: {core} (bundled: {self.bundledVersion or 'not found'})",
            f"PyTorch: {self.torchVersion or 'not installed'} (needs torch{self.torchRequirement})",
        ]
        if self.missing:
            lines.append("Missing packages: " + ", ".join(str(r) for r in self.missing))
        if self.skipped:
            lines.append("Never installed by SemiSegLA (Slicer's own or PyTorch Utils): "
                         + ", ".join(str(r) for r in self.skipped))
        return "\n".join(lines)


class DependencyManager:
    """Checks and installs; every Slicer call goes through ``slicerUtil`` (``slicer.util`` in Slicer)."""

    def __init__(self, moduleDir: Optional[str] = None, coreDir: Optional[str] = None,
                 requirementsPath: Optional[str] = None, slicerUtil=None,
                 pyTorchLogicFactory: Callable[[], object] = defaultPyTorchLogic,
                 versionOf: Callable[[str], Optional[str]] = installedVersion,
                 findSpec: Optional[Callable[[str], object]] = None,
                 torchRequirement: str = TORCH_REQUIREMENT,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.moduleDir = moduleDir
        self.coreDir = coreDir or (locateBundledCore(moduleDir) if moduleDir else None)
        if requirementsPath is None and moduleDir:
            requirementsPath = os.path.join(moduleDir, "Resources", "requirements.txt")
        self.requirementsPath = requirementsPath
        self.slicerUtil = slicerUtil
        self.pyTorchLogicFactory = pyTorchLogicFactory
        self.versionOf = versionOf
        self.findSpec = findSpec or importlib.util.find_spec
        self.torchRequirement = torchRequirement
        self.log = log or (lambda text: None)
        self.pipCalls: List[List[str]] = []

    # -- checking -----------------------------------------------------------------------------------
    def requirements(self) -> List[Requirement]:
        if not self.requirementsPath or not os.path.isfile(self.requirementsPath):
            return []
        with open(self.requirementsPath, encoding="utf-8") as f:
            return parseRequirements(f.read())

    def status(self) -> DependencyStatus:
        st = DependencyStatus()
        st.torchRequirement = self.torchRequirement
        st.coreDir = self.coreDir
        st.bundledVersion = bundledCoreVersion(self.coreDir)
        st.coreVersion = self.versionOf(CORE_DISTRIBUTION)
        try:
            st.coreImportable = self.findSpec(CORE_PACKAGE) is not None
        except (ImportError, ValueError):
            st.coreImportable = False
        for req in self.requirements():
            if isForbidden(req.name):
                st.skipped.append(req)
                continue
            version = self.versionOf(req.name)
            if version is None or not satisfies(version, req.specifier):
                st.missing.append(req)
        st.torchVersion = self.versionOf("torch")
        return st

    # -- installing ----------------------------------------------------------------------------------
    def confirmationText(self, st: DependencyStatus) -> str:
        items = []
        if st.coreNeedsInstall:
            items.append(f"- the SemiSegLA core {st.bundledVersion or ''} (bundled with the extension, no download)")
        if st.missing:
            items.append("- from the Python Package Index: " + ", ".join(str(r) for r in st.missing))
        if not st.torchOk:
            items.append(f"- PyTorch (torch{st.torchRequirement}) through PyTorch Utils (a large download)")
        return ("SemiSegLA needs to install into Slicer's Python:\n" + "\n".join(items)
                + "\n\nThis can take several minutes. Slicer's own numpy, SimpleITK and VTK are not changed."
                + "\nContinue?")

    def ensure(self, askConfirmation: bool = True) -> DependencyStatus:
        """Install what is missing (after one confirmation); raise DependencyError if it cannot."""
        st = self.status()
        if st.ready:
            return st
        if st.coreNeedsInstall and not st.coreDir:
            raise DependencyError("The SemiSegLA core was not found in the extension (Resources/semiseg-la); "
                                  "reinstall the SemiSegLA extension.")
        if not st.torchOk and st.torchVersion is None and self.pyTorchLogicFactory() is None:
            raise DependencyError("SemiSegLA needs PyTorch: install the 'PyTorch' extension from the "
                                  "Extensions Manager, restart Slicer, then try again.")
        if not st.torchOk and st.torchVersion is not None:
            raise DependencyError(f"PyTorch {st.torchVersion} is too old (SemiSegLA needs torch"
                                  f"{st.torchRequirement}): uninstall it in the PyTorch Utils module, restart "
                                  "Slicer, then try again to install a current version.")
        if askConfirmation and not self.slicerUtil.confirmOkCancelDisplay(
                self.confirmationText(st), "SemiSegLA: install dependencies"):
            raise DependencyError("Installation cancelled: SemiSegLA cannot run without its dependencies.")
        if not st.torchOk:
            self.installTorch()
        if st.missing:
            self.installRequirements(st.missing)
        if st.coreNeedsInstall:
            self.installCore()
        importlib.invalidate_caches()
        after = self.status()
        if not after.ready:
            raise DependencyError("Some dependencies are still missing after installation:\n" + after.describe())
        return after

    def installTorch(self) -> None:
        logic = self.pyTorchLogicFactory()
        if logic is None:
            raise DependencyError("SemiSegLA needs PyTorch: install the 'PyTorch' extension from the "
                                  "Extensions Manager, restart Slicer, then try again.")
        self.log(f"Installing PyTorch (torch{self.torchRequirement}) with PyTorch Utils...")
        logic.installTorch(askConfirmation=False, torchVersionRequirement=self.torchRequirement)
        if self.versionOf("torch") is None:
            raise DependencyError("PyTorch installation did not complete: install it in the PyTorch Utils "
                                  "module, restart Slicer, then try again.", restartRequired=True)

    def installRequirements(self, requirements: Sequence[Requirement]) -> None:
        wanted = [r for r in requirements if not isForbidden(r.name)]
        if not wanted:
            return
        constraints = self._writeConstraints()
        self.log("Installing " + ", ".join(str(r) for r in wanted) + "...")
        try:
            self.pipInstall(["-c", constraints] + [str(r) for r in wanted])
        finally:
            with contextlib.suppress(OSError):
                os.remove(constraints)

    def installCore(self) -> None:
        self.log(f"Installing the SemiSegLA core from {self.coreDir}...")
        buildRoot = tempfile.mkdtemp(prefix="ssla_core_", dir=self.tempRoot())
        try:
            source = copyCoreForBuild(self.coreDir, buildRoot)
            base = ["--no-deps", "--force-reinstall"]
            try:  # offline first: build with the setuptools Slicer already has
                self.pipInstall(base + ["--no-build-isolation", source])
            except Exception as exc:
                self.log(f"Offline build of the core failed ({exc}); retrying with an isolated build...")
                self.pipInstall(base + [source])
        finally:
            shutil.rmtree(buildRoot, ignore_errors=True)

    def tempRoot(self) -> str:
        """A short, ASCII-only, writable folder for the build copy (short paths for Windows)."""
        return shortAsciiTempRoot()

    def _writeConstraints(self) -> str:
        lines = []
        for name in PROTECTED_DISTRIBUTIONS:
            version = self.versionOf(name)
            if version:
                lines.append(f"{name}=={version}")
        handle, path = tempfile.mkstemp(prefix="ssla_constraints_", suffix=".txt")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def pipInstall(self, args: Sequence[str]) -> None:
        """The only way this module calls pip; refuses any forbidden package name."""
        args = [str(a) for a in args]
        skipNext = False
        for arg in args:
            if skipNext:
                skipNext = False
                continue
            if arg in ("-r", "--requirement") or arg.startswith(("-r", "--requirement=")):
                raise DependencyError("SemiSegLA installs requirements one by one, never from a file.")
            if arg in ("-c", "--constraint"):
                skipNext = True
                continue
            if arg.startswith("-") or os.path.isdir(arg) or os.path.isfile(arg):
                continue
            req = parseRequirement(arg)
            if req is not None and isForbidden(req.name):
                raise DependencyError(f"SemiSegLA refuses to pip-install '{req.name}': Slicer's own copy must "
                                      "not be replaced (torch comes from PyTorch Utils).")
        self.pipCalls.append(args)
        self.slicerUtil.pip_install(args)
