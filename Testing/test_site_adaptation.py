"""Fine-tuning to a new site, end to end through `semiseg-la finetune`: a short budgeted fine-tune on
shifted scans raises their Dice, the budget is honoured, the guard rail compares the child with its parent
on a held-out site case and says so when the child is worse, and `--from default` works."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import json_lines, run_cli
from conftest import sphere_volume, synthetic_cases
from semiseg_la.io.volume import Volume, read_volume, write_volume
from semiseg_la.preprocess.site_shift import SiteShift

PATCH = [32, 32, 32]
#: the simulated site inverts most of the intensity range: the parent, trained on bright spheres, misses
SITE = SiteShift("inversion", 2.5, seed=1)
PARENT_ID = "spheres-parent-v0.1.0"


@pytest.fixture(scope="module")
def parent_models(module_tmp) -> Path:
    """A site model folder holding a V-Net trained (in-process, 30 iterations) to segment bright spheres."""
    from semiseg_la.checkpoints import ModelCard, save_model
    from semiseg_la.checkpoints.card import default_classes, default_inference
    from semiseg_la.engine.config import build_config
    from semiseg_la.engine.loop import train

    root = module_tmp
    config = build_config({"method": "supervised", "data": "synthetic", "patch_size": PATCH,
                           "spacing": [1.0, 1.0, 1.0], "max_iterations": 30, "batch_size": 2, "labeled_bs": 2,
                           "base_lr": 0.05, "lr_policy": "constant", "validate_every": 0, "checkpoint_every": 1000,
                           "use_unlabeled": False, "device": "cpu", "output": str(root / "run"),
                           "method_params": {"dropout": False}})
    network = train(config, synthetic_cases(4, labeled=True), []).method.inference_network().eval()
    card = ModelCard(id=PARENT_ID, name="spheres-parent", version="0.1.0", method="supervised",
                     architecture={"name": "vnet", "config": network.config},
                     inference=default_inference(PATCH, (1.0, 1.0, 1.0)), classes=default_classes(),
                     validation={"split": "synthetic spheres", "dice": 0.95})
    save_model(root / "models" / PARENT_ID, network.state_dict(), card)
    return root / "models"


def write_site(root: Path, labeled: int = 4, unlabeled: int = 2, shift: SiteShift = SITE):
    """A site's cases as NRRD files: images/ + labels/ for the labelled ones, a folder of unlabelled scans."""
    site, unl = root / "site", root / "unlabeled"
    for folder in (site / "images", site / "labels", unl):
        folder.mkdir(parents=True)
    for i in range(labeled + unlabeled):
        image, label = sphere_volume((40, 36, 36), radius=8 + i % 3, seed=200 + i)
        scan = shift.apply(Volume(image, (1.0, 1.0, 1.0)), case_seed=i)
        if i < labeled:
            write_volume(scan, site / "images" / f"case{i}.nrrd")
            write_volume(scan.with_array(label), site / "labels" / f"case{i}.nrrd")
        else:
            write_volume(scan, unl / f"scan{i}.nrrd")
    return site, unl


def write_whole_site(root: Path, labeled: int = 4) -> tuple:
    """Whole scans (200 mm along X): the labelled sphere near one end, a smaller bright sphere that is not the
    target near the other; and one unlabelled scan of noise alone, where no localiser finds an atrium."""
    site, unl = root / "site", root / "unlabeled"
    for folder in (site / "images", site / "labels", unl):
        folder.mkdir(parents=True)
    shape = (200, 36, 36)
    for i in range(labeled):
        image, label = sphere_volume(shape, center=(40, 18, 18), radius=14 + i % 2, seed=300 + i)  # 11-14 mL
        decoy, _ = sphere_volume(shape, center=(150, 18, 18), radius=8, noise=0.0)
        write_volume(Volume(image + decoy, (1.0, 1.0, 1.0)), site / "images" / f"case{i}.nrrd")
        write_volume(Volume(label, (1.0, 1.0, 1.0)), site / "labels" / f"case{i}.nrrd")
    noise = np.random.default_rng(9).normal(0, 0.1, shape).astype(np.float32)
    write_volume(Volume(noise, (1.0, 1.0, 1.0)), unl / "noise.nrrd")
    return site, unl


def env_for(models: Path) -> dict:
    return {"SEMISEG_LA_MODELS": str(models)}


def test_a_fine_tune_adapts_to_the_site_and_the_card_says_how(parent_models, tmp_path):
    """Supervised-only, without the intensity augmentation: on a site that inverts the contrast the parent's
    predictions are all wrong, a random intensity affine hides what is constant at the site, and the mean
    teacher's consistency pulls the student towards its wrong teacher (docs/results.md, site adaptation);
    the LA site-shift benchmark compares the fine-tunes on realistic shifts."""
    site, unl = write_site(tmp_path)
    result = run_cli(["finetune", "--from", PARENT_ID, "--data", str(site), "--unlabeled", str(unl),
                      "--preset", "finetune-supervised", "--iterations", "60", "--set", "fit_to_budget=false",
                      "--set", "parent_blend=0",  # averaging with a parent that sees inverted spheres undoes it
                      "--lr", "0.1", "--set", "intensity_prob=0", "--device", "cpu", "--output", str(tmp_path / "run"),
                      "--progress", "json"], env_extra=env_for(parent_models))
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    done = records[-1]
    assert done["stage"] == "done" and done["iterations"] == 60
    guard = done["guard"]
    # the held-out site case: the parent misses the inverted spheres, the child finds them
    assert guard["parent_dice"] < 0.1
    assert guard["child_dice"] > 0.6, (guard, [r for r in records if r["stage"] == "log"])
    assert guard["verdict"] == "better or equal" and guard["held_out_cases"] == 1
    card = json.loads((Path(done["model_dir"]) / "card.json").read_text())
    record = card["finetune"]
    assert record["parent"] == PARENT_ID and record["labeled_cases"] == 3 and record["held_out_cases"] == 1
    assert record["unlabeled_cases"] == 0 and record["time_budget_s"] == 600 and "CPU" in record["device"]
    assert record["site_holdout"]["child_dice"] == pytest.approx(guard["child_dice"])
    assert record["parent_reference"]["dice"] == pytest.approx(0.95)
    assert card["validation"]["figure"] == "site hold-out"
    assert card["validation"]["checkpoint"] == "last (iteration 60)"  # judged by the held-out case, not picked
    assert card["lineage"]["parent"] == PARENT_ID
    # the two unlabelled scans (not the held-out case3), segmented by both: the parent misses the inverted spheres
    # that the child finds, so the two disagree there
    agreement = record["agreement"]
    assert agreement == done["guard"]["agreement"] and agreement["compared"] == 2
    assert sorted(case for case, _ in agreement["cases"]) == ["scan4", "scan5"]
    assert all(0.0 <= value < 0.5 for _, value in agreement["cases"]), agreement
    assert agreement["cases"][0][1] <= agreement["cases"][1][1] and "look at those first" in agreement["summary"]
    # both models' labels of those scans are kept in the run folder, on each scan's grid, and are what was compared
    assert list(agreement["labels"]) == [case for case, _ in agreement["cases"]]
    for case, value in agreement["cases"]:
        scan = read_volume(unl / f"{case}.nrrd")
        new, old = (read_volume(agreement["labels"][case][which]) for which in ("new", "parent"))
        assert new.same_grid(scan) and old.same_grid(scan) and Path(agreement["labels"][case]["new"]).parent == (
            tmp_path / "run" / "agreement")
        assert dice_of(new.array, old.array) == pytest.approx(value, abs=1e-4)
    listing = run_cli(["models", "list"], env_extra=env_for(parent_models))
    row = next(line for line in listing.stdout.splitlines() if line.startswith(card["id"]))
    assert "site hold-out" in row


def test_the_default_fine_tune_ends_within_its_time_budget(parent_models, tmp_path):
    """The whole command (loading, measured steps, training, export) within 10 % of the budget, with the
    schedule sized by the measured step and said before training (the preset's 50-iteration cap lifted, so
    the budget is what ends the run)."""
    site, unl = write_site(tmp_path, shift=SiteShift("scanner", 1.0, seed=2))
    budget = 40.0
    started = time.monotonic()
    result = run_cli(["finetune", "--from", PARENT_ID, "--data", str(site), "--unlabeled", str(unl),
                      "--time-budget", f"{budget:g}", "--iterations", "1000", "--device", "cpu",
                      "--output", str(tmp_path / "run"), "--progress", "json"], env_extra=env_for(parent_models))
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    plan = [r["message"] for r in records if r.get("stage") == "log" and "s per iteration" in r["message"]]
    assert plan and "fit in the 40 s budget" in plan[0]
    first_train = next(i for i, r in enumerate(records) if r.get("stage") == "train")
    assert records.index(next(r for r in records if r.get("message") == plan[0])) < first_train
    assert 0.6 * budget <= wall <= 1.1 * budget, f"the command took {wall:.1f} s for a {budget:g} s budget"
    done = records[-1]
    assert done["stage"] == "done" and done["iterations"] >= 3
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"max_iterations: {done['iterations']}" in config or "time budget reached" in result.stdout


def test_the_guard_rail_flags_a_child_worse_than_its_parent(parent_models, tmp_path):
    """Unshifted site scans whose training labels are wrong (moved off the sphere): the parent was right,
    the child learns the wrong outline, and the held-out (correctly labelled) case shows it."""
    site, unl = write_site(tmp_path, shift=SiteShift("gamma", 0.0))
    cases = sorted((site / "labels").glob("*.nrrd"))
    from semiseg_la.io.volume import read_volume

    for path in cases[:-1]:  # every case but the held-out (last) one gets a label shifted by 10 voxels
        label = read_volume(path)
        write_volume(label.with_array(np.roll(label.array, 10, axis=0)), path)
    result = run_cli(["finetune", "--from", PARENT_ID, "--data", str(site), "--unlabeled", str(unl),
                      "--iterations", "30", "--set", "fit_to_budget=false", "--lr", "0.05", "--device", "cpu",
                      # the guard itself, on the fine-tuned weights alone: the default's blend with the parent
                      # already repairs this child (0.997 against the parent's 0.951 when measured)
                      "--set", "parent_blend=0",
                      "--output", str(tmp_path / "run"), "--progress", "json"], env_extra=env_for(parent_models))
    assert result.returncode == 0, result.stderr
    done = json_lines(result.stdout)[-1]
    assert done["guard"]["verdict"] == "worse", done["guard"]
    assert "worse than its parent" in result.stderr and PARENT_ID in result.stderr
    assert "on the held-out case(s) case3 (Dice " in result.stderr
    assert result.stderr.count("worse than its parent") == 1  # JSON lines on stdout: the warning once on stderr
    card = json.loads((Path(done["model_dir"]) / "card.json").read_text())
    holdout = card["finetune"]["site_holdout"]
    assert holdout["child_dice"] < holdout["parent_dice"]
    assert holdout["cases"] == ["case3"]


def test_whole_site_scans_are_trained_and_checked_in_the_atrium_region(parent_models, tmp_path):
    """A clinician's site cases are whole scans, and `segment --region auto` only ever shows the fine model
    the atrium's region. The fine-tune trains on that region (the label's box), and its check scores each
    held-out scan as `segment --region auto` segments it: the guard's figures are the Dice of what `segment`
    writes for the parent and for the child. An unlabelled whole scan where the localiser finds no atrium is
    left out, and the log says so."""
    from semiseg_la.metrics import dice

    site, unl = write_whole_site(tmp_path)
    result = run_cli(["finetune", "--from", PARENT_ID, "--data", str(site), "--unlabeled", str(unl),
                      "--iterations", "2", "--set", "fit_to_budget=false", "--device", "cpu",
                      "--output", str(tmp_path / "run"), "--progress", "json"], env_extra=env_for(parent_models))
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    logs = [r["message"] for r in records if r.get("stage") == "log"]
    left_out = [m for m in logs if m.startswith("noise: left out of the unlabelled scans")]
    assert left_out and "--region" not in left_out[0], logs  # segment's hint does not apply to a fine-tune
    summary = next(m for m in logs if m.startswith("whole scans cut"))
    assert "4 labelled (the label's box + 15 mm)" in summary  # 3 trained, 1 held out
    guard = records[-1]["guard"]
    assert guard["parent_dice"] > 0.8 and guard["child_dice"] > 0.8, guard  # the target, not the small decoy
    truth = read_volume(site / "labels" / "case3.nrrd").array
    for model, figure in ((PARENT_ID, guard["parent_dice"]), (records[-1]["model_dir"], guard["child_dice"])):
        out = tmp_path / "segmented.nrrd"
        seg = run_cli(["segment", str(site / "images" / "case3.nrrd"), "-o", str(out), "--model", model,
                       "--tta", "none", "--device", "cpu", "--progress", "none"], env_extra=env_for(parent_models))
        assert seg.returncode == 0, seg.stderr
        assert dice(read_volume(out).array, truth) == pytest.approx(figure, abs=1e-6), model
    # `evaluate` scores what `segment` writes too: each whole scan in the region `segment --region auto` finds
    child, report = records[-1]["model_dir"], tmp_path / "evaluate.json"
    # and `--against parent` scores the parent beside it, case by case, as the guard rail scored it
    scored = run_cli(["evaluate", "--model", child, "--against", "parent", "--data", str(site), "--tta", "none",
                      "--device", "cpu", "--json", str(report), "--progress", "none"], env_extra=env_for(parent_models))
    assert scored.returncode == 0, scored.stderr
    evaluated = json.loads(report.read_text())
    assert evaluated["region"] == "auto" and evaluated["regions"]["case3"]["source"] == "auto"
    assert evaluated["cases"]["case3"]["dice"] == pytest.approx(guard["child_dice"], abs=1e-6)
    assert evaluated["against"]["model"] == PARENT_ID
    paired = evaluated["paired"]
    assert paired["n_cases"] == 4 and paired["cases"]["case3"]["against_dice"] == pytest.approx(guard["parent_dice"],
                                                                                                abs=1e-6)
    assert paired["better"] + paired["worse"] <= 4 and paired["interval_95"][0] <= paired["dice_difference"]
    assert f"against {PARENT_ID}: " in scored.stdout and "paired 95 % interval" in scored.stdout
    orphan = run_cli(["evaluate", "--model", PARENT_ID, "--against", "parent", "--data", str(site)],
                     env_extra=env_for(parent_models))
    assert orphan.returncode != 0 and f"{PARENT_ID} has no parent in its lineage" in orphan.stderr
    assert "Traceback" not in orphan.stderr


def two_step_finetune(models: Path, root: Path, labeled: int) -> dict:
    """A 2-iteration default fine-tune on `labeled` site cases and one unlabelled scan: its `done` record."""
    site, unl = write_site(root, labeled=labeled, unlabeled=1)
    result = run_cli(["finetune", "--from", PARENT_ID, "--data", str(site), "--unlabeled", str(unl),
                      "--iterations", "2", "--set", "fit_to_budget=false", "--device", "cpu",
                      "--output", str(root / "run"), "--progress", "json"], env_extra=env_for(models))
    assert result.returncode == 0, result.stderr
    return json_lines(result.stdout)[-1]


def test_an_unusable_unlabelled_scan_is_left_out_and_named_but_an_unusable_labelled_case_stops_the_run(
        parent_models, tmp_path):
    """Unlabelled scans are extra: a 2D localiser series of the study or a scan of NaNs among them costs that scan,
    not the fine-tune, and the log and the `done` record say which and why. An annotated case is the user's work:
    its problem is an error."""
    import SimpleITK as sitk

    site, unl = write_site(tmp_path, labeled=3, unlabeled=1)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((40, 36), np.float32)), str(unl / "localiser.nrrd"))
    write_volume(Volume(np.full((40, 36, 36), np.nan, np.float32), (1.0, 1.0, 1.0)), unl / "nans.nrrd")
    common = ["finetune", "--from", PARENT_ID, "--data", str(site), "--unlabeled", str(unl), "--iterations", "2",
              "--set", "fit_to_budget=false", "--device", "cpu", "--progress", "json"]
    result = run_cli(common + ["--output", str(tmp_path / "run")], env_extra=env_for(parent_models))
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout)
    left_out = records[-1]["left_out_unlabeled"]
    assert sorted(left_out) == ["localiser", "nans"]
    assert "2D" in left_out["localiser"] and "NaN" in left_out["nans"]
    logs = [r["message"] for r in records if r.get("stage") == "log"]
    assert any(m.startswith("warning: localiser: left out of the unlabelled scans, unusable:") for m in logs)
    assert "warning: 2 of 3 unlabelled scan(s) could not be used (above); the run went on without them" in logs
    assert "2 labelled, 1 unlabelled, 1 validation cases" in logs
    label = site / "labels" / "case0.nrrd"
    write_volume(read_volume(label).with_array(np.zeros((40, 36, 36), np.uint8)), label)
    refused = run_cli(common + ["--output", str(tmp_path / "run2"), "--progress", "none"],
                      env_extra=env_for(parent_models))
    assert refused.returncode != 0 and "case0" in refused.stderr and "empty" in refused.stderr


def test_two_labelled_cases_are_all_trained_and_the_check_is_marked_unchecked(parent_models, tmp_path):
    done = two_step_finetune(parent_models, tmp_path, labeled=2)
    assert done["guard"]["verdict"].startswith("unchecked")
    card = json.loads((Path(done["model_dir"]) / "card.json").read_text())
    assert card["finetune"]["labeled_cases"] == 2 and card["finetune"]["held_out_cases"] == 0
    assert card["validation"]["figure"] == "training fit"


def test_one_labelled_case_in_five_is_held_out_up_to_five():
    from semiseg_la.cli.export import held_out_count

    assert [held_out_count(n) for n in (0, 2, 3, 9, 10, 15, 16, 25, 64)] == [0, 0, 1, 1, 2, 3, 3, 5, 5]


def test_ten_labelled_cases_hold_two_out_and_the_guard_says_how_many(parent_models, tmp_path):
    done = two_step_finetune(parent_models, tmp_path, labeled=10)
    assert done["guard"]["held_out_cases"] == 2
    card = json.loads((Path(done["model_dir"]) / "card.json").read_text())
    record = card["finetune"]
    assert record["labeled_cases"] == 8 and record["held_out_cases"] == 2
    assert len(record["site_holdout"]["cases"]) == 2
    # the held-out cases judge the child: their images are not among its unlabelled scans either (one scan)
    assert record["unlabeled_cases"] == 1


def test_a_budget_too_small_to_train_is_a_clear_error(parent_models, tmp_path):
    site, unl = write_site(tmp_path, labeled=3, unlabeled=1)
    result = run_cli(["finetune", "--from", PARENT_ID, "--data", str(site), "--time-budget", "1",
                      "--device", "cpu", "--output", str(tmp_path / "run"), "--progress", "none"],
                     env_extra=env_for(parent_models))
    assert result.returncode != 0
    assert "leaves no time to train" in result.stderr and "give at least" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("semiseg-la: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr  # one line, after the run's own messages


def test_from_default_names_the_default_model(parent_models, tmp_path):
    site, _ = write_site(tmp_path, labeled=1, unlabeled=0)
    env = dict(env_for(parent_models), SEMISEG_LA_DEFAULT_MODEL=PARENT_ID)
    result = run_cli(["finetune", "--from", "default", "--data", str(site), "--iterations", "1",
                      "--set", "fit_to_budget=false", "--device", "cpu", "--output", str(tmp_path / "run"),
                      "--progress", "json"], env_extra=env)
    assert result.returncode == 0, result.stderr
    card = json.loads((Path(json_lines(result.stdout)[-1]["model_dir"]) / "card.json").read_text())
    assert card["lineage"]["parent"] == PARENT_ID
    logged = [r["message"] for r in json_lines(result.stdout) if r.get("stage") == "log"]
    assert f"not checked against the parent {PARENT_ID}: fewer than 3 labelled cases, so none was held out to " \
           "compare the fine-tuned model with its parent" in logged
    for command in (["models", "show", "default"], ["models", "lineage", "default"]):
        shown = run_cli(command, env_extra=env)
        assert shown.returncode == 0 and PARENT_ID in shown.stdout


def test_a_training_preset_fine_tunes_with_the_parents_patch_spacing_and_its_own_split(parent_models, tmp_path):
    """`finetune --preset supervised-la-8` (112 x 112 x 80 at 0.625 mm, 8 + 8 cases) from a 32-voxel, 1 mm
    parent: the inputs stay as the parent saw them, and the preset's split is kept (not the site's hold-out of
    one case), so a site folder too small for it is an error that says so."""
    site, _ = write_site(tmp_path, labeled=4, unlabeled=0)
    common = ["finetune", "--from", PARENT_ID, "--data", str(site), "--preset", "supervised-la-8", "--iterations",
              "1", "--device", "cpu", "--progress", "none"]
    result = run_cli(common + ["--output", str(tmp_path / "run")], env_extra=env_for(parent_models))
    assert result.returncode != 0 and "no labelled case left for training" in result.stderr
    result = run_cli(common + ["--labeled", "3", "--val", "1", "--output", str(tmp_path / "run2")],
                     env_extra=env_for(parent_models))
    assert result.returncode == 0, result.stderr
    # --progress none: the check's verdict is in the log whatever it is, once
    verdicts = [line for line in result.stderr.splitlines() if f"its parent {PARENT_ID} on the held-out" in line]
    assert len(verdicts) == 1 and ("better than or equal" in verdicts[0] or "worse" in verdicts[0]), result.stderr
    import yaml

    config = yaml.safe_load((tmp_path / "run2" / "config.yaml").read_text())
    assert config["patch_size"] == PATCH and config["spacing"] == [1.0, 1.0, 1.0]
    assert config["labeled_num"] == 3 and config["val_num"] == 1 and config["preset"] == "supervised-la-8"


def test_fine_tune_presets_exist_for_every_method_and_ramp_up_in_iterations():
    from semiseg_la.cli.train import finetune_preset
    from semiseg_la.engine.config import build_config, load_preset

    for method in ("mean_teacher", "supervised", "caml", "crln", "semicml_la", "site_adapter"):
        preset = load_preset(finetune_preset(method))
        config = build_config(dict(preset, data="x"))
        assert config.method == method and config.fit_to_budget and config.time_budget_s == 600
        assert config.export_checkpoint == "last", method  # the held-out case judges, it does not pick
    default = load_preset("finetune")["method_params"]
    assert 0 < default["rampup_fraction"] < 1  # the ramp-up completes inside any fitted run


def test_mean_teacher_consistency_reaches_its_weight_in_a_short_run():
    """The LA ramp-up counts in units of 150 iterations: over 150 fine-tune iterations it stayed at ~0.4 % of
    the weight. With `rampup_unit: 1` the weight is reached within the run."""
    import torch

    from semiseg_la.methods import Batch, build_method

    params = {"consistency": 1.0, "consistency_rampup": 20, "rampup_unit": 1, "consistency_on": "unlabeled"}
    method = build_method("mean_teacher", params, 150)
    image = torch.randn(4, 1, 16, 16, 16)
    label = torch.zeros(4, 16, 16, 16, dtype=torch.long)
    late = method.training_step(Batch(image, label, 2), 100).logs["consistency_weight"]
    early = method.training_step(Batch(image, label, 2), 2).logs["consistency_weight"]
    assert late == pytest.approx(1.0) and early < 0.5
    legacy = build_method("mean_teacher", {"consistency": 1.0, "consistency_rampup": 5}, 150)
    assert legacy.training_step(Batch(image, label, 2), 149).logs["consistency_weight"] < 0.01
    fraction = build_method("mean_teacher", {"consistency": 1.0, "rampup_fraction": 0.5}, 150)
    assert fraction.training_step(Batch(image, label, 2), 20).logs["consistency_weight"] < 0.2
    assert fraction.training_step(Batch(image, label, 2), 75).logs["consistency_weight"] == pytest.approx(1.0)


def test_pseudo_label_consistency_counts_only_confident_voxels():
    """Self-training's loss is the cross-entropy towards the teacher's class on the voxels the teacher is
    sure of: unsure voxels change nothing, no confident voxel gives 0, and a bad setting is refused."""
    import torch

    from semiseg_la.errors import ConfigError
    from semiseg_la.methods import Batch, build_method
    from semiseg_la.methods.losses import pseudo_label_ce

    teacher = torch.tensor([[0.95, 0.6], [0.05, 0.4]]).reshape(1, 2, 2, 1, 1)  # voxel 0 sure, voxel 1 not
    student = torch.zeros(1, 2, 2, 1, 1)
    assert float(pseudo_label_ce(student, teacher, 0.9)) == pytest.approx(math.log(2))
    student[0, 0, 0] = 5.0  # agrees with the teacher where it is sure: a small loss
    agreeing = float(pseudo_label_ce(student, teacher, 0.9))
    student[0, 1, 1] = -50.0  # the unsure voxel moves far: no effect
    assert float(pseudo_label_ce(student, teacher, 0.9)) == pytest.approx(agreeing) and agreeing < 0.01
    assert float(pseudo_label_ce(student, teacher, 0.99)) == 0.0
    method = build_method("mean_teacher", {"consistency_loss": "pseudo_label", "consistency_on": "unlabeled",
                                           "consistency": 1.0, "rampup_fraction": 0.5}, 10)
    image, label = torch.randn(4, 1, 16, 16, 16), torch.zeros(4, 16, 16, 16, dtype=torch.long)
    result = method.training_step(Batch(image, label, 2), 9)
    assert result.logs["loss_consistency"] > 0.0 and torch.isfinite(result.loss)
    result.loss.backward()
    with pytest.raises(ConfigError, match="consistency_loss"):
        build_method("mean_teacher", {"consistency_loss": "kl"}, 10)


def test_copy_paste_mixes_labelled_and_unlabelled_patches_both_ways(monkeypatch):
    """BCP: the first unlabelled patch receives a labelled box, the second is a box in a labelled patch; the
    mixed target is the label where the labelled patch shows and the teacher's class elsewhere, whose voxels
    weigh `unlabeled_weight`; with no unlabelled sample the step is supervised only."""
    from semiseg_la.errors import ConfigError
    from semiseg_la.methods import Batch, build_method, mean_teacher

    method = build_method("mean_teacher", {"consistency_loss": "copy_paste", "consistency": 1.0,
                                           "rampup_fraction": 0.5, "dropout": False, "unlabeled_weight": 0.25}, 10)
    with torch.no_grad():  # a teacher that calls every voxel background
        method.teacher.decoder.out_conv.bias.copy_(torch.tensor([50.0, -50.0]))
    seen, inputs = {}, []
    method.student.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach()))

    def spy(logits, target, weight):
        seen.update(target=target, weight=weight)
        return torch.zeros(()), torch.zeros(())

    monkeypatch.setattr(mean_teacher, "weighted_ce_dice", spy)
    labeled, unlabeled = torch.full((1, 1, 48, 48, 48), 1.0), torch.full((2, 1, 48, 48, 48), -1.0)
    label = torch.zeros(3, 48, 48, 48, dtype=torch.long)
    label[0] = 1
    result = method.training_step(Batch(torch.cat([labeled, unlabeled]), label, 1), 9)
    assert torch.isfinite(result.loss)
    mixed = inputs[0][1:, 0]
    from_label = mixed == 1.0
    box = 32 ** 3 / 48 ** 3  # 2/3 of each side
    assert float(from_label[0].float().mean()) == pytest.approx(box)
    assert float(from_label[1].float().mean()) == pytest.approx(1 - box)
    assert torch.equal(seen["target"] == 1, from_label)
    assert torch.equal(seen["weight"], torch.where(from_label, 1.0, 0.25))
    alone = method.training_step(Batch(labeled, label[:1], 1), 9)
    assert alone.logs["loss_consistency"] == 0.0 and torch.isfinite(alone.loss)
    for bad in ({"paste_fraction": 1.0}, {"unlabeled_weight": -1}):
        with pytest.raises(ConfigError, match="paste_fraction"):
            build_method("mean_teacher", {"consistency_loss": "copy_paste", **bad}, 10)


def test_mean_teacher_exports_the_student_when_asked_and_a_restored_run_keeps_the_choice():
    """After a few steps the EMA teacher and the student differ; `export: student` validates and exports the
    student, also when rebuilt from checkpoint states, the default stays the teacher, and a typo is refused."""
    from semiseg_la.engine.loop import restore_method
    from semiseg_la.errors import ConfigError
    from semiseg_la.methods import Batch, build_method

    torch.manual_seed(0)
    params = {"consistency": 1.0, "rampup_fraction": 0.5, "dropout": False, "export": "student"}
    method = build_method("mean_teacher", params, 3)
    optimizer = torch.optim.SGD(method.student.parameters(), lr=0.1)
    image, label = torch.randn(2, 1, 16, 16, 16), torch.zeros(2, 16, 16, 16, dtype=torch.long)
    for iteration in range(3):
        optimizer.zero_grad()
        method.training_step(Batch(image, label, 1), iteration).loss.backward()
        optimizer.step()
        method.after_optimizer_step(iteration)
    networks = {name: getattr(method, name).state_dict() for name in method.networks}
    key = "decoder.out_conv.weight"
    assert not torch.equal(networks["student"][key], networks["teacher"][key])
    for restored, expected in ((restore_method("mean_teacher", params, networks), "student"),
                               (restore_method("mean_teacher", {**params, "export": "teacher"}, networks), "teacher"),
                               (restore_method("mean_teacher", {"dropout": False}, networks), "teacher")):
        assert torch.equal(restored.inference_network().state_dict()[key], networks[expected][key])
    with pytest.raises(ConfigError, match="export must be one of teacher, student"):
        build_method("mean_teacher", {"export": "students"}, 10)


def test_legacy_evaluation_keeps_every_component_as_the_papers_do(parent_models, tmp_path):
    """Two atria-like blobs in one case: the papers' legacy evaluation (no post-processing) scores both,
    keeping only the largest component drops one; the JSON says which post-processing ran."""
    data = tmp_path / "two"
    for sub in ("images", "labels"):
        (data / sub).mkdir(parents=True)
    first, label_a = sphere_volume((64, 40, 36), center=(16, 20, 18), radius=8, seed=3)
    second, label_b = sphere_volume((64, 40, 36), center=(46, 20, 18), radius=7, seed=4)
    image = np.maximum(first, second)
    write_volume(Volume(image, (1.0, 1.0, 1.0)), data / "images" / "two.nrrd")
    write_volume(Volume(np.maximum(label_a, label_b), (1.0, 1.0, 1.0)), data / "labels" / "two.nrrd")
    scores = {}
    for extra in ([], ["--postprocess", "largest"]):
        out = tmp_path / f"metrics{len(extra)}.json"
        result = run_cli(["evaluate", "--model", PARENT_ID, "--data", str(data), "--legacy", "--json", str(out),
                          "--device", "cpu", "--progress", "none", *extra], env_extra=env_for(parent_models))
        assert result.returncode == 0, result.stderr
        report = json.loads(out.read_text())
        scores[report["postprocess"]] = report["mean"]["dice"]
    assert set(scores) == {"none", "largest"}
    assert scores["none"] > 0.8 and scores["largest"] < scores["none"] - 0.2


def test_parent_blend_exports_the_wise_ft_average_of_child_and_parent(parent_models, tmp_path):
    """A fine-tune exported with parent_blend 0.5: its weights are the mean of the run's own final weights
    (read back from its checkpoint) and the parent's, and the card records the share."""
    from semiseg_la.checkpoints import load_model_weights
    from semiseg_la.engine.loop import restore_method
    from semiseg_la.engine.state import load_state

    site, unl = write_site(tmp_path, labeled=2, unlabeled=1)
    run = tmp_path / "run"
    result = run_cli(["finetune", "--from", PARENT_ID, "--data", str(site), "--unlabeled", str(unl),
                      "--iterations", "3", "--set", "fit_to_budget=false", "--set", "parent_blend=0.5",
                      "--device", "cpu", "--output", str(run), "--progress", "json"], env_extra=env_for(parent_models))
    assert result.returncode == 0, result.stderr
    blended, card = load_model_weights(Path(json_lines(result.stdout)[-1]["model_dir"]))
    assert card.extra["finetune"]["parent_blend"] == 0.5
    state = load_state(run / "checkpoints" / "last.pt")  # no held-out case: the last checkpoint is exported
    method = restore_method(state["config"]["method"], state["config"]["method_params"], state["networks"])
    child = method.inference_network().state_dict()
    parent, _ = load_model_weights(parent_models / PARENT_ID)
    moved = [k for k in child if child[k].is_floating_point() and not torch.equal(child[k].float(), parent[k])]
    assert moved  # the fine-tune changed weights, so the check below means something
    for key in child:
        if child[key].is_floating_point():
            assert torch.allclose(blended[key], 0.5 * (child[key].float() + parent[key]), atol=1e-6), key


def test_a_misspelt_method_param_is_an_error_not_ignored():
    """`--set method_params.consistensy=0` must not run the default weight silently."""
    from semiseg_la.errors import ConfigError
    from semiseg_la.methods import build_method

    for method, typo in (("mean_teacher", "consistensy"), ("supervised", "consistency"), ("site_adapter", "alignmnet"),
                         ("caml", "memory_slot"), ("semicml_la", "gate_alpha"), ("semicml", "modality_name")):
        with pytest.raises(ConfigError, match=f"{method}: unknown method_params {typo}; it takes"):
            build_method(method, {typo: 0}, 10)
    for method, params in (("mean_teacher", {"consistency": 0, "dropout": False, "in_channels": 1}),
                           ("supervised", {"base": 8, "dropout": False}), ("site_adapter", {"alignment": 1.0}),
                           ("caml", {"memory_slots": 4, "labeled_num": 4}), ("semicml_la", {"gate_alpha_cap": 0.5}),
                           ("semicml", {"modality_names": ["T1", "T2"], "in_channels": 2})):
        build_method(method, params, 10)


def test_a_parent_given_as_a_folder_outside_the_catalog_is_blended_and_checked_from_that_folder(parent_models,
                                                                                               tmp_path):
    """`finetune --from FOLDER` with a model that is not installed: the blend and the guard rail read the parent
    from that folder at export (they looked it up by id and failed after the whole training)."""
    import shutil

    folder = tmp_path / "downloaded" / "spheres-parent"
    shutil.copytree(parent_models / PARENT_ID, folder)
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    site, unl = write_site(tmp_path, labeled=3, unlabeled=1)
    result = run_cli(["finetune", "--from", str(folder), "--data", str(site), "--unlabeled", str(unl),
                      "--iterations", "2", "--set", "fit_to_budget=false", "--set", "parent_blend=0.5",
                      "--device", "cpu", "--output", str(tmp_path / "run"), "--progress", "json"],
                     env_extra=env_for(catalog))
    assert result.returncode == 0, result.stderr
    card = json.loads((Path(json_lines(result.stdout)[-1]["model_dir"]) / "card.json").read_text())
    finetune = card["finetune"]
    assert finetune["parent"] == PARENT_ID and finetune["parent_blend"] == 0.5
    assert finetune["site_holdout"]["parent_dice"] >= 0 and finetune["held_out_cases"] == 1


def test_a_localiser_is_fine_tuned_at_its_own_width_and_stays_a_localiser(tmp_path):
    """A localiser (a V-Net 8 channels wide, role localiser) fine-tuned on a site's whole scans: the child keeps
    the width and the role, so `segment --localiser` can use it; a method that builds a 16-wide network is
    refused with the methods that can, instead of a size-mismatch traceback."""
    from semiseg_la.checkpoints import ModelCard, load_network, save_model
    from semiseg_la.checkpoints.card import default_classes, default_inference
    from semiseg_la.models.vnet import VNet

    torch.manual_seed(0)
    network = VNet(in_channels=1, n_classes=2, base=8, has_dropout=False)
    card = ModelCard(id="site-finder-v0.1.0", name="site-finder", version="0.1.0", method="supervised",
                     architecture={"name": "vnet", "config": network.config},
                     inference=default_inference([16, 16, 16], (2.0, 2.0, 2.0)), classes=default_classes(),
                     validation={"split": "none", "dice": 0.5}, extra={"role": "localiser"})
    parent = tmp_path / "site-finder-v0.1.0"
    save_model(parent, network.state_dict(), card)
    site, _ = write_whole_site(tmp_path)
    env = {"SEMISEG_LA_HOME": str(tmp_path / "home")}
    common = ["--from", str(parent), "--data", str(site), "--iterations", "2", "--device", "cpu", "--progress", "none"]
    done = run_cli(["finetune", *common, "--method", "supervised", "--output", str(tmp_path / "ft"),
                    "--name", "site-finder-b"], env_extra=env)
    assert done.returncode == 0, done.stderr[-2000:]
    child, child_card = load_network(tmp_path / "home" / "models" / "site-finder-b-v0.1.0")
    assert child.config["base"] == 8 and child_card.extra.get("role") == "localiser"
    refused = run_cli(["finetune", *common, "--method", "caml", "--output", str(tmp_path / "caml")], env_extra=env)
    assert refused.returncode == 4 and "8 channels wide" in refused.stderr and "Traceback" not in refused.stderr


def dice_of(a: np.ndarray, b: np.ndarray) -> float:
    from semiseg_la.metrics import dice

    return float(dice(a, b))


def test_the_labels_of_the_lowest_agreement_are_kept_and_the_others_removed(tmp_path, monkeypatch):
    """Four scans offered in turn: the two of lowest agreement keep their two files; a scan pushed out by a lower
    one loses its files; a folder left by an earlier export is cleared."""
    from semiseg_la.cli import export
    from semiseg_la.progress import ProgressReporter

    monkeypatch.setattr(export, "AGREEMENT_SHOWN", 2)
    folder = tmp_path / "agreement"
    folder.mkdir()
    (folder / "stale_new.nrrd").write_bytes(b"from an earlier export")
    image = Volume(np.zeros((6, 5, 4), np.float32), (1.0, 1.0, 2.0))
    kept = export.AgreementLabels(folder, ProgressReporter())
    for case, value in (("a", 0.9), ("b", 0.5), ("c", 0.7), ("d", 0.3), ("e", 0.95)):
        new = np.zeros(image.shape, np.uint8)
        new[: int(10 * value) % 6] = 1
        kept.offer(case, value, image, new, np.ones(image.shape, np.uint8))
    assert sorted(kept.files) == ["b", "d"]
    assert sorted(p.name for p in folder.iterdir()) == ["b_new.nrrd", "b_parent.nrrd", "d_new.nrrd", "d_parent.nrrd"]
    stored = read_volume(kept.files["d"]["new"])
    assert stored.same_grid(image) and stored.array.sum() == 3 * 5 * 4


def test_the_comparison_on_unlabelled_scans_agrees_with_itself_and_stops_at_the_deadline(parent_models, tmp_path):
    """The parent compared with itself agrees everywhere; with no time left in the budget nothing is segmented,
    and the card says why."""
    from semiseg_la.checkpoints import ModelCard, load_network
    from semiseg_la.cli.export import _unannotated_scans, unlabelled_agreement
    from semiseg_la.engine.config import build_config
    from semiseg_la.io.datasets import open_unlabeled_folder
    from semiseg_la.progress import ProgressReporter

    _, unl = write_site(tmp_path, labeled=0, unlabeled=3)
    folder = parent_models / PARENT_ID
    card, (network, _) = ModelCard.load(folder), load_network(folder)
    config = build_config({"method": "supervised", "data": "synthetic", "patch_size": PATCH,
                           "spacing": [1.0, 1.0, 1.0], "device": "cpu", "output": str(tmp_path / "run")})
    scans = open_unlabeled_folder(unl)
    itself = unlabelled_agreement(network.eval(), config, card, folder, scans, ProgressReporter(), None, 0.1)
    assert itself["compared"] == 3 and itself["not_compared"] == 0
    assert all(value == pytest.approx(1.0) for _, value in itself["cases"])
    late = unlabelled_agreement(network.eval(), config, card, folder, scans, ProgressReporter(), time.monotonic(), 0.1)
    assert late["compared"] == 0 and late["not_compared"] == 3 and late["summary"].startswith("no time was left")
    # a scan that cannot be read (a supervised fine-tune never opened it) is named, the others are still compared
    (unl / "scan1.nrrd").write_bytes(b"not an image")
    partly = unlabelled_agreement(network.eval(), config, card, folder, open_unlabeled_folder(unl),
                                  ProgressReporter(), None, 0.1)
    assert partly["compared"] == 2 and list(partly["unreadable"]) == ["scan1"], partly
    assert "unreadable" in partly["unreadable"]["scan1"] and "disagree most" in partly["summary"]
    # the folder gone since the run started: no comparison, and the model is still exported (no exception)
    gone = dataclasses.replace(config, unlabeled_dir=str(tmp_path / "moved-away"))
    assert _unannotated_scans(gone, ProgressReporter()) == []
