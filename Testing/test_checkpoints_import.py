"""Importing official-style `.pth` V-Net weights: weights_only only, key mapping, strict checks."""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import pytest
import torch

from semiseg_la.checkpoints.card import sha256_file
from semiseg_la.checkpoints.catalog import list_models, local_models_dir
from semiseg_la.checkpoints.import_pth import import_pth
from semiseg_la.checkpoints.store import load_model_weights, load_network
from semiseg_la.errors import CheckpointError
from semiseg_la.models.vnet import VNet

CONV_BLOCKS = {"block_one", "block_two", "block_three", "block_four", "block_five", "block_six", "block_seven",
               "block_eight", "block_nine"}


def make_net(seed: int = 0, **config) -> VNet:
    torch.manual_seed(seed)
    net = VNet(**{"base": 2, **config})
    for name, buf in net.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            buf.copy_(torch.rand_like(buf) + 0.5)
    return net


def official_names(state: dict, norm: str = "batchnorm", encoder: str = "", decoder: str = "") -> dict:
    """This project's keys renamed the way the UA-MT / MC-Net / CAML V-Nets name them."""
    out = {}
    for key, value in state.items():
        part, block, rest = key.split(".", 2)
        if block != "out_conv":
            index, leaf = rest.split(".", 1)
            if norm == "none" and block in CONV_BLOCKS:  # theirs: [conv, relu] per stage, ours [conv, id, relu]
                index = str(int(index) // 3 * 2)
            rest = f"conv.{index}.{leaf}"
        group = encoder if part == "encoder" else decoder
        out[f"{group}.{block}.{rest}" if group else f"{block}.{rest}"] = value
    return out


def assert_equal_weights(folder: Path, net: VNet) -> None:
    weights, _ = load_model_weights(folder)
    expected = net.state_dict()
    assert list(weights) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


def test_flat_ua_mt_checkpoint_with_module_prefix(tmp_path):
    net = make_net()
    state = {f"module.{k}": v for k, v in official_names(net.state_dict()).items()}
    assert "module.block_one.conv.0.weight" in state and "module.out_conv.weight" in state
    path = tmp_path / "vnet_best_model.pth"
    torch.save({"state_dict": state, "iteration": 6000}, path)
    folder = import_pth(path)
    assert folder.parent == local_models_dir() and folder.name == "imported-vnet_best_model-v0.1.0"
    assert_equal_weights(folder, net)
    loaded, card = load_network(folder)
    assert card.architecture["config"] == {**net.config, "has_dropout": False}
    assert card.lineage["imported_from"] == {"file": path.name, "sha256": sha256_file(path)}
    assert card.inference["patch_size"] == [112, 112, 80] and card.inference["spacing"] == [0.625] * 3
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
    assert [e.id for e in list_models() if e.source == "local"] == [folder.name]


def test_caml_checkpoint_imports_the_first_branch(tmp_path):
    v_net, a_net = make_net(seed=1), make_net(seed=2, up_type=1)
    state = official_names(v_net.state_dict(), encoder="encoder1", decoder="decoder1")
    state.update(official_names(a_net.state_dict(), encoder="encoder2", decoder="decoder2"))
    state["projection_head1.0.weight"] = torch.randn(32, 2)
    path = tmp_path / "caml.pth"
    torch.save({"net": state}, path)
    folder = import_pth(path, dest_id="caml-la-8-v1.0.0", method="caml")
    assert_equal_weights(folder, v_net)
    _, card = load_network(folder)
    assert (card.id, card.name, card.version, card.method) == ("caml-la-8-v1.0.0", "caml-la-8", "1.0.0", "caml")
    assert card.training["imported_from"]["dropped_groups"] == ["decoder2", "encoder2", "projection_head1"]


@pytest.mark.parametrize("config", [{"up_type": 1}, {"up_type": 2}, {"norm": "none"}, {"norm": "groupnorm",
                                                                                         "base": 16}])
def test_layouts_and_upsampling_types(tmp_path, config):
    net = make_net(**config)
    state = official_names(net.state_dict(), norm=config.get("norm", "batchnorm"), encoder="encoder",
                           decoder="decoder1")
    path = tmp_path / "model.pth"
    torch.save(state, path)
    folder = import_pth(path, up_type=config.get("up_type"))  # nearest (2) vs trilinear: not in the shapes
    assert_equal_weights(folder, net)
    _, card = load_network(folder)
    inferred = card.architecture["config"]
    assert inferred["up_type"] == config.get("up_type", 0) and inferred["norm"] == config.get("norm", "batchnorm")


def test_native_names_import_too(tmp_path):
    net = make_net()
    path = tmp_path / "native.pt"
    torch.save({"model": net.state_dict()}, path)
    assert_equal_weights(import_pth(path), net)


def test_safetensors_files_import_without_torch_load(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    net = make_net()
    path = tmp_path / "official.safetensors"
    save_file(official_names(net.state_dict(), encoder="encoder", decoder="decoder1"), str(path))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    assert_equal_weights(import_pth(path), net)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return builtins.exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"block_one.conv.0.weight": torch.zeros(1)}, "extra": Payload()}, path)
    message = re.escape(f"refusing {path}: it needs pickle to load (not a plain state dict); "
                        "only weights_only-loadable files are imported")
    with pytest.raises(CheckpointError, match=message):
        import_pth(path)
    assert not marker.exists()
    assert not local_models_dir().exists() or not any(local_models_dir().iterdir())
    # The payload is real: unpickling calls exactly this (what weights_only prevents).
    function, args = Payload().__reduce__()
    function(*args)
    assert marker.read_text() == "ran"


def test_unreadable_and_non_state_dict_files_are_refused(tmp_path):
    path = tmp_path / "broken.pth"
    net = make_net()
    torch.save(official_names(net.state_dict()), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        import_pth(path)
    torch.save({"epoch": 3, "lr": 0.01}, path)
    with pytest.raises(CheckpointError, match="no state dict found"):
        import_pth(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        import_pth(tmp_path / "absent.pth")


def test_strict_checks_list_missing_and_mismatched_keys(tmp_path):
    state = official_names(make_net().state_dict())
    state.pop("block_nine.conv.1.running_var")
    state["block_six.conv.0.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder.block_nine.1.running_var.*"
                                              r"shape mismatches: decoder.block_six.0.bias \[5\]"):
        import_pth(path)
    assert not local_models_dir().exists() or not any(local_models_dir().iterdir())


def test_unmappable_key_in_the_vnet_is_refused(tmp_path):
    state = official_names(make_net().state_dict(), encoder="encoder", decoder="decoder")
    state["encoder.attention.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="cannot map key.*encoder.attention.weight"):
        import_pth(path)


def test_existing_destination_id_is_refused(tmp_path):
    net = make_net()
    path = tmp_path / "m.pth"
    torch.save(net.state_dict(), path)
    import_pth(path, dest_id="taken-v0.1.0")
    with pytest.raises(CheckpointError, match="already exists"):
        import_pth(path, dest_id="taken-v0.1.0")
