"""Semi-CML + PReL: the ASC formula, the validation gate of the BMA teacher, the multi-modal data path,
export of a one-modality network, and short CPU runs of both forms (multi-modal and LA adaptation)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from semiseg_la.engine.config import build_config, load_preset
from semiseg_la.engine.data import prepare_case
from semiseg_la.engine.loop import Trainer, build_for_export
from semiseg_la.engine.multimodal import (
    modality_names,
    open_multimodal_dataset,
    prepare_multimodal_cases,
    single_channel,
)
from semiseg_la.engine.state import load_state
from semiseg_la.inference.predictor import InferenceSpec, Predictor
from semiseg_la.inference.validation import dice_score
from semiseg_la.io.datasets import open_dataset
from semiseg_la.io.synthetic import make_two_contrast_case, write_named_modality_folders, write_two_channel_nnunet
from semiseg_la.io.volume import Volume
from semiseg_la.methods import build_method
from semiseg_la.methods.semicml import asc_loss
from semiseg_la.models import VNet

PATCH = [32, 32, 32]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- ASC -------------------------------------------------------------------------------------------

def _hand_asc(a, b, negatives=(), temperature=1.0, eps=1e-6):
    """The formula of docs/methods.md 3.3, written out with plain Python loops."""
    z = [list(m) for m in a] + [list(m) for m in b]
    n, half = len(z), len(a)

    def sim(u, v):
        return (2 * sum(x * y for x, y in zip(u, v)) + eps) / (sum(x * x for x in u) + sum(y * y for y in v) + eps)

    total = 0.0
    for k in range(n):
        positive = (k + half) % n
        others = [z[j] for j in range(n) if j != k] + [list(m) for m in negatives]
        denominator = sum(math.exp(sim(z[k], o) / temperature) for o in others)
        total += -math.log(math.exp(sim(z[k], z[positive]) / temperature) / denominator)
    return total / n


def test_asc_equals_its_formula_on_hand_built_maps():
    a = [[0.9, 0.8, 0.1, 0.0], [0.2, 0.1, 0.7, 0.9]]
    b = [[1.0, 0.6, 0.2, 0.1], [0.0, 0.3, 0.8, 0.6]]
    queue = [[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.1, 0.0]]
    ta, tb, tq = (torch.tensor(x, dtype=torch.float64) for x in (a, b, queue))
    assert float(asc_loss(ta, tb)) == pytest.approx(_hand_asc(a, b), rel=1e-6)
    assert float(asc_loss(ta, tb, tq)) == pytest.approx(_hand_asc(a, b, queue), rel=1e-6)
    assert float(asc_loss(ta, tb, tq, temperature=0.5)) == pytest.approx(_hand_asc(a, b, queue, 0.5), rel=1e-6)
    # maps of any shape are flattened per sample; matching pairs score lower than swapped ones
    assert float(asc_loss(ta.reshape(2, 2, 2), tb.reshape(2, 2, 2))) == pytest.approx(_hand_asc(a, b), rel=1e-6)
    assert float(asc_loss(ta, tb)) < float(asc_loss(ta, tb.flip(0)))


# --- the validation gate -------------------------------------------------------------------------------

def _tiny(name="semicml", **params):
    base = {"in_channels": 2 if name == "semicml" else 1, "base": 4, "gate_pool": 3}
    return build_method(name, {**base, **params}, max_iterations=100)


def _params(net):
    return [p.detach().clone() for p in net.parameters()]


def _same(xs, ys):
    return all(torch.allclose(x, y, atol=1e-6) for x, y in zip(xs, ys))


def test_teacher_gate_pools_copies_then_updates_only_on_improvement():
    method = _tiny(modality_names=["T1", "T2"])
    initial = _params(method.teacher)
    actions = [method.update_teacher(s).action for s in ({0: .50, 1: .60}, {0: .55, 1: .62}, {0: .50, 1: .70})]
    assert actions == ["pool"] * 3 and _same(_params(method.teacher), initial)
    init = method.update_teacher({0: .40, 1: .40})  # pool full: source = best pooled mean (net_b)
    assert (init.action, init.source) == ("init", 1)
    assert _same(_params(method.teacher), _params(method.net_b))
    assert method.inference_network() is method.teacher and method.exported_modality == "channel 1 (T2)"

    with torch.no_grad():  # move the source away from the teacher so every update is visible
        for p in method.net_b.parameters():
            p.add_(1.0)
    # source pool [.60, .62, .70]: D must beat the worst pooled score
    expected = [({0: .99, 1: .60}, "skip", None),
                ({0: .10, 1: .65}, "update", 1 - (.65 - .60) / .65),   # pool -> [.65, .62, .70]
                ({1: .63}, "update", 1 - (.63 - .62) / .63),            # pool -> [.65, .63, .70]
                ({1: .62}, "skip", None),
                ({1: .63}, "skip", None),                               # equal is no improvement
                ({1: .64}, "update", 1 - (.64 - .63) / .64)]            # pool -> [.65, .64, .70]
    for scores, action, alpha in expected:
        before_t, source = _params(method.teacher), _params(method.net_b)
        decision = method.update_teacher(scores)
        assert decision.action == action, scores
        if alpha is None:
            assert _same(_params(method.teacher), before_t)
        else:
            assert decision.alpha == pytest.approx(alpha)
            blended = [alpha * t + (1 - alpha) * s for t, s in zip(before_t, source)]
            assert _same(_params(method.teacher), blended)
    assert int(method.gate.updates) == 3


def test_teacher_gate_alpha_cap_fixed_source_and_state_round_trip(tmp_path):
    method = _tiny(name="semicml_la", better=0, gate_pool=1, gate_alpha_cap=0.9, decoder_types=[1, 0])
    assert method.update_teacher([0.1, 0.9]).action == "pool"
    assert method.update_teacher([0.1, 0.9]).source == 0  # fixed choice (S3 option) beats the scores
    assert method.update_teacher([0.1001, 0.9]).alpha == pytest.approx(0.9)  # tiny gain: alpha capped
    assert method.update_teacher([0.9, 0.1]).alpha == pytest.approx(1 - (0.9 - 0.1001) / 0.9)  # big gain
    assert method.teacher.config["up_type"] == 1  # the teacher takes its source's decoder

    # the gate lives in the checkpointed networks: export from a state rebuilds the same teacher
    path = tmp_path / "state.pt"
    torch.save({"networks": method.state_dict(), "extra": method.extra_state()}, path)
    state = torch.load(path, weights_only=True)
    exported = build_for_export("semicml_la", {"in_channels": 1, "base": 4, "gate_pool": 1, "better": 0,
                                               "decoder_types": [1, 0]}, state["networks"])
    assert _same(_params(exported), _params(method.teacher)) and exported.config["up_type"] == 1


# --- data: the synthetic two-contrast generator and the multi-modal readers -------------------------------

def test_two_contrast_generator_and_multimodal_readers(tmp_path):
    case = make_two_contrast_case(shape=(40, 36, 24), seed=3)
    t1, t2 = case.images
    atrium = case.label.astype(bool)
    assert t1.shape == t2.shape == case.label.shape and 0 < atrium.mean() < 0.2
    assert t1[atrium].mean() > t1[~atrium].mean() + 0.4  # bright-blood contrast
    assert t2[atrium].mean() < t2[~atrium & (t2 > 0.5)].mean()  # dark-blood, noisier contrast
    assert np.std(t2 - ndimage_free_smooth(t2)) > np.std(t1 - ndimage_free_smooth(t1))

    nnunet = write_two_channel_nnunet(tmp_path / "nn", 3, shape=(40, 36, 24), n_unlabeled=1)
    records = open_multimodal_dataset(nnunet)
    assert [r.n_channels for r in records] == [2, 2, 2] and records[2].label_path is None
    assert modality_names(nnunet) == ["T1", "T2"]
    prepared = prepare_multimodal_cases(records[:2], (1.0, 1.0, 1.0))
    assert prepared[0].image.shape == (2, 40, 36, 24) and prepared[0].label.sum() > 0
    assert np.allclose(prepared[0].image.mean(axis=(1, 2, 3)), 0, atol=1e-4)  # each channel z-scored
    assert np.allclose(prepared[0].image.std(axis=(1, 2, 3)), 1, atol=1e-3)
    assert single_channel(prepared, 1)[0].image.shape == (1, 40, 36, 24)

    named = write_named_modality_folders(tmp_path / "named", 2, shape=(40, 36, 24))
    records = open_multimodal_dataset(named, modalities=["T1", "T2"], labeled=True)
    assert [p.parent.name for p in records[0].image_paths] == ["T1", "T2"]
    assert modality_names(named, ["T1", "T2"]) == ["T1", "T2"]


def ndimage_free_smooth(x):
    """A 3-voxel box mean along x: enough to split signal from voxel noise in the generator check."""
    return (np.roll(x, 1, 0) + x + np.roll(x, -1, 0)) / 3


# --- short CPU runs ------------------------------------------------------------------------------------

def _config(tmp_path, method, iterations, spacing, **method_params):
    params = {"base": 8, "gate_start": 0.0, "gate_every": 1, "gate_pool": 2, **method_params}
    return build_config({"method": method, "data": "test", "in_channels": 2 if method == "semicml" else 1,
                         "patch_size": PATCH, "spacing": spacing, "max_iterations": iterations,
                         "batch_size": 4, "labeled_bs": 2, "labeled_num": 2, "val_num": 0, "base_lr": 0.01,
                         "lr_policy": "constant", "checkpoint_every": 0, "validate_every": 0, "log_every": 1,
                         "seed": 5, "device": "cpu", "output": str(tmp_path / "run"), "method_params": params})


def _losses(run_dir):
    with open(run_dir / "train_log.csv", newline="") as handle:
        return [(float(r["loss"]), float(r["phase"])) for r in csv.DictReader(handle)]


def _assert_phase_one_loss_falls(losses, window=5):
    phase_one = [loss for loss, phase in losses if phase == 1.0]
    assert len(phase_one) >= 3 * window
    early, late = np.mean(phase_one[:window]), np.mean(phase_one[-window:])
    assert late < 0.85 * early, (early, late, phase_one)


@pytest.fixture(scope="module")
def multimodal_run(module_tmp):
    """24 iterations on synthetic two-contrast cases: 18 of mutual learning, then PReL."""
    tmp = module_tmp
    root = write_two_channel_nnunet(tmp / "data", 6, shape=(48, 48, 32), seed=0, n_unlabeled=2)
    records = open_multimodal_dataset(root)
    labeled = prepare_multimodal_cases(records[:4], (1.0, 1.0, 1.0), True)
    unlabeled = prepare_multimodal_cases(records[4:], (1.0, 1.0, 1.0), False)
    config = _config(tmp, "semicml", 24, [1.0, 1.0, 1.0], prel_start=0.75, source_teach_start=0.9,
                     modality_names=modality_names(root))
    result = Trainer(config, labeled, unlabeled).run()
    return config, result


def test_multimodal_short_run_lowers_the_loss(multimodal_run):
    config, result = multimodal_run
    losses = _losses(result.run_dir)
    assert len(losses) == 24 and [p for _, p in losses][-1] == 2.0  # PReL ran at the end
    _assert_phase_one_loss_falls(losses)


def test_model_trained_on_two_modalities_segments_from_one(multimodal_run):
    config, result = multimodal_run
    method = result.method
    network = method.inference_network()
    assert isinstance(network, VNet) and network.config["in_channels"] == 1
    assert method.exported_channel == 0 and method.exported_modality == "channel 0 (T1)"  # the better contrast
    # PReL ran: the export is the T1 student (the teacher's source; this run has no validation split to choose)
    assert method.prel_started and method.exported_network == "net_a (student, PReL)"
    assert network is method.net_a

    case = make_two_contrast_case("unseen", (48, 48, 32), seed=100)
    spec = InferenceSpec(tuple(PATCH), (1.0, 1.0, 1.0))
    prediction = Predictor(network, spec, device="cpu").predict(Volume(case.images[0], (1.0, 1.0, 1.0)))
    assert prediction.label.shape == case.label.shape
    assert dice_score(prediction.label.array.astype(bool), case.label.astype(bool)) > 0.5

    # the exported network is recoverable from the saved (weights_only) checkpoint alone
    state = load_state(result.run_dir / "checkpoints" / "last.pt")
    params = {"in_channels": 2, **config.method_params}
    restored = build_for_export("semicml", params, state["networks"])
    assert _same(_params(restored), _params(network))


def test_la_adaptation_short_run_lowers_the_loss(la_root, tmp_path):
    """2 labelled + 2 unlabelled real LA cases at 2.5 mm (the atrium fits a 32^3 patch)."""
    records = open_dataset(la_root, "train.list")
    spacing = [2.5, 2.5, 2.5]
    labeled = [prepare_case(r, spacing, True) for r in records[:2]]
    unlabeled = [prepare_case(r, spacing, False) for r in records[10:12]]
    config = _config(tmp_path, "semicml_la", 24, spacing, prel_start=0.8)
    result = Trainer(config, labeled, unlabeled).run()
    losses = _losses(result.run_dir)
    assert [p for _, p in losses][-1] == 2.0
    _assert_phase_one_loss_falls(losses)
    assert result.method.inference_network().config["in_channels"] == 1
    assert result.method.exported_modality.startswith("channel 0 (single modality")
    assert result.method.extra_state()["queue_len"] == 8  # the ASC queue filled and is checkpointable


def test_presets_build_both_forms():
    la = build_config(load_preset("semicml-la-8"), {"data": "x"})
    mm = build_config(load_preset("semicml-mm"), {"data": "x"})
    assert (la.method, la.labeled_num, la.in_channels) == ("semicml_la", 8, 1)
    assert (mm.method, mm.in_channels) == ("semicml", 2)
    method = build_method(la.method, {"in_channels": la.in_channels, **la.method_params, "base": 4},
                          la.max_iterations)
    assert (method.gate_start_it, method.prel_start_it, method.source_teach_it) == (815, 3778, 5555)
    assert method.gate_every == 74
    with pytest.raises(Exception, match="in_channels"):
        build_method("semicml", {"in_channels": 1}, 10)


def test_gate_follows_validation_scores_scored_by_the_engine(tmp_path):
    """With a validation split the engine scores each student on its own modality when the gate is due,
    and the teacher comes from the student the validation split prefers (not the training proxy)."""
    from conftest import sphere_volume
    from semiseg_la.engine.data import TrainCase

    def case(i, labeled):
        image, label = sphere_volume((40, 36, 36), radius=8 + i % 3, seed=i)
        return TrainCase(f"c{i}", np.stack([image, 0.5 * image + 1.0]), label if labeled else None)

    config = _config(tmp_path, "semicml", 12, [1.0, 1.0, 1.0])
    calls = []

    def validator(network, channel=None):
        calls.append(channel)
        return {"dice": 0.2 if channel == 0 else 0.7}

    trainer = Trainer(config, [case(0, True), case(1, True)], [case(2, False), case(3, False)], validator)
    trainer.run()
    method = trainer.method
    gate_calls = [c for c in calls if c is not None]
    assert gate_calls and set(gate_calls) == {0, 1}  # each student on its own modality
    assert method.exported_index == 1 and method.gate.ready
    assert method.exported_channel == 1


# --- PReL: the export follows the students, the frozen teacher stays fixed ----------------------------------

def _teacher_state(method):
    return {k: v.detach().clone() for k, v in method.teacher.state_dict().items()}


@pytest.mark.parametrize("teacher_bn", ["running", "batch"])
def test_prel_changes_the_exported_weights_and_keeps_the_frozen_teacher_fixed(tmp_path, teacher_bn):
    """The bug: the export was the gated teacher, frozen from prel_start, so PReL never changed it while its BN
    statistics drifted. Now PReL exports the student the validation split prefers, and the teacher (weights and
    BN running statistics) stays as the gate left it."""
    from conftest import synthetic_cases

    config = _config(tmp_path, "semicml_la", 10, [1.0, 1.0, 1.0], gate_pool=1, prel_start=0.4,
                     source_teach_start=0.9, teacher_bn=teacher_bn)
    trainer_ref = []

    def validator(network, channel=None):
        method = trainer_ref[0].method
        if method.prel_started:  # during PReL the validation split prefers net_b ...
            return {"dice": 0.8 if network is method.net_b else 0.3}
        return {"dice": 0.6 if network is method.net_a else 0.4}  # ... before it, net_a (the teacher's source)

    trainer = Trainer(config, synthetic_cases(2, True), synthetic_cases(2, False, 10), validator)
    trainer_ref.append(trainer)
    method = trainer.method

    def run_to(iteration):
        while trainer.iteration < iteration:
            trainer.train_step()
            trainer.iteration += 1

    run_to(method.prel_start_it)
    assert not method.prel_started and method.gate.ready and int(method.gate.source) == 0
    assert method.inference_network() is method.teacher  # before PReL: the BMA teacher
    run_to(method.prel_start_it + 1)  # the first PReL step, then its export scoring
    assert method.prel_started and method.exported_index == 1 and method.inference_network() is method.net_b
    assert method.exported_network == "net_b (student, PReL)"
    exported_before, teacher_before = _params(method.inference_network()), _teacher_state(method)

    run_to(config.max_iterations)
    assert not _same(_params(method.inference_network()), exported_before)  # PReL trained the exported network
    for key, value in method.teacher.state_dict().items():  # weights and BN running statistics unchanged
        assert torch.equal(value, teacher_before[key]), key

    # the checkpointed networks restore the same choice (the gate buffers carry the PReL state)
    params = {"in_channels": 1, **config.method_params}
    restored = build_for_export("semicml_la", params, method.state_dict())
    assert _same(_params(restored), _params(method.net_b))
    # a gate state written before these fields existed still loads (PReL then counts as not started)
    old = method.state_dict()
    old["gate"] = {k: v for k, v in old["gate"].items() if k not in ("prel_started", "export_scores")}
    again = build_method("semicml_la", params, 10)
    again.load_state_dict(old)
    assert not again.prel_started and again.inference_network() is again.teacher


def test_frozen_teacher_bn_modes_differ_and_leave_running_statistics_alone():
    method = _tiny("semicml_la", teacher_passes=2)
    method.train(True)
    before = _teacher_state(method)
    image = torch.randn(2, 1, 16, 16, 16) * 3 + 1
    results = {}
    for mode in ("running", "batch"):
        method.params["teacher_bn"] = mode
        torch.manual_seed(0)
        results[mode] = method.pseudo_label(image)
        for key, value in method.teacher.state_dict().items():
            assert torch.equal(value, before[key]), (mode, key)
        assert method.teacher.training and all(m.training for m in method.teacher.modules())  # modes restored
    assert not torch.allclose(results["running"], results["batch"])  # running vs batch statistics


def test_paper_preset_adam_warmup_and_milestones(tmp_path):
    from conftest import synthetic_cases

    preset = load_preset("semicml-la-8-paper")
    config = build_config(preset, {"data": "x", "device": "cpu", "output": str(tmp_path / "run"),
                                   "patch_size": PATCH, "method_params": {"base": 4}})
    assert (config.method, config.optimizer, config.base_lr, config.weight_decay) == ("semicml_la", "adam", 0.006,
                                                                                      0.0004)
    assert (config.lr_epochs, config.lr_warmup, config.lr_milestones) == (81, 8, [12, 28, 44, 56])
    assert (config.seed, config.amp, config.deterministic, config.normalization) == (1111, False, True, "stored")
    assert config.intensity_prob == 0.0 == build_config(load_preset("semicml-la-8"), {"data": "x"}).intensity_prob
    p = config.method_params
    assert (p["loss_scale"], p["teacher_noise"], p["teacher_bn"]) == (1.0, "official", "batch")
    trainer = Trainer(config, synthetic_cases(1, True), synthetic_cases(1, False, 5))
    assert isinstance(trainer.optimizer, torch.optim.Adam)

    def start(epoch):  # the first iteration of a paper epoch: epochs are 6000 / 81 iterations long
        return math.ceil(epoch * 6000 / 81)

    lr = trainer.learning_rate
    assert lr(0) == pytest.approx(0.006 / 8) and lr(start(1) - 1) == pytest.approx(0.006 / 8)
    assert lr(start(1)) == pytest.approx(0.006 * 2 / 8) and lr(start(7)) == pytest.approx(0.006)
    assert lr(start(12) - 1) == pytest.approx(0.006) and lr(start(12)) == pytest.approx(6e-4)
    assert lr(start(28)) == pytest.approx(6e-5) and lr(start(44)) == pytest.approx(6e-6)
    assert lr(start(56)) == pytest.approx(6e-7) and lr(5999) == pytest.approx(6e-7)
