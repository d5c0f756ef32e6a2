"""Slicer side, issue 15: the defects that only show where the stand-in behaves like Slicer.

Each test names the defect it guards. Where the module was wrong, Slicer's own behaviour decides (parent
transforms in the reference geometry and on label import, node IDs reused after Close Scene, the display,
storage and colour-table nodes that loading and exporting create, RuntimeError from a failed load, the
diffusion-weighted subclass of scalar volumes, the terminology's recommended colour); the stand-in mirrors
each of those (Testing/slicer_fake/fake_slicer.py names the Slicer source), and the first tests below check
the stand-in itself.
"""

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk

import slicer_fake
from conftest import rotation
from slicer_fake.fake_slicer import FakeGeometryMismatch, worldFromNode

# isort: split
from SemiSegLALib import nodes
from SemiSegLALib.state import State

BASE = "la-caml-v1.0.0"
TIMEOUT = 60


def rigid(axis, degrees, translation):
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(axis, degrees)
    matrix[:3, 3] = translation
    return matrix


OBLIQUE = rotation([1, 2, 3], 25)
SPACING = (0.625, 0.8, 2.5)
ORIGIN = (-12.5, 30.0, 7.25)
MOVE = rigid([0, 0, 1], 30, (40.0, -25.0, 12.0))  # a registration result the user applied to the volume


def blob(shape, center, radii):
    k, j, i = np.indices(shape)
    return (((i - center[0]) / radii[0]) ** 2 + ((j - center[1]) / radii[1]) ** 2
            + ((k - center[2]) / radii[2]) ** 2) < 1.0


def add_case(fake, name, seed=0, shape=(12, 20, 24), transform=None, className="vtkMRMLScalarVolumeNode"):
    rng = np.random.default_rng(seed)
    inside = blob(shape, (12, 10, 6), (6, 5, 3))
    array = (inside * 200.0 + rng.normal(50.0, 5.0, shape)).astype(np.float32)
    return fake.addVolume(name, array, SPACING, ORIGIN, OBLIQUE, className=className, transform=transform)


def expected_label(array):
    return array > array.mean() + array.std()  # what fake_core computes


def world_ijk_to_ras(node, geometry):
    return worldFromNode(node) @ geometry.ijkToRas()


def helper_nodes(fake):
    """Display, storage and colour-table nodes in the scene."""
    return [n for n in fake.scene.fakeNodes()
            if n.IsA("vtkMRMLDisplayNode") or n.IsA("vtkMRMLStorageNode") or n.IsA("vtkMRMLColorNode")]


def segment(make_logic, volume, mode=""):
    job = make_logic(mode).segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    return job.result


# -- the stand-in behaves like Slicer here ------------------------------------------------------------------
def test_stand_in_folds_the_parent_transform_into_the_reference_geometry(fake):
    """vtkMRMLSegmentationNode::SetReferenceImageGeometryParameterFromVolumeNode multiplies the volume's
    IJK-to-RAS by the volume-to-segmentation transform."""
    transform = fake.addTransform(MOVE)
    volume = add_case(fake, "v", transform=transform)
    seg = fake.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # segmentation not transformed yet
    np.testing.assert_allclose(seg.GetSegmentation().geometry.ijkToRas(), MOVE @ volume.geometry.ijkToRas(),
                               atol=1e-9)
    seg.SetAndObserveTransformNodeID(transform.GetID())
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # same parent: the plain geometry
    assert seg.GetSegmentation().geometry.close(volume.geometry, tol=1e-9)


def test_stand_in_imports_a_label_map_through_the_transform_between_parents(fake, tmp_path):
    """ImportLabelmapToSegmentationNode moves the label map by the transform between its parent and the
    segmentation's: an untransformed label into a transformed segmentation lands elsewhere (the stand-in
    refuses where Slicer would resample)."""
    transform = fake.addTransform(MOVE)
    volume = add_case(fake, "v", transform=transform)
    path = str(tmp_path / "label.nrrd")
    slicer_fake.writeNrrd(expected_label(volume.array).astype(np.uint8), volume.geometry, path, compress=False)
    label = fake.slicer.util.loadLabelVolume(path, {"show": False})
    seg = fake.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetAndObserveTransformNodeID(transform.GetID())
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    logic = fake.slicer.modules.segmentations.logic()
    with pytest.raises(FakeGeometryMismatch):
        logic.ImportLabelmapToSegmentationNode(label, seg)
    label.SetAndObserveTransformNodeID(transform.GetID())
    assert logic.ImportLabelmapToSegmentationNode(label, seg)


def test_stand_in_reuses_node_ids_after_clear_and_keeps_helpers_on_remove(fake, tmp_path):
    """vtkMRMLScene::Clear resets the unique-ID counters; vtkMRMLScene::RemoveNode removes only the node;
    slicer.util.loadNodeFromFile raises RuntimeError; AddArchetypeVolume adds display and storage nodes."""
    first = add_case(fake, "first")
    fake.scene.Clear(0)
    assert first.GetScene() is None and fake.scene.fakeNodes() == []
    second = add_case(fake, "second")
    assert second.GetID() == first.GetID() == "vtkMRMLScalarVolumeNode1"
    path = str(tmp_path / "l.nrrd")
    slicer_fake.writeNrrd(np.ones((2, 3, 4), np.uint8), slicer_fake.Geometry([1, 1, 1], [0, 0, 0], np.eye(3)),
                          path, compress=False)
    label = fake.slicer.util.loadLabelVolume(path, {"show": False})
    display, storage = label.GetDisplayNode(), label.GetStorageNode()
    assert display.GetColorNodeID() == slicer_fake.fake_slicer.DEFAULT_LABEL_COLOR_NODE_ID
    assert storage.GetFileName() == path
    fake.scene.RemoveNode(label)
    assert display.GetScene() is not None and storage.GetScene() is not None  # left behind
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"not an image")
    with pytest.raises(RuntimeError, match="Failed to load node from file"):
        fake.slicer.util.loadLabelVolume(str(bad), {"show": False})
    dwi = add_case(fake, "dwi", className="vtkMRMLDiffusionWeightedVolumeNode")
    assert dwi.IsA("vtkMRMLScalarVolumeNode") and not dwi.IsA("vtkMRMLTensorVolumeNode")


# -- 1. a volume under a transform ---------------------------------------------------------------------------
def test_segment_of_a_transformed_volume_lies_where_the_volume_is(fake, make_logic):
    transform = fake.addTransform(MOVE, "registration")
    volume = add_case(fake, "moved", transform=transform)
    seg = segment(make_logic, volume)
    assert seg.GetTransformNodeID() == transform.GetID()
    segmentation = seg.GetSegmentation()
    # the reference geometry, in the segmentation's coordinates, is the volume's own grid ...
    assert segmentation.geometry.close(volume.geometry, tol=1e-9)
    # ... so in the world the segment sits exactly on the (transformed) volume
    np.testing.assert_allclose(world_ijk_to_ras(seg, segmentation.geometry),
                               world_ijk_to_ras(volume, volume.geometry), atol=1e-9)
    np.testing.assert_array_equal(segmentation.GetNthSegment(0).mask, expected_label(volume.array))
    names = fake.recorder.names()
    assert names.index("vtkMRMLSegmentationNode.SetAndObserveTransformNodeID") < names.index(
        "vtkMRMLSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode")


def test_nested_transforms_and_fine_tuning_a_transformed_case(fake, make_logic, module):
    parent = fake.addTransform(rigid([1, 0, 0], 15, (0.0, 5.0, -3.0)), "scanner")
    child = fake.addTransform(MOVE, "registration")
    child.SetAndObserveTransformNodeID(parent.GetID())
    volume = add_case(fake, "nested", transform=child)
    add_case(fake, "plain", seed=3)
    seg = segment(make_logic, volume)
    np.testing.assert_allclose(world_ijk_to_ras(seg, seg.GetSegmentation().geometry),
                               world_ijk_to_ras(volume, volume.geometry), atol=1e-9)
    logic = make_logic()
    logic.setReviewed(seg, True)
    logic.keepTempFiles = True
    job = logic.finetune(BASE, "mean_teacher", iterations=3, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    label = sitk.ReadImage(os.path.join(job.datasetPlan.datasetDir, "labelsTr", "nested.nrrd"))
    image = sitk.ReadImage(os.path.join(job.datasetPlan.datasetDir, "imagesTr", "nested_0000.nrrd"))
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(label, attr)(), getattr(image, attr)(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected_label(volume.array).astype(np.uint8))


# -- 3. Close Scene and node removal -------------------------------------------------------------------------
def test_choices_do_not_come_back_after_close_scene(fake, make_logic):
    logic = make_logic()
    old = add_case(fake, "old scan")
    oldSeg = fake.addSegmentation("old seg", old, {"Left atrium": expected_label(old.array)})
    logic.setIncluded(old.GetID(), False)
    logic.setPairing(old.GetID(), "")
    assert [r.role for r in logic.scanCases()] == ["excluded"]
    fake.scene.Clear(0)  # File > Close Scene
    new = add_case(fake, "new scan")
    newSeg = fake.addSegmentation("new seg", new, {"Left atrium": expected_label(new.array)})
    assert (new.GetID(), newSeg.GetID()) == (old.GetID(), oldSeg.GetID())  # Slicer reuses the IDs
    rows = logic.scanCases()
    assert [(r.volumeName, r.role, r.paired, r.segmentationName) for r in rows] == [
        ("new scan", "labelled", "auto", "new seg")]


def test_choices_of_removed_nodes_are_dropped_and_a_removed_pairing_says_so(fake, make_logic, module):
    logic = make_logic()
    a = add_case(fake, "A")
    b = add_case(fake, "B", seed=1)
    segA = fake.addSegmentation("A seg", a, {"Left atrium": expected_label(a.array)})
    other = fake.addSegmentation("B manual", b, {"Left atrium": expected_label(b.array)}, setReference=False)
    logic.setPairing(b.GetID(), other.GetID())
    logic.setIncluded(a.GetID(), False)
    assert logic.pairingFor(b.GetID()) == other.GetID()
    fake.scene.RemoveNode(other)
    rows = {r.volumeName: r for r in logic.scanCases()}
    assert rows["B"].role == "invalid" and "no longer exists" in rows["B"].status
    fake.scene.RemoveNode(a)
    fake.scene.RemoveNode(segA)
    logic.pruneCaseChoices()
    assert logic._excluded == []  # the removed volume is not held any more
    logic.clearCaseChoices()
    assert logic.pairingFor(b.GetID()) == "auto"


# -- 4. no stray nodes ---------------------------------------------------------------------------------------
def test_segmenting_leaves_no_display_or_storage_nodes_of_the_temporary_label(fake, make_logic):
    volume = add_case(fake, "clean")
    seg = segment(make_logic, volume)
    assert [n.GetID() for n in fake.scene.fakeNodes()] == [volume.GetID(), seg.GetID(), seg.GetDisplayNode().GetID()]
    assert [n.GetClassName() for n in helper_nodes(fake)] == ["vtkMRMLSegmentationDisplayNode"]


def test_fine_tuning_leaves_no_colour_table_or_label_display_node(fake, make_logic):
    a = add_case(fake, "Case A", seed=1)
    fake.addSegmentation("Case A segmentation", a, {"Left atrium": expected_label(a.array)})
    add_case(fake, "Case B", seed=2)
    before = [n.GetID() for n in fake.scene.fakeNodes()]
    job = make_logic().finetune(BASE, "mean_teacher", iterations=3, device="cpu", waitForCompletion=True,
                                timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert "vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode" in fake.recorder.names()
    # what is new is the two results on the unlabelled Case B and their display nodes, as after segmenting
    added = [n.GetClassName() for n in fake.scene.fakeNodes() if n.GetID() not in before]
    assert added == ["vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode"] * 2


def test_a_failed_import_leaves_the_scene_as_it_was(fake, tmp_path):
    volume = add_case(fake, "two labels")
    path = str(tmp_path / "two.nrrd")
    labels = expected_label(volume.array).astype(np.uint8)
    labels[0, 0, 0] = 2
    slicer_fake.writeNrrd(labels, volume.geometry, path, compress=False)
    with pytest.raises(RuntimeError, match="holds 2 labels"):
        nodes.importLabelAsSegmentation(path, volume)
    assert fake.scene.fakeNodes() == [volume]


def test_an_unreadable_result_is_an_os_error_naming_the_file(fake, tmp_path):
    volume = add_case(fake, "unreadable")
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\ntruncated")
    with pytest.raises(OSError, match="Slicer could not read the result .*broken.nrrd"):
        nodes.importLabelAsSegmentation(str(bad), volume)
    assert fake.scene.fakeNodes() == [volume]


def test_never_removes_a_shared_colour_table(fake, tmp_path):
    path = str(tmp_path / "l.nrrd")
    slicer_fake.writeNrrd(np.ones((2, 3, 4), np.uint8), slicer_fake.Geometry([1, 1, 1], [0, 0, 0], np.eye(3)),
                          path, compress=False)
    label = fake.slicer.util.loadLabelVolume(path, {"show": False})
    nodes.removeNodeAndHelpers(label, removeColorNodes=True)  # the default table is not a user table: kept
    assert fake.scene.fakeNodes() == []
    assert fake.scene.GetNodeByID(slicer_fake.fake_slicer.DEFAULT_LABEL_COLOR_NODE_ID) is not None


# -- reviewed labels only ------------------------------------------------------------------------------------
def test_an_automatic_result_is_unlabelled_until_marked_as_corrected(fake, make_logic):
    a = add_case(fake, "auto A")
    b = add_case(fake, "manual B", seed=1)
    manual = fake.addSegmentation("B by hand", b, {"Left atrium": expected_label(b.array)})
    seg = segment(make_logic, a)
    logic = make_logic()
    rows = {r.volumeName: r for r in logic.scanCases()}
    assert rows["auto A"].role == "unlabelled" and rows["auto A"].segmentationId == seg.GetID()
    assert "automatic result" in rows["auto A"].status and "Corrected" in rows["auto A"].status
    assert rows["manual B"].role == "labelled" and rows["manual B"].reviewed  # drawn by the user
    logic.setReviewed(manual.GetID(), False)
    with pytest.raises(ValueError, match="at least one labelled case"):
        logic.finetune(BASE, "mean_teacher", device="cpu")
    logic.setReviewed(seg, True)
    rows = {r.volumeName: r for r in logic.scanCases()}
    assert rows["auto A"].role == "labelled" and rows["manual B"].role == "unlabelled"
    assert seg.GetAttribute(nodes.REVIEWED_ATTRIBUTE) == "true"  # kept on the node: saved with the scene


# -- diffusion-weighted volumes ------------------------------------------------------------------------------
def test_only_plain_scalar_volumes_are_cases(fake, make_logic):
    add_case(fake, "LGE")
    for className in ("vtkMRMLDiffusionWeightedVolumeNode", "vtkMRMLDiffusionTensorVolumeNode",
                      "vtkMRMLVectorVolumeNode", "vtkMRMLLabelMapVolumeNode"):
        add_case(fake, className, className=className)
    assert [r.volumeName for r in make_logic().scanCases()] == ["LGE"]


# -- colour from the terminology -----------------------------------------------------------------------------
def test_left_atrium_colour_comes_from_the_terminology(fake, make_logic):
    seg = segment(make_logic, add_case(fake, "colour"))
    assert seg.GetSegmentation().GetNthSegment(0).GetColor() == pytest.approx((203 / 255, 108 / 255, 81 / 255))
    types = fake.terminologiesLogic.types[("SCT", "123037004")]
    types[:] = [t if t[1] != "82471001" else t[:3] + ((10, 20, 30),) for t in types]
    seg = segment(make_logic, add_case(fake, "colour 2"))
    assert seg.GetSegmentation().GetNthSegment(0).GetColor() == pytest.approx((10 / 255, 20 / 255, 30 / 255))
    empty = segment(make_logic, add_case(fake, "nothing"), mode="empty")
    assert empty.GetSegmentation().GetNthSegment(0).GetColor() == pytest.approx((10 / 255, 20 / 255, 30 / 255))


def test_colour_falls_back_to_the_dicom_master_value_without_the_terminology_module(fake, monkeypatch):
    monkeypatch.delattr(fake.slicer.modules, "terminologies")
    assert nodes.terminologyColor() == pytest.approx((203 / 255, 108 / 255, 81 / 255))
    assert nodes.terminologyColor("not a terminology") == pytest.approx(nodes.LEFT_ATRIUM_COLOR)


# -- 5. nothing blocks the panel -----------------------------------------------------------------------------
def test_model_list_runs_in_the_background(fake, make_logic):
    logic = make_logic("slow-list")
    finished = []
    started = time.monotonic()
    call = logic.runInBackground("models list", logic.refreshModelsAndPresets, finished.append)
    assert time.monotonic() - started < 0.5 and call.busy  # returned at once; the child still runs
    deadline = time.monotonic() + TIMEOUT
    while logic.pollBackground() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert finished == [call] and call.error is None
    catalog, presets = call.result
    assert [e.id for e in catalog.ordered()] == [BASE, "la-meanteacher-v1.0.0"] and "caml" in presets
    assert logic.catalog is catalog


def test_background_errors_reach_the_main_thread(fake, make_logic):
    logic = make_logic()
    logic.refreshModels()
    call = logic.runInBackground("models remove", lambda: logic.removeModel(BASE))
    assert call.wait(TIMEOUT)
    assert isinstance(call.error, ValueError) and "bundled" in str(call.error)
    assert not logic.pollBackground()


def test_the_fine_tuning_dataset_is_written_one_case_per_poll_and_can_be_cancelled(fake, make_logic, tmp_path):
    a = add_case(fake, "Case A", seed=1)
    fake.addSegmentation("Case A segmentation", a, {"Left atrium": expected_label(a.array)})
    for index in range(3):
        add_case(fake, f"Scan {index}", seed=10 + index)
    logic = make_logic()
    job = logic.finetune(BASE, "mean_teacher", iterations=3, device="cpu")
    assert job.state is State.INITIALIZING and job.child is None  # nothing written on the click itself
    assert not os.path.exists(job.datasetPlan.datasetDir)
    assert logic.poll()
    assert os.listdir(os.path.join(job.datasetPlan.datasetDir, "imagesTr")) == ["Case_A_0000.nrrd"]
    assert job.state is State.INITIALIZING
    logic.cancel()
    assert job.state is State.CANCELLED and job.child is None and not logic.busy
    assert not os.path.exists(job.workDir)
    job = logic.finetune(BASE, "mean_teacher", iterations=3, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage


def test_a_finished_fine_tune_lists_the_models_off_the_main_thread(fake, make_logic, tmp_path):
    """Polled from the panel, a fine-tune never runs ``models list`` on the main thread; the panel re-reads
    the list through ``runInBackground`` (scripts that wait get it re-read by ``finetune`` itself)."""
    import json

    a = add_case(fake, "Case A", seed=1)
    fake.addSegmentation("Case A segmentation", a, {"Left atrium": expected_label(a.array)})
    calls = tmp_path / "calls.jsonl"
    logic = make_logic(SEMISEG_FAKE_CALLS=str(calls))
    job = logic.finetune(BASE, "supervised", iterations=3, device="cpu")
    deadline = time.monotonic() + TIMEOUT
    while logic.poll() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.state is State.FINISHED, job.errorMessage
    commands = [json.loads(line)["argv"] for line in calls.read_text().splitlines()]
    assert [c for c in commands if "models" in c] == []
    assert logic.catalog.get(job.result) is None  # not yet: the panel lists the models next, in the background
    assert logic.runInBackground("models list", logic.refreshModelsAndPresets).wait(TIMEOUT)
    assert logic.catalog.get(job.result) is not None


# -- panel state in the parameter node -----------------------------------------------------------------------
def test_panel_state_is_kept_in_the_parameter_node(fake, make_logic):
    volume = add_case(fake, "input")
    logic = make_logic()
    box = logic.createRegionBox(volume)
    logic.savePanelState(inputVolume=volume, Model=BASE, Device="cpu", Iterations=300, TimeBudgetMinutes=0,
                         Method="caml", BaseModel=BASE, Region="box", regionBox=box)
    parameterNode = logic.getParameterNode()
    assert parameterNode.GetScene() is fake.scene  # a scene node: saved with the scene
    again = make_logic().panelState()  # another logic (a reloaded module) reads the same node
    assert again == {"InputVolume": volume, "Model": BASE, "Device": "cpu", "Iterations": "300",
                     "TimeBudgetMinutes": "0", "Method": "caml", "BaseModel": BASE, "Region": "box",
                     "RegionBox": box}
    with pytest.raises(TypeError, match="Unknown panel parameters"):
        logic.savePanelState(Colour="red")
    fake.scene.Clear(0)
    assert make_logic().panelState()["InputVolume"] is None


# -- the real-Slicer self-test's model-free steps, run here against the stand-in -----------------------------
@pytest.mark.parametrize("name", ["test_transformed_volume_and_no_stray_nodes",
                                  "test_scene_close_forgets_case_choices", "test_region_box_to_voxels"])
def test_self_test_steps_run_against_the_stand_in(fake, module, name):
    """The same steps run inside Slicer (SemiSegLATest); here they at least run against the stand-in."""
    case = module.SemiSegLATest(name)
    case.setUp()
    getattr(case, name)()
    folders = list(case._scratchFolders)
    case.tearDown()
    assert bool(folders) == (name != "test_scene_close_forgets_case_choices")  # the two that write a file
    assert not any(os.path.exists(folder) for folder in folders)  # and leave nothing in the user's temp


def test_cancel_is_live_while_the_fine_tuning_dataset_is_written():
    from SemiSegLALib.state import CANCEL_TEXT, uiState

    view = uiState(State.INITIALIZING, "finetune")
    assert view.finetuneText == CANCEL_TEXT and view.finetuneEnabled and not view.inputsEnabled
    assert not uiState(State.INITIALIZING, "segment").segmentEnabled  # one write, nothing to cancel
