"""Real LA data (../shared/data/LA): loading, a short real training, and the bundled model's behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_helpers import run_cli
from semiseg_la.engine.config import build_config
from semiseg_la.engine.data import prepare_case, split_cases
from semiseg_la.engine.loop import Trainer
from semiseg_la.io.datasets import open_dataset
from semiseg_la.io.volume import read_volume, write_volume

VALIDATION_IDS = ["Q0MEX9ZIKAGJORSPLQ3Y", "Q7J0WYM695R9MA285ZW0", "QZC1W0FNR19KJFLOCFLH", "R8ER97O9UUN77C02VE2J",
                  "RSZY41MT2FGDKHWWL5L2", "SN4LF8SGBSRQUPTDSX78", "TDDI6L3Y0L9VVFP9MNFS", "UZUZZT2W9IUSHL6ASOX3"]


def test_split_follows_the_la_protocol(la_root):
    records = open_dataset(la_root, "train.list")
    split = split_cases(records, labeled_num=8, val_num=8)
    assert [r.case_id for r in split.labeled][:2] == ["06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU"]
    assert [r.case_id for r in split.validation] == VALIDATION_IDS
    assert len(split.unlabeled) == 72  # the rest of train.list, validation images included (never their labels)
    assert not {r.case_id for r in split.labeled} & set(VALIDATION_IDS)


def test_short_real_training_lowers_the_loss(la_root, tmp_path):
    records = open_dataset(la_root, "train.list")[:2]
    cases = [prepare_case(r, [1.25, 1.25, 1.25]) for r in records]
    config = build_config({"method": "supervised", "data": str(la_root), "patch_size": [64, 64, 48],
                           "spacing": [1.25, 1.25, 1.25], "max_iterations": 14, "batch_size": 2, "labeled_bs": 2,
                           "labeled_num": 2, "val_num": 0, "base_lr": 0.01, "lr_policy": "constant",
                           "checkpoint_every": 0, "validate_every": 0, "log_every": 1, "seed": 1,
                           "output": str(tmp_path / "run"), "device": "cpu"})
    Trainer(config, cases, []).run()
    import csv

    with open(tmp_path / "run" / "train_log.csv") as handle:
        losses = [float(r["loss"]) for r in csv.DictReader(handle)]
    assert len(losses) == 14
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses


@pytest.fixture(scope="module")
def bundled_default():
    from semiseg_la.checkpoints import default_model_id, list_models

    model_id = default_model_id()
    entry = {e.id: e for e in list_models()}[model_id]
    assert entry.source == "bundled" and entry.error is None
    return model_id


def test_bundled_default_model_meets_its_card_on_the_validation_split(la_root, tmp_path, bundled_default):
    """The default model's card states its validation Dice (one pass, as training validates). A final model
    trained on every labelled case takes it from its validation run (`validation_run`, bundled too): `evaluate
    --tta none` on those 8 cases must reproduce it, and the default flip TTA must reach 0.89 (issue 13 asked for
    0.88; the whole-scan stage of issue 14 measured 0.8985)."""
    from semiseg_la.checkpoints import ModelCard, resolve_model

    card = ModelCard.load(resolve_model(bundled_default))
    run_id = (card.validation or {}).get("validation_run", bundled_default)
    ids = list((card.validation or {}).get("cases", {})) or VALIDATION_IDS
    (tmp_path / "val.list").write_text("\n".join(ids) + "\n")

    def mean_dice(model: str, *extra: str) -> float:
        out = tmp_path / "metrics.json"
        proc = run_cli(["evaluate", "--model", model, "--data", str(la_root), "--list", str(tmp_path / "val.list"),
                        "--json", str(out), "--device", "cpu", "--progress", "none", *extra], timeout=900)
        assert proc.returncode == 0, proc.stderr
        return json.loads(out.read_text())["mean"]["dice"]

    one_pass = mean_dice(run_id, "--tta", "none")
    assert one_pass == pytest.approx(card.validation_dice, abs=0.005)
    assert one_pass > 0.85  # the default model's floor (0.851 for v0.1.0, trained further since)
    assert mean_dice(run_id) >= 0.89  # what `segment` gives by default (0.8985 measured, docs/results.md)
    if run_id != bundled_default:  # the final model trained on these cases too: at least its run's figure
        assert mean_dice(bundled_default, "--tta", "none") >= one_pass - 0.005


def test_bundled_default_model_segments_validation_cases_well(la_root, tmp_path, bundled_default):
    """Cropped NRRD input (the same voxels as the h5 crop) gives the same Dice as the h5 input."""
    ids = VALIDATION_IDS[:2]
    (tmp_path / "val.list").write_text("\n".join(ids) + "\n")
    out = tmp_path / "metrics.json"
    proc = run_cli(["evaluate", "--data", str(la_root), "--list", str(tmp_path / "val.list"), "--json", str(out),
                    "--device", "cpu", "--progress", "none"], timeout=900)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["cases"]) == set(ids)
    assert report["tta"] == "flip"  # evaluate scores what segment writes by default (compared per case below)
    assert {"dice", "jaccard", "hd95_mm", "asd_mm", "hd95_vox_legacy", "asd_vox_legacy"} <= set(report["mean"])
    assert report["mean"]["dice"] > 0.75, report["mean"]
    assert "Dice" in proc.stdout
    for case_id in ids:
        record = [r for r in open_dataset(la_root, str(tmp_path / "val.list")) if r.case_id == case_id][0]
        image, label = record.load()
        nrrd = tmp_path / f"{case_id}.nrrd"
        write_volume(image, nrrd)
        seg = tmp_path / f"{case_id}-seg.nrrd"
        proc = run_cli(["segment", str(nrrd), "-o", str(seg), "--device", "cpu", "--progress", "none"], timeout=600)
        assert proc.returncode == 0, proc.stderr
        pred = read_volume(seg).array
        dice = 2 * np.logical_and(pred, label.array).sum() / (pred.sum() + label.array.sum())
        assert abs(dice - report["cases"][case_id]["dice"]) < 1e-6
