"""The site adapter: an identity intensity adapter in front of a frozen parent, trained alone.

Units: an added adapter changes no prediction; the method trains the adapter and nothing else (weights and
BatchNorm statistics of the parent untouched); the statistics alignment alone learns to undo an intensity
change. End to end: `semiseg-la finetune --method site_adapter` adapts the spheres parent to a site whose
contrast it cannot read, the child is a catalog model `segment` loads, and it can be adapted or fine-tuned
again (with its adapter) but not by a method whose network cannot carry one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import json_lines, run_cli
from semiseg_la.errors import ConfigError
from semiseg_la.methods import build_method
from semiseg_la.methods.base import Batch
from semiseg_la.models import VNet
from test_site_adaptation import PARENT_ID, env_for, parent_models, write_site  # noqa: F401 (fixture)

SHAPE = (2, 1, 32, 32, 32)


def _parent() -> VNet:
    torch.manual_seed(0)
    net = VNet(has_dropout=False)
    for module in net.modules():  # running statistics = the exact average over the passes below
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None
    net.train()
    with torch.no_grad():  # running statistics of "training data": unit-variance noise
        for _ in range(3):
            net(torch.randn(SHAPE))
    return net.eval()


def _train(method, label: torch.Tensor, steps: int, lr: float) -> list:
    """`steps` Adam steps of `method` on scans 3 times brighter than the parent's and shifted by 1; the logs."""
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    logs = []
    for iteration in range(steps):
        method.train()
        result = method.training_step(Batch(3.0 * torch.randn(SHAPE) + 1.0, label, 1), iteration)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        logs.append(result.logs)
    return logs


def test_an_added_adapter_changes_no_prediction_and_fits_a_card():
    from semiseg_la.checkpoints.card import default_classes, default_inference
    from semiseg_la.checkpoints.store import build_network

    parent = _parent()
    child = VNet(has_dropout=False, input_adapter=16).eval()
    missing = child.load_state_dict(parent.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("input_adapter.") for k in missing)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert torch.equal(child(x), parent(x))
    card = {"format_version": 1, "id": "c-v0.1.0", "name": "c", "version": "0.1.0", "method": "site_adapter",
            "architecture": {"name": "vnet", "config": child.config},
            "inference": default_inference([32, 32, 32], (1.0, 1.0, 1.0)), "classes": default_classes()}
    assert child.config["input_adapter"] == 16 and "input_adapter" not in parent.config
    rebuilt = build_network(card)
    assert set(rebuilt.state_dict()) == set(child.state_dict())


def test_the_site_adapter_trains_the_adapter_and_nothing_else():
    parent = _parent()
    method = build_method("site_adapter", {"dropout": False, "alignment": 1.0}, 10)
    method.load_initial_weights(parent.state_dict())
    trainable = [n for n, p in method.net.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("input_adapter.") for n in trainable)
    before = {k: v.clone() for k, v in method.net.state_dict().items()}
    logs = _train(method, (torch.rand(SHAPE[:1] + SHAPE[2:]) > 0.5).long(), steps=3, lr=0.01)
    after = method.net.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("input_adapter.") for k in changed), changed
    assert logs[-1]["loss_alignment"] > 0


def test_statistics_alignment_alone_undoes_an_intensity_change():
    """Scans 3 times brighter and shifted by 1: with no label at all, matching the parent's BatchNorm statistics
    teaches the adapter to map them back (its output's mean and spread move towards the parent's inputs)."""
    parent = _parent()
    method = build_method("site_adapter", {"dropout": False, "supervised": 0.0, "alignment": 1.0}, 60)
    method.load_initial_weights(parent.state_dict())
    torch.manual_seed(1)
    logs = _train(method, torch.zeros(SHAPE[:1] + SHAPE[2:], dtype=torch.long), steps=60, lr=0.02)
    losses = [log["loss_alignment"] for log in logs]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    with torch.no_grad():
        mapped = method.net.input_adapter(3.0 * torch.randn(SHAPE) + 1.0)
    assert abs(float(mapped.mean())) < 0.5 and 0.4 < float(mapped.std()) < 2.0


def test_bad_site_adapter_settings_are_config_errors():
    with pytest.raises(ConfigError, match="input_adapter"):
        build_method("site_adapter", {"input_adapter": 0}, 10)
    with pytest.raises(ConfigError, match=">= 0"):
        build_method("site_adapter", {"alignment": -1}, 10)
    method = build_method("site_adapter", {"input_adapter": 8}, 10)
    wide = VNet(input_adapter=16).state_dict()
    with pytest.raises(ConfigError, match="another width"):
        method.load_initial_weights(wide)


def test_finetune_site_adapter_adapts_to_a_site_and_the_child_is_a_model(parent_models, tmp_path):  # noqa: F811
    """The spheres parent misses the spheres of a site that inverts most of the intensity range; an adapter
    trained alone in front of it (60 iterations) finds them on the held-out site case."""
    site, unl = write_site(tmp_path)
    env = env_for(parent_models)
    common = ["--data", str(site), "--unlabeled", str(unl), "--set", "fit_to_budget=false", "--device", "cpu",
              "--progress", "json"]
    result = run_cli(["finetune", "--from", PARENT_ID, "--method", "site_adapter", "--iterations", "60",
                      "--output", str(tmp_path / "run"), *common], env_extra=env)
    assert result.returncode == 0, result.stderr
    done = json_lines(result.stdout)[-1]
    guard = done["guard"]
    assert guard["parent_dice"] < 0.1 and guard["child_dice"] > 0.6, guard
    card = json.loads((Path(done["model_dir"]) / "card.json").read_text())
    assert card["method"] == "site_adapter" and card["architecture"]["config"]["input_adapter"] == 16
    assert card["lineage"]["parent"] == PARENT_ID
    child_id = card["id"]
    image = next((site / "images").glob("*.nrrd"))
    segmented = run_cli(["segment", str(image), "-o", str(tmp_path / "seg.nrrd"), "--model", child_id,
                         "--region", "whole", "--device", "cpu"], env_extra=env)
    assert segmented.returncode == 0, segmented.stderr
    for method in ("site_adapter", "mean_teacher"):  # adapted again, or fine-tuned with its adapter
        again = run_cli(["finetune", "--from", child_id, "--method", method, "--iterations", "2",
                         "--output", str(tmp_path / method), *common], env_extra=env)
        assert again.returncode == 0, again.stderr
        grandchild = json.loads((Path(json_lines(again.stdout)[-1]["model_dir"]) / "card.json").read_text())
        assert grandchild["architecture"]["config"]["input_adapter"] == 16
    caml = run_cli(["finetune", "--from", child_id, "--method", "caml", "--iterations", "2",
                    "--output", str(tmp_path / "caml"), *common], env_extra=env)
    assert caml.returncode != 0
    assert "site-adapted model" in caml.stderr and "--method site_adapter" in caml.stderr
    errors = [line for line in caml.stderr.splitlines() if line.startswith("semiseg-la: error:")]
    assert len(errors) == 1 and "Traceback" not in caml.stderr  # one line, after the run's own messages
