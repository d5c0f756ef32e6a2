"""A site fine-tune's automatic region is settled on the first pass of its nearest ancestor that was trained on
regions (`common.region_settler`): a fine-tune learns a few scans cut in one region each and settles regions
worse than its parent (docs/results.md). The walk follows installed parents whose weights are the ones
recorded."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np

from cli_helpers import save_tiny_model
from semiseg_la.cli.segment import SCOUT_AGREEMENT_WARN

ON_REGIONS = {"wide_fov_prob": 0.5, "labelled_cuts": 1}  # trained on whole-scan canvases
ONE_CUT = {"wide_fov_prob": 0.0, "labelled_cuts": 1}  # a site fine-tune: each scan cut once


def model(model_id: str, seed: int, config: dict, parent_folder=None, parent_sha256=None):
    """A tiny model folder trained (so its card says) with `config`, recording `parent_folder`'s model as its
    parent (with that model's weight fingerprint unless `parent_sha256` is given)."""
    from semiseg_la.checkpoints import ModelCard, load_model_weights, save_model
    from semiseg_la.checkpoints.card import weights_fingerprint

    folder = save_tiny_model(model_id, seed=seed)
    state, card = load_model_weights(folder)
    card.training = {"config": dict(config)}
    if parent_folder is not None:
        parent = ModelCard.load(parent_folder)
        card.lineage = {"parent": parent.id, "parent_sha256": parent_sha256 or weights_fingerprint(parent)}
    for item in folder.iterdir():
        item.unlink()
    save_model(folder, state, card)
    return folder


def settler_id(folder):
    from semiseg_la.checkpoints import ModelCard
    from semiseg_la.cli.common import region_settler

    found = region_settler(ModelCard.load(folder))
    return None if found is None else found[2]


def test_a_site_fine_tune_hands_the_settling_to_its_nearest_ancestor_trained_on_regions():
    first = model("first-v0.1.0", 0, ONE_CUT)
    default = model("default-v0.1.0", 1, ON_REGIONS, first)
    child = model("child-v0.1.0", 2, ONE_CUT, default)
    grandchild = model("grandchild-v0.1.0", 3, ONE_CUT, child)
    assert settler_id(child) == "default-v0.1.0" and settler_id(grandchild) == "default-v0.1.0"
    assert settler_id(default) is None  # trained on regions: settles its own (not its ancestors')
    assert settler_id(first) is None  # nothing above it
    several_cuts = model("cuts-v0.1.0", 4, {"wide_fov_prob": 0.0, "labelled_cuts": 4}, default)
    assert settler_id(several_cuts) is None


def test_the_walk_stops_at_a_missing_or_replaced_parent():
    from semiseg_la.checkpoints import ModelCard
    from semiseg_la.cli.common import region_settler

    default = model("default-v0.1.0", 1, ON_REGIONS)
    replaced = model("child-v0.1.0", 2, ONE_CUT, default, parent_sha256="0" * 64)  # not these weights
    grandchild = model("grandchild-v0.1.0", 3, ONE_CUT, replaced)
    assert settler_id(replaced) is None and settler_id(grandchild) is None
    orphan = ModelCard.load(model("orphan-v0.1.0", 4, ONE_CUT, default))
    orphan.lineage = {"parent": "removed-v0.1.0", "parent_sha256": None}
    assert region_settler(orphan) is None


def test_the_settler_a_fine_tune_records_outlives_a_removed_model_between_them():
    """A fine-tune of a fine-tune records its settler (`lineage.region_settler`): removing the model between them
    leaves its region settled as before; a record whose weights were replaced falls back to the walk."""
    import shutil

    from semiseg_la.checkpoints import ModelCard, load_model_weights, save_model
    from semiseg_la.checkpoints.card import weights_fingerprint

    default = model("default-v0.1.0", 1, ON_REGIONS)
    child = model("child-v0.1.0", 2, ONE_CUT, default)
    grandchild = model("grandchild-v0.1.0", 3, ONE_CUT, child)
    unrecorded = model("unrecorded-v0.1.0", 4, ONE_CUT, child)

    def record(folder, sha256):
        state, card = load_model_weights(folder)
        card.lineage = dict(card.lineage, region_settler={"id": "default-v0.1.0", "sha256": sha256})
        for item in folder.iterdir():
            item.unlink()
        save_model(folder, state, card)

    record(grandchild, weights_fingerprint(ModelCard.load(default)))
    stale = model("stale-v0.1.0", 5, ONE_CUT, child)
    record(stale, "0" * 64)
    assert settler_id(stale) == "default-v0.1.0"  # the walk through the installed child finds it
    shutil.rmtree(child)
    assert settler_id(grandchild) == "default-v0.1.0"
    assert settler_id(unrecorded) is None and settler_id(stale) is None  # the walk stops at the removed child


def test_a_fine_tune_records_the_model_that_settles_its_region(tmp_path):
    from cli_helpers import json_lines, run_cli
    from semiseg_la.checkpoints import ModelCard
    from semiseg_la.checkpoints.card import weights_fingerprint
    from test_site_adaptation import write_site

    root = model("root-v0.1.0", 0, ON_REGIONS)
    child = model("child-v0.1.0", 1, ONE_CUT, root)
    site, unl = write_site(tmp_path, labeled=2, unlabeled=0)
    proc = run_cli(["finetune", "--from", str(child), "--data", str(site), "--iterations", "1", "--set",
                    "fit_to_budget=false", "--device", "cpu", "--output", str(tmp_path / "run"), "--progress", "json"])
    assert proc.returncode == 0, proc.stderr
    card = ModelCard.load(json_lines(proc.stdout)[-1]["model_dir"])
    assert card.lineage["parent"] == "child-v0.1.0"
    assert card.lineage["region_settler"] == {"id": "root-v0.1.0",
                                              "sha256": weights_fingerprint(ModelCard.load(root))}


def test_a_scout_pass_settles_the_region_the_guard_rail_scores_in(monkeypatch):
    """`segment_as_auto` (the guard rail's `segment --region auto`) with a scout: the first pass is the scout's,
    the label written is the network's own pass on the region the scout settled."""
    from semiseg_la.cli.segment import segment_as_auto
    from semiseg_la.inference.localise import Region
    from semiseg_la.io.volume import Volume
    from semiseg_la.progress import ProgressReporter

    image = Volume(np.zeros((320, 300, 40), np.float32), (0.625, 0.625, 1.25))
    atrium = np.zeros(image.shape, np.uint8)
    atrium[100:180, 90:170, 10:30] = 1
    calls = []

    def network(kind):
        def predict(box):
            calls.append((kind, tuple(box)))
            out = np.zeros(image.shape, np.uint8)
            window = tuple(slice(a, b) for a, b in zip(box[:3], box[3:]))
            out[window] = atrium[window]
            return SimpleNamespace(label=image.with_array(out))
        return predict

    class Localiser:
        def find(self, image, min_size_mm=None):
            return Region((60, 50, 0), (220, 210, 40), "auto", found_volume_ml=60.0)

    monkeypatch.setattr("semiseg_la.checkpoints.catalog.default_localiser_id", lambda: "loc")
    spec = SimpleNamespace(patch_size=(112, 112, 80), spacing=(0.625, 0.625, 0.625))
    region, prediction = segment_as_auto(image, spec, network("child"), ProgressReporter(), "cpu",
                                         {"loc": (Localiser(), "loc")}, scout_predict=network("root"))
    assert [kind for kind, _ in calls] == ["root", "child"]
    assert list(calls[1][1]) == list(region.box) and prediction.label.array.sum() == atrium.sum()


def test_segment_says_which_model_settles_a_fine_tuned_models_region(tmp_path):
    """`segment --region auto` on a whole scan with a site fine-tune: its parent's first pass settles the region,
    and the log says so; the parent, trained on regions, settles its own."""
    from cli_helpers import json_lines, run_cli, write_case
    from test_localise import _blank_localiser

    localiser = _blank_localiser()  # finds nothing: the fine model searches the whole scan
    root = model("root-v0.1.0", 0, ON_REGIONS)
    child = model("child-v0.1.0", 1, ONE_CUT, root)
    src = tmp_path / "scan.nrrd"
    write_case(src, shape=(320, 300, 40), spacing=(0.625, 0.625, 1.25))
    for folder, says in ((child, True), (root, False)):
        proc = run_cli(["segment", str(src), "-o", str(tmp_path / "seg.nrrd"), "--model", str(folder),
                        "--localiser", localiser, "--tta", "none", "--progress", "json"])
        messages = [r.get("message", "") for r in json_lines(proc.stdout)]
        settled = [m for m in messages if "settled on the first pass of" in m]
        assert bool(settled) == says, (proc.returncode, messages[-3:])
        if says:
            assert "root-v0.1.0, the model this one was fine-tuned from" in settled[0]


def test_a_result_far_from_the_first_pass_that_settled_its_region_is_a_warning():
    from semiseg_la.cli.segment import scout_disagrees
    from semiseg_la.inference.localise import Region

    region = Region((0, 0, 0), (9, 9, 9), "auto", scout_agreement=0.84)
    assert SCOUT_AGREEMENT_WARN > 0.84
    text = scout_disagrees(region, "root-v0.1.0")
    assert "first pass of root-v0.1.0" in text and "(Dice 0.84 between the two)" in text
    assert "segment the scan with root-v0.1.0 as well" in text
    own = scout_disagrees(region)  # a model that settles its own region: its single pass against its flips
    assert own.startswith("the result is uncertain on this scan") and "(Dice 0.84 between the two)" in own
    assert scout_disagrees(dataclasses.replace(region, scout_agreement=SCOUT_AGREEMENT_WARN), "root") is None
    assert scout_disagrees(dataclasses.replace(region, scout_agreement=None), "root") is None
    assert region.to_dict()["scout_agreement"] == 0.84 and "scout_agreement" not in Region((0,) * 3, (1,) * 3,
                                                                                          "auto").to_dict()


def test_segment_warns_when_its_result_is_far_from_the_first_pass(tmp_path, monkeypatch):
    """`segment --region auto` on a whole scan: the Dice between its label and the first pass that settled the
    region (a site fine-tune's ancestor's, else the model's own single pass when it averages flips) goes into the
    region record, and below SCOUT_AGREEMENT_WARN a warning into the log and the `done` record (the passes are
    stood in for: these tiny models find no plausible atrium)."""
    from cli_helpers import write_case
    from semiseg_la.cli import segment
    from semiseg_la.cli.main import main as cli
    from semiseg_la.io.volume import read_volume
    from test_localise import _blank_localiser

    root = model("root-v0.1.0", 0, ON_REGIONS)
    child = model("child-v0.1.0", 1, ONE_CUT, root)
    src = tmp_path / "scan.nrrd"
    write_case(src, shape=(320, 300, 40), spacing=(0.625, 0.625, 1.25))
    records, localiser = [], _blank_localiser()
    monkeypatch.setattr("semiseg_la.progress.ProgressReporter.done", lambda self, **record: records.append(record))

    for folder, agreement, says in ((child, 0.62, "first pass of root-v0.1.0, the model it was fine-tuned from"),
                                    (child, 0.97, None), (root, 0.62, "a single pass of the model and its result")):
        def settled(region, image, segment_in, reporter, scout_in, agreement=agreement):
            assert scout_in is not None  # the ancestor's first pass, or the root's own single pass (flip TTA)
            atrium = np.zeros(image.shape, np.uint8)
            atrium[100:140, 100:140, 10:30] = 1
            prediction = SimpleNamespace(label=image.with_array(atrium), warnings=[], probability=None, timings={})
            return dataclasses.replace(region, scout_agreement=agreement), (prediction, "cpu", False)

        monkeypatch.setattr(segment, "segment_automatic", settled)
        assert cli(["segment", str(src), "-o", str(tmp_path / "seg.nrrd"), "--model", str(folder),
                    "--localiser", localiser, "--progress", "none"]) == 0
        done = records[-1]
        assert done["region"]["scout_agreement"] == agreement
        warned = [w for w in done["warnings"] if "(Dice 0.62 between the two)" in w]
        assert bool(warned) == (says is not None) and (says is None or says in warned[0]), done["warnings"]
    assert read_volume(src).shape == read_volume(tmp_path / "seg.nrrd").shape


def test_segment_writes_the_first_pass_it_compared_with(tmp_path, monkeypatch, capsys):
    """`--first-pass-out`: the label of the pass that settled the region, on the input's grid, and its record in
    the `done` line (the model that made it, the agreement, whether `segment` warned); nothing, and a log line,
    when a region was given; a bad extension refused before anything runs."""
    from cli_helpers import write_case
    from semiseg_la.cli import segment
    from semiseg_la.cli.main import main as cli
    from semiseg_la.io.volume import read_volume
    from test_localise import _blank_localiser

    root = model("root-v0.1.0", 0, ON_REGIONS)
    child = model("child-v0.1.0", 1, ONE_CUT, root)
    src, first_out = tmp_path / "scan.nrrd", tmp_path / "first.nrrd"
    write_case(src, shape=(320, 300, 40), spacing=(0.625, 0.625, 1.25))
    image = read_volume(src)
    localiser = _blank_localiser()

    def run(argv):
        code = cli(argv)
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        return code, next((r for r in lines if r.get("stage") == "done"), None), [r.get("message", "") for r in lines]

    def box(lower, upper):
        array = np.zeros(image.shape, np.uint8)
        array[lower[0]:upper[0], lower[1]:upper[1], lower[2]:upper[2]] = 1
        return SimpleNamespace(label=image.with_array(array), warnings=[], probability=None, timings={})

    first, final = box((100, 100, 10), (140, 140, 30)), box((100, 100, 10), (140, 120, 30))
    monkeypatch.setattr(segment, "region_scout", lambda card, predict_with, reporter: (
        lambda chosen: (first, "cpu", False), "root-v0.1.0"))

    def settled(region, image, segment_in, reporter, scout_in):
        scout_in(region)  # the first pass, then the result (half of it)
        return dataclasses.replace(region, scout_agreement=2 / 3), (final, "cpu", False)

    monkeypatch.setattr(segment, "segment_automatic", settled)
    argv = ["segment", str(src), "-o", str(tmp_path / "seg.nrrd"), "--model", str(child), "--localiser", localiser,
            "--progress", "json", "--first-pass-out", str(first_out)]
    code, done, logs = run(argv)
    assert code == 0
    assert f"wrote {first_out}: the first pass of root-v0.1.0 (Dice 0.67 with the result)" in logs
    record = done["first_pass"]
    assert record == {"output": str(first_out.resolve()), "model": "root-v0.1.0", "agreement": 0.6667,
                      "uncertain": True}
    written = read_volume(first_out)
    assert np.array_equal(written.array, first.label.array) and written.spacing == image.spacing
    first_out.unlink()
    code, done, logs = run(argv[:-2] + ["--region", "0", "0", "0", "60", "60", "20", "--first-pass-out",
                                        str(first_out)])
    assert code == 0 and done["first_pass"] is None and not first_out.exists()
    assert any("nothing written: no first pass settled this region (box)" in m for m in logs)
    assert run(argv[:-1] + [str(tmp_path / "first.png")])[0] == 2
