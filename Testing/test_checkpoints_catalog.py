"""The model catalog: bundled + site + local models, default resolution, lineage, removal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from semiseg_la.checkpoints import catalog
from semiseg_la.checkpoints.card import default_classes, default_inference
from semiseg_la.checkpoints.catalog import (
    default_model_id,
    lineage,
    list_models,
    local_models_dir,
    new_local_model_dir,
    remove_local_model,
    resolve_model,
    unique_model_id,
)
from semiseg_la.checkpoints.store import load_model_weights, save_model
from semiseg_la.errors import CheckpointError
from semiseg_la.models.vnet import VNet

CONFIG = {"in_channels": 1, "n_classes": 2, "base": 2, "norm": "batchnorm", "has_dropout": False, "up_type": 0}


def make_card(model_id: str, parent: str | None = None, labeled: int = 4, dice: float = 0.85) -> dict:
    return {"format_version": 1, "id": model_id, "name": model_id, "version": model_id.rsplit("-v", 1)[-1],
            "method": "caml" if parent else "supervised", "description": "test",
            "architecture": {"name": "vnet", "config": dict(CONFIG)},
            "inference": default_inference((32, 32, 16)), "classes": default_classes(),
            "training": {"labeled_cases": labeled}, "validation": {"dice": dice, "split": "2 cases"},
            "lineage": {"parent": parent, "parent_sha256": None}}


@pytest.fixture
def bundled(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "bundled"
    folder.mkdir()
    monkeypatch.setattr(catalog, "BUNDLED_DIR", folder)
    monkeypatch.delenv("SEMISEG_LA_DEFAULT_MODEL", raising=False)
    monkeypatch.delenv("SEMISEG_LA_MODELS", raising=False)
    return folder


_STATE = VNet(**CONFIG).state_dict()


def install(root: Path, model_id: str, parent: str | None = None, **kw) -> Path:
    return save_model(root / model_id, _STATE, make_card(model_id, parent, **kw))


def install_local(model_id: str, parent: str | None = None, **kw) -> Path:
    return save_model(new_local_model_dir(model_id), _STATE, make_card(model_id, parent, **kw))


def test_local_models_live_under_semiseg_la_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMISEG_LA_HOME", str(tmp_path / "home"))
    assert local_models_dir() == tmp_path / "home" / "models"
    monkeypatch.delenv("SEMISEG_LA_HOME")
    assert local_models_dir() == Path.home() / ".semiseg-la" / "models"


def test_listing_merges_bundled_site_and_local_and_survives_broken_folders(bundled, tmp_path, monkeypatch):
    install(bundled, "supervised-la-cpu-v0.1.0", labeled=16, dice=0.88)
    site = tmp_path / "site"
    install(site, "site-model-v0.1.0")
    monkeypatch.setenv("SEMISEG_LA_MODELS", str(site))
    install_local("finetuned-v0.1.0", parent="supervised-la-cpu-v0.1.0", labeled=8, dice=0.9)
    broken = local_models_dir() / "broken-v0.1.0"
    broken.mkdir()
    (broken / "card.json").write_text('{"id": "broken-v0.1.0",}')
    (local_models_dir() / "interrupted-v0.1.0").mkdir()  # weights written, card never came

    entries = {e.id: e for e in list_models()}
    assert [e.source for e in list_models()][:2] == ["bundled", "site"]
    good = entries["supervised-la-cpu-v0.1.0"]
    assert (good.source, good.labeled_cases, good.validation_dice, good.error) == ("bundled", 16, 0.88, None)
    assert good.path == bundled / "supervised-la-cpu-v0.1.0" and good.created
    child = entries["finetuned-v0.1.0"]
    assert (child.source, child.parent, child.method, child.error) == ("local", "supervised-la-cpu-v0.1.0",
                                                                      "caml", None)
    assert entries["site-model-v0.1.0"].source == "site"
    assert "line 1, column" in entries["broken-v0.1.0"].error
    assert "card.json" in entries["interrupted-v0.1.0"].error
    row = json.loads(json.dumps(child.to_dict()))  # JSON-ready for `semiseg-la models list --json` and Slicer
    assert (row["dice"], row["labeled_cases"], row["path"]) == (0.9, 8, str(child.path))


def test_local_model_cannot_shadow_a_bundled_one(bundled):
    install(bundled, "base-v0.1.0")
    shadow = local_models_dir() / "base-v0.1.0"
    save_model(shadow, _STATE, make_card("base-v0.1.0"))
    entries = [e for e in list_models() if e.id == "base-v0.1.0"]
    assert [e.source for e in entries] == ["bundled", "local"]
    assert entries[0].error is None and "this copy is ignored" in entries[1].error
    assert resolve_model("base-v0.1.0") == bundled / "base-v0.1.0"


def test_card_id_must_match_its_folder(bundled):
    save_model(bundled / "renamed", _STATE, make_card("original-v0.1.0"))
    (entry,) = list_models()
    assert "differs from the folder name" in entry.error


def test_resolve_by_id_by_path_and_unknown(bundled, tmp_path):
    install(bundled, "base-v0.1.0")
    local = install_local("mine-v0.1.0")
    assert resolve_model("base-v0.1.0") == bundled / "base-v0.1.0"
    assert resolve_model("mine-v0.1.0") == local
    elsewhere = save_model(tmp_path / "runs" / "export", _STATE, make_card("exported-v0.1.0"))
    assert resolve_model(str(elsewhere)) == elsewhere.resolve()
    with pytest.raises(CheckpointError, match=r"unknown model 'nope'; installed: base-v0.1.0, mine-v0.1.0"):
        resolve_model("nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no card.json"):
        resolve_model(str(tmp_path / "empty"))


def test_default_model_resolution_order(bundled, monkeypatch):
    with pytest.raises(CheckpointError, match="no model installed; train one with `semiseg-la train` or pass --model"):
        resolve_model(None)
    install(bundled, "b-model-v0.1.0")
    install(bundled, "a-model-v0.1.0")
    assert default_model_id() == "a-model-v0.1.0"  # first bundled
    (bundled / "default.json").write_text(json.dumps({"default": "b-model-v0.1.0"}))
    assert resolve_model(None) == bundled / "b-model-v0.1.0"
    install_local("local-v0.1.0")
    monkeypatch.setenv("SEMISEG_LA_DEFAULT_MODEL", "local-v0.1.0")
    assert resolve_model(None) == local_models_dir() / "local-v0.1.0"
    monkeypatch.delenv("SEMISEG_LA_DEFAULT_MODEL")
    (bundled / "default.json").write_text('{"default": "b-model-v0.1.0",,}')
    with pytest.raises(CheckpointError, match=r"default.json: malformed JSON at line 1, column"):
        default_model_id()


def test_benchmarks_score_a_final_model_through_its_validation_run(bundled):
    from semiseg_la.checkpoints import validation_model_id

    install(bundled, "run-v0.1.0")
    final = make_card("final-v0.1.0", labeled=80)
    final["validation"] = {"dice": 0.86, "figure": "validation run", "validation_run": "run-v0.1.0"}
    save_model(bundled / "final-v0.1.0", _STATE, final)
    (bundled / "default.json").write_text(json.dumps({"default": "final-v0.1.0"}))
    assert validation_model_id() == "run-v0.1.0"  # the default trained on the validation cases
    assert validation_model_id("final-v0.1.0") == "run-v0.1.0"
    assert validation_model_id("run-v0.1.0") == "run-v0.1.0"  # a model with its own validation split


def test_only_local_models_do_not_count_as_default(bundled):
    install_local("mine-v0.1.0")
    with pytest.raises(CheckpointError, match="no model installed"):
        default_model_id()


def test_new_local_model_dir_refuses_existing_and_invalid_ids(bundled):
    install(bundled, "base-v0.1.0")
    with pytest.raises(CheckpointError, match="already exists"):
        new_local_model_dir("base-v0.1.0")
    folder = new_local_model_dir("mine-v0.1.0")
    assert folder.is_dir() and folder.parent == local_models_dir()
    with pytest.raises(CheckpointError, match="already exists"):
        new_local_model_dir("mine-v0.1.0")
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(CheckpointError, match="invalid model id"):
            new_local_model_dir(bad)


def test_remove_refuses_bundled_and_removes_local_even_broken(bundled, tmp_path, monkeypatch):
    install(bundled, "base-v0.1.0")
    with pytest.raises(CheckpointError, match="bundled models are immutable"):
        remove_local_model("base-v0.1.0")
    assert (bundled / "base-v0.1.0" / "card.json").is_file()
    site = tmp_path / "site"
    install(site, "site-v0.1.0")
    monkeypatch.setenv("SEMISEG_LA_MODELS", str(site))
    with pytest.raises(CheckpointError, match="site folder"):
        remove_local_model("site-v0.1.0")
    install_local("mine-v0.1.0")
    broken = local_models_dir() / "broken-v0.1.0"
    broken.mkdir()
    remove_local_model("mine-v0.1.0")
    remove_local_model("broken-v0.1.0")
    assert sorted(p.name for p in local_models_dir().iterdir()) == []
    assert [e.id for e in list_models()] == ["base-v0.1.0", "site-v0.1.0"]
    with pytest.raises(CheckpointError, match="unknown local model"):
        remove_local_model("mine-v0.1.0")


def test_lineage_chain_to_root(bundled):
    install(bundled, "root-v0.1.0")
    install_local("child-v0.1.0", parent="root-v0.1.0")
    install_local("grandchild-v0.1.0", parent="child-v0.1.0")
    assert lineage("grandchild-v0.1.0") == ["grandchild-v0.1.0", "child-v0.1.0", "root-v0.1.0"]
    assert lineage("root-v0.1.0") == ["root-v0.1.0"]
    assert lineage(str(local_models_dir() / "child-v0.1.0")) == ["child-v0.1.0", "root-v0.1.0"]
    install_local("orphan-v0.1.0", parent="deleted-v0.1.0")
    assert lineage("orphan-v0.1.0") == ["orphan-v0.1.0", "deleted-v0.1.0"]


def test_models_lineage_says_which_ancestor_is_not_installed(bundled, capsys):
    import argparse

    from semiseg_la.cli.models import run_lineage

    install(bundled, "root-v0.1.0")
    install_local("child-v0.1.0", parent="root-v0.1.0")
    install_local("orphan-v0.1.0", parent="deleted-v0.1.0")
    run_lineage(argparse.Namespace(model_id="child-v0.1.0"))
    run_lineage(argparse.Namespace(model_id="orphan-v0.1.0"))
    assert capsys.readouterr().out.splitlines() == ["child-v0.1.0 <- root-v0.1.0",
                                                    "orphan-v0.1.0 <- deleted-v0.1.0 (not installed)"]


def test_lineage_cycle_is_an_error(bundled):
    install_local("a-v0.1.0", parent="b-v0.1.0")
    install_local("b-v0.1.0", parent="a-v0.1.0")
    with pytest.raises(CheckpointError, match="loops back"):
        lineage("a-v0.1.0")


def test_unique_model_id_appends_the_next_patch_version(bundled):
    assert unique_model_id("CAML fine-tune/site A") == "CAML-fine-tune-site-A-v0.1.0"
    install(bundled, "caml-la-v0.1.0")
    new_local_model_dir("caml-la-v0.1.1")  # even an empty folder claims its id
    assert unique_model_id("caml-la") == "caml-la-v0.1.2"
    assert unique_model_id("caml-la-v0.1.0") == "caml-la-v0.1.2"  # an existing version suffix is replaced


def test_catalog_models_load(bundled):
    install(bundled, "base-v0.1.0")
    weights, card = load_model_weights(resolve_model("base-v0.1.0"))
    assert card.id == "base-v0.1.0"
    assert all(torch.equal(weights[k], v) for k, v in _STATE.items())
