"""Shared fixtures: the real LA data beside the checkout, and small synthetic volumes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))  # importable without installation, too

LA_ROOT = Path(os.environ.get("SEMISEG_LA_DATA", REPO.parent / "shared" / "data" / "LA"))


def load_script(relative: str):
    """A repository script (bench/, scripts/) as a module, registered in sys.modules under its file name
    (dataclasses look their module up there)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def la_root() -> Path:
    """The 80-case LA h5 release (../shared/data/LA); tests that need it skip only where it is absent."""
    if not (LA_ROOT / "train.list").is_file():
        pytest.skip(f"LA data not found at {LA_ROOT}")
    return LA_ROOT


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Local models and caches go to a temporary folder, never the user's home."""
    home = tmp_path_factory.mktemp("semiseg_home")
    monkeypatch.setenv("SEMISEG_LA_HOME", str(home))
    yield
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Path:
    """A folder for one test module's shared fixtures, removed when the module is done.

    The suite writes hundreds of 30 MB checkpoints; kept to the end (pytest's default) they took 15 GB, more
    than CI's disk had free. Per-test folders go the same way (`tmp_path_retention_policy` in pytest.ini)."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)


def sphere_volume(shape=(48, 40, 32), center=None, radius=9.0, noise=0.1, seed=0):
    """A bright ellipsoid in noise: (image float32, label uint8), array axes (X, Y, Z)."""
    rng = np.random.default_rng(seed)
    center = center or tuple(s / 2 for s in shape)
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center)))
    label = (dist < radius).astype(np.uint8)
    image = label.astype(np.float32) * 2.0 + rng.normal(0, noise, shape).astype(np.float32)
    return image, label


def synthetic_cases(n: int, labeled: bool, seed: int = 0):
    """`n` prepared training cases (TrainCase) of spheres in noise, labelled or not."""
    from semiseg_la.engine.data import TrainCase

    cases = []
    for i in range(n):
        image, label = sphere_volume((40, 36, 36), radius=8 + i % 3, seed=seed + i)
        cases.append(TrainCase(f"c{seed + i}", image[None], label if labeled else None))
    return cases


@pytest.fixture
def one_torch_thread():
    """The Predictor raises torch's thread count to the core count; keep later CPU runs on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake(monkeypatch):
    """The explicit `slicer` stand-in, reset and installed for one test."""
    import slicer_fake

    stand_in = slicer_fake.getFake()
    stand_in.reset()
    stand_in.install(monkeypatch)
    return stand_in


@pytest.fixture(scope="module")
def module():
    """The SemiSegLA scripted module, loaded against the `slicer` stand-in."""
    import slicer_fake

    return slicer_fake.loadModule()


@pytest.fixture
def make_logic(module, tmp_path):
    """make_logic(mode, **env): a module logic whose core is the fake core in that mode."""
    import slicer_fake

    def make(mode="", **env):
        factory = slicer_fake.fakeCommandFactory(mode, env)
        return module.SemiSegLALogic(commandFactory=factory, tempRoot=str(tmp_path / "tmp"))
    return make


def rotation(axis, degrees):
    """The 3x3 rotation by `degrees` about `axis` (Rodrigues)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


def stop_after(polls: int):
    """A Trainer `should_stop` that asks to stop at its `polls`-th call (once per iteration): an interruption."""
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= polls

    return should_stop
