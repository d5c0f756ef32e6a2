"""CAML (docs/methods.md 2): networks, CMA, losses, the labelled-feature memory, training and export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cli_helpers import json_lines, nnunet_dataset, run_cli, write_case
from conftest import sphere_volume, stop_after, synthetic_cases
from semiseg_la.engine.config import build_config, load_preset
from semiseg_la.engine.data import TrainCase, prepare_case
from semiseg_la.engine.loop import Trainer
from semiseg_la.io.datasets import open_dataset
from semiseg_la.methods import Batch, build_method
from semiseg_la.methods.caml import (
    FeatureMemory,
    mutual_consistency,
    occ_loss,
    official_rows,
    select_confident,
    sharpen,
    voxel_rows,
)
from semiseg_la.models import VNet
from semiseg_la.models.caml import CamlHeads, CrossSampleMutualAttention, SubNetworkA, SubNetworkV

SMALL = {"memory_per_class": 16, "memory_min_keep": 16, "consistency_rampup": 0}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_batch(patch=(32, 32, 32), seed=0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(4, 1, *patch, generator=gen)
    label = (torch.rand(4, *patch, generator=gen) > 0.7).long()
    return Batch(image, label, 2)


# -- networks -------------------------------------------------------------------------------------------
def test_shapes_through_every_part():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 48, 32, 32)
    net_v, net_a = SubNetworkV().train(), SubNetworkA().train()
    logits_v, emb_v = net_v(x)
    logits_a, emb_a = net_a(x)
    assert logits_v.shape == logits_a.shape == (4, 2, 48, 32, 32)
    assert emb_v.shape == emb_a.shape == (4, 16, 48, 32, 32)
    x4 = net_a.encoder.block_four(net_a.encoder.block_three_dw(
        net_a.encoder.block_three(net_a.encoder.block_two_dw(net_a.encoder.block_two(
            net_a.encoder.block_one_dw(net_a.encoder.block_one(x)))))))
    assert x4.shape == (4, 128, 6, 4, 4)  # 96 tokens after block four: CMA works at any patch size
    assert net_a.cma(x4).shape == x4.shape
    assert [t.shape[1] for t in net_a.encode(x)] == [16, 32, 64, 128, 256]
    heads = CamlHeads(16, 32).train()
    rows = torch.randn(10, 16)
    z_v, z_a = heads(rows, rows)
    assert z_v.shape == z_a.shape == (10, 32)
    assert heads.eval().memory_features(rows, rows).shape == (10, 32)
    assert isinstance(net_v.vnet, VNet) and net_v.vnet.config["up_type"] == 0 and net_a.config["up_type"] == 1


def test_cma_is_identity_in_eval_and_mixes_samples_in_training():
    torch.manual_seed(0)
    cma = CrossSampleMutualAttention(channels=16, heads=4, ffn=32, dropout=0.0)
    x = torch.randn(3, 16, 2, 3, 2)
    assert torch.equal(cma.eval()(x), x)
    cma.train()
    y = cma(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    x2 = x.clone()
    x2[2] += 1.0  # changing one sample changes the others' outputs: attention across the batch
    assert not torch.allclose(cma(x2)[0], y[0])


def test_subnetwork_v_exports_plain_vnet_keys():
    method = build_method("caml", {"in_channels": 1}, 10)
    exported = method.inference_network()
    assert type(exported) is VNet
    VNet().load_state_dict(exported.state_dict(), strict=True)


# -- losses ------------------------------------------------------------------------------------------------
def test_sharpen_and_mutual_consistency_detach_switch():
    assert float(sharpen(torch.tensor(0.5), 0.1)) == pytest.approx(0.5)
    assert float(sharpen(torch.tensor(0.6), 0.1)) == pytest.approx(0.6 ** 10 / (0.6 ** 10 + 0.4 ** 10))
    for detach, expect_cross_grad in ((True, False), (False, True)):
        pa = torch.tensor([[0.7, 0.3]], requires_grad=True)
        pv = torch.tensor([[0.4, 0.6]])
        # only the target side depends on pa in the first term: its gradient shows the detach switch
        loss = mutual_consistency(pv, pa, 0.1, detach_target=detach) - torch.mean((pa - sharpen(pv, 0.1)) ** 2)
        loss.backward()
        assert (pa.grad.abs().sum() > 0) == expect_cross_grad


def _softmax(values):
    e = [math.exp(v) for v in values]
    return [x / sum(e) for x in e]


def test_occ_loss_equals_hand_computation():
    tau = 0.5
    memory = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0]])]  # class 1: one row, unused
    z_v = torch.tensor([[1.0, 2.0], [0.0, 1.0], [5.0, 5.0]])
    z_a = torch.tensor([[2.0, 0.0], [1.0, 1.0], [3.0, 3.0]])
    labels = torch.tensor([0, 0, 1])  # class 1 has a single query row: skipped
    # row 0: V logits (1, 2)/0.5 = (2, 4); A logits (2, 0)/0.5 = (4, 0)
    # row 1: V logits (0, 1)/0.5 = (0, 2); A logits (1, 1)/0.5 = (2, 2) -> C^a = (1/2, 1/2)
    cv0 = [math.exp(2) / (math.exp(2) + math.exp(4)), math.exp(4) / (math.exp(2) + math.exp(4))]
    ca0 = [math.exp(4) / (math.exp(4) + 1), 1 / (math.exp(4) + 1)]
    cv1 = [1 / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))]
    ca1 = [0.5, 0.5]
    row0 = -(ca0[0] * math.log(cv0[0] + 1e-8) + ca0[1] * math.log(cv0[1] + 1e-8))
    row1 = -(ca1[0] * math.log(cv1[0] + 1e-8) + ca1[1] * math.log(cv1[1] + 1e-8))
    assert float(occ_loss(z_v, z_a, labels, memory, tau)) == pytest.approx((row0 + row1) / 2, rel=1e-6)

    # both classes in memory: each query row is correlated with all four memory rows
    memory = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [-1.0, 0.0]])]
    labels = torch.tensor([0, 1, 1])
    rows = []
    for n in (1, 2):
        lv = [(float(z_v[n] @ m)) / tau for m in torch.cat(memory)]
        la = [(float(z_a[n] @ m)) / tau for m in torch.cat(memory)]
        cv, ca = _softmax(lv), _softmax(la)
        rows.append(-sum(a * math.log(v + 1e-8) for a, v in zip(ca, cv)))
    assert float(occ_loss(z_v, z_a, labels, memory, tau)) == pytest.approx(sum(rows) / 2, rel=1e-6)
    assert occ_loss(z_v, z_a, labels, [None, None], tau) is None
    assert occ_loss(z_v[:2], z_a[:2], torch.tensor([0, 1]), memory, tau) is None  # one row per class


def test_occ_target_detach_switch():
    memory = [torch.randn(4, 3), torch.randn(4, 3)]
    labels = torch.tensor([0, 0, 1, 1])
    for detach in (True, False):
        z_v, z_a = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
        occ_loss(z_v, z_a, labels, memory, 0.1, detach_target=detach).backward()
        assert z_v.grad.abs().sum() > 0
        assert (z_a.grad is not None and z_a.grad.abs().sum() > 0) == (not detach)


def test_select_confident_takes_top_k_per_class():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0])
    conf = torch.tensor([0.9, 0.6, 0.5, 0.99, 0.7, 0.8, 0.95])
    picked = select_confident(labels, conf, k=2)
    assert picked.tolist() == [6, 0, 3, 5]  # class-0 block first, each sorted by confidence


def test_voxel_and_official_rows():
    emb = torch.arange(2 * 3 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2, 2)
    index = torch.tensor([0, 5, 8, 15])  # flat (B, X, Y, Z) positions
    rows = voxel_rows(emb, index)
    assert torch.equal(rows[1], emb[0, :, 1, 0, 1]) and torch.equal(rows[3], emb[1, :, 1, 1, 1])
    assert torch.equal(official_rows(emb, index), emb.reshape(-1, 3)[index])
    assert not torch.equal(official_rows(emb, index), rows)  # the scrambled rows of C1


# -- the memory bank ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_memory_is_bounded_ring_on_the_device(device):
    torch.manual_seed(0)
    memory = FeatureMemory(slots=3, keep_fraction=0.1, min_keep=5)
    labels = torch.cat([torch.zeros(900), torch.ones(100)]).long().to(device)
    for step in range(5):
        positions, weights = memory.choose(labels)
        assert positions.numel() == 90 + 10  # ceil(0.1 n) per class
        assert torch.allclose(weights, torch.full_like(weights, 10.0))
        memory.write(torch.full((positions.numel(), 4), float(step), device=device), labels[positions], weights, 1000)
    assert memory.features.device.type == device and memory.labels.device.type == device
    assert memory.stored_rows() == 3 * 100
    assert memory.features.shape == (3, memory.capacity(1000), 4) and memory.capacity(1000) == 100 + 2 * 6
    assert memory.nbytes() == 3 * 112 * (4 * 4 + 1 + 4)
    assert sorted(set(memory.features[:, 0, 0].tolist())) == [2.0, 3.0, 4.0]  # oldest two overwritten
    blocks = memory.sample(per_class=20)
    assert blocks[0].shape == (20, 4) and blocks[1].shape == (20, 4) and blocks[0].device.type == device
    assert memory.sample(per_class=31)[1] is None  # only 30 foreground rows stored


def test_memory_sampling_follows_the_full_voxel_distribution():
    """Rows stand for n_c / k_c voxels, so a case with many correct voxels is drawn in proportion."""
    torch.manual_seed(0)
    memory = FeatureMemory(slots=2, keep_fraction=0.1, min_keep=50)
    for value, n in ((0.0, 1000), (1.0, 50)):  # 1000 vs 50 correct foreground voxels
        labels = torch.ones(n, dtype=torch.long)
        positions, weights = memory.choose(labels)
        memory.write(torch.full((positions.numel(), 1), value), labels[positions], weights, 2000)
    assert memory.stored_rows() == 100 + 50
    share = np.mean([float(memory.sample(per_class=10)[1].mean()) for _ in range(300)])
    assert share == pytest.approx(50 / 1050, abs=0.015)  # unweighted would give 50 / 150


def test_memory_flatten_switch_and_state_round_trip():
    torch.manual_seed(0)
    emb_v, emb_a = torch.randn(2, 16, 8, 8, 4), torch.randn(2, 16, 8, 8, 4)
    truth = (torch.rand(2, 8, 8, 4) > 0.5).long()
    correct = torch.ones_like(truth, dtype=torch.bool)
    heads_state = build_method("caml", {}, 1).heads.state_dict()
    stored = {}
    for flatten in ("voxel", "official"):
        method = build_method("caml", {"memory_flatten": flatten, "memory_keep_fraction": 1.0, "memory_slots": 2}, 1)
        method.heads.load_state_dict(heads_state)
        method.write_memory(emb_v, emb_a, truth, correct)
        assert method.heads.training  # restored after the eval-mode projection
        stored[flatten] = method
    voxel, official = stored["voxel"].memory, stored["official"].memory
    heads = stored["voxel"].heads.eval()
    # keep_fraction 1: every voxel is stored; compare slot 0 row by row with a direct computation
    assert voxel.stored_rows() == official.stored_rows() == 2 * 256
    with torch.no_grad():
        expect = (heads.proj_v(emb_v[0].flatten(1).T) + heads.proj_a(emb_a[0].flatten(1).T)) / 2
        scrambled = (heads.proj_v(emb_v[0].flatten(1).T) + heads.proj_a(emb_a[0].reshape(-1, 16))) / 2
    def sort_rows(t):
        return t[torch.argsort(t[:, 0])]
    assert torch.allclose(sort_rows(voxel.features[0, :256]), sort_rows(expect), atol=1e-5)
    assert torch.allclose(sort_rows(official.features[0, :256]), sort_rows(scrambled), atol=1e-5)
    clone = build_method("caml", {"memory_slots": 2}, 1)
    clone.load_extra_state(stored["voxel"].extra_state())
    assert torch.equal(clone.memory.features, voxel.features) and clone.memory.next_slot == voxel.next_slot


# -- training -------------------------------------------------------------------------------------------------
def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("official", [False, True])
def test_gradients_reach_both_subnetworks_and_heads(official):
    torch.manual_seed(0)
    params = {**SMALL, "detach_correlation_target": not official, "detach_consistency_target": not official}
    method = build_method("caml", params, 100)
    method.train(True)
    result = method.training_step(random_batch(), iteration=0)
    assert result.logs["occ_available"] == 1.0 and result.logs["weight_o"] == pytest.approx(0.05)
    result.loss.backward()
    for name, module in [("V", method.net_v), ("A", method.net_a), ("CMA", method.net_a.cma),
                         ("g_v", method.heads.proj_v), ("h_v", method.heads.pred_v)]:
        assert _grad_norm(module) > 0, name
    # A's heads only produce the OCC target (and memory entries, without gradient): with the
    # stop-gradient default they receive none; the official undetached target trains them
    for name in ("proj_a", "pred_a"):
        assert (_grad_norm(getattr(method.heads, name)) > 0) == official, name


def test_loss_without_memory_is_zero_but_keeps_heads_in_graph():
    method = build_method("caml", {"memory_per_class": 10 ** 7, "consistency_rampup": 0}, 10)
    method.train(True)
    result = method.training_step(random_batch(seed=1), iteration=0)
    assert result.logs["occ_available"] == 0.0 and result.logs["loss_o"] == 0.0
    result.loss.backward()
    assert all(p.grad is not None for p in method.heads.parameters())


def _crop(case: TrainCase, patch, center):
    starts = [int(min(max(c - p // 2, 0), s - p)) for c, p, s in zip(center, patch, case.image.shape[1:])]
    box = tuple(slice(a, a + p) for a, p in zip(starts, patch))
    label = case.label[box] if case.label is not None else np.zeros(patch, np.uint8)
    return case.image[(slice(None),) + box], label


@pytest.mark.slow
def test_short_cpu_run_on_real_la_cases_lowers_the_loss(la_root):
    torch.manual_seed(1337)
    records = open_dataset(la_root, "train.list")
    spacing, patch = [1.25] * 3, (32, 32, 32)
    images, labels = [], []
    for record, labelled in ((records[0], True), (records[1], True), (records[30], False), (records[31], False)):
        case = prepare_case(record, spacing, with_label=True)
        fg = np.argwhere(case.label > 0).mean(axis=0) if labelled else np.array(case.label.shape) / 2
        image, label = _crop(case, patch, fg.round().astype(int))
        images.append(image)
        labels.append(label if labelled else np.zeros_like(label))
    batch = Batch(torch.from_numpy(np.stack(images)).float(), torch.from_numpy(np.stack(labels)).long(), 2)
    method = build_method("caml", {"memory_per_class": 64, "memory_min_keep": 64, "consistency_rampup": 0}, 100)
    method.train(True)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    losses = []
    for iteration in range(10):
        result = method.training_step(batch, iteration)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        losses.append(float(result.loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


# -- engine, export, catalog, CLI --------------------------------------------------------------------------------
def test_trainer_runs_caml_and_exports_a_plain_vnet(tmp_path):
    from semiseg_la.inference.predictor import InferenceSpec, Predictor
    from semiseg_la.io.volume import Volume

    config = build_config(load_preset("caml-la-8"), {
        "data": "synthetic", "patch_size": [32, 32, 32], "spacing": [1, 1, 1], "max_iterations": 2,
        "labeled_num": 2, "val_num": 0, "checkpoint_every": 1, "validate_every": 0, "device": "cpu",
        "output": str(tmp_path / "run"), "method_params": {"memory_per_class": 16}})
    assert config.method == "caml" and config.method_params["consistency_rampup"] == 20
    result = Trainer(config, synthetic_cases(2, True, 0), synthetic_cases(3, False, 10)).run()
    assert result.iterations == 2
    network = result.method.inference_network()
    assert type(network) is VNet
    fresh = VNet()
    fresh.load_state_dict(network.state_dict(), strict=True)
    image, _ = sphere_volume((40, 36, 36), seed=5)
    prediction = Predictor(fresh, InferenceSpec((32, 32, 32), (1.0, 1.0, 1.0)), device="cpu").predict(
        Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    assert prediction.label.array.shape == (40, 36, 36)
    # the checkpoint holds the memory bank, readable with weights_only=True
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["method_extra"]["memory"]["features"].shape[0] == 8


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    """The memory bank travels in `extra_state`: a resumed run continues exactly like a straight one."""
    def config(folder):
        return build_config({"method": "caml", "data": "synthetic", "patch_size": [32, 32, 32], "spacing": [1, 1, 1],
                             "max_iterations": 3, "batch_size": 4, "labeled_bs": 2, "labeled_num": 2, "val_num": 0,
                             "checkpoint_every": 1, "validate_every": 0, "seed": 3, "device": "cpu",
                             "output": str(folder), "method_params": {**SMALL, "memory_slots": 2}})
    labeled, unlabeled = synthetic_cases(2, True, 0), synthetic_cases(3, False, 10)
    straight = Trainer(config(tmp_path / "a"), labeled, unlabeled).run()
    first = Trainer(config(tmp_path / "b"), labeled, unlabeled, should_stop=stop_after(1)).run()
    assert first.stopped_early and first.iterations == 1
    assert first.method.memory.stored_rows() > 0
    resumed = Trainer(config(tmp_path / "b"), labeled, unlabeled).run(resume=True)
    assert resumed.iterations == 3
    for name, module in straight.method.modules().items():
        for (key, a), b in zip(module.state_dict().items(), resumed.method.modules()[name].state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key}"
    assert torch.equal(straight.method.memory.features, resumed.method.memory.features)


@pytest.mark.slow
def test_cli_trains_caml_preset_exports_and_segments(tmp_path):
    data = tmp_path / "ds"
    unlabeled = nnunet_dataset(data, n_labeled=3, n_unlabeled=2)
    proc = run_cli(["train", "--preset", "caml-la-8", "--data", str(data), "--unlabeled", str(unlabeled),
                    "--labeled", "2", "--val", "1", "--iterations", "2", "--patch", "32", "32", "32",
                    "--spacing", "1", "1", "1", "--output", str(tmp_path / "run"), "--name", "caml-tiny",
                    "--device", "cpu", "--progress", "json", "--set", "method_params.memory_per_class=16"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = json_lines(proc.stdout)[-1]
    assert done["stage"] == "done" and done["model_id"]
    scan = tmp_path / "scan.nrrd"
    write_case(scan, seed=7)
    out = tmp_path / "seg.nrrd"
    proc = run_cli(["segment", str(scan), "-o", str(out), "--model", done["model_id"], "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file()


@pytest.mark.parametrize("rows", ["agreeing", "selected"])
def test_one_agreeing_unlabelled_voxel_gives_no_correlation_loss_instead_of_an_error(rows):
    """BatchNorm1d in the heads needs 2 rows: with exactly one agreeing voxel the heads return no query."""
    from semiseg_la.methods import Batch as StepBatch
    from semiseg_la.methods import build_method

    method = build_method("caml", {"memory_slots": 2, "occ_head_rows": rows}, 10)
    method.train(True)
    shape = (4, 2, 4, 4, 4)
    prob_v = torch.zeros(shape)
    prob_v[:, 0] = 1.0  # V: background everywhere
    prob_a = torch.zeros(shape)
    prob_a[:, 1] = 1.0  # A: foreground everywhere ...
    prob_a[2, :, 1, 1, 1] = torch.tensor([1.0, 0.0])  # ... but one unlabelled voxel where both agree
    emb = torch.randn(4, 16, 4, 4, 4, requires_grad=True)
    batch = StepBatch(torch.zeros(4, 1, 4, 4, 4), torch.zeros(4, 4, 4, 4, dtype=torch.long), 2)
    loss, logs = method.omni_correlation(batch, prob_v, prob_a, emb, emb)
    assert float(loss.detach()) == 0.0 and logs["occ_available"] == 0.0
    loss.backward()  # still part of the graph
