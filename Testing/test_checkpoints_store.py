"""Model folders: card.json + safetensors weights (single, sharded, float16), verified before use."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semiseg_la.checkpoints import store
from semiseg_la.checkpoints.card import ModelCard, default_classes, default_inference, sha256_file
from semiseg_la.checkpoints.store import build_network, load_model_weights, load_network, save_model
from semiseg_la.errors import CheckpointError
from semiseg_la.models.vnet import VNet

CONFIG = {"in_channels": 1, "n_classes": 2, "base": 2, "norm": "batchnorm", "has_dropout": False, "up_type": 0}


def make_card(model_id: str = "test-model-v0.1.0", **overrides) -> dict:
    card = {"format_version": 1, "id": model_id, "name": "Test model", "version": "0.1.0", "method": "supervised",
            "description": "tiny V-Net for tests", "architecture": {"name": "vnet", "config": dict(CONFIG)},
            "inference": default_inference((32, 32, 16)), "classes": default_classes(),
            "training": {"labeled_cases": 4, "seed": 1}, "validation": {"dice": 0.9, "split": "2 cases"},
            "lineage": {"parent": None, "parent_sha256": None}}
    card.update(overrides)
    return card


def make_state(seed: int = 0) -> dict:
    """A V-Net state dict with non-trivial BN statistics (so a buffer mix-up would show)."""
    torch.manual_seed(seed)
    state = VNet(**CONFIG).state_dict()
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            tensor.fill_(7)
        elif name.endswith(("running_mean", "running_var")):
            tensor.copy_(torch.rand_like(tensor) + 0.5)
    return state


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def saved(tmp_path: Path) -> tuple:
    state = make_state()
    folder = save_model(tmp_path / "model", state, make_card())
    return folder, state


def _edit_card(folder: Path, edit) -> None:
    data = json.loads((folder / "card.json").read_text())
    edit(data)
    (folder / "card.json").write_text(json.dumps(data))


# ---- round trips ----------------------------------------------------------------------------------
def test_float32_round_trip_is_exact_and_keeps_integer_buffers(saved):
    folder, state = saved
    weights, card = load_model_weights(folder)
    assert_same(weights, state)
    assert weights["encoder.block_one.1.num_batches_tracked"].dtype == torch.int64
    assert card.weights["dtype"] == "float32"
    assert card.weights["files"] == {"model.safetensors": sha256_file(folder / "model.safetensors")}
    assert card.weights["tensors"]["decoder.out_conv.weight"] == [2, 2, 1, 1, 1]
    assert set(card.software) >= {"semiseg_la", "torch", "numpy"} and card.created
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.safetensors"]


def test_float16_storage_returns_float32_within_fp16_rounding(tmp_path):
    state = make_state()
    folder = save_model(tmp_path / "half", state, make_card(), dtype="float16")
    weights, card = load_model_weights(folder)
    assert card.weights["dtype"] == "float16"
    for name, tensor in state.items():
        if tensor.is_floating_point():
            assert weights[name].dtype == torch.float32
            assert torch.equal(weights[name], tensor.half().float()), name
        else:
            assert torch.equal(weights[name], tensor)
    full = save_model(tmp_path / "full", state, make_card())
    assert (folder / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size


def test_float16_overflow_is_refused(tmp_path):
    state = make_state()
    state["decoder.out_conv.bias"] = torch.tensor([1e6, 0.0])
    with pytest.raises(CheckpointError, match="float16 range"):
        save_model(tmp_path / "m", state, make_card(), dtype="float16")


def test_non_contiguous_tensors_are_saved(tmp_path):
    state = make_state()
    weight = state["decoder.out_conv.weight"]
    state["decoder.out_conv.weight"] = weight.reshape(2, 2).t().contiguous().t().reshape(weight.shape)
    folder = save_model(tmp_path / "m", state, make_card())
    assert torch.equal(load_model_weights(folder)[0]["decoder.out_conv.weight"], weight)


def test_sharding_writes_several_shards_and_an_index(tmp_path):
    state = make_state()
    folder = save_model(tmp_path / "sharded", state, make_card(), max_shard_bytes=20_000)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    weights, card = load_model_weights(folder)
    assert_same(weights, state)
    assert set(card.weights["files"]) == {p.name for p in shards} | {"model.safetensors.index.json"}


def test_overwrite_replaces_a_model_and_removes_stale_shards(tmp_path):
    state = make_state()
    folder = save_model(tmp_path / "m", state, make_card(), max_shard_bytes=20_000)
    with pytest.raises(CheckpointError, match="already holds a model"):
        save_model(folder, state, make_card())
    new_state = make_state(seed=1)
    save_model(folder, new_state, make_card(), overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.safetensors"]
    assert_same(load_model_weights(folder)[0], new_state)


def test_card_round_trips_through_json_and_keeps_unknown_keys():
    data = make_card(custom_field={"a": 1})
    data["validation"]["hd95"] = float("nan")
    card = ModelCard.from_dict(data, require_weights=False)
    text = card.to_json()
    assert "NaN" not in text
    again = ModelCard.from_json(text, require_weights=False)
    assert again.extra == {"custom_field": {"a": 1}}
    assert again.validation["hd95"] is None and again.validation_dice == 0.9
    assert list(json.loads(text))[:3] == ["format_version", "id", "name"]


# ---- refusals -------------------------------------------------------------------------------------
def test_tampered_weight_byte_is_detected_before_parsing(saved, monkeypatch):
    folder, _ = saved
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    monkeypatch.setattr(store, "st_load", lambda *_: pytest.fail("parsed before verification"))
    with pytest.raises(CheckpointError, match=r"do not match the SHA-256 in card.json \(file changed or corrupted\)"):
        load_model_weights(folder)


def test_tampered_shard_is_detected(tmp_path):
    folder = save_model(tmp_path / "m", make_state(), make_card(), max_shard_bytes=20_000)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=shard.name):
        load_model_weights(folder)


def test_edited_card_shape_is_refused(saved):
    folder, _ = saved
    _edit_card(folder, lambda d: d["weights"]["tensors"].__setitem__("decoder.out_conv.weight", [3, 2, 1, 1, 1]))
    with pytest.raises(CheckpointError, match=r"differ from the tensors recorded in card.json.*out_conv.weight"):
        load_model_weights(folder)


def test_card_missing_a_tensor_is_refused(saved):
    folder, _ = saved
    _edit_card(folder, lambda d: d["weights"]["tensors"].pop("decoder.out_conv.bias"))
    with pytest.raises(CheckpointError, match="unexpected keys: decoder.out_conv.bias"):
        load_model_weights(folder)


def test_truncated_safetensors_is_refused(saved):
    folder, _ = saved
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model_weights(folder)
    # Even with a matching hash (e.g. a card written from a broken file), parsing fails cleanly.
    _edit_card(folder, lambda d: d["weights"]["files"].__setitem__("model.safetensors", sha256_file(path)))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model_weights(folder)


def test_missing_weight_file_is_refused(saved):
    folder, _ = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model_weights(folder)


def test_inconsistent_shard_index_is_refused(tmp_path):
    folder = save_model(tmp_path / "m", make_state(), make_card(), max_shard_bytes=20_000)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["decoder.out_conv.bias"] = shards[0] if index["weight_map"][
        "decoder.out_conv.bias"] != shards[0] else shards[1]
    index_path.write_text(json.dumps(index))
    _edit_card(folder, lambda d: d["weights"]["files"].__setitem__(index_path.name, sha256_file(index_path)))
    with pytest.raises(CheckpointError, match="shard index disagrees"):
        load_model_weights(folder)


def test_malformed_card_names_file_line_and_column(saved):
    folder, _ = saved
    lines = (folder / "card.json").read_text().splitlines()
    lines[3] = lines[3] + ","  # a stray comma, the MONAIAuto3DSeg #63 failure
    (folder / "card.json").write_text("\n".join(lines))
    with pytest.raises(CheckpointError) as info:
        load_model_weights(folder)
    message = str(info.value)
    assert str(folder / "card.json") in message and "\n" not in message
    assert f"line 4, column {len(lines[3])}" in message  # the doubled comma


def test_missing_required_keys_are_named(saved):
    folder, _ = saved
    _edit_card(folder, lambda d: (d.pop("method"), d.pop("inference")))
    with pytest.raises(CheckpointError, match="missing required key.*method, inference"):
        load_model_weights(folder)


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.__setitem__("id", "../escape"), "invalid id"),
    (lambda d: d["weights"]["files"].__setitem__("../../x.safetensors", "0" * 64), "not a model weight file name"),
    (lambda d: d.__setitem__("format_version", 2), "newer than this semiseg-la supports"),
    (lambda d: d["inference"].__setitem__("patch_size", [32, 32]), "patch_size"),
    (lambda d: d["weights"].__setitem__("dtype", "bfloat16"), "weights.dtype"),
])
def test_invalid_card_fields_are_refused(saved, edit, pattern):
    folder, _ = saved
    _edit_card(folder, edit)
    with pytest.raises(CheckpointError, match=pattern):
        load_model_weights(folder)


def test_state_dict_not_matching_the_architecture_writes_nothing(tmp_path):
    state = make_state()
    state.pop("decoder.out_conv.bias")
    with pytest.raises(CheckpointError, match="missing keys: decoder.out_conv.bias"):
        save_model(tmp_path / "m", state, make_card())
    assert not (tmp_path / "m").exists()


# ---- networks -------------------------------------------------------------------------------------
def test_load_network_reproduces_the_saved_network_without_pickle(saved, monkeypatch):
    folder, state = saved
    original = VNet(**CONFIG)
    original.load_state_dict(state)
    original.eval()
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("pickle used"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    net, card = load_network(folder)
    assert not net.training and card.id == "test-model-v0.1.0"
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), original(x))


def test_load_network_lists_architecture_mismatches(saved):
    folder, _ = saved
    _edit_card(folder, lambda d: d["architecture"]["config"].__setitem__("n_classes", 3))
    with pytest.raises(CheckpointError, match=r"shape mismatches: decoder.out_conv.weight \[2, 2, 1, 1, 1\]"):
        load_network(folder)


def test_unknown_architecture_and_config_key_are_refused():
    with pytest.raises(CheckpointError, match="unknown architecture 'unet'"):
        build_network(make_card(architecture={"name": "unet", "config": {}}))
    with pytest.raises(CheckpointError, match="unknown config key"):
        build_network(make_card(architecture={"name": "vnet", "config": {"depth": 5}}))


def test_build_network_disables_dropout():
    config = dict(CONFIG, has_dropout=True)
    net = build_network(make_card(architecture={"name": "vnet", "config": config}))
    assert not any(isinstance(m, torch.nn.Dropout3d) for m in net.modules())


# ---- atomicity ------------------------------------------------------------------------------------
def test_interrupted_save_leaves_no_card_and_no_temporary_files(tmp_path, monkeypatch):
    calls = []
    real_save = store.st_save

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store, "st_save", failing_save)
    folder = tmp_path / "m"
    with pytest.raises(OSError):
        save_model(folder, make_state(), make_card(), max_shard_bytes=20_000)
    names = [p.name for p in folder.iterdir()]
    assert "card.json" not in names and not [n for n in names if ".tmp" in n]
    with pytest.raises(CheckpointError, match="incomplete or interrupted"):
        load_model_weights(folder)


def test_every_file_is_written_through_a_temporary_and_renamed(tmp_path, monkeypatch):
    import os

    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append((Path(src).name, Path(dst).name)),
                                                         real_replace(src, dst)))
    folder = save_model(tmp_path / "m", make_state(), make_card(), max_shard_bytes=20_000)
    final = sorted(p.name for p in folder.iterdir())
    assert sorted(dst for _, dst in renamed) == final
    assert all(".tmp" in src for src, _ in renamed)
    assert renamed[-1][1] == "card.json"  # the completion marker comes last


def test_catalog_and_card_modules_do_not_import_torch():
    code = ("import sys; import semiseg_la.checkpoints.catalog, semiseg_la.checkpoints.card; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    training = str(Path(__file__).resolve().parents[1] / "training")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=training)
