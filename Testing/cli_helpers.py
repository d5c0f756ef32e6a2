"""Helpers for the CLI tests: run the real command in a child process, build tiny models and datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import SimpleITK as sitk

from conftest import REPO, sphere_volume
from semiseg_la.io.volume import Volume, write_volume

TINY_PATCH = [32, 32, 32]


def run_cli(args: List[str], timeout: float = 300, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "training") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "semiseg_la.cli.main", *args], capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout, env=env)


def json_lines(stdout: str) -> List[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def save_tiny_model(model_id: str = "tiny-test-v0.1.0", seed: int = 0) -> Path:
    """A randomly initialised V-Net in the local catalog (geometry tests need no trained weights)."""
    import torch

    from semiseg_la.checkpoints import ModelCard, new_local_model_dir, save_model
    from semiseg_la.checkpoints.card import default_classes, default_inference
    from semiseg_la.models import VNet

    torch.manual_seed(seed)
    net = VNet().eval()
    card = ModelCard(id=model_id, name="tiny-test", version="0.1.0", method="supervised",
                     architecture={"name": "vnet", "config": net.config},
                     inference=default_inference(TINY_PATCH, (1.0, 1.0, 1.0)), classes=default_classes(),
                     training={"note": "random weights for tests"})
    folder = new_local_model_dir(model_id)
    save_model(folder, net.state_dict(), card)
    return folder


def write_case(path: Path, shape=(40, 36, 36), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
               direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), seed=0, radius=9.0):
    image, label = sphere_volume(shape, radius=radius, seed=seed)
    vol = Volume(image, spacing, origin, direction)
    write_volume(vol, path)
    return vol, vol.with_array(label)


def nnunet_dataset(root: Path, n_labeled: int = 3, n_unlabeled: int = 2) -> Path:
    """A tiny nnU-Net-style folder (imagesTr/labelsTr/dataset.json) plus an unlabelled folder."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_labeled):
        image, label = write_case(root / "imagesTr" / f"case{i:02d}_0000.nrrd", seed=i, radius=8 + i)
        write_volume(label, root / "labelsTr" / f"case{i:02d}.nrrd")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "LGE-MRI"}, "labels": {"background": 0, "left_atrium": 1},
        "numTraining": n_labeled, "file_ending": ".nrrd"}))
    unl = root.parent / (root.name + "_unlabeled")
    unl.mkdir()
    for i in range(n_unlabeled):
        write_case(unl / f"u{i:02d}.nrrd", seed=100 + i)
    return unl


def oblique_direction(angle_deg: float = 20.0) -> tuple:
    t = np.deg2rad(angle_deg)
    rz = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(t / 2), -np.sin(t / 2)], [0, np.sin(t / 2), np.cos(t / 2)]])
    return tuple((rz @ rx).ravel())


def read_header(path: Path):
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()
