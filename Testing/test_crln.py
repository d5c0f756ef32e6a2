"""CRLN (methods.md 4): networks, DIM, CPS, strong view, training on real LA cases, export."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import stop_after, synthetic_cases
from semiseg_la.engine.config import build_config, load_preset
from semiseg_la.engine.data import TrainCase, prepare_case
from semiseg_la.engine.loop import Trainer, build_for_export
from semiseg_la.engine.state import load_state
from semiseg_la.errors import ConfigError
from semiseg_la.inference.predictor import InferenceSpec, Predictor
from semiseg_la.io.datasets import open_dataset
from semiseg_la.methods import build_method
from semiseg_la.methods.crln import (
    class_means,
    cps_loss,
    cutmix,
    geometric_step,
    positive_keys,
    rescale_in_plane,
    unsupervised_ce,
)
from semiseg_la.models import VNet
from semiseg_la.models.crln import CrlnNet, DynamicInteraction, PrototypeUpdate, official_row_order

SMALL = {"patch_size": [32, 32, 32], "prototypes": 4, "num_anchors": 16, "num_negatives": 32}


def _randomised_dim(**kwargs) -> DynamicInteraction:
    """A DIM on the 32^3-patch grid with non-zero prototypes (zero init makes every row identical)."""
    torch.manual_seed(0)
    dim = DynamicInteraction(2, 4, (64, 32), (16, 16, 16), **kwargs)
    with torch.no_grad():
        dim.prototypes.normal_()
    return dim


def test_network_shapes_and_dim_map_is_non_negative_with_the_logits_shape():
    torch.manual_seed(0)
    net = CrlnNet(n_prototypes=4, patch_size=(32, 32, 32))
    with torch.no_grad():
        net.dim.prototypes.normal_()
    out, plain = net(torch.randn(2, 1, 32, 32, 32), torch.randn(2, 1, 32, 32, 32))
    assert out.logits.shape == (2, 2, 32, 32, 32) and out.representation.shape == (2, 4, 32, 32, 32)
    assert out.dim_map.shape == out.logits.shape
    assert float(out.dim_map.detach().min()) >= 0.0 and float(out.dim_map.detach().max()) > 0.0
    assert plain.dim_map is None and plain.logits.shape == (2, 2, 32, 32, 32)
    assert net.dim.prototypes.shape == (1, 2, 4, 64) and net.dim.class_prototypes().shape == (2, 4)


def test_dim_other_patch_size_strict_refuses_resample_works():
    x7, x8 = torch.randn(1, 64, 4, 4, 8), torch.randn(1, 32, 8, 8, 16)  # a 16x16x32 patch, not 32^3
    with pytest.raises(ValueError, match=r"configured for score grid \(16, 16, 16\).*dim_size_policy"):
        _randomised_dim(size_policy="strict")(x7, x8)
    dim = _randomised_dim(size_policy="resample").eval()
    assert dim(x7, x8).shape == (1, 2, 16, 16, 32)
    same7, same8 = torch.randn(1, 64, 8, 8, 8), torch.randn(1, 32, 16, 16, 16)
    strict = _randomised_dim(size_policy="strict").eval()
    assert torch.allclose(dim(same7, same8), strict(same7, same8))  # identical at the configured size


def test_r1_default_keeps_class_rows_independent_official_reshape_mixes_them():
    assert official_row_order(2, 3).tolist() == [0, 2, 4, 1, 3, 5]
    x7, x8 = torch.randn(1, 64, 8, 8, 8), torch.randn(1, 32, 16, 16, 16)
    for official, expect_independent in ((False, True), (True, False)):
        dim = _randomised_dim(official_reshape=official).eval()
        before = dim.clues(x7, x8)
        with torch.no_grad():
            dim.prototypes[0, 1].add_(torch.randn_like(dim.prototypes[0, 1]))  # perturb class-1 parameters only
        after = dim.clues(x7, x8)
        assert torch.equal(before[:, 0], after[:, 0]) == expect_independent
        assert not torch.equal(before[:, 1], after[:, 1])


def test_r2_prototype_update_is_residual_by_default():
    q, message = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    for official, expected in ((False, q + message), (True, 2 * message)):
        update = PrototypeUpdate(8, drop_path=0.0, official_update=official).eval()
        torch.nn.init.zeros_(update.mlp[2].weight)
        torch.nn.init.zeros_(update.mlp[2].bias)
        assert torch.allclose(update(q, message), expected)


def test_cps_positive_key_equals_its_formula_on_a_hand_built_example():
    rep = torch.zeros(1, 2, 2, 2, 1)  # (B, M, X, Y, Z): four voxels, 2-d representation
    rep[0, :, 0, 0, 0] = torch.tensor([1.0, 0.0])
    rep[0, :, 0, 1, 0] = torch.tensor([3.0, 2.0])
    rep[0, :, 1, 0, 0] = torch.tensor([0.0, 4.0])
    rep[0, :, 1, 1, 0] = torch.tensor([9.0, 9.0])  # invalid voxel: must not count
    label = torch.tensor([[[[0], [0]], [[1], [1]]]])
    valid = torch.tensor([[[[True], [True]], [[True], [False]]]])
    means, counts = class_means(rep, label, valid, 2)
    assert counts.tolist() == [2.0, 1.0]
    assert torch.allclose(means, torch.tensor([[2.0, 1.0], [0.0, 4.0]]))
    pi = torch.tensor([[0.5, -1.0], [2.0, 2.0]])
    xi = 0.6
    expected = torch.stack([(torch.tensor([2.0, 1.0]) + xi * pi[0]) / (1 + xi),
                            (torch.tensor([0.0, 4.0]) + xi * pi[1]) / (1 + xi)])
    assert torch.allclose(positive_keys(means, pi, xi), expected)
    assert torch.equal(positive_keys(means, None, xi), means)


def test_cps_loss_uses_the_blended_positive_key():
    """Class 0 features all a, class 1 all b: the loss is known in closed form whatever the sampling."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    rep = torch.zeros(1, 2, 4, 1, 1)
    rep[0, :, :2, 0, 0] = a[:, None]
    rep[0, :, 2:, 0, 0] = b[:, None]
    label = torch.tensor([0, 0, 1, 1]).view(1, 4, 1, 1)
    valid = torch.ones_like(label, dtype=torch.bool)
    prob = torch.zeros(1, 2, 4, 1, 1)
    prob[0, 0, :2], prob[0, 1, 2:] = 0.5, 1.0  # class-0 voxels are hard, class-1 voxels are confident
    pi = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    xi, temperature, negatives = 0.5, 0.5, 8
    loss = cps_loss(rep, label, valid, prob, pi, xi, 0.97, temperature, 5, negatives)
    key = (a + xi * pi[0]) / (1 + xi)
    pos = F.cosine_similarity(a, key, dim=0) / temperature
    neg = F.cosine_similarity(a, b, dim=0) / temperature
    per_anchor = -pos + torch.logsumexp(torch.cat([pos.view(1), neg.repeat(negatives)]), 0)
    assert torch.allclose(loss, per_anchor / 2, atol=1e-5)  # only class 0 has hard anchors; 2 valid classes
    single = cps_loss(rep[..., :2, :, :], label[..., :2, :, :], valid[..., :2, :, :], prob[..., :2, :, :], pi, xi)
    assert float(single) == 0.0  # fewer than two classes present


def test_unsupervised_ce_weighting():
    logits = torch.zeros(2, 2, 2, 1, 1)
    logits[:, 1] = math.log(3.0)  # p(class 1) = 0.75
    target = torch.tensor([[1, -1], [0, 1]]).view(2, 2, 1, 1)
    conf = torch.tensor([[0.99, 0.99], [0.5, 0.98]]).view(2, 2, 1, 1)
    # sample 0: w = 1/1, one valid voxel CE = -log 0.75; sample 1: w = 1/2, CEs -log 0.25 and -log 0.75
    terms = torch.tensor([-math.log(0.75), 0.5 * -math.log(0.25), 0.5 * -math.log(0.75)])
    assert torch.allclose(unsupervised_ce(logits, target, conf, 0.97), terms.mean())


def test_cutmix_keeps_image_pseudo_label_and_confidence_aligned():
    torch.manual_seed(3)
    image = torch.rand(4, 1, 32, 32, 16)
    label = (image[:, 0] > 0.5).long()
    conf = image[:, 0] * 0.5 + 0.25
    img, lab, cf = cutmix(image, label, conf, 4.0, partner=torch.tensor([1, 2, 3, 0]))
    assert torch.equal(lab, (img[:, 0] > 0.5).long())
    assert torch.allclose(cf, img[:, 0] * 0.5 + 0.25)
    changed = (img != image)[:, 0]
    assert changed.any()
    pasted = changed.any(dim=3)  # x-y footprint of each box
    for b in range(4):
        xs, ys = torch.nonzero(pasted[b], as_tuple=True)
        if len(xs):
            box = (slice(int(xs.min()), int(xs.max()) + 1), slice(int(ys.min()), int(ys.max()) + 1))
            assert torch.equal(img[b, 0][box], image[(b + 1) % 4, 0][box])  # whole depth from the partner


def test_geometric_step_pads_with_ignore_and_zero_confidence():
    image = torch.rand(1, 32, 32, 8)
    label, conf = torch.ones(32, 32, 8, dtype=torch.long), torch.ones(32, 32, 8)
    img, lab, cf = rescale_in_plane(image, label, conf, 0.5)
    assert img.shape == image.shape and lab.shape == label.shape
    assert int(lab[0, 0, 0]) == -1 and float(cf[0, 0, 0]) == 0.0 and int(lab[16, 16, 0]) == 1
    assert torch.equal((lab == -1), (cf == 0))
    same = rescale_in_plane(image, label, conf, 1.0)
    assert torch.allclose(same[0], image, atol=1e-5) and torch.equal(same[1], label)
    torch.manual_seed(0)
    img, lab, cf = geometric_step(image[None].repeat(2, 1, 1, 1, 1), label[None].repeat(2, 1, 1, 1),
                                  conf[None].repeat(2, 1, 1, 1), (0.5, 1.5))
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0 and lab.shape == (2, 32, 32, 8)


def test_presets_and_parameters():
    for name, xi in (("crln-la-8", 0.6), ("crln-la-16", 0.9)):
        cfg = build_config(load_preset(name), {"data": "x"})
        assert cfg.method == "crln" and cfg.max_iterations == 40000 and cfg.nesterov and cfg.lr_policy == "poly"
        assert cfg.base_lr == pytest.approx(2.5e-3) and cfg.method_params["xi"] == xi
        assert list(cfg.method_params["patch_size"]) == list(cfg.patch_size)
    with pytest.raises(ConfigError, match="unknown method_params"):
        build_method("crln", {"prototype": 8}, 10)
    method = build_method("crln", SMALL, 40000)
    assert not method.rectifying(799) and method.rectifying(800)


def test_export_teacher_vnet_loads_strictly_and_rectified_inference_runs(tmp_path):
    cfg = build_config({"method": "crln", "data": "synthetic", "patch_size": [32, 32, 32], "spacing": [1, 1, 1],
                        "max_iterations": 2, "batch_size": 4, "labeled_bs": 2, "labeled_num": 2, "val_num": 0,
                        "base_lr": 0.01, "checkpoint_every": 1, "validate_every": 0, "seed": 1, "device": "cpu",
                        "output": str(tmp_path / "run"), "method_params": {**SMALL, "export": "teacher"}})
    result = Trainer(cfg, synthetic_cases(2, True, 0), synthetic_cases(2, False, 10)).run()
    method = result.method
    assert float(method.rectifier.alpha.detach()) != 0.0  # the rectifier's own optimiser stepped
    exported = method.inference_network()
    VNet().load_state_dict(exported.state_dict(), strict=True)
    state = load_state(tmp_path / "run" / "checkpoints" / "last.pt")  # weights_only load of the extra state
    again = build_method("crln", {"in_channels": 1, **SMALL, "export": "teacher"}, 2)
    again.load_state_dict(state["networks"])
    again.load_extra_state(state["method_extra"])
    assert again.rectifier_optimizer.state_dict()["state"][0]["momentum_buffer"].shape == ()
    rebuilt = build_for_export("crln", {"in_channels": 1, **SMALL, "export": "teacher"}, state["networks"])
    for (key, a), (_, b) in zip(exported.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), key
    spec = InferenceSpec((32, 32, 32), (1.0, 1.0, 1.0))
    volume = synthetic_cases(1, True, 5)[0].image[0]
    plain, _, _ = Predictor(exported, spec, device="cpu", mode="sliding").probabilities(volume)
    rectified, _, _ = Predictor(method.rectified_inference(), spec, device="cpu",
                                mode="sliding").probabilities(volume)
    assert plain.shape == rectified.shape == volume.shape and np.isfinite(rectified).all()


def _atrium_crop(case: TrainCase, patch, keep_label: bool) -> TrainCase:
    """A patch-sized box around the label centroid: every crop of the run then sees the atrium."""
    centre = np.argwhere(case.label > 0).mean(0).round().astype(int)
    starts = [max(0, min(int(c) - p // 2, s - p)) for c, p, s in zip(centre, patch, case.label.shape)]
    box = tuple(slice(a, a + p) for a, p in zip(starts, patch))
    return TrainCase(case.case_id, np.ascontiguousarray(case.image[(slice(None),) + box]),
                     case.label[box] if keep_label else None)


@pytest.mark.slow
def test_short_cpu_run_on_real_la_cases_lowers_the_loss(la_root, tmp_path):
    patch, spacing = (32, 32, 32), (1.25, 1.25, 1.25)
    records = open_dataset(la_root, "train.list")
    labeled = [_atrium_crop(prepare_case(r, spacing), patch, True) for r in records[:2]]
    unlabeled = [_atrium_crop(prepare_case(r, spacing), patch, False) for r in records[20:22]]
    cfg = build_config({"method": "crln", "data": str(la_root), "patch_size": list(patch), "spacing": list(spacing),
                        "max_iterations": 8, "batch_size": 4, "labeled_bs": 2, "labeled_num": 2, "val_num": 0,
                        "base_lr": 0.05, "nesterov": True, "lr_policy": "constant", "weight_decay": 5e-4,
                        "rot_flip": False, "intensity_prob": 0.0, "validate_every": 0, "checkpoint_every": 0,
                        "log_every": 1, "seed": 0, "device": "cpu", "output": str(tmp_path / "run"),
                        "method_params": {"patch_size": list(patch), "num_anchors": 64, "num_negatives": 128}})
    Trainer(cfg, labeled, unlabeled).run()
    with open(tmp_path / "run" / "train_log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    loss = [float(r["loss"]) for r in rows]
    supervised = [float(r["loss_sup"]) for r in rows]
    assert len(loss) == 8 and all(math.isfinite(v) for v in loss)
    assert np.mean(loss[-3:]) < np.mean(loss[:3]) - 0.05
    assert np.mean(supervised[-3:]) < np.mean(supervised[:3])


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    """Stop at 2 (checkpoint with the rectifier optimiser), resume to 4: same teacher and rectifier as straight."""
    def config(folder):
        return build_config({"method": "crln", "data": "synthetic", "patch_size": [32, 32, 32], "spacing": [1, 1, 1],
                             "max_iterations": 4, "batch_size": 4, "labeled_bs": 2, "labeled_num": 2, "val_num": 0,
                             "base_lr": 0.01, "checkpoint_every": 2, "validate_every": 0, "seed": 2, "device": "cpu",
                             "output": str(tmp_path / folder), "method_params": {**SMALL, "iterations_per_epoch": 1,
                                                                                 "rectify_from_epoch": 2}})
    labeled, unlabeled = synthetic_cases(2, True, 0), synthetic_cases(2, False, 10)
    straight = Trainer(config("a"), labeled, unlabeled).run().method
    first = Trainer(config("b"), labeled, unlabeled, should_stop=stop_after(2)).run()
    assert first.stopped_early and first.iterations == 2
    resumed = Trainer(config("b"), labeled, unlabeled).run(resume=True).method
    assert torch.equal(straight.rectifier.alpha, resumed.rectifier.alpha)
    for (name, a), (_, b) in zip(straight.teacher.state_dict().items(), resumed.teacher.state_dict().items()):
        assert torch.equal(a, b), name


def test_default_export_is_the_rectified_inference_and_round_trips_through_the_catalog(tmp_path):
    """Teacher + DIM + rectifier saved as a catalog model, rebuilt from its card, same probabilities."""
    from semiseg_la.checkpoints import ModelCard, load_network, save_model
    from semiseg_la.checkpoints.card import default_classes, default_inference

    cfg = build_config({"method": "crln", "data": "synthetic", "patch_size": [32, 32, 32], "spacing": [1, 1, 1],
                        "max_iterations": 2, "batch_size": 4, "labeled_bs": 2, "labeled_num": 2, "val_num": 0,
                        "base_lr": 0.01, "checkpoint_every": 0, "validate_every": 0, "seed": 1, "device": "cpu",
                        "output": str(tmp_path / "run"), "method_params": SMALL})
    exported = Trainer(cfg, synthetic_cases(2, True, 0), synthetic_cases(2, False, 10)).run().method.inference_network()
    assert exported.architecture_name == "crln-rectified" and exported.fixed_window
    card = ModelCard(id="crln-tiny-v0.1.0", name="crln-tiny", version="0.1.0", method="crln",
                     architecture={"name": exported.architecture_name, "config": exported.config},
                     inference=default_inference((32, 32, 32), (1.0, 1.0, 1.0)), classes=default_classes())
    save_model(tmp_path / "model", exported.state_dict(), card)
    loaded, _ = load_network(tmp_path / "model")
    spec = InferenceSpec((32, 32, 32), (1.0, 1.0, 1.0))
    volume = synthetic_cases(1, True, 5)[0].image[0]
    expected, windows, _ = Predictor(exported.eval(), spec, device="cpu", mode="fast").probabilities(volume)
    got, _, _ = Predictor(loaded, spec, device="cpu", mode="fast").probabilities(volume)
    assert windows > 1  # training-size windows even in fast mode: the DIM is tied to the patch
    np.testing.assert_allclose(got, expected, atol=1e-5)


# --- reproduction options (docs/methods/crln.md "Reproduction") -------------------------------------------

def test_r7_mlp_drop_path_drops_the_level_one_mlp_branch_per_sample():
    torch.manual_seed(0)
    q, message = torch.randn(64, 6, 8), torch.zeros(64, 6, 8)  # no message: Q'' = Q, Q''' = Q + branch
    for official in (False, True):
        update = PrototypeUpdate(8, drop_path=0.5, official_update=False, mlp_drop_path=official)
        branch = update.mlp(update.norm(q)).detach()
        out = update.train()(q, message).detach()
        kept = torch.isclose(out, q + branch / 0.5, atol=1e-5).flatten(1).all(1)
        dropped = torch.isclose(out, q, atol=1e-6).flatten(1).all(1)
        if official:  # every sample either loses the branch or keeps it scaled by 1 / keep
            assert bool((kept | dropped).all()) and 10 < int(dropped.sum()) < 54
        else:
            assert torch.allclose(out, q + branch, atol=1e-5)
        assert torch.allclose(update.eval()(q, message), q + branch, atol=1e-5)  # identity in eval mode
    net = CrlnNet(n_prototypes=4, patch_size=(32, 32, 32), mlp_drop_path=True)
    assert net.config["mlp_drop_path"] and net.dim.update1.mlp_drop_path


def test_r8_unsupervised_denominator_counts_unweighted_positive_voxels():
    logits = torch.zeros(2, 2, 2, 1, 1)
    logits[:, 1] = math.log(3.0)  # p(class 1) = 0.75
    target = torch.tensor([[1, 0], [0, 1]]).view(2, 2, 1, 1)
    conf = torch.tensor([[0.99, 0.99], [0.5, 0.6]]).view(2, 2, 1, 1)  # sample 1 has no confident voxel: w = 0
    sample0 = torch.tensor([-math.log(0.75), -math.log(0.25)])  # w = 1
    assert torch.allclose(unsupervised_ce(logits, target, conf, 0.97), sample0.mean())
    # official: the mean runs over every voxel with CE > 0, so sample 1's two zero-weighted voxels count
    assert torch.allclose(unsupervised_ce(logits, target, conf, 0.97, "unweighted"), sample0.sum() / 4)


def test_minmax_volume_input_space_keeps_the_volume_scale():
    """With whole-volume [0, 1] input the loader's brightness multiplies the patch's values as they are (the
    official loader); the per-patch min-max space rescales every patch to [0, 1] first."""
    patch = (torch.rand(2, 1, 8, 8, 8) * 0.4 + 0.2)  # a patch of a [0, 1] volume that spans [0.2, 0.6]
    outputs = {}
    for space in ("minmax_volume", "minmax"):
        method = build_method("crln", {**SMALL, "input_space": space}, 10)
        torch.manual_seed(3)
        outputs[space] = method.loader_view(patch)
    ratio = outputs["minmax_volume"] / patch
    assert torch.allclose(ratio, ratio.flatten(1)[:, :1, None, None, None].expand_as(ratio), atol=1e-5)
    assert float(ratio.min()) >= 0.75 and float(ratio.max()) <= 1.25
    assert float(outputs["minmax"].min()) == 0.0  # the per-patch view starts at 0
    assert not torch.allclose(outputs["minmax"], outputs["minmax_volume"])
    with pytest.raises(ConfigError, match="minmax_volume"):  # the engine must feed [0, 1] volumes
        build_config({"method": "crln", "data": "x", "method_params": {"input_space": "minmax_volume"}})
    with pytest.raises(ConfigError, match="minmax_volume"):
        build_config({"method": "crln", "data": "x", "normalization": "minmax-volume"})


def test_rectifier_schedule_per_epoch_with_floor():
    method = build_method("crln", {**SMALL, "rectifier_schedule": "epoch"}, 40000)
    lr = method.rectifier_lr
    assert lr(0) == lr(199) == pytest.approx(2.5e-3) and lr(200) == pytest.approx(2.5e-3 * (1 - 1 / 200) ** 0.9)
    assert lr(39999) == pytest.approx(2.5e-3 * (1 / 200) ** 0.9) and lr(40000) == pytest.approx(1e-6)
    default = build_method("crln", SMALL, 40000).rectifier_lr
    assert default(199) < default(0)  # per iteration
