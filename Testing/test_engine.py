"""The shared training loop: sampler, augmentation, config, schedules, resume equivalence."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import sphere_volume, stop_after, synthetic_cases
from semiseg_la.engine.config import build_config, load_preset, parse_overrides, preset_names
from semiseg_la.engine.data import Augmentation, TwoStreamSampler, random_crop, split_cases
from semiseg_la.engine.loop import Trainer
from semiseg_la.errors import ConfigError


def tiny_config(tmp_path, **overrides):
    base = {"method": "supervised", "data": "synthetic", "patch_size": [32, 32, 32], "spacing": [1, 1, 1],
            "max_iterations": 6, "batch_size": 2, "labeled_bs": 1, "labeled_num": 2, "val_num": 0,
            "base_lr": 0.01, "checkpoint_every": 3, "validate_every": 0, "seed": 3, "output": str(tmp_path / "run"),
            "device": "cpu"}
    base.update(overrides)
    return build_config(base)


def test_sampler_two_streams_and_passes():
    sampler = TwoStreamSampler(n_labeled=4, n_unlabeled=6, batch_size=4, labeled_bs=2, seed=0)
    seen = []
    for _ in range(2):  # one pass over the labelled pool = 2 batches
        labeled, unlabeled = sampler.next()
        assert len(labeled) == 2 and len(unlabeled) == 2
        assert all(0 <= i < 6 for i in unlabeled)
        seen += labeled
    assert sorted(seen) == [0, 1, 2, 3]


def test_sampler_without_unlabeled_fills_batch_with_labeled():
    sampler = TwoStreamSampler(n_labeled=5, n_unlabeled=0, batch_size=4, labeled_bs=2, seed=0)
    labeled, unlabeled = sampler.next()
    assert len(labeled) == 4 and unlabeled == []


def test_sampler_state_round_trip_continues_identically():
    a = TwoStreamSampler(7, 9, 4, 2, seed=11)
    for _ in range(5):
        a.next()
    b = TwoStreamSampler(7, 9, 4, 2, seed=999)
    b.load_state_dict(a.state_dict())
    assert [a.next() for _ in range(10)] == [b.next() for _ in range(10)]


def test_a_resumed_sampler_whose_pool_shrank_draws_only_from_the_pool_it_has():
    a = TwoStreamSampler(7, 9, 4, 2, seed=11)
    a.next()
    b = TwoStreamSampler(7, 5, 4, 2, seed=0)  # four unlabelled scans removed from --unlabeled before --resume
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        labeled, unlabeled = b.next()
        assert all(0 <= i < 7 for i in labeled) and all(0 <= i < 5 for i in unlabeled)


def test_held_out_validation_images_stay_out_of_the_unlabelled_pool_only_when_asked():
    from semiseg_la.io.datasets import CaseRecord

    records = [CaseRecord(f"l{i}", (f"l{i}.nrrd",), f"l{i}_label.nrrd") for i in range(4)]
    records += [CaseRecord("u0", ("u0.nrrd",))]
    extra = [CaseRecord("x0", ("x0.nrrd",))]
    la_protocol = split_cases(records, labeled_num=3, val_num=1, extra_unlabeled=extra)
    assert [r.case_id for r in la_protocol.validation] == ["l3"]
    assert [r.case_id for r in la_protocol.unlabeled] == ["l3", "u0", "x0"]
    held_out = split_cases(records, labeled_num=3, val_num=1, extra_unlabeled=extra, unseen_validation=True)
    assert [r.case_id for r in held_out.labeled] == ["l0", "l1", "l2"]
    assert [r.case_id for r in held_out.unlabeled] == ["u0", "x0"]


def test_random_crop_pads_small_axes_like_the_la_pipeline():
    rng = np.random.default_rng(0)
    image = np.ones((1, 20, 40, 10), np.float32)
    label = np.ones((20, 40, 10), np.uint8)
    out_img, out_lab = random_crop(image, label, (32, 32, 32), rng)
    assert out_img.shape == (1, 32, 32, 32) and out_lab.shape == (32, 32, 32)
    assert out_lab.sum() < 32 ** 3  # padding is zero


def test_augmentation_keeps_image_and_label_aligned():
    rng = np.random.default_rng(1)
    image, label = sphere_volume((40, 40, 36), center=(12, 20, 18), radius=6, noise=0.0)
    aug = Augmentation((32, 32, 32), intensity_prob=0.0)
    for _ in range(5):
        out_img, out_lab = aug(image[None], label, rng)
        assert np.array_equal(out_img[0] > 1.0, out_lab.astype(bool))


def test_config_overrides_presets_and_errors():
    assert parse_overrides(["method_params.consistency=0.2", "max_iterations=10"]) == {
        "method_params": {"consistency": 0.2}, "max_iterations": 10}
    assert "supervised-la-cpu" in preset_names()
    cfg = build_config(load_preset("mean-teacher-la-8"), {"data": "x", "max_iterations": 5})
    assert cfg.method == "mean_teacher" and cfg.max_iterations == 5 and cfg.method_params["ema_decay"] == 0.99
    with pytest.raises(ConfigError, match="patch_size"):
        build_config({"patch_size": [30, 32, 32]})
    with pytest.raises(ConfigError, match="unknown setting"):
        build_config({"max_iteration": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        load_preset("nope")


def test_lr_schedules(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, lr_policy="step", lr_step=2, lr_gamma=0.1),
                      synthetic_cases(2, True), [])
    assert trainer.learning_rate(0) == pytest.approx(0.01)
    assert trainer.learning_rate(2) == pytest.approx(0.001)
    trainer = Trainer(tiny_config(tmp_path, lr_policy="poly"), synthetic_cases(2, True), [])
    assert trainer.learning_rate(3) == pytest.approx(0.01 * 0.5 ** 0.9)


@pytest.mark.parametrize("method", ["supervised", "mean_teacher"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, method):
    """Stop at iteration 3 (checkpoint), resume to 6: weights equal those of a straight 6-iteration run."""
    labeled, unlabeled = synthetic_cases(2, True), synthetic_cases(3, False, seed=10)
    straight = Trainer(tiny_config(tmp_path / "a", method=method, batch_size=2), labeled, unlabeled).run()
    first = Trainer(tiny_config(tmp_path / "b", method=method, batch_size=2), labeled, unlabeled,
                    should_stop=stop_after(3)).run()
    assert first.stopped_early and first.iterations == 3
    resumed = Trainer(tiny_config(tmp_path / "b", method=method, batch_size=2), labeled, unlabeled).run(resume=True)
    assert resumed.iterations == 6
    for (name, a), (_, b) in zip(straight.method.inference_network().state_dict().items(),
                                 resumed.method.inference_network().state_dict().items()):
        assert torch.equal(a, b), name


def test_freeze_keeps_named_parameters_fixed_and_names_unknown_prefixes():
    import torch

    from semiseg_la.engine.loop import freeze_parameters
    from semiseg_la.methods import build_method

    method = build_method("mean_teacher", {}, 10)
    freeze_parameters(method, ["encoder.block_five", "decoder.block_six"])
    frozen = {n for n, p in method.student.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("encoder.block_five", "decoder.block_six")) for n in frozen)
    assert any(p.requires_grad for p in method.student.parameters())
    with pytest.raises(ConfigError, match="'encoder.block_ten'"):
        freeze_parameters(build_method("supervised", {}, 10), ["encoder.block_ten"])
    with pytest.raises(ConfigError, match="nothing to train"):
        freeze_parameters(build_method("supervised", {}, 10), ["encoder", "decoder"])
    norm_only = build_method("supervised", {}, 10)
    freeze_parameters(norm_only, [], train_only="norm")
    trained = {n for n, p in norm_only.net.named_parameters() if p.requires_grad}
    bn_names = {f"{m}.{k}" for m, mod in norm_only.net.named_modules() if isinstance(mod, torch.nn.BatchNorm3d)
                for k in ("weight", "bias")}
    assert trained == bn_names
    with pytest.raises(ConfigError, match="train_only"):
        freeze_parameters(build_method("supervised", {}, 10), [], train_only="decoder")


def test_mixed_precision_is_bf16_where_the_gpu_has_it_else_fp16_with_a_scaler(monkeypatch):
    import torch

    from semiseg_la.engine.precision import amp_dtype, grad_scaler

    assert amp_dtype(torch.device("cpu")) is None
    assert amp_dtype(torch.device("cuda", 0), enabled=False) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert amp_dtype(torch.device("cuda", 0)) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert amp_dtype(torch.device("cuda", 0)) is torch.float16
    assert not grad_scaler(torch.bfloat16).is_enabled() and not grad_scaler(None).is_enabled()


def test_compile_is_refused_until_it_is_implemented():
    with pytest.raises(ConfigError, match="compile"):
        build_config({"data": "x", "compile": True})


def test_anchor_weight_keeps_a_fine_tune_near_its_parent(tmp_path):
    """L2-SP: with a strong anchor the trained weights move less from the parent's than without."""
    from semiseg_la.methods import build_method

    parent = build_method("supervised", {}, 4)
    initial = {k: v.clone() for k, v in parent.net.state_dict().items()}
    cases = synthetic_cases(2, True)

    def drift(anchor):
        trainer = Trainer(tiny_config(tmp_path / f"a{anchor}", max_iterations=4, base_lr=0.05, anchor_weight=anchor),
                          cases, [], initial_weights=initial)
        trainer.run()
        after = trainer.method.net.state_dict()
        return sum(float(((after[k].float() - initial[k].float()) ** 2).sum())
                   for k in initial if k.endswith(".weight"))

    free, anchored = drift(0.0), drift(5.0)
    assert anchored < 0.5 * free
    with pytest.raises(ConfigError, match="anchor_weight"):
        tiny_config(tmp_path, anchor_weight=-1)


def _weights(result):
    return result.method.inference_network().state_dict()


def test_prefetching_loader_gives_the_same_run_and_the_same_resume(tmp_path):
    """The loader thread draws the same batches: a prefetched run, and one stopped at 3 and resumed (the
    checkpoint is taken while the 4th batch is in flight), equal a plain run bit for bit."""
    labeled, unlabeled = synthetic_cases(2, True), synthetic_cases(3, False, seed=10)
    common = {"method": "mean_teacher", "site_shift_prob": 0.5}
    plain_trainer = Trainer(tiny_config(tmp_path / "plain", **common), labeled, unlabeled)
    assert plain_trainer.loader is None  # on a CPU prefetching is off unless asked for
    plain = plain_trainer.run()
    prefetched = Trainer(tiny_config(tmp_path / "pre", prefetch=True, **common), labeled, unlabeled).run()
    first = Trainer(tiny_config(tmp_path / "res", prefetch=True, **common), labeled, unlabeled,
                    should_stop=stop_after(3))
    assert first.run().iterations == 3
    resumed = Trainer(tiny_config(tmp_path / "res", prefetch=True, **common), labeled, unlabeled).run(resume=True)
    for name, value in _weights(plain).items():
        assert torch.equal(value, _weights(prefetched)[name]), name
        assert torch.equal(value, _weights(resumed)[name]), name


def test_loader_processes_draw_the_same_run_with_any_count_and_the_same_resume(tmp_path):
    """Loader processes: one and two of them train the same weights, bit for bit, and a run stopped at 3
    (its checkpoint taken with batches in flight) and resumed equals them; batches differ from a run without
    them (each batch has its own seed), so the comparison is not vacuous."""
    labeled, unlabeled = synthetic_cases(2, True), synthetic_cases(3, False, seed=10)
    common = {"method": "mean_teacher", "site_shift_prob": 0.5}
    one = Trainer(tiny_config(tmp_path / "one", loader_workers=1, **common), labeled, unlabeled).run()
    two = Trainer(tiny_config(tmp_path / "two", loader_workers=2, **common), labeled, unlabeled).run()
    first = Trainer(tiny_config(tmp_path / "res", loader_workers=2, **common), labeled, unlabeled,
                    should_stop=stop_after(3))
    assert first.run().iterations == 3
    resumed = Trainer(tiny_config(tmp_path / "res", loader_workers=2, **common), labeled, unlabeled).run(resume=True)
    without = Trainer(tiny_config(tmp_path / "none", **common), labeled, unlabeled).run()
    for name, value in _weights(one).items():
        assert torch.equal(value, _weights(two)[name]), name
        assert torch.equal(value, _weights(resumed)[name]), name
    assert any(not torch.equal(v, _weights(without)[k]) for k, v in _weights(one).items())


def test_loader_workers_must_be_a_count():
    with pytest.raises(ConfigError, match="loader_workers"):
        build_config({"method": "supervised", "data": "synthetic", "loader_workers": -1})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the loader processes end with their parent on Linux")
def test_loader_processes_end_when_the_training_process_is_killed_outright(tmp_path):
    """kill -9 of a training process (a cancelled run's child killed) leaves no loader process behind."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from conftest import synthetic_cases
        from test_engine import tiny_config
        from semiseg_la.engine.loop import Trainer
        trainer = Trainer(tiny_config(Path({str(tmp_path)!r}), loader_workers=2, max_iterations=100),
                          synthetic_cases(2, True), [])
        trainer.train_step()
        print(json.dumps(sorted(trainer.loader.pool._processes)), flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = json.loads(proc.stdout.readline())
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    """Running (a zombie not yet reaped counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_cpu_is_named_with_its_thread_count_for_people():
    """What the time estimate and a card's `device` say on a CPU (it read "CPU x1 threads")."""
    import torch

    from semiseg_la.engine.precision import device_name

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert device_name("cpu") == "CPU, 1 thread"
        torch.set_num_threads(2)
        assert device_name("cpu") == "CPU, 2 threads"
    finally:
        torch.set_num_threads(threads)


def test_the_time_estimate_names_a_validation_pass_only_when_there_is_one():
    """A site fine-tune with 1-2 labelled cases has no validation split: no "0.0 s per validation" then."""
    from semiseg_la.engine.budget import BudgetPlan

    plan = BudgetPlan(step_s=3.23, validation_s=0.0, spent_s=11, export_s=8, loop_s=41, iterations=12, capped=False)
    assert plan.message(60, "CPU, 1 thread") == (
        "time estimate on CPU, 1 thread: 3.23 s per iteration; 12 iterations fit in the 60 s budget (about 0.7 min "
        "of training, 11 s already spent loading and measuring, 8 s kept for the export)")
    with_validation = dataclasses.replace(plan, validation_s=2.0)
    assert "3.23 s per iteration, 2.0 s per validation; 12 iterations" in with_validation.message(60, "CPU")
