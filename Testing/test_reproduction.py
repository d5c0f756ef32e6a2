"""Reproduction configurations (issue 11): the official-code presets resolve to the official values, and the
engine options they need (intensities as stored / whole-volume min-max, Adam with warm-up and milestones,
per-epoch schedules, export of the last checkpoint) each change behaviour as intended."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import nnunet_dataset
from conftest import synthetic_cases
from semiseg_la.engine.config import build_config, load_preset
from semiseg_la.engine.data import normalize_volume, prepare_case
from semiseg_la.engine.loop import Trainer
from semiseg_la.errors import ConfigError
from semiseg_la.inference.predictor import InferenceSpec, Predictor
from semiseg_la.io.datasets import CaseRecord
from semiseg_la.io.volume import Volume, write_volume
from semiseg_la.methods import build_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the presets ------------------------------------------------------------------------------------------

CAML_OFFICIAL = {"method": "caml", "max_iterations": 15000, "batch_size": 4, "labeled_bs": 2, "optimizer": "sgd",
                 "base_lr": 0.01, "lr_policy": "constant", "momentum": 0.9, "weight_decay": 1e-4,
                 "patch_size": [112, 112, 80], "intensity_prob": 0.0, "normalization": "stored", "seed": 3407,
                 "deterministic": True, "amp": False, "export_checkpoint": "last"}
CAML_OFFICIAL_PARAMS = {"detach_consistency_target": False, "detach_correlation_target": False,
                        "memory_flatten": "official", "memory_keep_fraction": 1.0, "occ_head_rows": "agreeing",
                        "supervised_weight": 0.5, "consistency": 1.0, "occ_weight": 0.05, "embedding_dim": 32,
                        "memory_per_class": 256, "num_filtered": 12800, "sharpen_temperature": 0.1}
CRLN_OFFICIAL = {"method": "crln", "max_iterations": 40000, "batch_size": 4, "labeled_bs": 2, "optimizer": "sgd",
                 "base_lr": 2.5e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "lr_policy": "poly",
                 "poly_power": 0.9, "lr_epochs": 200, "min_lr": 1e-6, "intensity_prob": 0.0,
                 "normalization": "minmax-volume", "seed": 0, "deterministic": True, "amp": False}
CRLN_OFFICIAL_PARAMS = {"official_reshape": True, "official_update": True, "mlp_drop_path": True,
                        "unsup_denominator": "unweighted", "input_space": "minmax_volume",
                        "dim_size_policy": "strict", "teacher_eval_mode": False, "rectifier_schedule": "epoch",
                        "prototypes": 16, "cps_weight": 0.5, "unsup_weight": 0.5, "ema_decay": 0.99,
                        "strong_threshold": 0.97, "weak_threshold": 0.7, "temperature": 0.5, "num_anchors": 256,
                        "num_negatives": 512, "iterations_per_epoch": 200, "rectify_from_epoch": 4,
                        "export": "rectified"}
SEMICML_PAPER = {"method": "semicml_la", "optimizer": "adam", "base_lr": 0.006, "weight_decay": 4e-4,
                 "lr_policy": "multistep", "lr_epochs": 81, "lr_warmup": 8, "lr_milestones": [12, 28, 44, 56],
                 "lr_gamma": 0.1, "intensity_prob": 0.0, "normalization": "stored", "seed": 1111, "amp": False}
SEMICML_PAPER_PARAMS = {"loss_scale": 1.0, "teacher_noise": "official", "teacher_bn": "batch",
                        "student_dropout": False, "sup_bce_weight": 10.0, "sup_dice_weight": 7.0, "asc_weight": 3.5,
                        "teacher_passes": 4, "gate_pool": 6, "prel_alpha": [0.1, 0.1]}

EXPECTED = {
    "caml-la-4-official": ({**CAML_OFFICIAL, "labeled_num": 4},
                           {**CAML_OFFICIAL_PARAMS, "consistency_rampup": 40, "memory_slots": 4}),
    "caml-la-8-official": ({**CAML_OFFICIAL, "labeled_num": 8},
                           {**CAML_OFFICIAL_PARAMS, "consistency_rampup": 20, "memory_slots": 8}),
    "caml-la-16-official": ({**CAML_OFFICIAL, "labeled_num": 16},
                            {**CAML_OFFICIAL_PARAMS, "consistency_rampup": 15, "memory_slots": 16}),
    "crln-la-8-official": ({**CRLN_OFFICIAL, "labeled_num": 8}, {**CRLN_OFFICIAL_PARAMS, "xi": 0.6}),
    "crln-la-16-official": ({**CRLN_OFFICIAL, "labeled_num": 16}, {**CRLN_OFFICIAL_PARAMS, "xi": 0.9}),
    "semicml-la-8-paper": ({**SEMICML_PAPER, "labeled_num": 8}, SEMICML_PAPER_PARAMS),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reproduction_preset_resolves_to_the_official_values(name):
    from semiseg_la.cli.main import build_parser
    from semiseg_la.cli.train import resolve_config

    top, params = EXPECTED[name]
    config = resolve_config(build_parser("train").parse_args(["train", "--preset", name, "--data", "x"]))
    assert config.preset == name
    for key, value in top.items():
        assert getattr(config, key) == (pytest.approx(value) if isinstance(value, float) else value), key
    for key, value in params.items():
        got = config.method_params[key]
        assert got == (pytest.approx(value) if isinstance(value, float) else value), key
    method = build_method(config.method, {"in_channels": 1, **config.method_params}, config.max_iterations)
    if config.method == "caml":  # the whole bank: every correct labelled voxel is kept
        assert method.memory.keep_fraction == 1.0 and method.memory.slots == config.labeled_num
    if config.method == "crln":
        assert method.student.config["mlp_drop_path"] and method.student.config["official_update"]


def test_default_presets_keep_the_improved_values():
    caml = build_config(load_preset("caml-la-8"), {"data": "x"})
    assert caml.normalization == "zscore-volume" and caml.export_checkpoint == "best" and caml.seed == 1337
    assert caml.method_params["detach_consistency_target"] and caml.method_params["memory_flatten"] == "voxel"
    crln = build_config(load_preset("crln-la-8"), {"data": "x"})
    assert crln.lr_epochs is None and crln.method_params["input_space"] == "zscore"
    assert not crln.method_params["official_reshape"] and "mlp_drop_path" not in crln.method_params
    # one augmentation for all three methods' presets: no engine intensity affine
    for name in ("caml-la-8", "crln-la-8", "semicml-la-8", "caml-la-8-official", "semicml-la-8-paper"):
        assert build_config(load_preset(name), {"data": "x"}).intensity_prob == 0.0, name


# --- intensities ------------------------------------------------------------------------------------------

def _volume_file(path, array, spacing=(1.0, 1.0, 1.0)):
    write_volume(Volume(array.astype(np.float32), spacing), path)
    return path


def test_normalize_volume_modes():
    rng = np.random.default_rng(0)
    array = (rng.normal(5.0, 2.0, (12, 10, 8))).astype(np.float32)
    z = normalize_volume(array, "zscore-volume")
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-5
    assert np.array_equal(normalize_volume(array, "stored"), array)
    m = normalize_volume(array, "minmax-volume")
    assert float(m.min()) == 0.0 and float(m.max()) == pytest.approx(1.0)
    np.testing.assert_allclose(m, (array - array.min()) / (array.max() - array.min()), rtol=1e-6)
    assert np.array_equal(normalize_volume(np.full((3, 3, 3), 7.0), "minmax-volume"), np.zeros((3, 3, 3)))
    with pytest.raises(Exception, match="unknown normalization"):
        normalize_volume(array, "percentile")
    with pytest.raises(ConfigError, match="normalization"):
        build_config({"data": "x", "normalization": "percentile"})


def test_prepare_case_uses_the_configured_normalization(tmp_path):
    """`stored` keeps the file's intensities (the LA h5 release is z-scored over the uncropped scan already);
    the default re-z-scores the case; `minmax-volume` scales the whole case to [0, 1]."""
    rng = np.random.default_rng(1)
    array = rng.normal(0.4, 0.8, (20, 18, 16)).astype(np.float32)  # like a stored LA crop: not mean 0 / std 1
    label = (rng.random((20, 18, 16)) > 0.7).astype(np.float32)
    record = CaseRecord("c0", (_volume_file(tmp_path / "c0.nrrd", array),), _volume_file(tmp_path / "l0.nrrd", label))
    spacing = (1.0, 1.0, 1.0)
    stored = prepare_case(record, spacing, normalization="stored").image[0]
    default = prepare_case(record, spacing).image[0]
    minmax = prepare_case(record, spacing, normalization="minmax-volume").image[0]
    np.testing.assert_allclose(stored, array, atol=1e-6)
    np.testing.assert_allclose(default, (array - array.mean()) / array.std(), atol=1e-4)
    assert float(minmax.min()) == pytest.approx(0.0) and float(minmax.max()) == pytest.approx(1.0)


class _Threshold(torch.nn.Module):
    """Foreground logit = intensity - 0.5: the label shows exactly which intensities the network was fed."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), x - 0.5], dim=1)


def test_predictor_normalises_inputs_as_the_card_says():
    array = np.zeros((24, 24, 24), np.float32)
    array[4:20, 4:20, 4:20] = 0.8
    array[8:16, 8:16, 8:16] = 3.0
    volume = Volume(array, (1.0, 1.0, 1.0))
    labels = {}
    for mode in ("zscore-volume", "stored", "minmax-volume"):
        spec = InferenceSpec((16, 16, 16), (1.0, 1.0, 1.0), normalization=mode)
        labels[mode] = Predictor(_Threshold(), spec, device="cpu", largest_component=False).predict(volume).label.array
        expected = normalize_volume(array, mode) > 0.5
        assert np.array_equal(labels[mode].astype(bool), expected), mode
    assert labels["stored"].sum() > labels["minmax-volume"].sum()  # 0.8 is foreground as stored, not in [0, 1]


# --- optimiser and schedule ---------------------------------------------------------------------------------

def _trainer(tmp_path, **overrides):
    config = build_config({"method": "supervised", "data": "x", "patch_size": [32, 32, 32], "max_iterations": 100,
                           "labeled_num": 1, "device": "cpu", "output": str(tmp_path / "run"), **overrides})
    return Trainer(config, synthetic_cases(1, True), [])


def test_schedules_in_epochs_with_warmup_milestones_and_floor(tmp_path):
    per_epoch = _trainer(tmp_path, lr_policy="poly", base_lr=0.1, lr_epochs=10, min_lr=0.02)
    lr = per_epoch.learning_rate
    assert lr(0) == lr(9) == pytest.approx(0.1)  # constant within an epoch of 100 / 10 iterations
    assert lr(10) == pytest.approx(0.1 * 0.9 ** 0.9) and lr(95) == pytest.approx(0.02)  # floored
    per_iteration = _trainer(tmp_path, lr_policy="poly", base_lr=0.1).learning_rate
    assert per_iteration(9) < per_iteration(0)  # the default counts iterations
    multistep = _trainer(tmp_path, lr_policy="multistep", base_lr=1.0, lr_warmup=4, lr_milestones=[10, 30],
                         lr_gamma=0.5).learning_rate
    assert [multistep(i) for i in (0, 1, 3, 4, 9, 10, 29, 30, 99)] == pytest.approx(
        [0.25, 0.5, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    assert isinstance(_trainer(tmp_path, optimizer="adam").optimizer, torch.optim.Adam)
    assert isinstance(_trainer(tmp_path).optimizer, torch.optim.SGD)
    for bad in ({"optimizer": "rmsprop"}, {"lr_policy": "multistep"}, {"lr_milestones": [30, 10]},
                {"lr_epochs": 0}, {"export_checkpoint": "middle"}):
        with pytest.raises(ConfigError):
            build_config({"data": "x", **bad})


# --- export: the last checkpoint, and the card's normalisation ------------------------------------------------

def test_export_last_checkpoint_and_card_records_the_normalization(tmp_path):
    from semiseg_la.checkpoints import resolve_model
    from semiseg_la.cli.main import main

    data = tmp_path / "Dataset001_Tiny"
    nnunet_dataset(data, n_labeled=3, n_unlabeled=1)
    common = ["train", "--method", "supervised", "--data", str(data), "--labeled", "2", "--val", "1",
              "--iterations", "3", "--patch", "32", "32", "32", "--spacing", "1", "1", "1", "--validate-every", "1",
              "--device", "cpu", "--progress", "none"]
    cards = {}
    for choice, normalization in (("last", "stored"), ("best", "zscore-volume")):
        assert main(common + ["--set", f"export_checkpoint={choice}", "--set", f"normalization={normalization}",
                              "--output", str(tmp_path / choice), "--name", f"repro-{choice}"]) == 0
        run = tmp_path / choice
        best = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
        folder = resolve_model(_model_id(f"repro-{choice}"))
        cards[choice] = (json.loads((folder / "card.json").read_text()), int(best["iteration"]))
    last_card, _ = cards["last"]
    assert last_card["inference"]["normalization"] == "stored"
    assert last_card["validation"]["checkpoint"] == "last (iteration 3)"
    assert last_card["training"]["exported_iteration"] == 3
    best_card, best_iteration = cards["best"]
    assert best_card["inference"]["normalization"] == "zscore-volume"
    assert best_card["validation"]["checkpoint"] == f"best (iteration {best_iteration})"


def _model_id(prefix: str) -> str:
    from semiseg_la.checkpoints.catalog import list_models

    return next(m.id for m in list_models() if m.id.startswith(prefix))
