"""SemiSegLA: semi-supervised left-atrium segmentation of 3D LGE-MRI in 3D Slicer.

A thin Slicer layer over the headless core (``semiseg_la``, run as ``semiseg-la`` in a child process):
this file moves volumes and segmentations between MRML nodes and files, drives the panel and watches the
child. It must stay Python 3.9-compatible (Slicer 5.8) and never imports torch.
"""

import contextlib
import importlib
import logging
import os
import sys
from typing import List, Optional

import qt
import slicer
from SemiSegLALib import cases as caseRules
from SemiSegLALib import geometry, nodes
from SemiSegLALib.catalog import DEFAULT_METHOD_PRESETS, Catalog, CatalogError, methodLabel, parsePresetsJson
from SemiSegLALib.commands import CommandFactory
from SemiSegLALib.dependencies import DependencyError, DependencyManager
from SemiSegLALib.events import Signal
from SemiSegLALib.jobs import Job
from SemiSegLALib.paths import newWorkDir, shortAsciiTempRoot
from SemiSegLALib.process import ProcessRunner, ProcessStartError
from SemiSegLALib.progress import oneLine
from SemiSegLALib.state import State, uiState
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
SETTINGS_PREFIX = "SemiSegLA/"
DEVICE_CHOICES = ("auto", "cuda", "cpu")  # order of the deviceComboBox items
LIB_MODULES = ("events", "progress", "state", "commands", "process", "paths", "geometry", "catalog", "cases",
               "dependencies", "jobs", "nodes")


@contextlib.contextmanager
def _waitCursor():
    """Busy cursor around short synchronous work (model list, installs)."""
    slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        yield
    finally:
        slicer.app.restoreOverrideCursor()


#
# SemiSegLA
#


class SemiSegLA(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SemiSegLA")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SemiSegLA contributors"]
        self.parent.helpText = _(
            "Segment the left atrium in 3D LGE-MRI with semi-supervised models, edit the result in Segment "
            "Editor, and fine-tune a local model from a few corrected cases plus unlabelled scans. The "
            "computation runs in a separate process (GPU or CPU); the result is a segmentation on the input's "
            "exact grid with the standard Left atrium terminology (SNOMED CT 82471001)."
            "<p>Methods: CAML (Gao et al., Correlation-Aware Mutual Learning for Semi-supervised Medical "
            "Image Segmentation, MICCAI 2023); Semi-CML with PReL (Zhang et al., Multi-modal contrastive "
            "mutual learning and pseudo-label re-learning for semi-supervised medical image segmentation, "
            "Medical Image Analysis 83:102656, 2023); CRLN (Wang et al., Cooperative Rectification Learning "
            "Network, arXiv 2502.11456, 2025). Data benchmark: Xiong et al., A global benchmark of algorithms "
            "for segmenting the left atrium from late gadolinium-enhanced cardiac magnetic resonance imaging, "
            "Medical Image Analysis 2021.</p>"
            "<p>Not a medical device: results must be reviewed by a qualified person.</p>")
        self.parent.acknowledgementText = _(
            "SemiSegLA re-implements the published methods on a shared V-Net; it follows the patterns of the "
            "SlicerMONAIAuto3DSeg, SlicerTotalSegmentator and SlicerNNUnet extensions.")


#
# SemiSegLALogic
#


def _defaultCommandFactory() -> CommandFactory:
    """``PythonSlicer -m semiseg_la.cli.main`` with Slicer's startup environment when PythonSlicer exists."""
    import shutil

    pythonSlicer = shutil.which("PythonSlicer")
    if pythonSlicer:
        return CommandFactory(pythonSlicer, baseEnvironment=slicer.util.startupEnvironment)
    return CommandFactory(sys.executable)


class SemiSegLALogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from scripts and tests; no Qt widgets here.

    The process runner, the command factory (which Python and entry point run the core), the temporary
    folder and the dependency manager are constructor arguments, so tests inject a stand-in core and
    scripts can point at another installation.
    """

    def __init__(self, runner=None, commandFactory: Optional[CommandFactory] = None,
                 tempRoot: Optional[str] = None, keepTempFiles: bool = False,
                 dependencyManager: Optional[DependencyManager] = None, listTimeoutSeconds: float = 180.0):
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner = runner or ProcessRunner()
        self.commandFactory = commandFactory or _defaultCommandFactory()
        self.tempRoot = tempRoot
        self.keepTempFiles = keepTempFiles
        self.dependencies = dependencyManager
        self.listTimeoutSeconds = listTimeoutSeconds
        self.activeJob: Optional[Job] = None
        self.catalog = Catalog()
        self.methodPresets: List[str] = list(DEFAULT_METHOD_PRESETS)
        self.pairing = {}  # volume id -> segmentation id ("" = none) chosen by the user
        self.excluded = set()  # volume ids the user left out of fine-tuning
        self.jobCreated = Signal("jobCreated")  # (job), emitted before the job starts

    # -- temporary folders ----------------------------------------------------------------------------
    def _workDir(self, prefix: str) -> str:
        root = self.tempRoot or shortAsciiTempRoot([slicer.app.temporaryPath])
        return newWorkDir(root, prefix)

    def _cleanupFor(self, workDir: str):
        import shutil

        def cleanup(job: Job) -> None:
            if self.keepTempFiles:
                job.log(f"Temporary files kept in {workDir}")
                return
            shutil.rmtree(workDir, ignore_errors=True)
        return cleanup

    def _startJob(self, job: Job, waitForCompletion: bool, timeout: Optional[float]) -> Job:
        self.activeJob = job
        self.jobCreated.emit(job)
        job.start()
        if waitForCompletion:
            job.wait(timeout=timeout)
        return job

    def _checkIdle(self) -> None:
        if self.activeJob is not None and self.activeJob.isBusy:
            raise RuntimeError("SemiSegLA is busy: wait for the current run to finish, or cancel it")

    @property
    def busy(self) -> bool:
        return self.activeJob is not None and self.activeJob.isBusy

    def poll(self) -> bool:
        """Advance the active job (the widget calls this from a QTimer); True while busy."""
        return self.activeJob.poll() if self.activeJob is not None else False

    def cancel(self) -> None:
        if self.activeJob is not None:
            self.activeJob.cancel()

    # -- models ----------------------------------------------------------------------------------------
    def _run(self, spec, what: str):
        try:
            result = self.runner.run(spec.argv, spec.env, timeout=self.listTimeoutSeconds)
        except ProcessStartError as exc:
            raise RuntimeError(str(exc)) from exc
        if result.timedOut:
            raise RuntimeError(f"'{what}' did not answer within {self.listTimeoutSeconds:.0f} s")
        return result

    @staticmethod
    def _commandError(result, what: str) -> str:
        for text in (result.stderr, result.stdout):
            lines = [line for line in text.splitlines() if line.strip()]
            if lines:
                return oneLine(lines[-1])
        return f"'{what}' failed with exit code {result.returncode}"

    def refreshModels(self) -> Catalog:
        """Read ``semiseg-la models list --json``; raises CatalogError/RuntimeError with one line."""
        result = self._run(self.commandFactory.modelsList(), "models list")
        if not result.ok:
            raise CatalogError(f"Could not list the models: {self._commandError(result, 'models list')}")
        self.catalog = Catalog.fromJson(result.stdout)
        return self.catalog

    def refreshMethodPresets(self) -> List[str]:
        """Method presets from ``models presets --json`` when the core has it, else the fixed list."""
        presets: List[str] = []
        try:
            result = self._run(self.commandFactory.modelsPresets(), "models presets")
            if result.ok:
                presets = parsePresetsJson(result.stdout)
        except RuntimeError:
            presets = []
        # the fixed methods first (the core always has them), then those the presets add
        self.methodPresets = list(dict.fromkeys(list(DEFAULT_METHOD_PRESETS) + presets))
        return self.methodPresets

    def removeModel(self, modelId: str) -> Optional[str]:
        """Remove a local model; returns the model to select next (its parent or base)."""
        allowed, reason = self.catalog.canRemove(modelId)
        if not allowed:
            raise ValueError(reason)
        nextId = self.catalog.selectionAfterRemoval(modelId)
        result = self._run(self.commandFactory.modelsRemove(modelId), "models remove")
        if not result.ok:
            raise RuntimeError(f"Could not remove {modelId}: {self._commandError(result, 'models remove')}")
        self.refreshModels()
        return self.catalog.defaultModelId(nextId)

    def importCheckpoint(self, path: str) -> str:
        """Import a checkpoint file as a local model; returns its id."""
        result = self._run(self.commandFactory.modelsImport(path), "models import")
        if not result.ok:
            raise RuntimeError(f"Could not import {os.path.basename(path)}: "
                               f"{self._commandError(result, 'models import')}")
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        if not lines:
            raise RuntimeError("The import did not report the new model's id")
        newId = lines[-1]
        self.refreshModels()
        return newId

    # -- segmentation ------------------------------------------------------------------------------------
    def segment(self, inputVolume, modelId: Optional[str], device: str = "auto",
                overlap: Optional[float] = None, showIn3D: bool = False, name: Optional[str] = None,
                waitForCompletion: bool = False, timeout: Optional[float] = None) -> Job:
        """Start segmenting ``inputVolume``; the job's ``result`` is the new segmentation node."""
        self._checkIdle()
        if inputVolume is None:
            raise ValueError("Select an input volume")
        entry = self.catalog.get(modelId)
        if entry is not None and entry.isBroken:
            raise ValueError(f"Model {entry.id} cannot be used: {entry.error}")
        workDir = self._workDir("seg")
        inputPath = os.path.join(workDir, "input.nrrd")
        outputPath = os.path.join(workDir, "output.nrrd")
        resultName = name or f"{inputVolume.GetName()} segmentation"

        def prepare(job: Job) -> None:
            job.log(f"Writing '{inputVolume.GetName()}' to {inputPath}")
            nodes.writeVolumeNode(inputVolume, inputPath)

        def build(dev: str):
            spec = self.commandFactory.segment(inputPath, outputPath, modelId, dev, overlap)
            spec.cwd = workDir  # whatever the core writes next to itself stays in the temp folder
            return spec

        def finalize(job: Job, done: dict):
            resultPath = done.get("output") or outputPath
            if not os.path.isfile(resultPath):
                raise FileNotFoundError(f"The core reported success but wrote no result at {resultPath}")
            geometry.checkSameGrid(inputPath, resultPath)
            segNode, empty = nodes.importLabelAsSegmentation(resultPath, inputVolume, resultName)
            if empty:
                job.addNotice("No left atrium was found: the segment is empty; draw it in Segment Editor.")
            if showIn3D:
                nodes.showIn3D(segNode)
            if done.get("device"):
                job.log(f"Computed on: {done.get('device')}")
            return segNode

        job = Job("segment", self.runner, build, device=device, prepare=prepare, finalize=finalize,
                  cleanup=self._cleanupFor(workDir), description=f"Segment {inputVolume.GetName()}")
        job.workDir = workDir
        return self._startJob(job, waitForCompletion, timeout)

    def process(self, inputVolume, modelId: Optional[str] = None, device: str = "auto",
                timeout: Optional[float] = None):
        """Scripting entry point: segment and wait; returns the segmentation node or raises."""
        if modelId is None:
            if not len(self.catalog):
                self.refreshModels()
            modelId = self.catalog.defaultModelId()
        job = self.segment(inputVolume, modelId, device=device, waitForCompletion=True, timeout=timeout)
        if job.state is not State.FINISHED:
            raise RuntimeError(job.errorMessage or job.summary())
        return job.result

    # -- fine-tuning -------------------------------------------------------------------------------------
    def setPairing(self, volumeId: str, segmentationId: Optional[str]) -> None:
        """The user's pairing: a segmentation id, ``""`` for none, or None to go back to automatic."""
        if segmentationId is None:
            self.pairing.pop(volumeId, None)
        else:
            self.pairing[volumeId] = segmentationId

    def setIncluded(self, volumeId: str, included: bool) -> None:
        if included:
            self.excluded.discard(volumeId)
        else:
            self.excluded.add(volumeId)

    def scanCases(self) -> List[caseRules.CaseRow]:
        volumes, segmentations = nodes.scanScene()
        return caseRules.buildCaseTable(volumes, segmentations, self.pairing, self.excluded)

    def finetune(self, baseModelId: str, method: str, rows: Optional[List[caseRules.CaseRow]] = None,
                 iterations: Optional[int] = None, timeBudgetSeconds: Optional[float] = None,
                 name: Optional[str] = None, device: str = "auto", waitForCompletion: bool = False,
                 timeout: Optional[float] = None) -> Job:
        """Start fine-tuning a new local model; the job's ``result`` is the new model id."""
        self._checkIdle()
        rows = self.scanCases() if rows is None else rows
        errors, warnings = caseRules.validateCases(rows, method)
        if errors:
            raise ValueError(errors[0])
        if not baseModelId:
            raise ValueError("Choose a base model to fine-tune from")
        entry = self.catalog.get(baseModelId)
        if entry is not None and entry.isBroken:
            raise ValueError(f"Model {entry.id} cannot be used: {entry.error}")
        workDir = self._workDir("ft")
        plan = caseRules.DatasetPlan(workDir, rows)

        def prepare(job: Job) -> None:
            for text in warnings:
                job.log(f"Note: {text}")
            nodes.writeDataset(plan, log=job.log)

        def build(dev: str):
            spec = self.commandFactory.finetune(
                baseModelId, plan.datasetDir, method, plan.unlabeledDir if plan.unlabelled else None,
                iterations=iterations, timeBudgetSeconds=timeBudgetSeconds, name=name, device=dev)
            spec.cwd = workDir  # the core's run folder (runs/...) stays in the temp folder
            return spec

        def finalize(job: Job, done: dict):
            newId = done.get("model_id")
            if not newId:
                raise RuntimeError("The core finished fine-tuning without reporting the new model id")
            try:
                self.refreshModels()
            except (CatalogError, RuntimeError) as exc:
                job.addNotice(f"The model list could not be refreshed: {oneLine(str(exc))}")
            return newId

        job = Job("finetune", self.runner, build, device=device, prepare=prepare, finalize=finalize,
                  cleanup=self._cleanupFor(workDir), description=f"Fine-tune from {baseModelId}")
        job.workDir = workDir
        job.datasetPlan = plan
        return self._startJob(job, waitForCompletion, timeout)

    def describeNewModel(self, modelId: str) -> str:
        entry = self.catalog.get(modelId)
        if entry is None:
            return f"New model {modelId}."
        dice = f", validation Dice {entry.dice:.3f}" if entry.dice is not None else ""
        cases = f", {entry.labeledCases} labelled cases" if entry.labeledCases is not None else ""
        return f"New model {entry.id} ({methodLabel(entry.method)}, parent {entry.parent or 'none'}{cases}{dice})."


#
# SemiSegLAWidget
#


class SemiSegLAWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: renders the logic's state; all decisions live in the logic and SemiSegLALib."""

    CASE_COLUMNS = ("Use", "Volume", "Role", "Segmentation", "Status")

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SemiSegLALogic] = None
        self.job: Optional[Job] = None
        self.pollTimer = None
        self._modelsLoaded = False
        self._filling = False
        self._rows: List[caseRules.CaseRow] = []

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SemiSegLA.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        dependencies = DependencyManager(moduleDir=MODULE_DIR, slicerUtil=slicer.util, log=self.appendLog)
        self.logic = SemiSegLALogic(dependencyManager=dependencies)
        self.logic.jobCreated.connect(self.onJobCreated)

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(200)
        self.pollTimer.connect("timeout()", self.onPollTimer)

        self.ui.logTextEdit.setMaximumBlockCount(5000)
        self.ui.caseTableWidget.setColumnCount(len(self.CASE_COLUMNS))
        self.ui.caseTableWidget.setHorizontalHeaderLabels(list(self.CASE_COLUMNS))
        self.ui.caseTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.methodComboBox.clear()
        for method in self.logic.methodPresets:
            self.ui.methodComboBox.addItem(methodLabel(method), method)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.revertToBaseButton.connect("clicked(bool)", self.onRevertToBase)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.importCheckpointButton.connect("clicked(bool)", self.onImportCheckpoint)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.refreshCasesButton.connect("clicked(bool)", self.refreshCases)
        self.ui.checkDependenciesButton.connect("clicked(bool)", self.onShowVersions)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.keepTempFilesCheckBox.connect("toggled(bool)", self.onKeepTempFiles)
        self.ui.caseTableWidget.connect("itemChanged(QTableWidgetItem*)", self.onCaseItemChanged)
        self.ui.finetuneCollapsibleButton.connect("contentsCollapsed(bool)", self.onFinetuneCollapsed)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.restoreSettings()
        self.render(State.IDLE, None)

    def enter(self) -> None:
        if not self._modelsLoaded and self.logic.dependencies.status().ready:
            self.refreshModels(quiet=True)
        self.refreshCases()

    def cleanup(self) -> None:
        if self.pollTimer is not None:
            self.pollTimer.stop()
        if self.logic is not None and self.logic.busy:
            self.logic.cancel()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload the Lib helpers too (``importlib``: the ``imp`` module is gone in Python 3.12)."""
        for name in LIB_MODULES:
            module = sys.modules.get(f"SemiSegLALib.{name}")
            if module is not None:
                importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic is not None and self.logic.busy:
            self.logic.cancel()
        self._rows = []

    # -- settings --------------------------------------------------------------------------------------
    def _setting(self, key: str, default=None):
        return qt.QSettings().value(SETTINGS_PREFIX + key, default)

    def _setSetting(self, key: str, value) -> None:
        qt.QSettings().setValue(SETTINGS_PREFIX + key, value)

    def restoreSettings(self) -> None:
        device = str(self._setting("device", "auto"))
        self.ui.deviceComboBox.currentIndex = DEVICE_CHOICES.index(device) if device in DEVICE_CHOICES else 0
        self.ui.show3DCheckBox.checked = str(self._setting("show3D", "false")).lower() == "true"
        try:
            self.ui.iterationsSpinBox.value = int(self._setting("iterations", 1000))
            self.ui.timeBudgetSpinBox.value = int(self._setting("timeBudgetMinutes", 0))
        except (TypeError, ValueError):
            pass

    def saveSettings(self) -> None:
        self._setSetting("device", self.device())
        self._setSetting("show3D", "true" if self.ui.show3DCheckBox.checked else "false")
        self._setSetting("iterations", self.ui.iterationsSpinBox.value)
        self._setSetting("timeBudgetMinutes", self.ui.timeBudgetSpinBox.value)
        if self.currentModelId():
            self._setSetting("model", self.currentModelId())
        method = self.ui.methodComboBox.currentData
        if method:
            self._setSetting("method", method)

    # -- small helpers ---------------------------------------------------------------------------------
    def device(self) -> str:
        index = self.ui.deviceComboBox.currentIndex
        return DEVICE_CHOICES[index] if 0 <= index < len(DEVICE_CHOICES) else "auto"

    def currentModelId(self) -> Optional[str]:
        return self.ui.modelComboBox.currentData or None

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        slicer.app.processEvents()

    def setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")

    def ensureDependencies(self) -> bool:
        """Check, and after a confirmation install, what the core needs. False when not ready."""
        dependencies = self.logic.dependencies
        try:
            if dependencies.status().ready:
                return True
            testing = slicer.app.commandOptions().testingEnabled  # no dialogs in Slicer's --testing mode
            status = dependencies.ensure(askConfirmation=not testing)
            self.ui.dependenciesStatusLabel.text = status.describe()
            return True
        except DependencyError as exc:
            self.setStatus(oneLine(str(exc)), error=True)
            if exc.restartRequired:
                if slicer.util.confirmYesNoDisplay(f"{exc}\n\nRestart Slicer now?"):
                    slicer.util.restart()
            else:
                slicer.util.errorDisplay(str(exc), windowTitle="SemiSegLA")
            return False
        except Exception as exc:
            logging.exception("SemiSegLA: installing dependencies failed")
            self.setStatus(f"Installing dependencies failed: {oneLine(str(exc))}", error=True)
            slicer.util.errorDisplay(f"Installing dependencies failed: {oneLine(str(exc))}",
                                     detailedText=str(exc), windowTitle="SemiSegLA")
            return False

    # -- models -----------------------------------------------------------------------------------------
    def refreshModels(self, quiet: bool = False, select: Optional[str] = None) -> None:
        try:
            with _waitCursor():
                self.logic.refreshModels()
                presets = self.logic.refreshMethodPresets()
        except (CatalogError, RuntimeError) as exc:
            self.setStatus(oneLine(str(exc)), error=True)
            if not quiet:
                slicer.util.errorDisplay(oneLine(str(exc)), windowTitle="SemiSegLA")
            return
        self._modelsLoaded = True
        self.fillModelCombos(select or self.currentModelId() or self._setting("model"))
        current = self.ui.methodComboBox.currentData or self._setting("method")
        self.ui.methodComboBox.clear()
        for method in presets:
            self.ui.methodComboBox.addItem(methodLabel(method), method)
        index = self.ui.methodComboBox.findData(current) if current else -1
        self.ui.methodComboBox.currentIndex = max(index, 0)

    def fillModelCombos(self, preferred: Optional[str]) -> None:
        catalog = self.logic.catalog
        self._filling = True
        try:
            for combo in (self.ui.modelComboBox, self.ui.baseModelComboBox):
                combo.clear()
            for entry in catalog.ordered():
                self.ui.modelComboBox.addItem(catalog.displayName(entry), entry.id)
                index = self.ui.modelComboBox.count - 1
                self.ui.modelComboBox.setItemData(index, catalog.details(entry), qt.Qt.ToolTipRole)
                if entry.isBroken:
                    item = self.ui.modelComboBox.model().item(index)  # QStandardItemModel of the combo
                    if item is not None:
                        item.setEnabled(False)
                else:
                    self.ui.baseModelComboBox.addItem(catalog.displayName(entry), entry.id)
            chosen = catalog.defaultModelId(preferred)
            for combo in (self.ui.modelComboBox, self.ui.baseModelComboBox):
                index = combo.findData(chosen) if chosen else -1
                combo.currentIndex = max(index, 0) if combo.count else -1
        finally:
            self._filling = False
        self.onModelChanged()

    def selectModel(self, modelId: Optional[str]) -> None:
        if not modelId:
            return
        for combo in (self.ui.modelComboBox, self.ui.baseModelComboBox):
            index = combo.findData(modelId)
            if index >= 0:
                combo.currentIndex = index

    def onModelChanged(self, index: int = -1) -> None:
        if self._filling:
            return
        catalog = self.logic.catalog
        entry = catalog.get(self.currentModelId())
        self.ui.modelDetailsLabel.text = catalog.details(entry) if entry else (
            "No models: click Refresh (the SemiSegLA core is installed on first use).")
        allowed, reason = catalog.canRemove(entry.id if entry else None)
        self.ui.removeModelButton.enabled = allowed and not self.logic.busy
        self.ui.removeModelButton.toolTip = reason or "Remove the selected fine-tuned model."
        self.ui.revertToBaseButton.enabled = bool(entry and catalog.revertTarget(entry.id)) and not self.logic.busy
        self.updateButtons()

    def onRefreshModels(self) -> None:
        if self.ensureDependencies():
            self.refreshModels()

    def onRevertToBase(self) -> None:
        modelId = self.currentModelId()
        target = self.logic.catalog.revertTarget(modelId) if modelId else None
        if not target:
            self.setStatus("The selected model is already a base model.")
            return
        self.selectModel(target)
        self.setStatus(f"Selected the base model {target}; the fine-tuned model is kept.")

    def onRemoveModel(self) -> None:
        modelId = self.currentModelId()
        allowed, reason = self.logic.catalog.canRemove(modelId)
        if not allowed:
            self.setStatus(reason, error=True)
            return
        question = f"Remove the local model {modelId}? This deletes its files." + (f"\n\n{reason}" if reason else "")
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle="SemiSegLA"):
            return
        try:
            with _waitCursor():
                nextId = self.logic.removeModel(modelId)
        except (ValueError, RuntimeError) as exc:
            self.setStatus(oneLine(str(exc)), error=True)
            return
        self.fillModelCombos(nextId)
        self.setStatus(f"Removed {modelId}; selected {nextId or 'no model'}.")

    def onImportCheckpoint(self) -> None:
        if not self.ensureDependencies():
            return
        path = qt.QFileDialog.getOpenFileName(self.parent, "Import a model checkpoint", "",
                                              "Model checkpoints (*.pth *.pt *.safetensors);;All files (*)")
        if not path:
            return
        try:
            with _waitCursor():
                newId = self.logic.importCheckpoint(path)
        except (RuntimeError, CatalogError) as exc:
            self.setStatus(oneLine(str(exc)), error=True)
            slicer.util.errorDisplay(oneLine(str(exc)), windowTitle="SemiSegLA")
            return
        self.fillModelCombos(newId)
        self.setStatus(f"Imported {newId}.")

    def onOpenModelsFolder(self) -> None:
        entry = self.logic.catalog.get(self.currentModelId())
        if entry is None or not entry.path:
            self.setStatus("Select a model first (Refresh to list them).")
            return
        folder = entry.path if os.path.isdir(entry.path) else os.path.dirname(entry.path)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))

    # -- dependencies ------------------------------------------------------------------------------------
    def onShowVersions(self) -> None:
        self.ui.dependenciesStatusLabel.text = self.logic.dependencies.status().describe()

    def onInstallDependencies(self) -> None:
        if self.ensureDependencies():
            self.ui.dependenciesStatusLabel.text = self.logic.dependencies.status().describe()
            self.refreshModels(quiet=True)

    def onKeepTempFiles(self, checked: bool) -> None:
        self.logic.keepTempFiles = bool(checked)

    # -- case table ---------------------------------------------------------------------------------------
    def onFinetuneCollapsed(self, collapsed: bool) -> None:
        if not collapsed:
            self.refreshCases()

    def refreshCases(self) -> None:
        if self.logic is None:
            return
        rows = self.logic.scanCases()
        _, segmentations = nodes.scanScene()
        self._rows = rows
        table = self.ui.caseTableWidget
        self._filling = True
        try:
            table.clearContents()
            table.setRowCount(len(rows))
            for r, row in enumerate(rows):
                use = qt.QTableWidgetItem()
                use.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
                use.setCheckState(qt.Qt.Checked if row.role != caseRules.EXCLUDED else qt.Qt.Unchecked)
                use.setData(qt.Qt.UserRole, row.volumeId)
                table.setItem(r, 0, use)
                table.setItem(r, 1, qt.QTableWidgetItem(row.volumeName))
                table.setItem(r, 2, qt.QTableWidgetItem(row.role))
                table.setCellWidget(r, 3, self._pairingCombo(row, segmentations))
                status = qt.QTableWidgetItem(row.status)
                status.setToolTip(row.status)
                table.setItem(r, 4, status)
            table.resizeColumnsToContents()
        finally:
            self._filling = False
        self.ui.casesSummaryLabel.text = caseRules.summaryText(rows)
        self.updateButtons()

    def _pairingCombo(self, row: caseRules.CaseRow, segmentations) -> "qt.QComboBox":
        combo = qt.QComboBox()
        auto = row.segmentationName if row.paired == "auto" and row.segmentationName else "none"
        combo.addItem(f"Automatic ({auto})", "auto")
        combo.addItem("None (unlabelled)", caseRules.NO_SEGMENTATION)
        for seg in segmentations:
            combo.addItem(seg.name, seg.id)
        current = self.logic.pairing.get(row.volumeId, "auto")
        combo.currentIndex = max(combo.findData(current), 0)
        volumeId = row.volumeId

        def onChanged(index: int) -> None:
            value = combo.itemData(index)
            self.logic.setPairing(volumeId, None if value == "auto" else value)
            qt.QTimer.singleShot(0, self.refreshCases)  # rebuild after this signal returns
        combo.connect("currentIndexChanged(int)", onChanged)
        return combo

    def onCaseItemChanged(self, item) -> None:
        if self._filling or item.column() != 0:
            return
        volumeId = item.data(qt.Qt.UserRole)
        self.logic.setIncluded(volumeId, item.checkState() == qt.Qt.Checked)
        qt.QTimer.singleShot(0, self.refreshCases)

    # -- running ------------------------------------------------------------------------------------------
    def updateButtons(self, *args) -> None:
        state = self.job.state if self.job is not None else State.IDLE
        self.render(state, self.job.kind if self.job is not None else None)

    def render(self, state: State, kind: Optional[str]) -> None:
        view = uiState(state, kind)
        hasInput = self.ui.inputVolumeSelector.currentNode() is not None
        hasModel = bool(self.currentModelId()) or not self._modelsLoaded
        self.ui.segmentButton.text = view.segmentText
        self.ui.segmentButton.enabled = view.segmentEnabled and (view.busy or hasInput)
        self.ui.finetuneButton.text = view.finetuneText
        self.ui.finetuneButton.enabled = view.finetuneEnabled and (view.busy or hasModel)
        for widget in (self.ui.inputVolumeSelector, self.ui.modelComboBox, self.ui.deviceComboBox,
                       self.ui.refreshModelsButton, self.ui.importCheckpointButton, self.ui.caseTableWidget,
                       self.ui.refreshCasesButton, self.ui.methodComboBox, self.ui.baseModelComboBox,
                       self.ui.iterationsSpinBox, self.ui.timeBudgetSpinBox, self.ui.modelNameLineEdit,
                       self.ui.overlapSpinBox, self.ui.installDependenciesButton):
            widget.enabled = view.inputsEnabled
        if view.busy:
            self.ui.removeModelButton.enabled = False
            self.ui.revertToBaseButton.enabled = False
        self.ui.progressBar.setFormat(f"{view.progressText} %p%" if view.busy else (view.progressText or "%p%"))

    def onJobCreated(self, job: Job) -> None:
        self.job = job
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.etaLabel.text = ""
        self.setStatus(job.description)
        job.stateChanged.connect(self.onJobStateChanged)
        job.progress.connect(self.onJobProgress)
        job.logLine.connect(self.onJobLogLine)
        job.notice.connect(self.onJobNotice)
        job.finished.connect(self.onJobFinished)

    def onPollTimer(self) -> None:
        if not self.logic.poll():
            self.pollTimer.stop()

    def onJobStateChanged(self, job: Job, state: State) -> None:
        self.render(state, job.kind)
        if state is State.CANCELLING:
            self.setStatus("Cancelling...")
        slicer.app.processEvents()

    def onJobProgress(self, job: Job, event) -> None:
        self.ui.progressBar.value = int(round(job.tracker.percent))
        self.ui.etaLabel.text = job.tracker.statusText()

    def onJobLogLine(self, job: Job, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onJobNotice(self, job: Job, text: str) -> None:
        self.setStatus(text)
        slicer.util.showStatusMessage(f"SemiSegLA: {text}", 5000)

    def onJobFinished(self, job: Job) -> None:
        self.pollTimer.stop()
        self.render(job.state, job.kind)
        self.ui.etaLabel.text = ""
        if job.state is State.FINISHED:
            self.ui.progressBar.value = 100
            if job.kind == "segment":
                segNode = job.result
                self.ui.show3DButton.setSegmentationNode(segNode)
                self.setStatus(f"'{segNode.GetName()}' created. {job.summary()} Edit it in Segment Editor.")
                self.refreshCases()
            else:
                self.fillModelCombos(job.result)
                self.setStatus(f"{self.logic.describeNewModel(job.result)} {job.summary()}")
        elif job.state is State.CANCELLED:
            self.ui.progressBar.value = 0
            self.setStatus(job.summary())
        else:
            self.setStatus(job.summary(), error=True)
            slicer.util.errorDisplay(job.errorMessage or "SemiSegLA failed", windowTitle="SemiSegLA",
                                     detailedText=job.logText)

    def _startOrCancel(self, kind: str) -> bool:
        """True when the click was a Cancel (the job of that kind is running)."""
        if self.job is not None and self.job.isBusy:
            if self.job.kind == kind:
                self.logic.cancel()
            return True
        return False

    def onSegmentButton(self) -> None:
        if self._startOrCancel("segment"):
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is None:
            self.setStatus("Select an input volume.", error=True)
            return
        if not self.ensureDependencies():
            return
        if not self._modelsLoaded:
            self.refreshModels()
        self.saveSettings()
        try:
            self.logic.segment(volume, self.currentModelId(), device=self.device(),
                               overlap=self.ui.overlapSpinBox.value, showIn3D=self.ui.show3DCheckBox.checked)
        except (ValueError, RuntimeError, OSError) as exc:
            self.setStatus(oneLine(str(exc)), error=True)
            return
        if self.logic.busy:
            self.pollTimer.start()

    def onFinetuneButton(self) -> None:
        if self._startOrCancel("finetune"):
            return
        if not self.ensureDependencies():
            return
        if not self._modelsLoaded:
            self.refreshModels()
        self.refreshCases()
        method = self.ui.methodComboBox.currentData or "mean_teacher"
        errors, warnings = caseRules.validateCases(self._rows, method)
        if errors:
            self.setStatus(errors[0], error=True)
            slicer.util.warningDisplay("\n\n".join(errors), windowTitle="SemiSegLA: cannot fine-tune yet")
            return
        labelled, unlabelled = caseRules.counts(self._rows)
        base = self.ui.baseModelComboBox.currentData
        question = (f"Fine-tune a new model from {base} with {methodLabel(method)} on {labelled} labelled and "
                    f"{unlabelled} unlabelled cases?\nThe base model is not modified."
                    + ("\n\n" + "\n".join(warnings) if warnings else ""))
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle="SemiSegLA"):
            return
        self.saveSettings()
        minutes = self.ui.timeBudgetSpinBox.value
        try:
            self.logic.finetune(base, method, rows=self._rows, iterations=self.ui.iterationsSpinBox.value,
                                timeBudgetSeconds=minutes * 60 if minutes else None,
                                name=self.ui.modelNameLineEdit.text.strip() or None, device=self.device())
        except (ValueError, RuntimeError, OSError, LookupError) as exc:
            self.setStatus(oneLine(str(exc)), error=True)
            return
        if self.logic.busy:
            self.pollTimer.start()


#
# SemiSegLATest
#


class SemiSegLATest(ScriptedLoadableModuleTest):
    """Runs inside a real Slicer only (Reload & Test, the Self Tests module, or ctest).

    End to end on a small synthetic oblique, anisotropic volume: file round trip geometry, segmentation
    with a model on the CPU, the segment's name, terminology and reference geometry, a short fine-tune,
    lineage, revert to base and removal. The model comes from the environment variable
    ``SEMISEGLA_TEST_MODEL`` (an id or folder; the core's tiny test model is a good choice), else the
    first bundled model. Without the core installed the model steps are skipped with a message.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_geometry_round_trip()
        self.setUp()
        self.test_segment_and_finetune()

    # -- helpers ---------------------------------------------------------------------------------------
    def _syntheticVolume(self, name: str, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        k, j, i = np.meshgrid(np.arange(24), np.arange(40), np.arange(48), indexing="ij")
        inside = ((i - 24) / 12.0) ** 2 + ((j - 20) / 10.0) ** 2 + ((k - 12) / 6.0) ** 2 < 1.0
        array = (inside * 300.0 + rng.normal(100.0, 20.0, inside.shape)).astype("float32")
        angle = np.deg2rad(20.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.5])
        ijkToRas[:3, 3] = [-12.5, 30.0, 7.25]
        return slicer.util.addVolumeFromArray(array, ijkToRAS=slicer.util.vtkMatrixFromArray(ijkToRas), name=name)

    def _ijkToRas(self, node):
        import numpy as np
        import vtk

        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])

    def _terminologyOf(self, segment) -> str:
        import vtk

        value = vtk.reference("")  # GetTag(name, std::string&) returns the tag through a reference
        if segment.GetTag(segment.GetTerminologyEntryTagName(), value):
            return str(value.get())
        return ""

    # -- tests --------------------------------------------------------------------------------------------
    def test_geometry_round_trip(self) -> None:
        import tempfile

        import numpy as np

        self.delayDisplay("Geometry round trip through an uncompressed NRRD")
        volume = self._syntheticVolume("roundtrip")
        folder = tempfile.mkdtemp(prefix="ssla_test_")
        path = os.path.join(folder, "volume.nrrd")
        nodes.writeVolumeNode(volume, path)
        grid = geometry.gridFromNrrd(path)  # LPS
        expected = self._ijkToRas(volume)
        lpsAxes = np.array(grid.axes).T * np.array([[-1], [-1], [1]])
        np.testing.assert_allclose(lpsAxes, expected[:3, :3], atol=1e-4)
        np.testing.assert_allclose(np.array(grid.origin) * [-1, -1, 1], expected[:3, 3], atol=1e-4)
        loaded = slicer.util.loadVolume(path)
        np.testing.assert_allclose(self._ijkToRas(loaded), expected, atol=1e-4)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), slicer.util.arrayFromVolume(volume))
        self.delayDisplay("Geometry round trip passed")

    def test_segment_and_finetune(self) -> None:
        import numpy as np

        logic = SemiSegLALogic(dependencyManager=DependencyManager(moduleDir=MODULE_DIR, slicerUtil=slicer.util))
        status = logic.dependencies.status()
        if not status.ready:
            self.delayDisplay("Skipping the model steps: dependencies missing\n" + status.describe())
            return
        logic.refreshModels()
        modelId = os.environ.get("SEMISEGLA_TEST_MODEL") or logic.catalog.defaultModelId()
        self.assertTrue(modelId, "no model to test with")

        self.delayDisplay(f"Segmenting a synthetic volume with {modelId} on the CPU")
        volume = self._syntheticVolume("case A")
        logic.keepTempFiles = True  # to compare the segment with the core's own output file
        job = logic.segment(volume, modelId, device="cpu", waitForCompletion=True, timeout=1800)
        logic.keepTempFiles = False
        self.assertEqual(job.state, State.FINISHED, job.errorMessage)
        segNode = job.result
        self.assertEqual(segNode.GetName(), "case A segmentation")
        segmentation = segNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 1)
        segmentId = segmentation.GetNthSegmentID(0)
        segment = segmentation.GetSegment(segmentId)
        self.assertEqual(segment.GetName(), "Left atrium")
        self.assertIn("82471001", self._terminologyOf(segment))
        reference = segNode.GetNodeReference(segNode.GetReferenceImageGeometryReferenceRole())
        self.assertIsNotNone(reference)
        self.assertEqual(reference.GetID(), volume.GetID())
        # the segment holds exactly the core's label map, voxel for voxel on the input's grid
        output = slicer.util.loadLabelVolume(os.path.join(job.workDir, "output.nrrd"), {"show": False})
        np.testing.assert_allclose(self._ijkToRas(output), self._ijkToRas(volume), atol=1e-4)
        segmentArray = slicer.util.arrayFromSegmentBinaryLabelmap(segNode, segmentId, volume)
        np.testing.assert_array_equal(segmentArray > 0, slicer.util.arrayFromVolume(output) > 0)
        slicer.mrmlScene.RemoveNode(output)

        self.delayDisplay("Short fine-tune with one labelled and one unlabelled case")
        array = segmentArray
        if array.sum() == 0:  # an untrained model may find nothing: draw a blob as the correction
            k, j, i = np.indices(array.shape)
            blob = (((i - 24) / 10.0) ** 2 + ((j - 20) / 8.0) ** 2 + ((k - 12) / 5.0) ** 2 < 1.0)
            slicer.util.updateSegmentBinaryLabelmapFromArray(blob.astype("uint8"), segNode, segmentId, volume)
        self._syntheticVolume("case B", seed=1)
        rows = logic.scanCases()
        self.assertEqual(caseRules.counts(rows), (1, 1))
        method = "mean_teacher" if "mean_teacher" in logic.refreshMethodPresets() else logic.methodPresets[0]
        job = logic.finetune(modelId, method, rows=rows, iterations=2, name="selftest", device="cpu",
                             waitForCompletion=True, timeout=1800)
        self.assertEqual(job.state, State.FINISHED, job.errorMessage)
        newId = job.result
        entry = logic.catalog.get(newId)
        self.assertIsNotNone(entry)
        self.assertEqual(entry.parent, modelId)
        self.assertEqual(logic.catalog.baseOf(newId).id, logic.catalog.baseOf(modelId).id)
        self.assertIsNone(logic.catalog.get(modelId).error)
        nextId = logic.removeModel(newId)
        self.assertIsNone(logic.catalog.get(newId))
        self.assertTrue(nextId)
        self.delayDisplay("SemiSegLA end-to-end test passed")
