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
from typing import Callable, Dict, List, Optional, Tuple

import qt
import slicer
import vtk
from SemiSegLALib import cases as caseRules
from SemiSegLALib import geometry, nodes
from SemiSegLALib import region as regionMath
from SemiSegLALib.catalog import (
    DEFAULT_METHOD_PRESETS,
    Catalog,
    CatalogError,
    agreementLabels,
    agreementNote,
    comparisonNames,
    diceText,
    guardNote,
    guardWarning,
    methodLabel,
    parsePresetsJson,
)
from SemiSegLALib.commands import CommandFactory, regionArguments
from SemiSegLALib.dependencies import DependencyError, DependencyManager
from SemiSegLALib.events import Signal
from SemiSegLALib.jobs import BackgroundCall, Job
from SemiSegLALib.paths import FINETUNE_RUN_BYTES, FULL_DISK_BYTES, newWorkDir, shortAsciiTempRoot, spaceShortage
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
LIB_MODULES = ("events", "progress", "state", "commands", "process", "paths", "geometry", "region", "catalog",
               "cases", "dependencies", "jobs", "nodes")


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
        # The user's case-table choices, held by node object, not by node ID: vtkMRMLScene::Clear resets the
        # ID counters, so after Close Scene a new volume gets an old volume's ID. Entries whose node left the
        # scene are dropped (pruneCaseChoices), and Close Scene clears them all (clearCaseChoices).
        self._pairing: List[Tuple[object, object]] = []  # (volume node, segmentation node or NO_SEGMENTATION)
        self._excluded: List[object] = []  # volume nodes the user left out of fine-tuning
        self.backgroundCalls: List[BackgroundCall] = []
        self.jobCreated = Signal("jobCreated")  # (job), emitted before the job starts

    # -- temporary folders ----------------------------------------------------------------------------
    def _workDir(self, prefix: str, neededBytes: int = 0, what: str = "") -> str:
        """A fresh temporary folder; a ValueError that says so when its disk lacks ``neededBytes``."""
        root = self.tempRoot or shortAsciiTempRoot([slicer.app.temporaryPath])
        shortage = spaceShortage(root, neededBytes, what)
        if shortage:
            raise ValueError(shortage)
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
            if job.kind == "finetune" and job.state is State.FINISHED:
                self.refreshModelsAfter(job)  # scripts wait anyway; the panel does this in the background
        return job

    def refreshModelsAfter(self, job: Job) -> None:
        """Re-read the model list after a fine-tune (blocking); a failure becomes a notice of the job."""
        try:
            self.refreshModels()
        except (CatalogError, RuntimeError) as exc:
            job.addNotice(f"The model list could not be refreshed: {oneLine(str(exc))}")

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

    # -- short core commands off the main thread ----------------------------------------------------------
    def runInBackground(self, description: str, function: Callable[[], object],
                        onFinished: Optional[Callable[[BackgroundCall], None]] = None) -> BackgroundCall:
        """Run ``function`` (model list, remove, import: child processes, no MRML) in a worker thread.
        ``onFinished(call)`` runs on the thread that calls ``pollBackground()`` (the panel's timer)."""
        call = BackgroundCall(description, function)
        if onFinished is not None:
            call.finished.connect(onFinished)
        self.backgroundCalls.append(call)
        return call.start()

    def pollBackground(self) -> bool:
        """Report finished background calls; True while any is still running."""
        for call in list(self.backgroundCalls):
            if not call.poll():
                self.backgroundCalls.remove(call)
        return bool(self.backgroundCalls)

    @property
    def backgroundBusy(self) -> bool:
        return any(not call.done for call in self.backgroundCalls)

    def refreshModelsAndPresets(self) -> Tuple[Catalog, List[str]]:
        """Both lists the panel shows (blocking; the panel runs it through ``runInBackground``)."""
        catalog = self.refreshModels()
        return catalog, self.refreshMethodPresets()

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
                waitForCompletion: bool = False, timeout: Optional[float] = None, region="auto") -> Job:
        """Start segmenting ``inputVolume``; the job's ``result`` is the new segmentation node.

        ``region``: "auto" (the core finds the atrium; a box it found is then shown as the markups ROI
        "<volume> region", the job's ``regionNode``, for the user to move and segment again with), "whole",
        a vtkMRMLMarkupsROINode (the voxels of the volume it holds, converted through both parent transforms
        and the written file's header), or a voxel box [i0, j0, k0, i1, j1, k1] of the volume. The job's
        ``region`` is the core's account of the region it used (region.RegionRecord), its ``warnings`` what
        the user must check."""
        self._checkIdle()
        if inputVolume is None:
            raise ValueError("Select an input volume")
        entry = self.catalog.get(modelId)
        if entry is not None and entry.isBroken:
            raise ValueError(f"Model {entry.id} cannot be used: {entry.error}")
        roiNode, fixedRegion = self._regionOf(region, inputVolume)
        stored, voxels = nodes.volumeBytes(inputVolume)  # the input as stored, the label written back
        workDir = self._workDir("seg", stored + voxels + FULL_DISK_BYTES, "Segmenting")
        inputPath = os.path.join(workDir, "input.nrrd")
        outputPath = os.path.join(workDir, "output.nrrd")
        firstPassPath = os.path.join(workDir, "first_pass.nrrd")
        resultName = name or f"{inputVolume.GetName()} segmentation"
        volumeName = inputVolume.GetName()

        def prepare(job: Job) -> None:
            job.log(f"Writing '{volumeName}' to {inputPath}")
            nodes.writeVolumeNode(inputVolume, inputPath)
            job.regionBox = fixedRegion
            if roiNode is not None:  # exact, from the header of the file the core reads
                job.regionBox = nodes.voxelBoxOfRoi(roiNode, inputVolume, inputPath)
                job.log(f"Region: the box '{roiNode.GetName()}', voxels {job.regionBox} of {inputPath}")

        def build(dev: str):
            automatic = job.regionBox is None  # only an automatic region is settled on a first pass
            spec = self.commandFactory.segment(inputPath, outputPath, modelId, dev, overlap, region=job.regionBox,
                                               firstPassPath=firstPassPath if automatic else None)
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
            job.region = regionMath.RegionRecord.fromDone(done)
            if job.region is not None:
                job.log(f"Region: {job.region.describe()}")
                if job.region.source == regionMath.AUTO and job.region.box:
                    job.regionNode = nodes.showAutomaticRegion(inputVolume, job.region.box, inputPath)
            warnings = done.get("warnings")
            if not isinstance(warnings, list):
                warnings = job.region.warnings if job.region is not None else []
            job.warnings = [job.reword(str(w)) for w in warnings]
            job.firstPassNode = self.showFirstPass(regionMath.FirstPass.fromDone(done), job, inputPath, volumeName)
            return segNode

        job = Job("segment", self.runner, build, device=device, prepare=prepare, finalize=finalize,
                  cleanup=self._cleanupFor(workDir), description=f"Segment {volumeName}",
                  reword=lambda text: regionMath.forSlicerUsers(text, inputPath, volumeName))
        job.workDir = workDir
        job.inputVolume = inputVolume
        job.firstPassNode, job.firstPassNotice = None, None  # an uncertain result's first pass, shown beside it
        job.regionBox = fixedRegion
        job.regionNode = roiNode  # the box it segments in; an automatic run's box once it is known
        job.region = None
        return self._startJob(job, waitForCompletion, timeout)

    def showFirstPass(self, firstPass: Optional[regionMath.FirstPass], job: Job, inputPath: str, volumeName: str):
        """An uncertain result's first pass (the core compared the two and warned) as an automatic segmentation beside
        it, so the user sees where they differ without segmenting again: for a fine-tuned model that pass is its
        parent's. Unreviewed, so never a label until corrected and ticked. A file not on the input's grid, or one
        that cannot be read, is logged and skipped: the result stands. The node, or None."""
        if firstPass is None or not firstPass.uncertain:
            return None
        name = firstPass.segmentationName(volumeName)
        try:
            volume = job.inputVolume
            geometry.checkSameGrid(inputPath, firstPass.path)
            node, _ = nodes.importLabelAsSegmentation(firstPass.path, volume, name, color=nodes.PARENT_RESULT_COLOR)
            nodes.markAsComparison(node)
        except (LookupError, OSError, RuntimeError, ValueError) as exc:
            job.log(f"The first pass was not added beside the result: {exc}")
            return None
        job.firstPassNotice = firstPass.notice(name)
        return node

    def _regionOf(self, region, inputVolume):
        """(ROI node or None, what to pass to the core: "whole", a voxel box or None for auto). A box that
        holds no voxel of the volume is refused here (ValueError), before anything runs."""
        if region is None or (isinstance(region, str) and region.lower() == regionMath.AUTO):
            return None, None
        if isinstance(region, str):
            if region.lower() == regionMath.WHOLE:
                return None, regionMath.WHOLE
            if region.lower() == regionMath.BOX:
                raise ValueError("Region is Box: choose a box, or click Create box to place one")
            raise ValueError(f"Unknown region '{region}': auto, whole, a box (markups ROI) or a voxel box")
        if hasattr(region, "IsA"):
            if not region.IsA(nodes.ROI_CLASS):
                raise ValueError(f"'{region.GetName()}' is not a box (markups ROI)")
            # the same conversion as in prepare, on the node's own geometry: what the file will hold
            objectToNode, size = nodes.roiGeometry(region)
            try:
                regionMath.voxelBoxOfRoi(objectToNode, size, nodes.matrixBetweenParents(region, inputVolume),
                                         nodes.volumeIjkToRas(inputVolume), nodes.volumeShape(inputVolume))
            except regionMath.RegionError as exc:
                raise regionMath.RegionError(f"The box '{region.GetName()}' cannot be used for "
                                             f"'{inputVolume.GetName()}': {exc}.") from None
            return region, None
        box = [int(v) for v in region]
        regionArguments(box)  # ValueError unless six indices with lower < upper
        return None, box

    def createRegionBox(self, inputVolume):
        """A box of a typical atrium's size (region.TYPICAL_ATRIUM_BOX_MM) centred on the volume, aligned with
        its axes and under its parent transform, named "<volume> box"."""
        if inputVolume is None:
            raise ValueError("Select an input volume first")
        return nodes.createRegionBox(inputVolume)

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
    @staticmethod
    def _inScene(node) -> bool:
        return node is not None and node.GetScene() is not None  # a removed node (or one of a closed scene)

    def _resolve(self, nodeOrId, what: str):
        return nodes.getNode(nodeOrId, what) if isinstance(nodeOrId, str) else nodeOrId

    def setPairing(self, volume, segmentation) -> None:
        """The user's pairing for a volume (node or ID): a segmentation (node or ID), ``""`` for none, or
        None to go back to automatic."""
        volumeNode = self._resolve(volume, "volume")
        self._pairing = [(v, s) for v, s in self._pairing if v is not volumeNode]
        if segmentation is None:
            return
        if isinstance(segmentation, str) and segmentation == caseRules.NO_SEGMENTATION:
            self._pairing.append((volumeNode, caseRules.NO_SEGMENTATION))
        else:
            self._pairing.append((volumeNode, self._resolve(segmentation, "segmentation")))

    def setIncluded(self, volume, included: bool) -> None:
        volumeNode = self._resolve(volume, "volume")
        self._excluded = [v for v in self._excluded if v is not volumeNode]
        if not included:
            self._excluded.append(volumeNode)

    def setReviewed(self, segmentation, reviewed: bool) -> None:
        """The "Corrected" mark of a segmentation (node or ID), kept on the node and saved with the scene."""
        nodes.setReviewed(self._resolve(segmentation, "segmentation"), reviewed)

    def clearCaseChoices(self) -> None:
        """Forget every pairing and exclusion (Close Scene)."""
        self._pairing = []
        self._excluded = []

    def pruneCaseChoices(self) -> None:
        """Drop the choices of volumes no longer in the scene (node removed, scene closed)."""
        self._pairing = [(v, s) for v, s in self._pairing if self._inScene(v)]
        self._excluded = [v for v in self._excluded if self._inScene(v)]

    def caseChoices(self) -> Tuple[Dict[str, str], set]:
        """(pairing, excluded) by the current node IDs, for ``buildCaseTable``."""
        self.pruneCaseChoices()
        pairing = {}
        for volume, segmentation in self._pairing:
            if isinstance(segmentation, str):
                pairing[volume.GetID()] = segmentation
            elif self._inScene(segmentation):
                pairing[volume.GetID()] = segmentation.GetID()
            else:
                pairing[volume.GetID()] = "(removed segmentation)"  # no node has this ID: the row says so
        return pairing, {v.GetID() for v in self._excluded}

    def pairingFor(self, volumeId: str) -> str:
        """The Segmentation column's value: ``"auto"``, ``""`` (none) or the chosen segmentation's ID."""
        return self.caseChoices()[0].get(volumeId, "auto")

    def scanCases(self) -> List[caseRules.CaseRow]:
        volumes, segmentations = nodes.scanScene()
        pairing, excluded = self.caseChoices()
        return caseRules.buildCaseTable(volumes, segmentations, pairing, excluded)

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
        workDir = self._workDir("ft", nodes.datasetBytes(rows) + FINETUNE_RUN_BYTES, "Fine-tuning")
        plan = caseRules.DatasetPlan(workDir, rows)

        def prepare(job: Job):
            for text in warnings:
                job.log(f"Note: {text}")
            return nodes.iterWriteDataset(plan, log=job.log)  # one case per poll: the panel stays responsive

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
            job.guardWarning = guardWarning(done.get("guard"), baseModelId)
            note = job.guardWarning or guardNote(done.get("guard"), baseModelId)
            if note:
                job.addNotice(note)
            job.comparisons = self.showDisagreement(done.get("guard"), plan, job, newId, baseModelId)
            where = agreementNote(done.get("guard"), {row.caseId: row.volumeName for row, _ in plan.unlabelled},
                                  [name for name, _, _ in job.comparisons], newId, baseModelId)
            if where:
                job.addNotice(where)
            leftOut = caseRules.leftOutNote(done.get("left_out_unlabeled"),
                                            {row.caseId: row.volumeName for row, _ in plan.unlabelled})
            if leftOut:
                job.addNotice(leftOut)
            # the model list is re-read after the job: by _startJob when waiting, else by the caller (the
            # panel lists the models in a worker thread; this runs on the main thread)
            return newId

        job = Job("finetune", self.runner, build, device=device, prepare=prepare, finalize=finalize,
                  cleanup=self._cleanupFor(workDir), description=f"Fine-tune from {baseModelId}")
        job.workDir = workDir
        job.datasetPlan = plan
        return self._startJob(job, waitForCompletion, timeout)

    def showDisagreement(self, guard, plan: caseRules.DatasetPlan, job: Job, newId: str,
                         parentId: str) -> List[Tuple[str, object, object]]:
        """Each model's result on the unlabelled volumes where the new model and its parent disagree most (the core
        keeps both labels of a few, ``agreementLabels``), as two automatic segmentations beside each volume, so the
        user compares them without segmenting again; neither is a label until corrected and ticked. A volume gone from
        the scene, or a file not on its volume's written grid, is logged and skipped. [(volume name, new, parent)]"""
        written = {row.caseId: (row, path) for row, path in plan.unlabelled}
        shown: List[Tuple[str, object, object]] = []
        for caseId, newPath, parentPath in agreementLabels(guard):
            if caseId not in written:
                continue
            row, scanPath = written[caseId]
            try:
                volume = nodes.getNode(row.volumeId, f"volume '{row.volumeName}'")
                for path in (newPath, parentPath):
                    geometry.checkSameGrid(scanPath, path)
                newName, parentName = comparisonNames(row.volumeName, newId, parentId)
                new, _ = nodes.importLabelAsSegmentation(newPath, volume, newName)
                try:
                    parent, _ = nodes.importLabelAsSegmentation(parentPath, volume, parentName,
                                                                color=nodes.PARENT_RESULT_COLOR)
                    nodes.markAsComparison(parent)
                except Exception:
                    nodes.removeNodeAndHelpers(new)  # both or neither
                    raise
            except (LookupError, OSError, RuntimeError, ValueError) as exc:
                job.log(f"The two results on '{row.volumeName}' were not added: {exc}")
                continue
            shown.append((row.volumeName, new, parent))
        return shown

    # -- panel state, saved with the scene ----------------------------------------------------------------
    PANEL_PARAMETERS = ("Model", "Device", "Iterations", "TimeBudgetMinutes", "Method", "BaseModel", "Region")
    INPUT_VOLUME_ROLE = "InputVolume"
    REGION_BOX_ROLE = "RegionBox"

    def savePanelState(self, inputVolume=None, regionBox=None, **values) -> None:
        """Store the panel's choices in the module's parameter node (a vtkMRMLScriptedModuleNode in the
        scene, so they are saved and restored with the scene). ``values``: PANEL_PARAMETERS."""
        unknown = set(values) - set(self.PANEL_PARAMETERS)
        if unknown:
            raise TypeError(f"Unknown panel parameters: {sorted(unknown)}")
        parameterNode = self.getParameterNode()
        parameterNode.SetNodeReferenceID(self.INPUT_VOLUME_ROLE, inputVolume.GetID() if inputVolume else None)
        parameterNode.SetNodeReferenceID(self.REGION_BOX_ROLE, regionBox.GetID() if regionBox else None)
        for key, value in values.items():
            if value is not None:
                parameterNode.SetParameter(key, str(value))

    def panelState(self) -> Dict[str, object]:
        """What ``savePanelState`` stored: the input volume node (or None) and the parameters (None when
        unset)."""
        parameterNode = self.getParameterNode()
        state: Dict[str, object] = {self.INPUT_VOLUME_ROLE: parameterNode.GetNodeReference(self.INPUT_VOLUME_ROLE),
                                    self.REGION_BOX_ROLE: parameterNode.GetNodeReference(self.REGION_BOX_ROLE)}
        for key in self.PANEL_PARAMETERS:
            state[key] = parameterNode.GetParameter(key) or None
        return state

    def describeNewModel(self, modelId: str) -> str:
        entry = self.catalog.get(modelId)
        if entry is None:
            return f"New model {modelId}."
        dice = f", {diceText(entry)}" if entry.dice is not None else ""
        cases = f", {entry.labeledCases} labelled cases" if entry.labeledCases is not None else ""
        return f"New model {entry.id} ({methodLabel(entry.method)}, parent {entry.parent or 'none'}{cases}{dice})."


#
# SemiSegLAWidget
#


class SemiSegLAWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: renders the logic's state; all decisions live in the logic and SemiSegLALib."""

    CASE_COLUMNS = ("Use", "Volume", "Role", "Segmentation", "Corrected", "Status")
    CORRECTED_COLUMN = 4

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[SemiSegLALogic] = None
        self.job: Optional[Job] = None
        self.pollTimer = None
        self.callTimer = None
        self._modelsLoaded = False
        self._modelsLoading = False
        self._afterModels: List[Callable[[], None]] = []  # what waits for the model list (a Segment click)
        self._filling = False
        self._restoringPanel = False
        self._sceneClosing = False
        self._selectingRegionBox = False  # the panel (not the user) is choosing the box shown
        self._watchedRegion = None  # the box an automatic run showed, watched for the user moving it
        self._watchedFingerprint = None
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
        self.callTimer = qt.QTimer()  # polls the model list/remove/import calls running in a worker thread
        self.callTimer.setInterval(100)
        self.callTimer.connect("timeout()", self.onCallTimer)

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
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.regionComboBox.connect("currentIndexChanged(int)", self.onRegionChanged)
        self.ui.regionBoxSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onRegionBoxSelected)
        self.ui.createBoxButton.connect("clicked(bool)", self.onCreateBox)
        self.ui.keepTempFilesCheckBox.connect("toggled(bool)", self.onKeepTempFiles)
        self.ui.caseTableWidget.connect("itemChanged(QTableWidgetItem*)", self.onCaseItemChanged)
        self.ui.finetuneCollapsibleButton.connect("contentsCollapsed(bool)", self.onFinetuneCollapsed)
        # every panel choice goes to the parameter node, so it is saved with the scene
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.savePanelState)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.savePanelState)
        self.ui.baseModelComboBox.connect("currentIndexChanged(int)", self.savePanelState)
        self.ui.iterationsSpinBox.connect("valueChanged(int)", self.savePanelState)
        self.ui.timeBudgetSpinBox.connect("valueChanged(int)", self.savePanelState)

        scene = slicer.mrmlScene
        self.addObserver(scene, scene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(scene, scene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(scene, scene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(scene, scene.NodeRemovedEvent, self.onNodeRemoved)
        self._restoringPanel = True  # the remembered defaults are not scene choices
        try:
            self.restoreSettings()
        finally:
            self._restoringPanel = False
        self.render(State.IDLE, None)

    def enter(self) -> None:
        self.restorePanelState()
        if not self._modelsLoaded and self.logic.dependencies.status().ready:
            self.refreshModels(quiet=True)  # in a worker thread: entering the module never blocks
        self.refreshCases()

    def cleanup(self) -> None:
        for timer in (self.pollTimer, self.callTimer):
            if timer is not None:
                timer.stop()
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
        self._sceneClosing = True  # the selectors empty themselves now: not a choice to store
        if self.logic is not None and self.logic.busy:
            self.logic.cancel()
        self._unwatchRegion()
        self.setRegionChoice(regionMath.AUTO)  # the boxes go with the scene
        if self.logic is not None:
            self.logic.clearCaseChoices()  # node IDs are reused after Close Scene: old choices must not return
        self._rows = []

    def onSceneEndClose(self, caller, event) -> None:
        self._sceneClosing = False
        if self.parent is not None and self.parent.isEntered:  # the module's panel is shown
            self.restorePanelState()
            self.refreshCases()

    def onSceneEndImport(self, caller, event) -> None:
        self.restorePanelState()  # a loaded scene brings its own parameter node
        self.refreshCases()

    def onNodeRemoved(self, caller, event) -> None:
        if self.logic is not None:
            self.logic.pruneCaseChoices()
        if self._watchedRegion is not None and self._watchedRegion.GetScene() is None:
            self._unwatchRegion()

    # -- panel state in the parameter node -------------------------------------------------------------
    def savePanelState(self, *args) -> None:
        if self.logic is None or self._restoringPanel or self._filling or self._sceneClosing:
            return
        self.logic.savePanelState(
            inputVolume=self.ui.inputVolumeSelector.currentNode(), Model=self.currentModelId(),
            Device=self.device(), Iterations=self.ui.iterationsSpinBox.value,
            TimeBudgetMinutes=self.ui.timeBudgetSpinBox.value, Method=self.ui.methodComboBox.currentData,
            BaseModel=self.ui.baseModelComboBox.currentData, Region=self.regionChoice(),
            regionBox=self.ui.regionBoxSelector.currentNode())

    def restorePanelState(self) -> None:
        """Show the parameter node's choices (those of a loaded scene, or the ones made before)."""
        state = self.logic.panelState()
        self._restoringPanel = True
        try:
            if state["InputVolume"] is not None:
                self.ui.inputVolumeSelector.setCurrentNode(state["InputVolume"])
            if state["RegionBox"] is not None:
                self._selectRegionBox(state["RegionBox"])
            if state["Region"] in regionMath.CHOICES:
                self.setRegionChoice(state["Region"])
            if state["Device"] in DEVICE_CHOICES:
                self.ui.deviceComboBox.currentIndex = DEVICE_CHOICES.index(state["Device"])
            for key, spinBox in (("Iterations", self.ui.iterationsSpinBox),
                                 ("TimeBudgetMinutes", self.ui.timeBudgetSpinBox)):
                with contextlib.suppress(TypeError, ValueError):
                    if state[key] is not None:
                        spinBox.value = int(state[key])
            for key, combo in (("Method", self.ui.methodComboBox), ("BaseModel", self.ui.baseModelComboBox),
                               ("Model", self.ui.modelComboBox)):
                index = combo.findData(state[key]) if state[key] else -1
                if index >= 0:
                    combo.currentIndex = index
        finally:
            self._restoringPanel = False
        self.updateButtons()

    def onInputChanged(self, node=None) -> None:
        self.savePanelState()
        self.updateButtons()

    # -- region ----------------------------------------------------------------------------------------
    def regionChoice(self) -> str:
        index = self.ui.regionComboBox.currentIndex
        return regionMath.CHOICES[index] if 0 <= index < len(regionMath.CHOICES) else regionMath.AUTO

    def setRegionChoice(self, choice: str) -> None:
        self.ui.regionComboBox.currentIndex = regionMath.CHOICES.index(choice)

    def regionForRun(self):
        """What Segment passes as ``region``: "auto", "whole" or the selected box (None: Box without one)."""
        choice = self.regionChoice()
        return self.ui.regionBoxSelector.currentNode() if choice == regionMath.BOX else choice

    def onRegionChanged(self, index: int = -1) -> None:
        self.savePanelState()
        self.updateButtons()

    def onRegionBoxSelected(self, node=None) -> None:
        if node is not None and not (self._selectingRegionBox or self._restoringPanel or self._sceneClosing):
            self.setRegionChoice(regionMath.BOX)  # the user picked a box: segment in it
        self.savePanelState()

    def _selectRegionBox(self, node) -> None:
        """Show ``node`` in the box selector without taking it as the user's choice of Region."""
        self._selectingRegionBox = True
        try:
            self.ui.regionBoxSelector.setCurrentNode(node)
        finally:
            self._selectingRegionBox = False

    def onCreateBox(self) -> None:
        volume = self.ui.inputVolumeSelector.currentNode()
        try:
            roi = self.logic.createRegionBox(volume)
        except (ValueError, RuntimeError) as exc:
            self.setStatus(oneLine(str(exc)), error=True)
            return
        self._selectRegionBox(roi)
        self.setRegionChoice(regionMath.BOX)
        self.setStatus(f"'{roi.GetName()}' placed on '{volume.GetName()}': move and resize it around the left "
                       "atrium in the slice views, then click Segment atrium.")

    def _watchAutomaticRegion(self, roi) -> None:
        """Select the box an automatic run used (Region stays Automatic); once the user moves or resizes it,
        Region becomes Box, so segmenting again in the corrected box is one click."""
        self._unwatchRegion()
        self._selectRegionBox(roi)
        self._watchedRegion = roi
        self._watchedFingerprint = nodes.roiFingerprint(roi)
        # vtkMRMLMarkupsROINode invokes ModifiedEvent whenever its size, centre, axes or transform change,
        # also while it is dragged (vtkMRMLMarkupsROINode.cxx: SetSize, UpdateObjectToWorldMatrix)
        self.addObserver(roi, vtk.vtkCommand.ModifiedEvent, self.onWatchedRegionModified)

    def _unwatchRegion(self) -> None:
        if self._watchedRegion is not None:
            self.removeObserver(self._watchedRegion, vtk.vtkCommand.ModifiedEvent, self.onWatchedRegionModified)
        self._watchedRegion = None
        self._watchedFingerprint = None

    def onWatchedRegionModified(self, caller=None, event=None) -> None:
        roi = self._watchedRegion
        if roi is None or roi.GetScene() is None or nodes.roiFingerprint(roi) == self._watchedFingerprint:
            return  # a name, colour or selection change: not a new region
        self._unwatchRegion()
        self._selectRegionBox(roi)
        self.setRegionChoice(regionMath.BOX)
        self.setStatus(f"'{roi.GetName()}' was changed: Region is now Box, and Segment atrium segments inside it.")

    def offerRegionBox(self, job: Job) -> None:
        """No atrium found: say so, and offer a box to place around it (Region: Box, a box made if none)."""
        volume = getattr(job, "inputVolume", None)
        roi = self.ui.regionBoxSelector.currentNode()
        action = (f"Region is set to Box with '{roi.GetName()}'" if roi is not None else
                  "A box of a typical atrium's size ({}) is placed on the volume".format(
                      " x ".join(f"{v:g}" for v in regionMath.TYPICAL_ATRIUM_BOX_MM) + " mm"))
        question = (f"{job.errorMessage}\n\nPlace a box around the left atrium now?\n{action}; move and resize it "
                    "in the slice views, then click Segment atrium.")
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle="SemiSegLA: no left atrium found"):
            return
        if roi is None:
            try:
                roi = self.logic.createRegionBox(volume if volume is not None and volume.GetScene() is not None
                                                 else self.ui.inputVolumeSelector.currentNode())
            except (ValueError, RuntimeError) as exc:
                self.setStatus(oneLine(str(exc)), error=True)
                return
            self._selectRegionBox(roi)
        self.setRegionChoice(regionMath.BOX)
        self.setStatus(f"Move and resize '{roi.GetName()}' around the left atrium, then click Segment atrium.")

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
            self.ui.iterationsSpinBox.value = int(self._setting("iterations", 0))  # 0: the preset's limit
            self.ui.timeBudgetSpinBox.value = int(self._setting("timeBudgetMinutes", 10)) or 10
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

    def setStatus(self, text: str, error: bool = False, warning: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else ("color: #b9770e;" if warning else ""))

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
    def _startCall(self, description: str, function, onDone) -> None:
        """Run a short core command in a worker thread; ``onDone(call)`` runs on the main thread."""
        self.ui.refreshModelsButton.enabled = False
        self.logic.runInBackground(description, function, onDone)
        self.callTimer.start()

    def onCallTimer(self) -> None:
        if not self.logic.pollBackground():
            self.callTimer.stop()
            self.ui.refreshModelsButton.enabled = not (self.logic.busy or self._modelsLoading)

    def refreshModels(self, quiet: bool = False, select: Optional[str] = None,
                      then: Optional[Callable[[], None]] = None) -> None:
        """List the models and presets in a worker thread; fill the combos (and run ``then``) when done."""
        if then is not None:
            self._afterModels.append(then)
        if self._modelsLoading:
            return
        self._modelsLoading = True
        self.setStatus("Listing the models...")

        def onDone(call: BackgroundCall) -> None:
            self._modelsLoading = False
            waiting, self._afterModels = self._afterModels, []
            if call.error is not None:
                text = oneLine(str(call.error))
                self.setStatus(text, error=True)
                if not quiet:
                    slicer.util.errorDisplay(text, windowTitle="SemiSegLA")
                return
            _, presets = call.result
            self._modelsLoaded = True
            panel = self.logic.panelState()
            self.fillModelCombos(select or self.currentModelId() or panel["Model"] or self._setting("model"))
            current = self.ui.methodComboBox.currentData or panel["Method"] or self._setting("method")
            self.ui.methodComboBox.clear()
            for method in presets:
                self.ui.methodComboBox.addItem(methodLabel(method), method)
            index = self.ui.methodComboBox.findData(current) if current else -1
            self.ui.methodComboBox.currentIndex = max(index, 0)
            self.setStatus(f"{len(self.logic.catalog)} models.")
            for action in waiting:
                action()

        self._startCall("models list", self.logic.refreshModelsAndPresets, onDone)

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
        self.savePanelState()

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
        self.savePanelState()
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
        self.ui.removeModelButton.enabled = False
        self.setStatus(f"Removing {modelId}...")

        def onDone(call: BackgroundCall) -> None:
            if call.error is not None:
                self.setStatus(oneLine(str(call.error)), error=True)
                self.onModelChanged()
                return
            self.fillModelCombos(call.result)
            self.setStatus(f"Removed {modelId}; selected {call.result or 'no model'}.")

        self._startCall("models remove", lambda: self.logic.removeModel(modelId), onDone)

    def onImportCheckpoint(self) -> None:
        if not self.ensureDependencies():
            return
        path = qt.QFileDialog.getOpenFileName(self.parent, "Import a model checkpoint", "",
                                              "Model checkpoints (*.pth *.pt *.safetensors);;All files (*)")
        if not path:
            return
        self.setStatus(f"Importing {os.path.basename(path)}...")

        def onDone(call: BackgroundCall) -> None:
            if call.error is not None:
                self.setStatus(oneLine(str(call.error)), error=True)
                slicer.util.errorDisplay(oneLine(str(call.error)), windowTitle="SemiSegLA")
                return
            self.fillModelCombos(call.result)
            self.setStatus(f"Imported {call.result}.")

        self._startCall("models import", lambda: self.logic.importCheckpoint(path), onDone)

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
                corrected = qt.QTableWidgetItem()
                if row.segmentationId and row.role != caseRules.INVALID:
                    # only a segmentation marked as corrected is a label (SemiSegLA's own results start unmarked)
                    corrected.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
                    corrected.setCheckState(qt.Qt.Checked if row.reviewed else qt.Qt.Unchecked)
                    corrected.setData(qt.Qt.UserRole, row.segmentationId)
                    corrected.setToolTip("Tick once this segmentation has been reviewed and corrected in Segment "
                                         "Editor; unticked, the volume is used as an unlabelled scan.")
                else:
                    corrected.setFlags(qt.Qt.ItemIsEnabled)
                table.setItem(r, self.CORRECTED_COLUMN, corrected)
                status = qt.QTableWidgetItem(row.status)
                status.setToolTip(row.status)
                table.setItem(r, 5, status)
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
        current = self.logic.pairingFor(row.volumeId)
        combo.currentIndex = max(combo.findData(current), 0)
        volumeId = row.volumeId

        def onChanged(index: int) -> None:
            value = combo.itemData(index)
            self.logic.setPairing(volumeId, None if value == "auto" else value)
            qt.QTimer.singleShot(0, self.refreshCases)  # rebuild after this signal returns
        combo.connect("currentIndexChanged(int)", onChanged)
        return combo

    def onCaseItemChanged(self, item) -> None:
        if self._filling or item.column() not in (0, self.CORRECTED_COLUMN):
            return
        nodeId = item.data(qt.Qt.UserRole)
        checked = item.checkState() == qt.Qt.Checked
        try:
            if item.column() == 0:
                self.logic.setIncluded(nodeId, checked)
            else:
                self.logic.setReviewed(nodeId, checked)
        except LookupError as exc:  # the node went away meanwhile
            self.setStatus(oneLine(str(exc)), error=True)
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
                       self.ui.overlapSpinBox, self.ui.installDependenciesButton, self.ui.regionComboBox,
                       self.ui.regionBoxSelector):
            widget.enabled = view.inputsEnabled
        self.ui.createBoxButton.enabled = view.inputsEnabled and hasInput
        if view.busy:
            self.ui.removeModelButton.enabled = False
            self.ui.revertToBaseButton.enabled = False
        self.ui.progressBar.setFormat(f"{view.progressText} %p%" if view.busy else (view.progressText or "%p%"))

    def onJobCreated(self, job: Job) -> None:
        self.job = job
        self._unwatchRegion()  # the run may move the box it shows: that is not the user's doing
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
                created = f"'{segNode.GetName()}' created."
                region = getattr(job, "region", None)
                regionNode = getattr(job, "regionNode", None)
                shown = ""
                if region is not None and region.source == regionMath.AUTO and regionNode is not None:
                    self._watchAutomaticRegion(regionNode)
                    shown = (f" The region it was found in is shown as '{regionNode.GetName()}': if it misses the "
                             "atrium, move or resize it and click Segment atrium again.")
                if job.warnings:
                    firstPass = getattr(job, "firstPassNotice", None)
                    told = job.warnings + ([firstPass] if firstPass else [])
                    self.setStatus(f"{created} Check it: {' '.join(told)}{shown}", warning=True)
                    slicer.util.warningDisplay("\n\n".join(told), windowTitle="SemiSegLA: check the result")
                else:
                    self.setStatus(f"{created} {job.summary()} Edit it in Segment Editor.{shown}")
                self.refreshCases()
            else:
                base = self.ui.baseModelComboBox.currentData
                summary = job.summary()

                def adopt() -> None:  # once the model list (with the new model) is in
                    if getattr(job, "guardWarning", None):
                        # the child is worse than its parent on the held-out case(s): keep the parent selected
                        self.fillModelCombos(base)
                        self.setStatus(job.guardWarning, error=True)
                        slicer.util.warningDisplay(job.guardWarning,
                                                   windowTitle="SemiSegLA: fine-tuned model not selected")
                    else:
                        self.fillModelCombos(job.result)
                        self.setStatus(f"{self.logic.describeNewModel(job.result)} {summary}")

                self.refreshModels(quiet=True, then=adopt)
                if getattr(job, "comparisons", None):
                    self.refreshCases()  # the two results added beside the volumes where the models disagree most
        elif job.state is State.CANCELLED:
            self.ui.progressBar.value = 0
            self.setStatus(job.summary())
        else:
            self.setStatus(job.summary(), error=True)
            if job.kind == "segment" and job.errorKind == "region":
                self.offerRegionBox(job)
                return
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
            self.refreshModels(then=self.onSegmentButton)  # continues once the list is in
            return
        region = self.regionForRun()
        if region is None:
            self.setStatus("Region is Box: choose a box, or click Create box to place one.", error=True)
            return
        self.saveSettings()
        try:
            self.logic.segment(volume, self.currentModelId(), device=self.device(),
                               overlap=self.ui.overlapSpinBox.value, showIn3D=self.ui.show3DCheckBox.checked,
                               region=region)
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
            self.refreshModels(then=self.onFinetuneButton)  # continues once the list is in
            return
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
    lineage, revert to base and removal. Without a model: a label imported for a volume under a linear
    transform lies on that volume, no display, storage or colour-table node is left behind, the colour comes
    from the terminology, the case table forgets its choices when the scene is closed (Slicer reuses
    node IDs after Close Scene), and a region box (markups ROI) under its own transform becomes the same voxel
    box as Slicer's Crop Volume computes for it. With a model: segmenting inside a box. The model comes from
    the environment variable
    ``SEMISEGLA_TEST_MODEL`` (an id or folder; the core's tiny test model is a good choice), else the
    first bundled model. Without the core installed the model steps are skipped with a message.
    """

    STEPS = ("test_geometry_round_trip", "test_transformed_volume_and_no_stray_nodes",
             "test_scene_close_forgets_case_choices", "test_region_box_to_voxels", "test_segment_and_finetune",
             "test_segment_in_a_box")

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()
        self._scratchFolders: List[str] = []

    def tearDown(self) -> None:
        """A step's files go with it, passed or not: the self-test runs on the user's own machine."""
        import shutil

        for folder in self._scratchFolders:
            shutil.rmtree(folder, ignore_errors=True)
        self._scratchFolders = []

    def runTest(self) -> None:
        for step in self.STEPS:
            self.setUp()
            try:
                getattr(self, step)()
            finally:
                self.tearDown()

    # -- helpers ---------------------------------------------------------------------------------------
    def _scratchPath(self, name: str) -> str:
        """A path in a new temporary folder that `tearDown` removes."""
        import tempfile

        folder = tempfile.mkdtemp(prefix="ssla_test_")
        self._scratchFolders.append(folder)
        return os.path.join(folder, name)

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

    HELPER_CLASSES = ("vtkMRMLLabelMapVolumeNode", "vtkMRMLDisplayNode", "vtkMRMLStorageNode", "vtkMRMLColorTableNode")

    def _helperCounts(self):
        return {name: slicer.mrmlScene.GetNumberOfNodesByClass(name) for name in self.HELPER_CLASSES}

    def _terminologyOf(self, segment) -> str:
        import vtk

        value = vtk.reference("")  # GetTag(name, std::string&) returns the tag through a reference
        if segment.GetTag(segment.GetTerminologyEntryTagName(), value):
            return str(value.get())
        return ""

    # -- tests --------------------------------------------------------------------------------------------
    def test_geometry_round_trip(self) -> None:
        import numpy as np

        self.delayDisplay("Geometry round trip through an uncompressed NRRD")
        volume = self._syntheticVolume("roundtrip")
        path = self._scratchPath("volume.nrrd")
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

    def test_transformed_volume_and_no_stray_nodes(self) -> None:
        import numpy as np
        import vtk

        self.delayDisplay("A label imported for a volume under a linear transform")
        volume = self._syntheticVolume("moved")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
        angle = np.deg2rad(30.0)
        move = np.eye(4)
        move[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
        move[:3, 3] = [40.0, -25.0, 12.0]
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(move))
        volume.SetAndObserveTransformNodeID(transform.GetID())
        # the core's output: a label map on the volume's own grid (the file carries no transform)
        mask = slicer.util.arrayFromVolume(volume) > 250
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        labelNode = slicer.util.addVolumeFromArray(mask.astype("uint8"), ijkToRAS=ijkToRas, name="core output",
                                                   nodeClassName="vtkMRMLLabelMapVolumeNode")
        path = self._scratchPath("label.nrrd")
        nodes.writeVolumeNode(labelNode, path)
        nodes.removeNodeAndHelpers(labelNode)
        before = self._helperCounts()

        segNode, empty = nodes.importLabelAsSegmentation(path, volume)
        after = self._helperCounts()
        after["vtkMRMLDisplayNode"] -= 1  # the segmentation's own display node
        self.assertEqual(after, before, "the temporary label map left nodes in the scene")
        self.assertFalse(empty)
        self.assertEqual(segNode.GetTransformNodeID(), transform.GetID())
        segmentId = segNode.GetSegmentation().GetNthSegmentID(0)
        # the segment holds the label voxel for voxel on the (transformed) volume's grid: before issue 15 the
        # reference geometry carried the transform twice and the label map was moved by its inverse
        # (arrayFromSegmentBinaryLabelmap itself leaves a display node: counted before it, above)
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(segNode, segmentId, volume) > 0,
                                      mask)
        # the colour is the terminology's recommended one (DICOM master list: 203, 108, 81)
        color = segNode.GetSegmentation().GetSegment(segmentId).GetColor()
        np.testing.assert_allclose(color, nodes.terminologyColor(), atol=1e-6)
        np.testing.assert_allclose(np.array(color) * 255.0, nodes.LEFT_ATRIUM_RGB, atol=0.6)

        self.delayDisplay("Exporting the label for fine-tuning leaves no colour table behind")
        before = self._helperCounts()
        voxels = nodes.writeLabelOnVolumeGrid(segNode, segmentId, volume, os.path.join(os.path.dirname(path), "x.nrrd"))
        self.assertEqual(voxels, int(mask.sum()))
        self.assertEqual(self._helperCounts(), before)
        self.delayDisplay("Transform and stray-node checks passed")

    def test_scene_close_forgets_case_choices(self) -> None:
        self.delayDisplay("Case-table choices do not come back after Close Scene")
        logic = SemiSegLALogic(dependencyManager=DependencyManager(moduleDir=MODULE_DIR, slicerUtil=slicer.util))
        old = self._syntheticVolume("old scan")
        oldId = old.GetID()
        logic.setIncluded(old, False)
        logic.setPairing(old, caseRules.NO_SEGMENTATION)
        self.assertEqual([r.role for r in logic.scanCases()], [caseRules.EXCLUDED])
        slicer.mrmlScene.Clear(0)
        new = self._syntheticVolume("new scan")
        if new.GetID() == oldId:
            self.delayDisplay(f"The new volume got the closed scene's ID {oldId}, as expected")
        rows = logic.scanCases()
        self.assertEqual([(r.volumeName, r.role, r.paired) for r in rows], [("new scan", caseRules.UNLABELLED, "auto")])
        # diffusion-weighted volumes (a subclass of scalar volumes) are not cases
        slicer.mrmlScene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", "dwi")
        self.assertEqual([r.volumeName for r in logic.scanCases()], ["new scan"])
        self.delayDisplay("Scene-close checks passed")

    def _transform(self, name: str, degrees: float, axis: int, translation):
        import numpy as np

        angle = np.deg2rad(degrees)
        c, s = np.cos(angle), np.sin(angle)
        move = np.eye(4)
        a, b = [i for i in range(3) if i != axis]
        move[a, a], move[a, b], move[b, a], move[b, b] = c, -s, s, c
        move[:3, 3] = translation
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(move))
        return transform

    def _cropVolumeBox(self, roi, volume):
        """Slicer's own voxels of an ROI (vtkSlicerCropVolumeLogic::GetVoxelBasedCropOutputExtent), as a
        voxel box with exclusive upper bounds; None where the Crop Volume module is not loaded."""
        cropVolume = getattr(slicer.modules, "cropvolume", None)
        if cropVolume is None:
            return None
        extent = [0, -1, 0, -1, 0, -1]
        cropVolume.logic().GetVoxelBasedCropOutputExtent(roi, volume, extent, True)
        return [extent[0], extent[2], extent[4], extent[1] + 1, extent[3] + 1, extent[5] + 1]

    def test_region_box_to_voxels(self) -> None:
        self.delayDisplay("A region box under its own transform becomes a voxel box of the written file")
        logic = SemiSegLALogic(dependencyManager=DependencyManager(moduleDir=MODULE_DIR, slicerUtil=slicer.util))
        volume = self._syntheticVolume("boxed")
        volume.SetAndObserveTransformNodeID(self._transform("registration", 30.0, 2, [40.0, -25.0, 12.0]).GetID())
        roi = logic.createRegionBox(volume)
        self.assertEqual(roi.GetTransformNodeID(), volume.GetTransformNodeID())
        self.assertEqual(roi.GetName(), "boxed box")
        path = self._scratchPath("input.nrrd")
        nodes.writeVolumeNode(volume, path)
        # the synthetic volume (34 x 32 x 60 mm) is smaller than a typical atrium box: the box is all of it
        self.assertEqual(nodes.voxelBoxOfRoi(roi, volume, path), [0, 0, 0, 48, 40, 24])
        # a smaller box, moved under its own transform (5 degrees and a few mm, under the registration)
        roi.SetSize(15.0, 12.0, 25.0)
        boxFrame = self._transform("box frame", 5.0, 0, [1.5, -2.0, 3.0])
        boxFrame.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
        roi.SetAndObserveTransformNodeID(boxFrame.GetID())
        box = nodes.voxelBoxOfRoi(roi, volume, path)
        self.assertTrue(all(0 <= lo < hi for lo, hi in zip(box[:3], box[3:])), box)
        self.assertTrue(box != [0, 0, 0, 48, 40, 24], box)
        cropBox = self._cropVolumeBox(roi, volume)
        if cropBox is not None:
            self.assertEqual(box, cropBox, "the module's voxels differ from Crop Volume's")
        else:
            self.delayDisplay("Crop Volume is not loaded: its cross-check is skipped")
        self.delayDisplay("The box an automatic run used, shown as an ROI, gives the same voxels back")
        found = [6, 5, 3, 40, 33, 20]
        shown = nodes.showAutomaticRegion(volume, found, path)
        self.assertEqual(shown.GetName(), "boxed region")
        self.assertEqual(shown.GetTransformNodeID(), volume.GetTransformNodeID())
        self.assertEqual(nodes.voxelBoxOfRoi(shown, volume, path), found)
        self.assertIs(nodes.automaticRegionNode(volume), shown)
        if cropBox is not None:
            self.assertEqual(self._cropVolumeBox(shown, volume), found)
        self.assertIs(nodes.showAutomaticRegion(volume, [0, 0, 0, 10, 10, 10], path), shown)  # moved, not added
        self.delayDisplay("Region box checks passed")

    def _modelLogic(self):
        """(logic, model id) with the model list read, or (None, None) when the dependencies are missing."""
        logic = SemiSegLALogic(dependencyManager=DependencyManager(moduleDir=MODULE_DIR, slicerUtil=slicer.util))
        status = logic.dependencies.status()
        if not status.ready:
            self.delayDisplay("Skipping the model steps: dependencies missing\n" + status.describe())
            return None, None
        logic.refreshModels()
        modelId = os.environ.get("SEMISEGLA_TEST_MODEL") or logic.catalog.defaultModelId()
        self.assertTrue(modelId, "no model to test with")
        return logic, modelId

    def test_segment_in_a_box(self) -> None:
        import numpy as np

        logic, modelId = self._modelLogic()
        if logic is None:
            return
        self.delayDisplay(f"Segmenting inside a box with {modelId} on the CPU")
        volume = self._syntheticVolume("case box")
        volume.SetAndObserveTransformNodeID(self._transform("registration", 30.0, 2, [40.0, -25.0, 12.0]).GetID())
        roi = logic.createRegionBox(volume)
        roi.SetSize(20.0, 18.0, 40.0)
        job = logic.segment(volume, modelId, device="cpu", region=roi, waitForCompletion=True, timeout=1800)
        self.assertEqual(job.state, State.FINISHED, job.errorMessage)
        self.assertEqual(job.region.source, "box")
        self.assertEqual(job.region.box, job.regionBox)  # the core segmented in the box the module computed
        cropBox = self._cropVolumeBox(roi, volume)
        if cropBox is not None:
            self.assertEqual(job.regionBox, cropBox)
        segNode = job.result
        array = slicer.util.arrayFromSegmentBinaryLabelmap(segNode, segNode.GetSegmentation().GetNthSegmentID(0),
                                                           volume)
        inside = np.zeros(array.shape, bool)
        i0, j0, k0, i1, j1, k1 = job.regionBox
        inside[k0:k1, j0:j1, i0:i1] = True
        self.assertFalse((array[~inside] > 0).any(), "the segment reaches outside the box")
        self.delayDisplay("Segmenting in a box passed")

    def test_segment_and_finetune(self) -> None:
        import numpy as np

        logic, modelId = self._modelLogic()
        if logic is None:
            return

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
        # an uncertain result's first pass (here the core's own output read again) goes beside it, never its label
        record = {"output": os.path.join(job.workDir, "output.nrrd"), "model": modelId, "agreement": 0.5,
                  "uncertain": True}
        first = logic.showFirstPass(regionMath.FirstPass(record), job, os.path.join(job.workDir, "input.nrrd"),
                                    "case A")
        self.assertEqual(first.GetName(), f"case A: {modelId} (first pass)")
        self.assertTrue(nodes.isComparison(first) and not nodes.isReviewed(first))
        self.assertEqual([row.segmentationId for row in logic.scanCases()], [segNode.GetID()])
        nodes.removeNodeAndHelpers(first)

        self.delayDisplay("Short fine-tune with one labelled and one unlabelled case")
        array = segmentArray
        if array.sum() == 0:  # an untrained model may find nothing: draw a blob as the correction
            k, j, i = np.indices(array.shape)
            blob = (((i - 24) / 10.0) ** 2 + ((j - 20) / 8.0) ** 2 + ((k - 12) / 5.0) ** 2 < 1.0)
            slicer.util.updateSegmentBinaryLabelmapFromArray(blob.astype("uint8"), segNode, segmentId, volume)
        self._syntheticVolume("case B", seed=1)
        rows = logic.scanCases()
        self.assertEqual(caseRules.counts(rows), (0, 2))  # an automatic result is no label until corrected
        logic.setReviewed(segNode, True)
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
        # both models' results on the unlabelled volume are beside it, and neither is a label until corrected
        self.assertEqual([name for name, _, _ in job.comparisons], ["case B"])
        for node in job.comparisons[0][1:]:
            self.assertEqual(node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()).GetName(), "case B")
            self.assertFalse(nodes.isReviewed(node))
        self.assertTrue(nodes.isComparison(job.comparisons[0][2]) and not nodes.isComparison(job.comparisons[0][1]))
        self.assertEqual(caseRules.counts(logic.scanCases()), (1, 1))
        self.assertIsNone(logic.catalog.get(modelId).error)
        nextId = logic.removeModel(newId)
        self.assertIsNone(logic.catalog.get(newId))
        self.assertTrue(nextId)
        self.delayDisplay("SemiSegLA end-to-end test passed")
