"""Slicer side, layer (b): SemiSegLALogic (the real class from SemiSegLA.py) against the explicit slicer
stand-in and the stand-in core, with real child processes and real NRRD files."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import slicer_fake
from conftest import rotation

# isort: split
from SemiSegLALib import cases as caseRules
from SemiSegLALib.jobs import OOM_FALLBACK_NOTICE, OOM_RETRY_NOTICE, Job
from SemiSegLALib.nodes import (
    LEFT_ATRIUM_COLOR,
    LEFT_ATRIUM_TERMINOLOGY,
    PARENT_RESULT_COLOR,
    isAutomaticResult,
    isComparison,
    isReviewed,
)
from SemiSegLALib.state import State

BASE = "la-caml-v1.0.0"
TIMEOUT = 60


OBLIQUE = rotation([1, 2, 3], 25)
SPACING = (0.625, 0.8, 2.5)
ORIGIN = (-12.5, 30.0, 7.25)


def blob(shape, center, radii):
    k, j, i = np.indices(shape)
    return (((i - center[0]) / radii[0]) ** 2 + ((j - center[1]) / radii[1]) ** 2
            + ((k - center[2]) / radii[2]) ** 2) < 1.0


def add_case(fake, name, seed=0, shape=(12, 20, 24)):
    rng = np.random.default_rng(seed)
    inside = blob(shape, (12, 10, 6), (6, 5, 3))
    array = (inside * 200.0 + rng.normal(50.0, 5.0, shape)).astype(np.float32)
    return fake.addVolume(name, array, SPACING, ORIGIN, OBLIQUE)


def expected_label(array):
    return array > array.mean() + array.std()  # what fake_core computes


def tmp_contents(tmp_path):
    root = tmp_path / "tmp"
    return sorted(os.listdir(root)) if root.exists() else []


# -- segment -----------------------------------------------------------------------------------------------
def test_segment_oblique_anisotropic_volume_end_to_end(fake, make_logic, tmp_path):
    volume = add_case(fake, "LA_001")
    study = fake.placeInFolder(volume, "Study 1")
    logic = make_logic()
    events = []
    logic.jobCreated.connect(lambda job: job.progress.connect(lambda j, e: events.append((e.stage, j.tracker.percent))))
    job = logic.segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    seg = job.result
    assert seg.GetName() == "LA_001 segmentation"
    # the segmentation lies on the input's exact grid, voxel for voxel
    segmentation = seg.GetSegmentation()
    assert segmentation.geometry.close(volume.geometry, tol=1e-9)
    assert segmentation.shape == volume.array.shape
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    np.testing.assert_array_equal(segment.mask, expected_label(volume.array))
    # name, standard terminology, colour, reference geometry, subject hierarchy
    assert segment.GetName() == "Left atrium"
    assert segment.tags["TerminologyEntry"] == LEFT_ATRIUM_TERMINOLOGY
    assert "SCT^82471001^Left atrium" in LEFT_ATRIUM_TERMINOLOGY
    assert "SCT^123037004^Anatomical Structure" in LEFT_ATRIUM_TERMINOLOGY
    assert segment.GetColor() == pytest.approx(LEFT_ATRIUM_COLOR)
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is volume
    sh = fake.scene.subjectHierarchy
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study
    assert seg.displayNodesCreated and not seg.closedSurface
    # the scene holds the input and the result (with its display node) only; the temporary label map, its
    # display and storage nodes, and the temporary folder are gone
    assert [n.GetID() for n in fake.scene.fakeNodes()] == [volume.GetID(), seg.GetID(), seg.GetDisplayNode().GetID()]
    assert tmp_contents(tmp_path) == []
    names = fake.recorder.names()
    assert names.index("vtkMRMLSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode") < names.index(
        "vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode")
    assert "vtkMRMLVolumeArchetypeStorageNode.UseCompressionOff" in names
    # progress reached the callbacks, in order, up to 100 %
    stages = [s for s, _ in events]
    assert stages[0] == "load" and "predict" in stages and stages[-1] == "done"
    percents = [p for _, p in events]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert job.logLines[0].startswith("Writing 'LA_001'")
    assert any(line.startswith("Running: ") for line in job.logLines)


def test_segment_follows_the_input_transform_and_shows_3d(fake, make_logic):
    """The stand-in folds parent transforms as Slicer does (see test_slicer_issue15.py): the result lies on
    the transformed volume only when the transform is set before the geometry and on the label map too."""
    move = np.eye(4)
    move[:3, :3], move[:3, 3] = rotation([0, 0, 1], 30), (40.0, -25.0, 12.0)
    transform = fake.addTransform(move, "registration")
    volume = add_case(fake, "moved")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    job = make_logic().segment(volume, BASE, device="cpu", showIn3D=True, waitForCompletion=True,
                               timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert job.result.GetTransformNodeID() == transform.GetID()
    assert job.result.GetSegmentation().geometry.close(volume.geometry, tol=1e-9)
    assert job.result.closedSurface


def test_process_is_the_scripting_entry_point(fake, make_logic):
    volume = add_case(fake, "scripted")
    logic = make_logic()
    seg = logic.process(volume, device="cpu", timeout=TIMEOUT)  # model: the catalog's first bundled one
    assert seg.GetName() == "scripted segmentation"
    failing = make_logic("fail-input")
    with pytest.raises(RuntimeError, match="Input volume is not 3D"):
        failing.process(volume, BASE, device="cpu", timeout=TIMEOUT)


def test_failure_shows_the_one_line_reason_and_leaves_the_scene(fake, make_logic, tmp_path):
    volume = add_case(fake, "bad")
    job = make_logic("fail-input").segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FAILED
    assert job.errorMessage == "Input volume is not 3D: size (64, 64)"
    assert job.summary() == "Failed: Input volume is not 3D: size (64, 64)"
    assert job.returnCode == 2
    assert fake.scene.fakeNodes() == [volume]
    assert tmp_contents(tmp_path) == []
    assert job.logLines[-1] == "Error: Input volume is not 3D: size (64, 64)"


def test_crash_without_error_record_surfaces_the_last_text_line(fake, make_logic):
    volume = add_case(fake, "crash")
    job = make_logic("crash").segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FAILED
    assert job.errorMessage == "The SemiSegLA core stopped: RuntimeError: something deep broke"
    assert "Traceback (most recent call last):" in job.logText


def test_success_without_done_record_is_a_failure(fake, make_logic):
    volume = add_case(fake, "nodone")
    job = make_logic("no-done").segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FAILED and "without a result record" in job.errorMessage
    assert fake.scene.fakeNodes() == [volume]


def test_result_on_another_grid_is_refused(fake, make_logic):
    volume = add_case(fake, "shifted")
    job = make_logic("bad-geometry").segment(volume, BASE, device="cpu", waitForCompletion=True,
                                             timeout=TIMEOUT)
    assert job.state is State.FAILED
    assert job.errorMessage.startswith("The result is not on the input's grid (axis 0 is")
    assert fake.scene.fakeNodes() == [volume]


def test_empty_result_gives_an_empty_left_atrium_segment_and_says_so(fake, make_logic):
    volume = add_case(fake, "nothing")
    job = make_logic("empty").segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    segmentation = job.result.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == "Left atrium" and not segment.mask.any()
    assert segment.tags["TerminologyEntry"] == LEFT_ATRIUM_TERMINOLOGY
    assert any("No left atrium was found" in n for n in job.notices)


def test_plain_text_lines_go_to_the_log(fake, make_logic):
    volume = add_case(fake, "noisy")
    job = make_logic("noise").segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert "UserWarning: this is a plain warning line" in job.logLines
    assert "{not json at all" in job.logLines


def test_gpu_out_of_memory_inside_the_core_is_reported(fake, make_logic, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    volume = add_case(fake, "oom")
    logic = make_logic("oom-fallback")
    notices = []
    logic.jobCreated.connect(lambda job: job.notice.connect(lambda j, text: notices.append(text)))
    job = logic.segment(volume, BASE, device="cuda", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert job.doneRecord["fell_back_to_cpu"] is True
    # (the core's first log line says which region it segments; test_slicer_region.py covers it)
    assert notices[1:] == ["CUDA out of memory: retrying on the CPU", OOM_FALLBACK_NOTICE]
    assert notices[0].startswith("region: the whole image")
    assert OOM_FALLBACK_NOTICE in job.summary()


def test_gpu_out_of_memory_error_is_retried_on_the_cpu(fake, make_logic, monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    calls = tmp_path / "calls.jsonl"
    volume = add_case(fake, "oom2")
    logic = make_logic("oom-error", SEMISEG_FAKE_CALLS=str(calls))
    states = []
    logic.jobCreated.connect(lambda job: job.stateChanged.connect(lambda j, s: states.append(s)))
    job = logic.segment(volume, BASE, device="cuda", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert job.retriedOnCpu and job.effectiveDevice == "cpu"
    assert OOM_RETRY_NOTICE in job.notices
    invocations = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [c["argv"][c["argv"].index("--device") + 1] for c in invocations] == ["cuda", "cpu"]
    assert [c["cuda_visible_devices"] for c in invocations] == [None, "-1"]
    assert states == [State.INITIALIZING, State.SEGMENTING, State.SEGMENTING, State.IMPORTING, State.FINISHED]


def test_out_of_memory_without_retry_fails_with_advice(fake, module, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    volume = add_case(fake, "oom3")
    image = str(tmp_path / "in.nrrd")
    slicer_fake.writeNrrd(volume.array, volume.geometry, image, compress=False)
    factory = slicer_fake.fakeCommandFactory("oom-error")
    job = Job("segment", module.ProcessRunner(), lambda dev: factory.segment(image, str(tmp_path / "o.nrrd"),
                                                                             BASE, dev),
              device="cuda", retryOnOutOfMemory=False)
    assert job.start().wait(TIMEOUT) is State.FAILED
    assert job.errorKind == "oom"
    assert job.errorMessage.startswith("CUDA out of memory. Tried to allocate 2.00 GiB (out of memory; try Device: CPU")


def test_cancel_kills_the_child_and_leaves_the_scene(fake, make_logic, tmp_path):
    volume = add_case(fake, "slow")
    logic = make_logic("slow")
    job = logic.segment(volume, BASE, device="cpu")
    assert job.state is State.SEGMENTING and logic.busy
    deadline = time.monotonic() + 20
    while job.tracker.stage != "predict" and time.monotonic() < deadline:
        logic.poll()
        time.sleep(0.02)
    assert job.tracker.stage == "predict"
    pid = job.child.pid
    start = time.monotonic()
    logic.cancel()
    assert time.monotonic() - start < 3.0
    assert job.state is State.CANCELLED and not logic.busy
    assert job.summary() == "Cancelled; the scene is unchanged."
    assert job.child.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert fake.scene.fakeNodes() == [volume]
    assert tmp_contents(tmp_path) == []
    assert not logic.poll()


def test_only_one_run_at_a_time(fake, make_logic):
    volume = add_case(fake, "busy")
    logic = make_logic("slow")
    job = logic.segment(volume, BASE, device="cpu")
    try:
        with pytest.raises(RuntimeError, match="busy"):
            logic.segment(volume, BASE, device="cpu")
    finally:
        job.cancel()


def test_keep_temporary_files_for_bug_reports(fake, make_logic, tmp_path):
    volume = add_case(fake, "kept")
    logic = make_logic()
    logic.keepTempFiles = True
    job = logic.segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED
    assert sorted(os.listdir(job.workDir)) == ["input.nrrd", "output.nrrd"]
    assert job.logLines[-1] == f"Temporary files kept in {job.workDir}"
    # the exchanged input is uncompressed NRRD, in LPS, on the volume's grid
    header = Path(job.workDir, "input.nrrd").read_bytes()[:2000]
    assert b"encoding: raw" in header and b"left-posterior-superior" in header


# -- models -------------------------------------------------------------------------------------------------
def test_models_list_presets_import_and_remove(fake, make_logic, tmp_path):
    logic = make_logic()
    catalog = logic.refreshModels()
    assert [e.id for e in catalog.ordered()] == ["la-caml-v1.0.0", "la-meanteacher-v1.0.0"]
    assert logic.refreshMethodPresets() == ["supervised", "mean_teacher", "caml", "crln"]
    checkpoint = tmp_path / "official_caml.pth"
    checkpoint.write_bytes(b"weights")
    newId = logic.importCheckpoint(str(checkpoint))
    assert newId == "imported-official_caml-v0.0.1"
    assert logic.catalog.get(newId).isLocal
    with pytest.raises(ValueError, match="bundled"):
        logic.removeModel(BASE)
    assert logic.removeModel(newId) == BASE  # no parent: the first bundled model is selected
    assert logic.catalog.get(newId) is None
    with pytest.raises(RuntimeError, match="no such file"):
        logic.importCheckpoint(str(tmp_path / "missing.pth"))
    older = make_logic("no-presets")
    assert older.refreshMethodPresets() == ["supervised", "mean_teacher"]


def test_broken_model_is_refused_before_starting(fake, make_logic):
    volume = add_case(fake, "x")
    logic = make_logic()
    logic.refreshModels()
    from SemiSegLALib.catalog import ModelEntry

    broken = ModelEntry({"id": "broken-v1", "source": "local", "error": "weights checksum mismatch"})
    logic.catalog.entries.append(broken)
    logic.catalog.byId[broken.id] = broken
    with pytest.raises(ValueError, match="checksum mismatch"):
        logic.segment(volume, "broken-v1")
    assert fake.scene.fakeNodes() == [volume]


# -- fine-tune ----------------------------------------------------------------------------------------------
def labelled_scene(fake, la_mask=None):
    a = add_case(fake, "Case A", seed=1)
    mask = blob(a.array.shape, (12, 10, 6), (5, 4, 2)) if la_mask is None else la_mask
    seg = fake.addSegmentation("Case A segmentation", a, {"Left atrium": mask})
    b = add_case(fake, "Case B", seed=2)
    c = add_case(fake, "Case C", seed=3)
    other = fake.addSegmentation("Case C vessels", c, {"Aorta": mask})
    fake.addVolume("a label map", np.zeros((2, 2, 2), np.uint8), className="vtkMRMLLabelMapVolumeNode")
    return a, seg, b, c, other, mask


def test_finetune_end_to_end_writes_the_dataset_on_each_grid(fake, make_logic, tmp_path):
    a, seg, b, c, other, mask = labelled_scene(fake)
    before = [n.GetID() for n in fake.scene.fakeNodes()]
    logic = make_logic()
    logic.refreshModels()
    rows = logic.scanCases()
    assert [(r.volumeName, r.role) for r in rows] == [("Case A", "labelled"), ("Case B", "unlabelled"),
                                                      ("Case C", "invalid")]
    logic.keepTempFiles = True
    job = logic.finetune(BASE, "mean_teacher", iterations=6, name="site", device="cpu",
                         waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert job.result == "site-v0.0.1"
    entry = logic.catalog.get("site-v0.0.1")
    assert entry.parent == BASE and entry.labeledCases == 1 and entry.unlabeledCases == 1
    assert logic.catalog.revertTarget("site-v0.0.1") == BASE
    assert logic.describeNewModel("site-v0.0.1") == (
        "New model site-v0.0.1 (Mean Teacher, parent la-caml-v1.0.0, 1 labelled cases, "
        "Dice 0.800 on its own training cases (optimistic)).")
    assert job.guardWarning is None
    assert any("s per iteration" in text for text in job.notices)  # the core's time estimate reaches the panel
    assert job.tracker.lastDice is not None
    # the dataset: nnU-Net layout, label uint8 on the image's exact grid, the voxels of the segment
    plan = job.datasetPlan
    meta = json.loads(Path(plan.datasetDir, "dataset.json").read_text())
    assert meta == {"channel_names": {"0": "LGE-MRI"}, "labels": {"background": 0, "left_atrium": 1},
                    "numTraining": 1, "file_ending": ".nrrd"}
    image = sitk.ReadImage(os.path.join(plan.datasetDir, "imagesTr", "Case_A_0000.nrrd"))
    label = sitk.ReadImage(os.path.join(plan.datasetDir, "labelsTr", "Case_A.nrrd"))
    assert label.GetPixelIDTypeAsString() == "8-bit unsigned integer"
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(label, attr)(), getattr(image, attr)(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), mask.astype(np.uint8))
    assert os.listdir(plan.unlabeledDir) == ["Case_B.nrrd"]
    assert os.path.isdir(os.path.join(job.workDir, "runs", "finetune"))  # the child ran in the temp folder
    assert any("Case C" in line and "no 'Left atrium' segment" in line for line in job.logLines)
    # no temporary label maps left behind: what is new is the two results on the unlabelled Case B
    added = [n for n in fake.scene.fakeNodes() if n.GetID() not in before]
    assert [n.GetName() for n in added if n.IsA("vtkMRMLSegmentationNode")] == [
        "Case B: site-v0.0.1 (new)", f"Case B: {BASE} (parent)"]  # each model by its id
    assert not [n for n in added if n.IsA("vtkMRMLVolumeNode")]


def test_finetune_needs_a_labelled_case(fake, make_logic):
    add_case(fake, "only unlabelled")
    logic = make_logic()
    with pytest.raises(ValueError, match="at least one labelled case"):
        logic.finetune(BASE, "mean_teacher", device="cpu")


def test_finetune_with_an_empty_atrium_segment_names_the_case(fake, make_logic, tmp_path):
    a = add_case(fake, "Case E")
    fake.addSegmentation("Case E segmentation", a, {"Left atrium": np.zeros(a.array.shape, bool)})
    add_case(fake, "Case F")
    before = fake.scene.fakeNodes()
    job = make_logic().finetune(BASE, "mean_teacher", device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FAILED
    assert job.errorMessage == "Case E: the 'Left atrium' segment of 'Case E segmentation' is empty"
    assert job.child is None  # failed while preparing: the core never started
    assert fake.scene.fakeNodes() == before
    assert tmp_contents(tmp_path) == []


def test_finetune_cancel_creates_no_model(fake, make_logic):
    labelled_scene(fake)
    logic = make_logic("slow")
    job = logic.finetune(BASE, "mean_teacher", iterations=200, device="cpu")
    deadline = time.monotonic() + 20
    while job.tracker.stage != "train" and time.monotonic() < deadline:
        logic.poll()
        time.sleep(0.02)
    logic.cancel()
    assert job.state is State.CANCELLED
    assert all(e.isBundled for e in logic.refreshModels().entries)


def test_user_pairing_and_exclusion(fake, make_logic):
    a, seg, b, c, other, mask = labelled_scene(fake)
    logic = make_logic()
    logic.setPairing(a.GetID(), caseRules.NO_SEGMENTATION)  # treat A as unlabelled
    logic.setIncluded(c.GetID(), True)
    rows = {r.volumeName: r for r in logic.scanCases()}
    assert rows["Case A"].role == "unlabelled" and rows["Case A"].paired == "user"
    logic.setPairing(a.GetID(), None)
    logic.setIncluded(b.GetID(), False)
    rows = {r.volumeName: r for r in logic.scanCases()}
    assert rows["Case A"].role == "labelled" and rows["Case B"].role == "excluded"


def test_module_metadata(module):
    parent = slicer_fake.fake_slicer.FakeModuleParent()
    module.SemiSegLA(parent)
    assert parent.title == "SemiSegLA"
    assert parent.categories == ["Segmentation"]
    assert "82471001" in parent.helpText and "MICCAI 2023" in parent.helpText
    assert "arXiv 2502.11456" in parent.helpText


def test_finetune_better_on_one_held_out_case_says_how_little_that_is(fake, make_logic):
    """Three labelled cases: the core holds one out and calls the child better; the job's notices (the status
    line after the fine-tune) say that one case is little evidence and how to compare."""
    labelled_scene(fake)
    for seed in (4, 5):
        volume = add_case(fake, f"Case {seed}", seed=seed)
        fake.addSegmentation(f"Case {seed} segmentation", volume,
                             {"Left atrium": blob(volume.array.shape, (12, 10, 6), (5, 4, 2))})
    logic = make_logic()
    logic.refreshModels()
    job = logic.finetune(BASE, "mean_teacher", iterations=3, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert job.guardWarning is None
    notes = [n for n in job.notices if "one held-out case" in n]
    assert notes and "(Dice 0.880 vs 0.850)" in notes[0] and "little evidence" in notes[0]
    assert notes[0] in job.summary()
    # where the new model and its parent disagree most on the unlabelled volumes, by the volumes' own names
    where = [n for n in job.notices if "disagree most" in n]
    assert where and where[0].startswith("Of 1 unlabelled volume(s)"), job.notices
    assert "disagree most on 'Case B' (0.60)" in where[0]  # the volume's name, not its file's case id Case_B
    assert f"Each model's result on 'Case B' is in the scene as '<volume>: {job.result} (new)'" in where[0]


def test_finetune_adds_both_results_where_the_two_models_disagree_most(fake, make_logic):
    """The core keeps both models' labels of the unlabelled scans of lowest agreement; the module adds them beside
    each volume as automatic segmentations (its own colour for the parent's), which leave the volume unlabelled."""
    a, seg, b, c, other, mask = labelled_scene(fake)
    logic = make_logic()
    logic.refreshModels()
    job = logic.finetune(BASE, "mean_teacher", iterations=3, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    [(name, new, parent)] = job.comparisons
    assert name == "Case B" and new.GetName() == f"Case B: {job.result} (new)"
    assert parent.GetName() == f"Case B: {BASE} (parent)"
    for node, cut in ((new, 1.0), (parent, 2.0)):  # the fake core's labels: the scan above mean + cut x std
        assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is b
        assert isAutomaticResult(node) and not isReviewed(node)
        segment = node.GetSegmentation().GetNthSegment(0)
        assert segment.GetName() == "Left atrium" and node.GetSegmentation().geometry.close(b.geometry, tol=1e-9)
        np.testing.assert_array_equal(segment.mask, b.array > b.array.mean() + cut * b.array.std())
    assert parent.GetSegmentation().GetNthSegment(0).GetColor() == pytest.approx(PARENT_RESULT_COLOR)
    assert new.GetSegmentation().GetNthSegment(0).GetColor() == pytest.approx(LEFT_ATRIUM_COLOR)
    assert isComparison(parent) and not isComparison(new)
    rows = {r.volumeName: r for r in logic.scanCases()}
    assert rows["Case B"].role == "unlabelled" and "automatic result" in rows["Case B"].status
    assert rows["Case B"].segmentationId == new.GetID()  # a Corrected tick there marks the new model's result


def test_finetune_skips_a_disagreement_result_off_its_volume_grid(fake, make_logic):
    """A parent's label on another grid than the scan written for the core: neither result is added, the log
    says why, and the note falls back to asking the user to segment with each model."""
    labelled_scene(fake)
    logic = make_logic("bad-agreement-grid")
    logic.refreshModels()
    before = {n.GetID() for n in fake.scene.fakeNodes()}
    job = logic.finetune(BASE, "mean_teacher", iterations=3, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert job.comparisons == []
    assert not [n for n in fake.scene.fakeNodes() if n.GetID() not in before and n.IsA("vtkMRMLSegmentationNode")]
    assert any("The two results on 'Case B' were not added" in line and "grid" in line for line in job.logLines)
    where = [n for n in job.notices if "disagree most" in n]
    assert where and "segmented with each model" in where[0] and "in the scene" not in where[0]


def test_finetune_names_an_unlabelled_volume_the_core_left_out_and_why(fake, make_logic):
    """The core goes on without an unusable unlabelled scan (a 2D localiser series of the study): the notices name
    the volume, not its file, with the reason, and say how to leave it out; without one, no such notice."""
    labelled_scene(fake)
    logic = make_logic("left-out")
    logic.refreshModels()
    job = logic.finetune(BASE, "mean_teacher", iterations=3, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    notes = [n for n in job.notices if "left out of the fine-tune" in n]
    assert notes == ["1 unlabelled volume(s) were left out of the fine-tune: 'Case B' (invalid image: image is 2D "
                     "(shape (256, 256)); a 3D scalar image is required). Untick *Use* for such volumes in the case "
                     "table if they are not scans of the atrium."], job.notices
    assert notes[0] in job.summary()
    job = make_logic().finetune(BASE, "mean_teacher", iterations=3, device="cpu", waitForCompletion=True,
                                timeout=TIMEOUT)
    assert job.state is State.FINISHED and not [n for n in job.notices if "left out" in n]


def test_finetune_on_one_labelled_case_says_it_was_not_checked(fake, make_logic):
    """One labelled case: nothing is held out, the core's verdict is "unchecked", and the notices say so."""
    labelled_scene(fake)
    logic = make_logic()
    logic.refreshModels()
    job = logic.finetune(BASE, "mean_teacher", iterations=3, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    notes = [n for n in job.notices if "not checked against its parent" in n]
    assert notes and "fewer than 3 labelled cases" in notes[0] and notes[0] in job.summary()


def test_finetune_worse_than_its_parent_is_reported_and_not_adopted(fake, make_logic):
    """The core's parent/child check on a held-out case says the child is worse: the job says so in one
    notice naming both figures, and the widget keeps the parent selected (SemiSegLAWidget.onJobFinished)."""
    labelled_scene(fake)
    logic = make_logic("guard-worse")
    logic.refreshModels()
    job = logic.finetune(BASE, "mean_teacher", iterations=3, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert job.guardWarning is not None
    assert "worse than its parent la-caml-v1.0.0" in job.guardWarning and "0.610 vs 0.850" in job.guardWarning
    assert job.guardWarning in job.notices
    assert logic.catalog.get(job.result) is not None  # kept in the list, not selected


# -- disk space ---------------------------------------------------------------------------------------------
def free_space(monkeypatch, free):
    """The disk of every temporary folder has ``free`` bytes free (shutil.disk_usage as SemiSegLALib.paths
    asks it)."""
    from SemiSegLALib import paths

    usage = paths.shutil.disk_usage
    monkeypatch.setattr(paths.shutil, "disk_usage",
                        lambda folder: usage(folder)._replace(free=free))


def test_a_fine_tune_that_cannot_fit_on_the_disk_is_refused_before_writing(fake, make_logic, tmp_path,
                                                                           monkeypatch):
    """The dataset plus the run's checkpoints and model (about 0.5 GB) do not fit: one line says how much is
    needed and free and where to choose another folder, and nothing is written."""
    labelled_scene(fake)
    logic = make_logic()
    logic.refreshModels()
    free_space(monkeypatch, 100 * 2**20)
    with pytest.raises(ValueError, match=r"Fine-tuning needs about 512 MB of temporary files in .*, and 100 MB "
                                         r"are free\. Free some space, or choose another temporary directory "
                                         r"\(Edit > Application Settings > Modules > Temporary directory\)"):
        logic.finetune(BASE, "mean_teacher", iterations=3, device="cpu")
    assert tmp_contents(tmp_path) == [] and not logic.busy


def test_the_dataset_estimate_counts_each_included_volume_and_each_label(fake):
    """Each labelled or unlabelled volume as stored (float32 here: 4 bytes a voxel) and one byte a voxel for
    a labelled case's label; invalid and left-out rows write nothing."""
    from SemiSegLALib import nodes

    a, seg, b, c, other, mask = labelled_scene(fake)
    volumes, segmentations = nodes.scanScene()
    rows = caseRules.buildCaseTable(volumes, segmentations, {}, set())
    voxels = a.array.size
    assert [r.role for r in rows] == ["labelled", "unlabelled", "invalid"]
    assert nodes.datasetBytes(rows) == voxels * 4 + voxels + b.array.size * 4
    rows = caseRules.buildCaseTable(volumes, segmentations, {}, {b.GetID()})
    assert nodes.datasetBytes(rows) == voxels * 5


def test_segmenting_on_a_full_disk_is_refused_before_writing(fake, make_logic, tmp_path, monkeypatch):
    volume = add_case(fake, "full disk")
    logic = make_logic()
    free_space(monkeypatch, 10 * 2**20)
    with pytest.raises(ValueError, match=r"Segmenting needs about 64 MB of temporary files in .*, and 10 MB are "
                                         r"free"):
        logic.segment(volume, BASE, device="cpu")
    assert tmp_contents(tmp_path) == []


def test_a_write_that_fails_on_a_full_disk_says_so(fake, tmp_path, monkeypatch):
    """Slicer's storage node returns 0 when it cannot write; with almost nothing free the error says the disk
    is full, otherwise it names the file only."""
    from SemiSegLALib import nodes

    unwritable = fake.addVolume("no image data", np.zeros((2, 2, 2), np.float32))
    unwritable.array = None  # the stand-in's WriteData fails for a volume without voxels, as Slicer's does
    target = str(tmp_path / "input.nrrd")
    with pytest.raises(OSError) as plenty:
        nodes.writeVolumeNode(unwritable, target)
    assert str(plenty.value) == f"Could not write 'no image data' to {target}"
    free_space(monkeypatch, 3 * 2**20)
    with pytest.raises(OSError, match=r"Could not write 'no image data' to .*input\.nrrd: the disk is full "
                                      r"\(3 MB free in .*\)"):
        nodes.writeVolumeNode(unwritable, target)
