"""Stand-ins for the Slicer-side tests: a fake ``slicer`` (fake_slicer.py) and a fake core CLI
(fake_core.py). Importing this package puts the module folder (SemiSegLA/) on ``sys.path`` so that
``SemiSegLALib`` imports as it does inside Slicer."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SemiSegLA"
MODULE_FILE = MODULE_DIR / "SemiSegLA.py"
FAKE_CORE = Path(__file__).with_name("fake_core.py")

if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from .fake_slicer import RECORDER, FakeGeometryMismatch, FakeSlicer, Geometry, readNrrd, writeNrrd  # noqa: E402

__all__ = ["FAKE_CORE", "MODULE_DIR", "MODULE_FILE", "RECORDER", "REPO", "FakeGeometryMismatch", "FakeSlicer",
           "Geometry", "fakeCommandFactory", "getFake", "loadModule", "readNrrd", "writeNrrd"]

_FAKE = None


def getFake() -> FakeSlicer:
    """The one fake (the module file binds ``slicer`` at import); ``reset()`` it per test."""
    global _FAKE
    if _FAKE is None:
        _FAKE = FakeSlicer()
    return _FAKE


def loadModule():
    """Import SemiSegLA/SemiSegLA.py with the fake ``slicer``/``qt`` in place (once per session)."""
    if "SemiSegLA" in sys.modules and getattr(sys.modules["SemiSegLA"], "__file__", "") == str(MODULE_FILE):
        return sys.modules["SemiSegLA"]
    fake = getFake()
    saved = {name: sys.modules.get(name) for name in
             ("slicer", "slicer.util", "slicer.i18n", "slicer.ScriptedLoadableModule", "qt", "vtk")}
    fake.install()
    try:
        spec = importlib.util.spec_from_file_location("SemiSegLA", str(MODULE_FILE))
        module = importlib.util.module_from_spec(spec)
        sys.modules["SemiSegLA"] = module
        spec.loader.exec_module(module)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    return module


def fakeCommandFactory(mode: str = "", extraEnvironment=None):
    """A CommandFactory that runs fake_core.py with the current interpreter."""
    from SemiSegLALib.commands import CommandFactory

    env = {"SEMISEG_FAKE_MODE": mode}
    env.update(extraEnvironment or {})
    return CommandFactory(sys.executable, entry=[str(FAKE_CORE)], extraEnvironment=env)
