"""Slicer side, layer (c): SemiSegLAWidget (the real class) on the explicit ``qt``/``slicer`` stand-ins
(slicer_fake/fake_qt.py), driven through its buttons and timers, with the stand-in core in real processes."""

import pytest

import slicer_fake
from slicer_fake import fake_qt
from test_slicer_logic import BASE, add_case, labelled_scene

# isort: split
from SemiSegLALib.state import CANCEL_TEXT, FINETUNE_TEXT, SEGMENT_TEXT

TIMEOUT = 60
loop = fake_qt.EVENT_LOOP


class ReadyDependencies:
    """Everything installed (the dependency checks have their own tests)."""

    def status(self):
        return type("Status", (), {"ready": True, "describe": lambda self: "ready"})()


@pytest.fixture
def make_widget(fake, tmp_path):
    module = slicer_fake.loadModule()

    def make(mode=""):
        panel = fake_qt.FakeModulePanel()
        widget = module.SemiSegLAWidget(panel)
        widget.setup()
        logic = widget.logic
        logic.commandFactory = slicer_fake.fakeCommandFactory(mode)
        logic.tempRoot = str(tmp_path / "tmp")
        logic.dependencies = ReadyDependencies()
        panel.isEntered = True
        widget.enter()  # Slicer shows the panel: the model list loads in a worker thread
        loop.run(lambda: widget._modelsLoaded, TIMEOUT)
        return widget
    yield make


def idle(widget):
    return not widget.logic.busy and not widget.pollTimer.isActive() and not widget._modelsLoading \
        and not widget.callTimer.isActive()


def test_segment_through_the_panel(fake, make_widget):
    volume = add_case(fake, "LA_001")
    widget = make_widget()
    ui = widget.ui
    assert ui.modelComboBox.currentData == BASE and ui.deviceComboBox.count == 3
    assert ui.segmentButton.text == SEGMENT_TEXT and not ui.segmentButton.enabled  # no input yet
    ui.inputVolumeSelector.setCurrentNode(volume)
    assert ui.segmentButton.enabled
    ui.deviceComboBox.currentIndex = 2  # CPU
    ui.segmentButton.click()
    assert widget.pollTimer.isActive()
    assert ui.segmentButton.text == CANCEL_TEXT and ui.segmentButton.enabled
    assert not ui.finetuneButton.enabled and not ui.modelComboBox.enabled
    loop.run(lambda: idle(widget), TIMEOUT)
    assert ui.segmentButton.text == SEGMENT_TEXT
    seg = widget.job.result
    assert seg.GetName() == "LA_001 segmentation" and seg.GetScene() is fake.scene
    assert ui.show3DButton.segmentationNode is seg
    assert ui.statusLabel.text.startswith("'LA_001 segmentation' created.") and ui.statusLabel.styleSheet == ""
    assert ui.progressBar.value == 100 and "Running: " in ui.logTextEdit.toPlainText()
    assert "--device cpu" in ui.logTextEdit.toPlainText()
    # the new result is in the case table, not yet marked as corrected
    assert ui.caseTableWidget.rowCount() == 1
    corrected = ui.caseTableWidget.item(0, widget.CORRECTED_COLUMN)
    assert corrected.data(fake_qt.Qt.UserRole) == seg.GetID() and corrected.checkState() == fake_qt.Qt.Unchecked
    assert ui.caseTableWidget.item(0, 2).text() == "unlabelled"
    assert not fake.dialogs


def test_cancel_during_a_slow_segment_leaves_the_scene_unchanged(fake, make_widget):
    volume = add_case(fake, "LA_002")
    widget = make_widget("slow")
    ui = widget.ui
    ui.inputVolumeSelector.setCurrentNode(volume)
    before = fake.scene.fakeNodes()
    ui.segmentButton.click()
    loop.run(lambda: widget.job.tracker.stage == "predict", TIMEOUT)
    assert ui.segmentButton.text == CANCEL_TEXT
    ui.segmentButton.click()  # Cancel
    loop.run(lambda: idle(widget), TIMEOUT)
    assert widget.job.state.value == "Cancelled"
    assert ui.segmentButton.text == SEGMENT_TEXT and ui.segmentButton.enabled
    assert ui.finetuneButton.enabled and ui.modelComboBox.enabled
    assert fake.scene.fakeNodes() == before
    assert ui.statusLabel.text == "Cancelled; the scene is unchanged." and ui.progressBar.value == 0


def finetune(fake, widget, iterations=6):
    ui = widget.ui
    ui.finetuneCollapsibleButton.collapsed = True
    ui.finetuneCollapsibleButton.collapsed = False  # expanding the section lists the cases
    assert [ui.caseTableWidget.item(r, 2).text() for r in range(ui.caseTableWidget.rowCount())] == [
        "labelled", "unlabelled", "invalid"]
    ui.methodComboBox.currentIndex = ui.methodComboBox.findData("mean_teacher")
    ui.iterationsSpinBox.value = iterations
    ui.timeBudgetSpinBox.value = 0
    ui.modelNameLineEdit.text = "site"
    ui.deviceComboBox.currentIndex = 2
    ui.finetuneButton.click()
    assert widget.pollTimer.isActive() and ui.finetuneButton.text == CANCEL_TEXT
    assert not ui.segmentButton.enabled
    loop.run(lambda: idle(widget) and widget.job.isDone, TIMEOUT)
    assert widget.job.state.value == "Finished", widget.job.errorMessage
    assert ui.finetuneButton.text == FINETUNE_TEXT and ui.finetuneButton.enabled


def test_finetune_selects_the_new_model(fake, make_widget):
    labelled_scene(fake)
    widget = make_widget()
    finetune(fake, widget)
    ui = widget.ui
    assert widget.job.result == "site-v0.0.1"
    assert ui.modelComboBox.currentData == "site-v0.0.1" and ui.baseModelComboBox.currentData == "site-v0.0.1"
    assert ui.statusLabel.text.startswith("New model site-v0.0.1 (Mean Teacher, parent la-caml-v1.0.0")
    assert ui.revertToBaseButton.enabled
    assert not [d for d in fake.dialogs if d[0] != "confirmOkCancel"]


def test_finetune_worse_than_its_parent_keeps_the_parent_selected(fake, make_widget):
    labelled_scene(fake)
    widget = make_widget("guard-worse")
    ui = widget.ui
    assert ui.baseModelComboBox.currentData == BASE
    finetune(fake, widget)
    assert widget.job.result == "site-v0.0.1" and widget.job.guardWarning
    assert ui.modelComboBox.currentData == BASE and ui.baseModelComboBox.currentData == BASE
    assert ui.modelComboBox.findData("site-v0.0.1") >= 0  # the new model is kept in the list
    assert ui.statusLabel.text == widget.job.guardWarning and ui.statusLabel.styleSheet
    assert f"worse than its parent {BASE}" in ui.statusLabel.text and "(Dice 0.610 vs 0.850)" in ui.statusLabel.text
    warnings = [d for d in fake.dialogs if d[0] == "warning"]
    assert warnings == [("warning", widget.job.guardWarning, "SemiSegLA: fine-tuned model not selected")]
    assert widget.logic.panelState()["Model"] == BASE


def test_close_scene_forgets_the_case_table_choices(fake, make_widget):
    a, seg, b, c, other, mask = labelled_scene(fake)
    widget = make_widget()
    ui = widget.ui
    widget.refreshCases()
    table = ui.caseTableWidget
    # untick Use for Case B, and pair Case A with no segmentation
    table.item(1, 0).setCheckState(fake_qt.Qt.Unchecked)
    combo = table.cellWidget(0, 3)
    combo.currentIndex = combo.findData("")
    loop.tick()
    assert [table.item(r, 2).text() for r in range(table.rowCount())] == ["unlabelled", "excluded", "invalid"]
    ids = [a.GetID(), b.GetID()]
    fake.scene.Clear(0)  # File > Close Scene
    assert table.rowCount() == 0 and ui.casesSummaryLabel.text
    loop.tick()
    # new volumes get the old IDs; the old choices must not come back
    a2 = add_case(fake, "New A", seed=4)
    fake.addSegmentation("New A segmentation", a2, {"Left atrium": mask})
    b2 = add_case(fake, "New B", seed=5)
    assert [a2.GetID(), b2.GetID()] == ids
    widget.refreshCases()
    assert [table.item(r, 2).text() for r in range(table.rowCount())] == ["labelled", "unlabelled"]
    assert table.item(1, 0).checkState() == fake_qt.Qt.Checked
    assert table.cellWidget(0, 3).currentData == "auto"
