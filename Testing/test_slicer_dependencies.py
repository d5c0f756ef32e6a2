"""Slicer side: dependency checks and installs (core bundled, torch via PyTorch Utils, never Slicer's own
numpy/SimpleITK/vtk), against the stand-in's ``slicer.util``."""

import os
import re
from pathlib import Path

import pytest

import slicer_fake

# isort: split
from SemiSegLALib.dependencies import (
    FORBIDDEN_PIP_NAMES,
    DependencyError,
    DependencyManager,
    bundledCoreVersion,
    isForbidden,
    locateBundledCore,
    parseRequirements,
    satisfies,
)

REQUIREMENTS = slicer_fake.MODULE_DIR / "Resources" / "requirements.txt"


class FakePyTorchLogic:
    def __init__(self, versions, version="2.4.1"):
        self.versions, self.version, self.calls = versions, version, []

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        self.calls.append((askConfirmation, torchVersionRequirement))
        self.versions["torch"] = self.version


@pytest.fixture
def core_dir(tmp_path):
    folder = tmp_path / "bundle" / "training"
    (folder / "semiseg_la").mkdir(parents=True)
    (folder / "semiseg_la" / "__init__.py").write_text("")
    (folder / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n\n[project]\n'
                                           'name = "semiseg-la"\nversion = "0.3.0"\n')
    return str(folder)


def is_core_folder(arg):
    return os.path.isfile(os.path.join(arg, "pyproject.toml")) and os.path.isdir(os.path.join(arg, "semiseg_la"))


def manager(fake, core_dir, tmp_path, versions, requirements="scikit-image>=0.20\nsafetensors>=0.4\n",
            torchLogic=None, importable=False):
    req = tmp_path / "requirements.txt"
    req.write_text(requirements)

    def pip_install_effect(args):
        for arg in args:
            if is_core_folder(arg):  # the core, from its build copy
                versions["semiseg-la"] = "0.3.0"
                continue
            match = re.match(r"^([A-Za-z0-9_.-]+)", arg)
            if match and not arg.startswith("-") and not os.path.exists(arg):
                versions[match.group(1)] = "99.0"

    util = fake.slicer.util
    original = util.pip_install

    class Util:  # slicer.util as the module sees it, with pip's effect on the fake "site-packages"
        @staticmethod
        def pip_install(args):
            original(args)
            pip_install_effect(args)

        confirmOkCancelDisplay = staticmethod(util.confirmOkCancelDisplay)

    return DependencyManager(coreDir=core_dir, requirementsPath=str(req), slicerUtil=Util,
                             pyTorchLogicFactory=lambda: torchLogic, versionOf=versions.get,
                             findSpec=lambda name: object() if importable else None)


def test_shipped_requirements_never_name_slicers_packages():
    reqs = parseRequirements(REQUIREMENTS.read_text())
    assert reqs, "requirements.txt is empty"
    assert not [r.name for r in reqs if isForbidden(r.name)]
    assert {r.key for r in reqs} >= {"scikit-image", "safetensors"}


def test_requirements_cover_the_cores_dependencies():
    """Every third-party dependency of training/pyproject.toml except Slicer's own packages and torch is in
    requirements.txt, so the child never lacks a package at run time."""
    text = (slicer_fake.REPO / "training" / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M).group(1)
    core = parseRequirements("\n".join(re.findall(r'"([^"]+)"', block)))
    shipped = {r.key for r in parseRequirements(REQUIREMENTS.read_text())}
    missing = [str(r) for r in core if not isForbidden(r.name) and r.key not in shipped]
    assert not missing, f"add to SemiSegLA/Resources/requirements.txt: {missing}"


def test_forbidden_names_and_normalisation():
    assert {"numpy", "simpleitk", "vtk", "torch"} <= FORBIDDEN_PIP_NAMES
    for name in ("numpy", "NumPy", "SimpleITK", "SIMPLEITK", "vtk", "torch", "Torch", "torchvision"):
        assert isForbidden(name), name
    assert not isForbidden("scikit-image") and not isForbidden("numpy-stl")


def test_requirement_parsing_and_version_checks():
    reqs = parseRequirements("# c\nscikit-image>=0.20  # why\n\n-r other.txt\nPyYAML[x]>=6.0 ; python_version>'3'\n")
    assert [(r.name, r.specifier) for r in reqs] == [("scikit-image", ">=0.20"), ("PyYAML", ">=6.0")]
    assert satisfies("0.22.0", ">=0.20") and not satisfies("0.19.3", ">=0.20")
    assert satisfies("2.4.1+cu121", ">=2.1") and not satisfies("1.13.1", ">=2.1")
    assert satisfies("1.4.2", "~=1.4") and not satisfies("2.0", "~=1.4")
    assert satisfies("1.2.9", "==1.2.*") and not satisfies("1.3", "==1.2.*")
    assert satisfies("3.0", ">=2,<4,!=3.1") and not satisfies("3.1", ">=2,<4,!=3.1")


def test_locate_bundled_core(tmp_path, core_dir):
    module_dir = tmp_path / "module"
    (module_dir / "Resources" / "semiseg-la").mkdir(parents=True)
    assert locateBundledCore(str(module_dir)) is None
    os.rename(os.path.dirname(core_dir), module_dir / "Resources" / "semiseg-la-x")
    os.rmdir(module_dir / "Resources" / "semiseg-la")
    os.rename(module_dir / "Resources" / "semiseg-la-x", module_dir / "Resources" / "semiseg-la")
    found = locateBundledCore(str(module_dir))
    assert found == os.path.normpath(str(module_dir / "Resources" / "semiseg-la" / "training"))
    assert bundledCoreVersion(found) == "0.3.0"
    # a source checkout: SemiSegLA/ beside training/
    assert locateBundledCore(str(slicer_fake.MODULE_DIR)) == os.path.normpath(str(slicer_fake.REPO / "training"))


def test_first_use_installs_everything_after_one_confirmation(fake, core_dir, tmp_path):
    versions = {"numpy": "1.26.4", "SimpleITK": "2.4.0"}
    torch = FakePyTorchLogic(versions)
    deps = manager(fake, core_dir, tmp_path, versions, torchLogic=torch)
    before = deps.status()
    assert before.coreNeedsInstall and not before.torchOk and [str(r) for r in before.missing] == [
        "scikit-image>=0.20", "safetensors>=0.4"]
    after = deps.ensure(askConfirmation=True)
    assert after.ready
    assert len(fake.dialogs) == 1
    text = fake.dialogs[0][1]
    assert "SemiSegLA core 0.3.0" in text and "scikit-image>=0.20" in text and "PyTorch" in text
    assert "numpy, SimpleITK and VTK are not changed" in text
    assert torch.calls == [(False, ">=2.4")]  # torch through PyTorch Utils, confirmed once above
    # requirements with a constraints file pinning Slicer's own packages; the core with --no-deps
    reqCall, coreCall = fake.pipCalls
    assert reqCall[0] == "-c" and reqCall[2:] == ["scikit-image>=0.20", "safetensors>=0.4"]
    assert coreCall[:3] == ["--no-deps", "--force-reinstall", "--no-build-isolation"] and len(coreCall) == 4
    assert coreCall[3] != core_dir and os.path.basename(coreCall[3]) == "training"  # a temporary build copy
    assert not os.path.exists(reqCall[1])  # the constraints file is temporary
    assert not os.path.exists(coreCall[3])  # and so is the build copy


def test_constraints_pin_slicers_packages(fake, core_dir, tmp_path):
    versions = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "torch": "2.4.1", "semiseg-la": "0.3.0"}
    deps = manager(fake, core_dir, tmp_path, versions)
    seen = {}
    original = deps.slicerUtil.pip_install

    def capture(args):
        seen["constraints"] = Path(args[1]).read_text()
        original(args)
    deps.slicerUtil.pip_install = staticmethod(capture)
    deps.installRequirements(parseRequirements("scikit-image>=0.20"))
    assert seen["constraints"].split() == ["numpy==1.26.4", "SimpleITK==2.4.0", "torch==2.4.1"]


def test_forbidden_packages_are_never_pip_installed(fake, core_dir, tmp_path):
    versions = {"torch": "2.4.1", "semiseg-la": "0.3.0"}
    hostile = "numpy>=2\nSimpleITK\nvtk==9.3\ntorch>=2.5\ntorchvision\nscikit-image>=0.20\n"
    deps = manager(fake, core_dir, tmp_path, versions, requirements=hostile)
    status = deps.status()
    assert [r.name for r in status.missing] == ["scikit-image"]
    assert sorted(r.name for r in status.skipped) == ["SimpleITK", "numpy", "torch", "torchvision", "vtk"]
    deps.ensure(askConfirmation=False)
    installed = [a for call in fake.pipCalls for a in call]
    for name in ("numpy", "SimpleITK", "vtk", "torch", "torchvision"):
        assert not any(re.match(rf"^{name}\b", a, re.I) for a in installed), installed
    for bad in (["numpy>=2"], ["--upgrade", "SimpleITK"], ["torch"], ["-r", "reqs.txt"], ["vtk @ https://x/vtk.whl"]):
        with pytest.raises(DependencyError):
            deps.pipInstall(bad)
    assert len(fake.pipCalls) == 1  # only the scikit-image call went through


def test_missing_pytorch_extension_is_an_actionable_error(fake, core_dir, tmp_path):
    deps = manager(fake, core_dir, tmp_path, {"semiseg-la": "0.3.0"}, requirements="", torchLogic=None)
    with pytest.raises(DependencyError, match="install the 'PyTorch' extension from the Extensions Manager"):
        deps.ensure()
    assert fake.pipCalls == [] and fake.dialogs == []


def test_old_torch_asks_for_a_reinstall_through_pytorch_utils(fake, core_dir, tmp_path):
    deps = manager(fake, core_dir, tmp_path, {"semiseg-la": "0.3.0", "torch": "1.13.1"}, requirements="",
                   torchLogic=FakePyTorchLogic({}))
    with pytest.raises(DependencyError, match=r"PyTorch 1.13.1 is too old .*torch>=2.4.*PyTorch Utils"):
        deps.ensure()


def test_declining_the_confirmation_installs_nothing(fake, core_dir, tmp_path):
    fake.confirmAnswer = False
    versions = {"torch": "2.4.1"}
    deps = manager(fake, core_dir, tmp_path, versions)
    with pytest.raises(DependencyError, match="Installation cancelled"):
        deps.ensure(askConfirmation=True)
    assert fake.pipCalls == []


def test_outdated_core_is_reinstalled_and_a_source_checkout_left_alone(fake, core_dir, tmp_path):
    versions = {"torch": "2.4.1", "semiseg-la": "0.2.0"}
    deps = manager(fake, core_dir, tmp_path, versions, requirements="")
    assert deps.status().coreNeedsInstall
    deps.ensure(askConfirmation=False)
    assert versions["semiseg-la"] == "0.3.0"
    dev = manager(fake, core_dir, tmp_path, {"torch": "2.4.1"}, requirements="", importable=True)
    assert dev.status().ready  # importable from PYTHONPATH without metadata: not reinstalled
    assert "importable (source checkout)" in dev.status().describe()


def test_core_install_falls_back_to_an_isolated_build(fake, core_dir, tmp_path):
    versions = {"torch": "2.4.1"}
    deps = manager(fake, core_dir, tmp_path, versions, requirements="")
    original = deps.slicerUtil.pip_install

    def failing_offline(args):
        if "--no-build-isolation" in args:
            raise RuntimeError("setuptools too old")
        original(args)
    deps.slicerUtil.pip_install = staticmethod(failing_offline)
    deps.ensure(askConfirmation=False)
    assert deps.pipCalls[-1][:2] == ["--no-deps", "--force-reinstall"] and len(deps.pipCalls[-1]) == 3
    assert deps.pipCalls[-1][2] == deps.pipCalls[-2][3]  # the same build copy, now with an isolated build


def test_core_is_built_from_a_short_writable_copy_never_in_the_extension_folder(fake, core_dir, tmp_path):
    """Issue 15.2: pip builds a local folder in place (build/, *.egg-info). Inside the extension folder that
    fails when the folder is read-only and can pass Windows' 260-character limit; the module builds from a
    copy in a short temporary folder instead, and the extension folder is left exactly as it was."""
    import stat

    core = Path(core_dir)
    (core / "semiseg_la" / "presets").mkdir()
    (core / "semiseg_la" / "presets" / "a.yaml").write_text("x: 1\n")
    (core / "build" / "lib").mkdir(parents=True)  # leftovers of an earlier in-place build: not copied
    (core / "semiseg_la.egg-info").mkdir()
    (core / "semiseg_la" / "__pycache__").mkdir()
    before = sorted(str(p.relative_to(core)) for p in core.rglob("*"))
    versions = {"torch": "2.4.1"}
    deps = manager(fake, core_dir, tmp_path, versions, requirements="")
    seen = {}
    original = deps.slicerUtil.pip_install

    def build_in_place(args):
        folder = Path(args[-1])
        if folder == core or core in folder.parents:
            raise PermissionError(f"[Errno 13] Permission denied: '{folder / 'build'}'")  # a read-only install
        seen["copy"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        seen["writable"] = all(os.stat(p).st_mode & stat.S_IWUSR for p in folder.rglob("*"))
        (folder / "build").mkdir()
        (folder / "semiseg_la.egg-info").mkdir()
        original(args)
    deps.slicerUtil.pip_install = staticmethod(build_in_place)
    for path in [core, *core.rglob("*")]:  # a read-only extensions folder
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        deps.ensure(askConfirmation=False)
    finally:
        for path in [core, *core.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert versions["semiseg-la"] == "0.3.0"
    assert seen["copy"] == ["pyproject.toml", "semiseg_la", "semiseg_la/__init__.py", "semiseg_la/presets",
                            "semiseg_la/presets/a.yaml"]
    assert seen["writable"]
    copy = deps.pipCalls[-1][-1]
    assert len(copy) < 160 and copy.isascii()  # short and ASCII: far below Windows' limit
    assert not os.path.exists(os.path.dirname(copy))  # removed after the install
    assert sorted(str(p.relative_to(core)) for p in core.rglob("*")) == before  # nothing written there
