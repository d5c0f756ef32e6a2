"""The fine-tune benchmark's summary: each fine-tune against supervised-only, with the cases each side wins
(the paired interval itself: test_metrics_summary.py)."""

from __future__ import annotations

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/bench_finetune.py")


def test_summary_names_the_cases_each_side_wins(bench, capsys):
    rows = [{"method": "default", "shifted": 0.85, "shifted_cases": [0.9, 0.8], "step_s": 5.5},
            {"method": "supervised", "shifted": 0.84, "shifted_cases": [0.85, 0.83], "step_s": 5.0}]
    bench.print_summary({}, rows)
    out = capsys.readouterr().out
    assert "+1.00 Dice points" in out and "better on 1 of 2 cases" in out and "1.10x" in out


@pytest.mark.parametrize("unlabeled", [0, 12])
def test_a_site_without_unlabelled_scans_is_fine_tuned_without_the_flag(bench, monkeypatch, tmp_path, unlabeled):
    """`finetune --unlabeled` refuses an empty folder, so `--unlabeled 0` must not pass one."""
    import argparse
    import subprocess

    seen = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: seen.append(command) or
                        subprocess.CompletedProcess(command, 2, "", "stopped here"))
    args = argparse.Namespace(model="m", budget=600.0, device="cpu", overrides=[], unlabeled=unlabeled)
    run = bench.run_finetune("default", args, tmp_path, tmp_path / "site", tmp_path / "unlabeled")
    assert run["error"] == "exit 2: stopped here"
    assert ("--unlabeled" in seen[0]) == bool(unlabeled)


def test_whole_scans_are_also_scored_in_fixed_regions_when_asked(bench, monkeypatch, tmp_path):
    """`--fixed-region 5 15`: every model is scored per case with `--region auto` and in the label's box + each
    margin (the same box for every model); the figures are reported side by side, with the per-case spread."""
    import json
    from pathlib import Path

    import numpy as np

    from semiseg_la.io.volume import Volume, write_volume

    label = np.zeros((40, 30, 20), np.uint8)
    label[10:20, 10:20, 5:15] = 1
    seen = []

    def fake_segment(argv):
        seen.append(argv)
        out = label.copy()
        if "--region" in argv and argv[argv.index("--region") + 4] == "35":  # the wider region spills over
            out[20:30, 10:20, 5:15] = 1
        write_volume(Volume(out, (1.0, 1.0, 1.0)), argv[argv.index("-o") + 1])
        region = {"source": "box"} if "--region" in argv else {"source": "auto", "scout_agreement": 0.5 + len(seen)}
        Path(argv[argv.index("--roi-out") + 1]).write_text(json.dumps(region))
        return 0

    monkeypatch.setattr(bench, "cli", fake_segment)
    monkeypatch.setattr(bench.WholeScanScorer, "fixed_region",
                        lambda self, model, lab, margin: [1, 2, 3, 20 + int(margin), 25, 18])
    scorer = bench.WholeScanScorer(tmp_path, "none", margins=[5, 15])
    pair = (Volume(label.astype(np.float32), (1.0, 1.0, 1.0)), Volume(label, (1.0, 1.0, 1.0)))
    scores = bench.score_model("m", [pair], [pair], "none", scorer)
    assert scores["shifted"] == scores["fixed_regions"]["5"]["shifted"] == 1.0
    assert abs(scores["fixed_regions"]["15"]["shifted"] - 2 / 3) < 1e-6
    assert abs(scores["region_spread"]["shifted"] - 1 / 3) < 1e-6
    assert ["--region" in argv for argv in seen] == [False, False, True, True, True, True]
    # the automatic region's scout agreement, case by case; none recorded for a region given
    assert scores["unshifted_scout_agreement"] == [1.5] and scores["shifted_scout_agreement"] == [2.5]
    assert scorer.scout_agreement is None
    assert seen[2][-6:] == ["1", "2", "3", "25", "25", "18"]
    text = bench.format_fixed({"shifted": 0.75, "unshifted": 0.89}, {"shifted": 0.70, "unshifted": 0.90}, "15")
    assert "+ 15 mm" in text and "recovered 25.0%" in text and "-1.00p" in text
    assert "33.3 points at the site" in bench.format_spread(scores["region_spread"])
    args = bench.parse_args(["--data", "d", "--whole", "448", "--fixed-region", "--methods"])
    assert args.fixed_region == [15.0] and args.methods == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--data", "d", "--fixed-region", "10"])


def test_figures_are_written_after_each_fine_tune(bench, monkeypatch, tmp_path):
    """A benchmark stopped part-way (a time box on a GPU machine) keeps the base's and each finished
    fine-tune's figures in --json; a failed fine-tune is recorded too."""
    import json

    import numpy as np

    from semiseg_la.io.volume import Volume

    label = np.zeros((12, 12, 8), np.uint8)
    label[3:9, 3:9, 2:6] = 1
    record = type("Record", (), {"case_id": "c", "label_path": "x",
                                 "load": lambda self: (Volume(label.astype(np.float32), (1.0,) * 3),
                                                       Volume(label, (1.0,) * 3))})
    monkeypatch.setattr(bench, "open_dataset", lambda root, name: [record() for _ in range(3)])
    monkeypatch.setattr(bench, "resolve_model", lambda model: tmp_path / "base")
    monkeypatch.setattr(bench, "write_site", lambda *a: (tmp_path / "site", tmp_path / "unl"))
    monkeypatch.setattr(bench, "score_model", lambda model, *a, **k: {
        "model": str(model), "unshifted": 0.9, "shifted": 0.8, "shifted_cases": [0.8], "unshifted_cases": [0.9]})
    out = tmp_path / "run.json"
    seen = []

    def finetune(method, *a):
        saved = json.loads(out.read_text())
        seen.append([row["method"] for row in saved["runs"]])
        if method == "supervised":
            raise KeyboardInterrupt  # the run is stopped here
        return {"model_dir": "m", "iterations": 5, "wall_s": 1.0, "step_s": 0.1, "guard": None}

    monkeypatch.setattr(bench, "run_finetune", finetune)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--data", "d", "--model", "m", "--labeled", "1", "--unlabeled", "1", "--val", "1",
                    "--methods", "default", "supervised", "--json", str(out), "--work", str(tmp_path)])
    saved = json.loads(out.read_text())
    assert seen == [[], ["default"]]
    assert [row["method"] for row in saved["runs"]] == ["default"] and saved["base"]["shifted"] == 0.8
    assert saved["device"] == "cpu"


def test_whole_scan_canvases_do_not_depend_on_the_site_size(bench):
    """The scored whole scans are built from the donors' tissue: a run with fewer site scans (`--unlabeled 0`)
    must score the same canvases as the default run, a larger site must not lend its scans or the scored ones."""
    records = [f"case{i}" for i in range(80)]
    default = bench.whole_scan_donors(records, 16, 8)
    assert default == records[16:28]
    assert bench.whole_scan_donors(records, 4, 8) == default == bench.whole_scan_donors(records, 2, 8)
    assert bench.whole_scan_donors(records, 40, 8) == records[40:52]
    with pytest.raises(SystemExit, match="tissue donors"):
        bench.whole_scan_donors(records, 64, 8)  # 64..75 would overlap the scored 72..79


def test_unlabelled_scans_are_listed_lowest_agreement_first(bench):
    """`--score-unlabeled`: each unlabelled scan's parent and child Dice beside the card's agreement, lowest first,
    and the mean change on the scans the module names against the rest."""
    parent = {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": 0.5}
    child = {"a": 0.92, "b": 0.7, "c": 0.72, "d": 0.5, "e": 0.55}
    lines = bench.format_unlabeled(parent, child, [["d", 0.6], ["b", 0.7], ["e", 0.8], ["a", 0.95], ["c", 0.97]])
    assert [line.split()[0] for line in lines[1:6]] == ["d", "b", "e", "a", "c"]
    assert "-10.00p" in lines[1] and "0.600" in lines[1]
    assert lines[-1] == "  the 3 scans with the lowest agreement: mean change -5.00p; the other 2: +2.00p"
    assert len(bench.format_unlabeled(parent, child, None)) == 6  # no agreement recorded: no ranking line


def test_unlabelled_site_scans_come_with_their_reference_labels(bench, tmp_path):
    """The scans are read back as the fine-tune read them; the labels are the cases' own (or the canvas's)."""
    import numpy as np

    from semiseg_la.io.volume import Volume, write_volume

    label = np.zeros((12, 12, 8), np.uint8)
    label[3:9, 3:9, 2:6] = 1
    record = type("Record", (), {"label_path": "x", "load": lambda self: (
        Volume(label.astype(np.float32), (1.0,) * 3), Volume(label, (1.0,) * 3))})
    site = []
    for name in ("l0", "u1", "u2"):
        site.append(record())
        site[-1].case_id = name
    for name in ("u1", "u2"):
        write_volume(Volume(np.full(label.shape, 2.0, np.float32), (1.0,) * 3), tmp_path / f"{name}.nrrd")
    scans = list(bench.unlabeled_site_scans(site, 1, tmp_path))
    assert [case for case, _, _ in scans] == ["u1", "u2"]
    assert float(scans[0][1].array.max()) == 2.0 and int(scans[0][2].array.sum()) == int(label.sum())
