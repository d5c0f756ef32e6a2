"""Slicer side: the Region row (issue 14): Automatic, Box (a markups ROI) or Whole volume.

The box a user draws is in RAS under its own parent transform; the core wants voxel indices of the file the
module wrote. These tests check that conversion against a brute-force count of the voxels that lie wholly in
the box (Slicer's Crop Volume rule), for an oblique, anisotropic volume under one transform and a box under
another; that an automatic run shows the box it used and that moving it makes the next run use it; that
"no atrium found" says what to do in Slicer's words and offers a box; and that warnings reach the user.
"""

import itertools
import json

import numpy as np
import pytest

import slicer_fake
from conftest import rotation
from slicer_fake import fake_qt
from test_slicer_issue15 import MOVE, add_case, rigid
from test_slicer_logic import BASE, SPACING, TIMEOUT, expected_label
from test_slicer_widget import idle, make_widget  # noqa: F401  (make_widget is a fixture)

# isort: split
from SemiSegLALib import geometry, nodes
from SemiSegLALib import region as regionMath
from SemiSegLALib.commands import regionArguments
from SemiSegLALib.state import State

loop = fake_qt.EVENT_LOOP
OBLIQUE = rotation([1, 2, 3], 25)
ORIGIN = (-12.5, 30.0, 7.25)


OTHER = rigid([1, 0, 0], -20, (-7.0, 3.0, 15.0))  # a different transform the user put the box under


def world_of(node):
    return slicer_fake.fake_slicer.worldFromNode(node)


def box_on_voxels(fake, volume, box, name="user box", transform=None, slack=0.2):
    """A user's ROI, under ``transform``, whose faces lie ``slack`` voxels outside the outer faces of the
    voxel box: placed by hand, not on the grid exactly."""
    ijkToRas = volume.geometry.ijkToRas()
    lower = np.array(box[:3], float) - 0.5 - slack
    upper = np.array(box[3:], float) - 0.5 + slack
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    centre_world = world_of(volume) @ ijkToRas @ np.r_[(lower + upper) / 2, 1.0]
    axes_world = world_of(volume)[:3, :3] @ (ijkToRas[:3, :3] / spacing)
    roi = fake.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    if transform is not None:
        roi.SetAndObserveTransformNodeID(transform.GetID())
    node_from_world = np.linalg.inv(world_of(roi))
    objectToNode = np.eye(4)
    objectToNode[:3, :3] = node_from_world[:3, :3] @ axes_world
    objectToNode[:3, 3] = (node_from_world @ centre_world)[:3]
    roi.SetSize(*((upper - lower) * spacing))
    roi.SetAndObserveObjectToNodeMatrix(fake.slicer.util.vtkMatrixFromArray(objectToNode))
    return roi


def voxels_wholly_inside(volume, roi):
    """Brute force: every voxel whose 8 corners (in world coordinates) lie inside the ROI."""
    shape = volume.array.shape[::-1]  # i, j, k
    world_from_ijk = world_of(volume) @ volume.geometry.ijkToRas()
    object_from_world = np.linalg.inv(world_of(roi) @ roi.objectToNode())
    half = np.array(roi.GetSize()) / 2 + 1e-6
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    inside = np.ones(len(ijk), bool)
    for offset in itertools.product((-0.5, 0.5), repeat=3):
        corners = np.c_[ijk + offset, np.ones(len(ijk))] @ (object_from_world @ world_from_ijk).T
        inside &= np.all(np.abs(corners[:, :3]) <= half, axis=1)
    return ijk[inside].astype(int)


def calls_of(path):
    return [json.loads(line)["argv"] for line in path.read_text().splitlines()]


def region_argument(argv):
    if "--region" not in argv:
        return None
    start = argv.index("--region") + 1
    words = []
    for word in argv[start:]:
        if word.startswith("--"):
            break
        words.append(word)
    return words


# -- the arithmetic (region.py) -----------------------------------------------------------------------------
@pytest.mark.parametrize("directions", [np.eye(3), OBLIQUE, OBLIQUE @ np.diag([1, -1, 1])],
                         ids=["identity", "oblique", "left-handed"])
def test_a_voxel_box_round_trips_through_the_box_drawn_for_it(directions):
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = directions @ np.diag(SPACING)
    ijkToRas[:3, 3] = ORIGIN
    box = [3, 1, 2, 17, 19, 9]
    objectToNode, size = regionMath.roiOfVoxelBox(box, ijkToRas)
    assert np.linalg.det(objectToNode[:3, :3]) == pytest.approx(1.0)  # a rotation, even for a left-handed grid
    assert size == pytest.approx([14 * SPACING[0], 18 * SPACING[1], 7 * SPACING[2]])
    assert regionMath.voxelBoxOfRoi(objectToNode, size, np.eye(4), ijkToRas, (24, 20, 12)) == box
    # a box reaching past the image is clipped to it; one beside it holds nothing
    far = objectToNode.copy()
    far[:3, 3] += ijkToRas[:3, :3] @ np.array([0.0, 0.0, 40.0])
    with pytest.raises(regionMath.RegionError, match="no whole voxel"):
        regionMath.voxelBoxOfRoi(far, size, np.eye(4), ijkToRas, (24, 20, 12))
    assert regionMath.voxelBoxOfRoi(objectToNode, [s * 3 for s in size], np.eye(4), ijkToRas,
                                    (24, 20, 12)) == [0, 0, 0, 24, 20, 12]


def test_the_grid_comes_from_the_written_files_header(fake, tmp_path):
    volume = add_case(fake, "header")
    path = str(tmp_path / "v.nrrd")
    nodes.writeVolumeNode(volume, path)
    np.testing.assert_allclose(regionMath.ijkToRasFromGrid(geometry.gridFromNrrd(path)),
                               volume.geometry.ijkToRas(), atol=1e-9)


def test_region_arguments_for_the_core():
    assert regionArguments(None) == [] and regionArguments("auto") == []  # the core's default
    assert regionArguments("whole") == ["--region", "whole"]
    assert regionArguments([1, 2, 3, 10, 11, 12]) == ["--region", "1", "2", "3", "10", "11", "12"]
    for bad in ([1, 2, 3], [5, 2, 3, 4, 11, 12], "everything"):
        with pytest.raises(ValueError):
            regionArguments(bad)


def test_core_messages_are_worded_for_slicer_users():
    text = "/tmp/ssla/seg1/input.nrrd: no left atrium found; give a region with --region"
    assert regionMath.forSlicerUsers(text, "/tmp/ssla/seg1/input.nrrd", "LA 7") == (
        "'LA 7': no left atrium found; set Region to Box, place the box around the left atrium and click "
        "Segment atrium again")


# -- a user box -> the voxel box the core gets ----------------------------------------------------------------
def test_a_user_box_under_its_own_transform_becomes_the_right_voxel_box(fake, make_logic, tmp_path, monkeypatch):
    """Oblique, anisotropic volume under a registration; the box under another transform."""
    volume_transform = fake.addTransform(MOVE, "registration")
    box_transform = fake.addTransform(OTHER, "box frame")
    volume = add_case(fake, "LA_box", transform=volume_transform)
    wanted = [4, 3, 2, 19, 15, 9]
    roi = box_on_voxels(fake, volume, wanted, transform=box_transform)
    # independent of the module: the voxels that lie wholly inside the box are exactly the wanted box
    inside = voxels_wholly_inside(volume, roi)
    assert inside.min(axis=0).tolist() + (inside.max(axis=0) + 1).tolist() == wanted
    assert len(inside) == np.prod(np.subtract(wanted[3:], wanted[:3]))

    calls = tmp_path / "calls.jsonl"
    logic = make_logic(SEMISEG_FAKE_CALLS=str(calls))
    job = logic.segment(volume, BASE, device="cpu", region=roi, waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert region_argument(calls_of(calls)[-1]) == [str(v) for v in wanted]
    assert job.regionBox == wanted and job.region.source == "box" and job.region.box == wanted
    assert job.regionNode is roi
    # the segment lies inside the box only, on the volume's grid, under its transform
    mask = job.result.GetSegmentation().GetNthSegment(0).mask
    expected = np.zeros_like(mask)
    expected[wanted[2]:wanted[5], wanted[1]:wanted[4], wanted[0]:wanted[3]] = True
    np.testing.assert_array_equal(mask, expected_label(volume.array) & expected)
    assert job.result.GetTransformNodeID() == volume_transform.GetID()
    # the user's box is left as it was; no other box was made
    assert [n for n in fake.scene.fakeNodes() if n.IsA("vtkMRMLMarkupsROINode")] == [roi]


def test_a_box_beside_the_volume_is_refused_before_anything_runs(fake, make_logic, tmp_path):
    volume = add_case(fake, "LA_beside")
    roi = box_on_voxels(fake, volume, [0, 0, 20, 5, 5, 25], name="far box")  # slices 20-24 of 12
    with pytest.raises(ValueError, match="The box 'far box' cannot be used for 'LA_beside': it holds no whole "
                                         "voxel"):
        make_logic().segment(volume, BASE, device="cpu", region=roi)
    with pytest.raises(ValueError, match="Region is Box"):
        make_logic().segment(volume, BASE, device="cpu", region="box")


def test_whole_volume_and_a_voxel_box_go_to_the_core(fake, make_logic, tmp_path):
    volume = add_case(fake, "LA_whole")
    calls = tmp_path / "calls.jsonl"
    logic = make_logic(SEMISEG_FAKE_CALLS=str(calls))
    job = logic.segment(volume, BASE, device="cpu", region="whole", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED and job.region.source == "whole"
    job = logic.segment(volume, BASE, device="cpu", region=[0, 0, 0, 12, 10, 6], waitForCompletion=True,
                        timeout=TIMEOUT)
    assert job.state is State.FINISHED and job.region.box == [0, 0, 0, 12, 10, 6]
    job = logic.segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert [region_argument(argv) for argv in calls_of(calls)] == [["whole"], ["0", "0", "0", "12", "10", "6"], None]
    assert job.region.source == "whole" and job.regionNode is None  # auto chose the whole (small) image


def test_create_box_is_a_typical_atrium_box_on_the_volume_under_its_transform(fake, make_logic, tmp_path):
    transform = fake.addTransform(MOVE, "registration")
    array = np.zeros((50, 160, 170), np.float32)  # k, j, i: 170 x 160 x 50 voxels
    spacing = (0.8, 0.8, 2.0)  # 136 x 128 x 100 mm
    volume = fake.addVolume("big", array, spacing, ORIGIN, OBLIQUE, transform=transform)
    roi = make_logic().createRegionBox(volume)
    assert roi.GetName() == "big box" and roi.GetScene() is fake.scene
    assert roi.GetTransformNodeID() == transform.GetID()  # drawn where the volume is shown
    assert roi.GetDisplayNode().IsA("vtkMRMLMarkupsROIDisplayNode")
    # centred on the volume, aligned with its axes; 100 mm across R-L and A-P, 80 mm S-I
    centre = volume.geometry.ijkToRas() @ np.r_[(np.array(array.shape[::-1]) - 1) / 2, 1]
    np.testing.assert_allclose(roi.objectToNode()[:3, 3], centre[:3], atol=1e-9)
    np.testing.assert_allclose(roi.objectToNode()[:3, :3], OBLIQUE, atol=1e-9)
    assert np.argmax(np.abs(OBLIQUE[:, 2])) == 2  # the k axis runs closest to S-I here
    assert roi.GetSize() == pytest.approx((100.0, 100.0, 80.0))
    # on a volume smaller than that, the box is the volume's size
    small = add_case(fake, "small")
    small_box = make_logic().createRegionBox(small)
    assert small_box.GetSize() == pytest.approx([24 * SPACING[0], 20 * SPACING[1], 12 * SPACING[2]])
    path = str(tmp_path / "small.nrrd")
    nodes.writeVolumeNode(small, path)
    assert nodes.voxelBoxOfRoi(small_box, small, path) == [0, 0, 0, 24, 20, 12]


# -- automatic --------------------------------------------------------------------------------------------------
def test_an_automatic_run_shows_the_box_it_used(fake, make_logic, tmp_path):
    transform = fake.addTransform(MOVE, "registration")
    volume = add_case(fake, "LA_auto", transform=transform)
    logic = make_logic("localiser")
    job = logic.segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    found = [6, 5, 3, 18, 15, 9]  # what the stand-in core's localiser reports for 24 x 20 x 12 voxels
    assert job.region.source == "auto" and job.region.box == found and job.region.foundVolumeMl == 52.0
    roi = job.regionNode
    assert roi.GetName() == "LA_auto region" and roi.IsA("vtkMRMLMarkupsROINode")
    assert roi.GetTransformNodeID() == transform.GetID()
    assert nodes.automaticRegionNode(volume) is roi
    sh = fake.scene.subjectHierarchy
    assert sh.GetItemParent(sh.GetItemByDataNode(roi)) == sh.GetItemParent(sh.GetItemByDataNode(volume))
    # its faces are the outer faces of exactly those voxels: converting it back gives the same box
    assert voxels_wholly_inside(volume, roi).min(axis=0).tolist() == found[:3]
    assert (voxels_wholly_inside(volume, roi).max(axis=0) + 1).tolist() == found[3:]
    path = str(tmp_path / "again.nrrd")
    nodes.writeVolumeNode(volume, path)
    assert nodes.voxelBoxOfRoi(roi, volume, path) == found
    # the first and last voxel centres the core reports (LPS) lie half a voxel inside the box's corners
    ijkToRas = volume.geometry.ijkToRas()
    for corner, index in zip(job.region.cornersLps, (found[:3], np.subtract(found[3:], 1))):
        np.testing.assert_allclose(np.diag([-1, -1, 1]) @ corner, (ijkToRas @ np.r_[index, 1])[:3], atol=1e-3)
    assert any(line.startswith("Region: found automatically: voxels 6-17 x 5-14 x 3-8, atrium 52 mL")
               for line in job.logLines)
    # a second automatic run moves the same box instead of adding one
    job = logic.segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.regionNode is roi
    assert len([n for n in fake.scene.fakeNodes() if n.IsA("vtkMRMLMarkupsROINode")]) == 1


def test_no_atrium_found_is_a_region_error_in_slicer_words(fake, make_logic):
    volume = add_case(fake, "LA_none")
    job = make_logic("no-atrium").segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FAILED and job.errorKind == "region" and job.returnCode == 5
    assert job.errorMessage == ("'LA_none': no left atrium found; set Region to Box, place the box around the left "
                                "atrium and click Segment atrium again")
    assert "--region" not in job.summary() and "input.nrrd" not in job.summary()
    assert any("give a region with --region" in line for line in job.logLines)  # the log keeps the core's words
    assert fake.scene.fakeNodes() == [volume]


def test_warnings_are_kept_for_the_user(fake, make_logic):
    volume = add_case(fake, "LA_two")
    job = make_logic("localiser,two-candidates").segment(volume, BASE, device="cpu", waitForCompletion=True,
                                                         timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert job.warnings == ["2 atrium-like regions found; segmented the largest. If it is not the left atrium, set "
                            "Region to Box, place the box around the left atrium and click Segment atrium again"]
    assert job.region.candidates == 2


def segmentations(fake):
    return [n for n in fake.scene.fakeNodes() if n.IsA("vtkMRMLSegmentationNode")]


def test_an_uncertain_result_comes_with_its_first_pass_beside_it(fake, make_logic, tmp_path, monkeypatch):
    """The core warns that the result and the first pass that settled its region differ and writes that pass
    (`--first-pass-out`, asked for on an automatic region only): it is added beside the volume as another model's
    automatic result, never a label, and the case table keeps the volume paired with its own result."""
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("SEMISEG_FAKE_CALLS", str(calls))
    volume = add_case(fake, "LA_unsure")
    logic = make_logic("localiser,uncertain")
    job = logic.segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert "--first-pass-out" in calls_of(calls)[-1]
    first, result = job.firstPassNode, job.result
    assert first.GetName() == f"LA_unsure: {BASE} (first pass)" and set(segmentations(fake)) == {first, result}
    assert nodes.isAutomaticResult(first) and not nodes.isReviewed(first) and nodes.isComparison(first)
    assert not nodes.isComparison(result)
    assert first.GetNodeReference(first.GetReferenceImageGeometryReferenceRole()) is volume
    expected = result.GetSegmentation().GetNthSegment(0).mask.copy()
    expected[:, :, 12:] = 0  # the stand-in core's first pass: the result in the first half of the box along i
    np.testing.assert_array_equal(first.GetSegmentation().GetNthSegment(0).mask, expected)
    assert first.GetSegmentation().GetNthSegment(0).GetColor() == pytest.approx(nodes.PARENT_RESULT_COLOR)
    assert job.firstPassNotice == (f"The first pass it was compared with (Dice 0.62 between the two), by {BASE}, is "
                                   f"beside it as 'LA_unsure: {BASE} (first pass)': compare the two where they "
                                   "differ; either may be the better one.")
    assert [r.segmentationId for r in logic.scanCases()] == [result.GetID()]
    # a box given: no first pass asked for; a result that is not uncertain: nothing added beside it
    box = box_on_voxels(fake, volume, [2, 2, 2, 20, 16, 10])
    job = logic.segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT, region=box)
    assert job.state is State.FINISHED and "--first-pass-out" not in calls_of(calls)[-1]
    job = make_logic("localiser").segment(volume, BASE, device="cpu", waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED and job.firstPassNode is None and job.firstPassNotice is None
    assert len(segmentations(fake)) == 4


def test_a_first_pass_off_the_volume_grid_is_skipped(fake, make_logic):
    volume = add_case(fake, "LA_offgrid")
    job = make_logic("localiser,uncertain,bad-first-pass-grid").segment(volume, BASE, device="cpu",
                                                                       waitForCompletion=True, timeout=TIMEOUT)
    assert job.state is State.FINISHED, job.errorMessage
    assert job.firstPassNode is None and segmentations(fake) == [job.result]
    assert any(line.startswith("The first pass was not added beside the result") for line in job.logLines)
    assert job.warnings and job.warnings[0].startswith("the result is uncertain on this scan")


def click_segment(widget):
    """Segment atrium, as a user clicks it, and wait until the job has ended."""
    widget.ui.segmentButton.click()
    loop.run(lambda: idle(widget), TIMEOUT)


# -- the panel ------------------------------------------------------------------------------------------------
def test_move_the_automatic_box_and_segment_again_in_one_click(fake, make_widget, tmp_path, monkeypatch):  # noqa: F811
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("SEMISEG_FAKE_CALLS", str(calls))
    volume = add_case(fake, "LA_panel")
    widget = make_widget("localiser")
    ui = widget.ui
    assert ui.regionComboBox.currentText == "Automatic" and ui.regionComboBox.count == 3
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.segmentButton.click()
    assert not ui.regionComboBox.enabled and not ui.createBoxButton.enabled  # inputs are locked while it runs
    loop.run(lambda: idle(widget), TIMEOUT)
    roi = widget.job.regionNode
    assert roi.GetName() == "LA_panel region"
    # shown and selected, but Region stays Automatic (the next volume is found automatically too)
    assert ui.regionBoxSelector.currentNode() is roi and widget.regionChoice() == "auto"
    assert ui.statusLabel.text.startswith("'LA_panel segmentation' created.")
    assert "shown as 'LA_panel region': if it misses the atrium, move or resize it" in ui.statusLabel.text
    assert widget.logic.panelState()["Region"] == "auto"
    # a change that does not move it (a new name) changes nothing
    roi.SetName("renamed region")
    roi.Modified()
    assert widget.regionChoice() == "auto"
    # the user enlarges it: Region becomes Box with it; Segment atrium is the one click left
    roi.SetSize(*[s + 2 * v for s, v in zip(roi.GetSize(), SPACING)])  # one voxel more on every side
    assert widget.regionChoice() == "box" and ui.regionBoxSelector.currentNode() is roi
    assert "Region is now Box" in ui.statusLabel.text
    assert widget.logic.panelState()["Region"] == "box" and widget.logic.panelState()["RegionBox"] is roi
    click_segment(widget)
    assert widget.job.state is State.FINISHED, widget.job.errorMessage
    assert region_argument(calls_of(calls)[-1]) == ["5", "4", "2", "19", "16", "10"]
    assert widget.job.region.source == "box"


def test_no_atrium_found_offers_a_box(fake, make_widget):  # noqa: F811
    volume = add_case(fake, "LA_offer")
    widget = make_widget("no-atrium")
    ui = widget.ui
    ui.inputVolumeSelector.setCurrentNode(volume)
    click_segment(widget)
    assert widget.job.state is State.FAILED
    kinds = [d[0] for d in fake.dialogs]
    assert kinds == ["confirmOkCancel"]  # the offer, not an error dialog
    _, question, title = fake.dialogs[0]
    assert question.startswith("'LA_offer': no left atrium found; set Region to Box, place the box around the left "
                               "atrium and click Segment atrium again")
    assert "Place a box around the left atrium now?" in question and "100 x 100 x 80 mm" in question
    assert title == "SemiSegLA: no left atrium found"
    roi = ui.regionBoxSelector.currentNode()
    assert roi is not None and roi.GetName() == "LA_offer box" and widget.regionChoice() == "box"
    assert ui.statusLabel.text == "Move and resize 'LA_offer box' around the left atrium, then click Segment atrium."
    # declined: the message stays, nothing is created
    fake.confirmAnswer = False
    fake.dialogs.clear()
    ui.regionBoxSelector.setCurrentNode(None)
    ui.regionComboBox.currentIndex = 0
    click_segment(widget)
    assert [d[0] for d in fake.dialogs] == ["confirmOkCancel"]
    assert ui.statusLabel.text.startswith("Failed: 'LA_offer': no left atrium found; set Region to Box")
    assert widget.regionChoice() == "auto"
    assert len([n for n in fake.scene.fakeNodes() if n.IsA("vtkMRMLMarkupsROINode")]) == 1


def test_warnings_reach_the_status_line_and_a_dialog(fake, make_widget):  # noqa: F811
    volume = add_case(fake, "LA_warn")
    widget = make_widget("localiser,two-candidates")
    ui = widget.ui
    ui.inputVolumeSelector.setCurrentNode(volume)
    click_segment(widget)
    assert widget.job.state is State.FINISHED, widget.job.errorMessage
    status = ui.statusLabel.text
    assert status.startswith("'LA_warn segmentation' created. Check it: 2 atrium-like regions found; segmented the "
                             "largest. If it is not the left atrium, set Region to Box")
    assert "--region" not in status and ui.statusLabel.styleSheet == "color: #b9770e;"
    assert [d[0] for d in fake.dialogs] == ["warning"]
    assert "2 atrium-like regions found" in fake.dialogs[0][1]


def test_an_uncertain_result_names_its_first_pass_in_the_status_and_dialog(fake, make_widget):  # noqa: F811
    volume = add_case(fake, "LA_doubt")
    widget = make_widget("localiser,uncertain")
    widget.ui.inputVolumeSelector.setCurrentNode(volume)
    click_segment(widget)
    assert widget.job.state is State.FINISHED, widget.job.errorMessage
    status = widget.ui.statusLabel.text
    assert status.startswith("'LA_doubt segmentation' created. Check it: the result is uncertain on this scan")
    assert f"is beside it as 'LA_doubt: {BASE} (first pass)': compare the two where they differ" in status
    assert [d[0] for d in fake.dialogs] == ["warning"] and "(first pass)" in fake.dialogs[0][1]


def test_create_box_button_and_box_choice(fake, make_widget, tmp_path, monkeypatch):  # noqa: F811
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("SEMISEG_FAKE_CALLS", str(calls))
    volume = add_case(fake, "LA_button")
    widget = make_widget()
    ui = widget.ui
    assert not ui.createBoxButton.enabled  # no input volume yet
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.regionComboBox.currentIndex = 1  # Box, without a box
    ui.segmentButton.click()
    assert widget.job is None
    assert ui.statusLabel.text == "Region is Box: choose a box, or click Create box to place one."
    ui.regionComboBox.currentIndex = 0
    ui.createBoxButton.click()
    roi = ui.regionBoxSelector.currentNode()
    assert roi.GetName() == "LA_button box" and widget.regionChoice() == "box"
    assert "move and resize it around the left atrium" in ui.statusLabel.text
    click_segment(widget)
    assert widget.job.state is State.FINISHED, widget.job.errorMessage
    assert region_argument(calls_of(calls)[-1]) == ["0", "0", "0", "24", "20", "12"]  # the small volume, whole
    # picking a box in the selector means Box; Whole volume is passed as such
    ui.regionComboBox.currentIndex = 2
    click_segment(widget)
    assert region_argument(calls_of(calls)[-1]) == ["whole"]
    ui.regionBoxSelector.setCurrentNode(None)
    ui.regionBoxSelector.setCurrentNode(roi)
    assert widget.regionChoice() == "box"


def test_region_choice_is_restored_and_reset_by_close_scene(fake, make_widget):  # noqa: F811
    volume = add_case(fake, "LA_state")
    widget = make_widget()
    ui = widget.ui
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.createBoxButton.click()
    roi = ui.regionBoxSelector.currentNode()
    ui.regionComboBox.currentIndex = 0
    ui.regionBoxSelector.setCurrentNode(None)
    widget.restorePanelState()  # e.g. entering the module again: the parameter node's choices
    assert widget.regionChoice() == "auto"
    state = widget.logic.panelState()
    assert state["Region"] == "auto" and state["RegionBox"] is None
    ui.regionBoxSelector.setCurrentNode(roi)
    assert widget.logic.panelState()["Region"] == "box"
    ui.regionComboBox.currentIndex = 2
    ui.regionBoxSelector.setCurrentNode(None)
    ui.regionComboBox.currentIndex = 1
    widget.logic.savePanelState(inputVolume=volume, Region="box", regionBox=roi)
    widget.restorePanelState()
    assert widget.regionChoice() == "box" and ui.regionBoxSelector.currentNode() is roi
    fake.scene.Clear(0)
    assert widget.regionChoice() == "auto" and ui.regionBoxSelector.currentNode() is None
