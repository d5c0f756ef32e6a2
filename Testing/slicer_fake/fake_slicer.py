"""An explicit stand-in for exactly the ``slicer`` (and ``qt``/``vtk``) calls SemiSegLA makes.

Not a MagicMock: every name below exists because the module calls it, anything else raises
AttributeError, unexpected keyword arguments raise TypeError, and every call is recorded. The nodes hold
numpy arrays (KJI order, as ``slicer.util.arrayFromVolume`` returns them) and an IJK-to-RAS geometry
(spacing, origin and axis directions in RAS, as MRML stores them). Files on disk are NRRD in LPS, written
and read with SimpleITK, as Slicer's NRRD IO does; the tests check that conversion against SimpleITK.

What it cannot show: real MRML behaviour (resampling on import, display nodes, terminology lookup,
subject-hierarchy plugins, Qt widgets). Where the real Slicer would resample, this stand-in raises, so
a grid mismatch can never pass silently.
"""

import sys
import types
import unittest
from typing import Dict, List, Optional

import numpy as np

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

CLASS_PARENTS = {
    "vtkMRMLNode": None,
    "vtkMRMLStorableNode": "vtkMRMLNode",
    "vtkMRMLTransformableNode": "vtkMRMLStorableNode",
    "vtkMRMLDisplayableNode": "vtkMRMLTransformableNode",
    "vtkMRMLVolumeNode": "vtkMRMLDisplayableNode",
    "vtkMRMLScalarVolumeNode": "vtkMRMLVolumeNode",
    "vtkMRMLLabelMapVolumeNode": "vtkMRMLScalarVolumeNode",
    "vtkMRMLTensorVolumeNode": "vtkMRMLScalarVolumeNode",
    "vtkMRMLVectorVolumeNode": "vtkMRMLTensorVolumeNode",
    "vtkMRMLSegmentationNode": "vtkMRMLDisplayableNode",
    "vtkMRMLStorageNode": "vtkMRMLNode",
    "vtkMRMLVolumeArchetypeStorageNode": "vtkMRMLStorageNode",
}


class FakeGeometryMismatch(NotImplementedError):
    """Real Slicer would resample here; the stand-in refuses so that tests catch the mismatch."""


class Recorder:
    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def record(self, name: str, *args) -> None:
        self.calls.append((name,) + args)

    def names(self) -> List[str]:
        return [c[0] for c in self.calls]


RECORDER = Recorder()


def _isA(className: str, query: str) -> bool:
    current: Optional[str] = className
    while current is not None:
        if current == query:
            return True
        current = CLASS_PARENTS.get(current)
    return False


# -- geometry ------------------------------------------------------------------------------------------------
class Geometry:
    """IJK-to-RAS: directions (3x3, columns = unit I, J, K axes in RAS), spacing, origin (RAS)."""

    def __init__(self, spacing, origin, directions) -> None:
        self.spacing = np.asarray(spacing, dtype=float).reshape(3)
        self.origin = np.asarray(origin, dtype=float).reshape(3)
        self.directions = np.asarray(directions, dtype=float).reshape(3, 3)

    def ijkToRas(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.directions @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def copy(self) -> "Geometry":
        return Geometry(self.spacing.copy(), self.origin.copy(), self.directions.copy())

    def close(self, other: "Geometry", tol: float = 1e-5) -> bool:
        return bool(np.allclose(self.ijkToRas(), other.ijkToRas(), atol=tol))


def writeNrrd(array: np.ndarray, geometry: Geometry, path: str, compress: bool) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in geometry.spacing])
    image.SetOrigin([float(v) for v in LPS_FROM_RAS @ geometry.origin])
    image.SetDirection([float(v) for v in (LPS_FROM_RAS @ geometry.directions).ravel()])
    sitk.WriteImage(image, path, useCompression=compress)


def readNrrd(path: str):
    import SimpleITK as sitk

    image = sitk.ReadImage(path)
    directionsLps = np.array(image.GetDirection()).reshape(3, 3)
    geometry = Geometry(image.GetSpacing(), LPS_FROM_RAS @ np.array(image.GetOrigin()),
                        LPS_FROM_RAS @ directionsLps)
    return sitk.GetArrayFromImage(image), geometry


# -- nodes --------------------------------------------------------------------------------------------------
class FakeNode:
    className = "vtkMRMLNode"

    def __init__(self) -> None:
        self._id: Optional[str] = None
        self._name = ""
        self._references: Dict[str, str] = {}
        self._transformId: Optional[str] = None
        self._scene: Optional[FakeScene] = None

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name):
        RECORDER.record(f"{self.className}.SetName", name)
        self._name = str(name)

    def IsA(self, className):
        return _isA(self.className, className)

    def GetClassName(self):
        return self.className

    def SetNodeReferenceID(self, role, nodeId):
        RECORDER.record(f"{self.className}.SetNodeReferenceID", role, nodeId)
        self._references[role] = nodeId

    def GetNodeReference(self, role):
        nodeId = self._references.get(role)
        return self._scene.GetNodeByID(nodeId) if (nodeId and self._scene) else None

    def GetTransformNodeID(self):
        return self._transformId

    def SetAndObserveTransformNodeID(self, transformId):
        RECORDER.record(f"{self.className}.SetAndObserveTransformNodeID", transformId)
        self._transformId = transformId


class FakeVolumeNode(FakeNode):
    def __init__(self, className: str = "vtkMRMLScalarVolumeNode") -> None:
        super().__init__()
        self.className = className
        self.array: Optional[np.ndarray] = None
        self.geometry = Geometry([1, 1, 1], [0, 0, 0], np.eye(3))


class FakeSegment:
    def __init__(self, name: str, mask: np.ndarray, color=(0.5, 0.5, 0.5)) -> None:
        self._name = name
        self.mask = mask
        self._color = tuple(color)
        self.tags: Dict[str, str] = {}

    def GetName(self):
        return self._name

    def SetName(self, name):
        RECORDER.record("vtkSegment.SetName", name)
        self._name = str(name)

    def SetColor(self, r, g, b):
        RECORDER.record("vtkSegment.SetColor", r, g, b)
        self._color = (float(r), float(g), float(b))

    def GetColor(self):
        return self._color

    def SetTag(self, tagName, value):
        RECORDER.record("vtkSegment.SetTag", tagName, value)
        self.tags[str(tagName)] = str(value)

    @staticmethod
    def GetTerminologyEntryTagName():
        return "TerminologyEntry"


class FakeSegmentation:
    """vtkSegmentation: ordered segments whose masks lie on ``geometry`` with ``shape`` (KJI)."""

    def __init__(self) -> None:
        self._segments: Dict[str, FakeSegment] = {}
        self.geometry: Optional[Geometry] = None
        self.shape: Optional[tuple] = None

    def GetNumberOfSegments(self):
        return len(self._segments)

    def GetNthSegmentID(self, index):
        return list(self._segments)[index]

    def GetNthSegment(self, index):
        return self._segments[self.GetNthSegmentID(index)]

    def GetSegment(self, segmentId):
        return self._segments.get(segmentId)

    def AddEmptySegment(self, segmentId="", segmentName="", color=None):
        RECORDER.record("vtkSegmentation.AddEmptySegment", segmentId, segmentName, color)
        if self.shape is None:
            raise RuntimeError("fake: AddEmptySegment before any geometry is known")
        newId = segmentId or f"Segment_{len(self._segments) + 1}"
        self._segments[newId] = FakeSegment(segmentName or newId, np.zeros(self.shape, bool),
                                            color or (0.5, 0.5, 0.5))
        return newId

    def _add(self, segmentId: str, segment: FakeSegment) -> None:
        self._segments[segmentId] = segment


class FakeSegmentationNode(FakeNode):
    className = "vtkMRMLSegmentationNode"

    def __init__(self) -> None:
        super().__init__()
        self._segmentation = FakeSegmentation()
        self.displayNodesCreated = False
        self.closedSurface = False

    def CreateDefaultDisplayNodes(self):
        RECORDER.record("vtkMRMLSegmentationNode.CreateDefaultDisplayNodes")
        self.displayNodesCreated = True

    def GetSegmentation(self):
        return self._segmentation

    def GetReferenceImageGeometryReferenceRole(self):
        return "referenceImageGeometryRef"

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode):
        RECORDER.record("vtkMRMLSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode",
                        volumeNode.GetID())
        self._segmentation.geometry = volumeNode.geometry.copy()
        self._segmentation.shape = tuple(volumeNode.array.shape)
        self._references[self.GetReferenceImageGeometryReferenceRole()] = volumeNode.GetID()

    def CreateClosedSurfaceRepresentation(self):
        RECORDER.record("vtkMRMLSegmentationNode.CreateClosedSurfaceRepresentation")
        self.closedSurface = True
        return True


class FakeStorageNode:
    className = "vtkMRMLVolumeArchetypeStorageNode"

    def __init__(self) -> None:
        self._fileName = ""
        self._compress = True
        self.unregistered = False

    def SetFileName(self, fileName):
        RECORDER.record("vtkMRMLVolumeArchetypeStorageNode.SetFileName", fileName)
        self._fileName = str(fileName)

    def UseCompressionOff(self):
        RECORDER.record("vtkMRMLVolumeArchetypeStorageNode.UseCompressionOff")
        self._compress = False

    def WriteData(self, node):
        RECORDER.record("vtkMRMLVolumeArchetypeStorageNode.WriteData", node.GetID(), self._fileName)
        if not isinstance(node, FakeVolumeNode) or node.array is None:
            return 0
        writeNrrd(node.array, node.geometry, self._fileName, self._compress)
        return 1

    def UnRegister(self, obj):
        if obj is not None:
            raise TypeError("fake: UnRegister expects None")
        self.unregistered = True


# -- scene and subject hierarchy -----------------------------------------------------------------------------
class FakeSubjectHierarchy:
    SCENE_ITEM = 1

    def __init__(self) -> None:
        self._next = 2
        self.itemOfNode: Dict[str, int] = {}
        self.parentOf: Dict[int, int] = {}
        self.names: Dict[int, str] = {self.SCENE_ITEM: "Scene"}

    def _newItem(self, parent: int, name: str) -> int:
        item = self._next
        self._next += 1
        self.parentOf[item] = parent
        self.names[item] = name
        return item

    def GetItemByDataNode(self, node):
        return self.itemOfNode.get(node.GetID(), 0)

    def GetItemParent(self, item):
        return self.parentOf.get(item, 0)

    def SetItemParent(self, item, parent):
        RECORDER.record("vtkMRMLSubjectHierarchyNode.SetItemParent", item, parent)
        if item not in self.parentOf or (parent not in self.parentOf and parent != self.SCENE_ITEM):
            raise ValueError("fake: invalid subject hierarchy item")
        self.parentOf[item] = parent


class FakeScene:
    def __init__(self) -> None:
        self._nodes: Dict[str, FakeNode] = {}
        self._counters: Dict[str, int] = {}
        self.subjectHierarchy = FakeSubjectHierarchy()

    def _create(self, className: str):
        if className == "vtkMRMLVolumeArchetypeStorageNode":
            return FakeStorageNode()
        if className in ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode"):
            return FakeVolumeNode(className)
        if className == "vtkMRMLSegmentationNode":
            return FakeSegmentationNode()
        raise AttributeError(f"fake slicer: node class {className} is not part of the stand-in")

    def _add(self, node: FakeNode, name: str = "") -> FakeNode:
        count = self._counters.get(node.className, 0) + 1
        self._counters[node.className] = count
        node._id = f"{node.className}{count}"
        node._name = name or node._name or node._id
        node._scene = self
        self._nodes[node._id] = node
        sh = self.subjectHierarchy
        sh.itemOfNode[node._id] = sh._newItem(sh.SCENE_ITEM, node._name)
        return node

    def AddNewNodeByClass(self, className, nodeName=""):
        RECORDER.record("vtkMRMLScene.AddNewNodeByClass", className, nodeName)
        node = self._create(className)
        if not isinstance(node, FakeNode):
            raise TypeError(f"fake slicer: {className} cannot be added to the scene here")
        return self._add(node, nodeName)

    def CreateNodeByClass(self, className):
        RECORDER.record("vtkMRMLScene.CreateNodeByClass", className)
        return self._create(className)

    def RemoveNode(self, node):
        RECORDER.record("vtkMRMLScene.RemoveNode", node.GetID() if node is not None else None)
        if node is not None and node.GetID() in self._nodes:
            del self._nodes[node.GetID()]
            item = self.subjectHierarchy.itemOfNode.pop(node.GetID(), None)
            self.subjectHierarchy.parentOf.pop(item, None)
            node._scene = None

    def GetNodeByID(self, nodeId):
        return self._nodes.get(nodeId)

    # not Slicer API: for assertions only
    def fakeNodes(self) -> List[FakeNode]:
        return list(self._nodes.values())


# -- module-level functions ------------------------------------------------------------------------------
class FakeSegmentationsLogic:
    def ImportLabelmapToSegmentationNode(self, labelmapNode, segmentationNode):
        RECORDER.record("vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode",
                        labelmapNode.GetID(), segmentationNode.GetID())
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.geometry is None:
            segmentation.geometry = labelmapNode.geometry.copy()
            segmentation.shape = tuple(labelmapNode.array.shape)
        if (not segmentation.geometry.close(labelmapNode.geometry)
                or tuple(labelmapNode.array.shape) != segmentation.shape):
            raise FakeGeometryMismatch("fake: label map and segmentation reference geometry differ "
                                       "(real Slicer would resample)")
        for value in sorted(int(v) for v in np.unique(labelmapNode.array) if v != 0):
            segmentation._add(f"Label_{value}", FakeSegment(f"Label_{value}", labelmapNode.array == value))
        return True

    def ExportSegmentsToLabelmapNode(self, segmentationNode, segmentIds, labelmapNode, referenceVolumeNode):
        ids = [segmentIds.GetValue(i) for i in range(segmentIds.GetNumberOfValues())]
        RECORDER.record("vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode",
                        segmentationNode.GetID(), ids, labelmapNode.GetID(), referenceVolumeNode.GetID())
        segmentation = segmentationNode.GetSegmentation()
        if (segmentation.geometry is None or not segmentation.geometry.close(referenceVolumeNode.geometry)
                or segmentation.shape != tuple(referenceVolumeNode.array.shape)):
            raise FakeGeometryMismatch("fake: export onto a different grid is not modelled")
        out = np.zeros(segmentation.shape, dtype=np.int16)  # Slicer exports as short
        for index, segmentId in enumerate(ids):
            segment = segmentation.GetSegment(segmentId)
            if segment is None:
                return False
            out[segment.mask] = index + 1
        labelmapNode.array = out
        labelmapNode.geometry = referenceVolumeNode.geometry.copy()
        return True


class FakeStringArray:
    def __init__(self) -> None:
        self._values: List[str] = []

    def InsertNextValue(self, value):
        self._values.append(str(value))
        return len(self._values) - 1

    def GetNumberOfValues(self):
        return len(self._values)

    def GetValue(self, index):
        return self._values[index]


class FakeModuleParent:
    __slots__ = ("title", "categories", "dependencies", "contributors", "helpText", "acknowledgementText")


class FakeSlicer:
    """Holds the fake modules; ``install()`` puts them into ``sys.modules``; ``reset()`` gives a new scene."""

    def __init__(self) -> None:
        self.recorder = RECORDER
        self.confirmAnswer = True
        self.pipCalls: List[list] = []
        self.dialogs: List[tuple] = []
        self.slicer = self._buildSlicer()
        self.qt = types.ModuleType("qt")  # the module file imports qt; the logic never uses it
        self.vtk = types.ModuleType("vtk")
        self.vtk.vtkStringArray = FakeStringArray
        self.reset()

    # -- the fake modules ---------------------------------------------------------------------------------
    def _buildSlicer(self) -> types.ModuleType:
        fake = self
        slicer = types.ModuleType("slicer")
        slicer.__path__ = []  # a package, so "from slicer.util import ..." works

        util = types.ModuleType("slicer.util")

        def loadLabelVolume(filename, properties=None):
            RECORDER.record("slicer.util.loadLabelVolume", filename, dict(properties or {}))
            unknown = set(properties or {}) - {"show", "name"}
            if unknown:
                raise TypeError(f"fake: unexpected loadLabelVolume properties {sorted(unknown)}")
            array, geometry = readNrrd(filename)
            node = FakeVolumeNode("vtkMRMLLabelMapVolumeNode")
            node.array, node.geometry = array, geometry
            return fake.scene._add(node, (properties or {}).get("name", ""))

        def arrayFromVolume(volumeNode):
            RECORDER.record("slicer.util.arrayFromVolume", volumeNode.GetID())
            return volumeNode.array

        def updateVolumeFromArray(volumeNode, narray):
            RECORDER.record("slicer.util.updateVolumeFromArray", volumeNode.GetID(), str(narray.dtype))
            if tuple(narray.shape) != tuple(volumeNode.array.shape):
                raise ValueError("fake: updateVolumeFromArray with another shape is not modelled")
            volumeNode.array = np.array(narray, copy=True)

        def getNodesByClass(className):
            RECORDER.record("slicer.util.getNodesByClass", className)
            return [n for n in fake.scene.fakeNodes() if n.IsA(className)]

        def pip_install(requirements):
            RECORDER.record("slicer.util.pip_install", requirements)
            fake.pipCalls.append(list(requirements) if isinstance(requirements, list) else [requirements])

        def confirmOkCancelDisplay(text, windowTitle=None, parent=None):
            RECORDER.record("slicer.util.confirmOkCancelDisplay", text)
            fake.dialogs.append(("confirmOkCancel", text, windowTitle))
            return fake.confirmAnswer

        class VTKObservationMixin:
            def __init__(self):
                self._observations = []

            def addObserver(self, obj, event, method):
                self._observations.append((obj, event, method))

            def removeObservers(self, method=None):
                self._observations = []

        for fn in (loadLabelVolume, arrayFromVolume, updateVolumeFromArray, getNodesByClass, pip_install,
                   confirmOkCancelDisplay):
            setattr(util, fn.__name__, fn)
        util.VTKObservationMixin = VTKObservationMixin
        slicer.util = util

        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        slicer.i18n = i18n

        slm = types.ModuleType("slicer.ScriptedLoadableModule")

        class ScriptedLoadableModule:
            def __init__(self, parent):
                self.parent = parent

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None):
                pass

        class ScriptedLoadableModuleWidget:
            def __init__(self, parent=None):
                self.parent = parent

        class ScriptedLoadableModuleTest(unittest.TestCase):
            def delayDisplay(self, message, msec=1000):
                RECORDER.record("ScriptedLoadableModuleTest.delayDisplay", message)

        for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                    ScriptedLoadableModuleTest):
            setattr(slm, cls.__name__, cls)
        slicer.ScriptedLoadableModule = slm

        modules = types.ModuleType("slicer.modules")
        segmentations = types.ModuleType("slicer.modules.segmentations")
        segmentationsLogic = FakeSegmentationsLogic()
        segmentations.logic = lambda: segmentationsLogic
        modules.segmentations = segmentations
        slicer.modules = modules

        class vtkMRMLSubjectHierarchyNode:
            @staticmethod
            def GetSubjectHierarchyNode(scene):
                return scene.subjectHierarchy

        slicer.vtkMRMLSubjectHierarchyNode = vtkMRMLSubjectHierarchyNode
        return slicer

    def reset(self) -> None:
        self.scene = FakeScene()
        self.slicer.mrmlScene = self.scene
        RECORDER.calls.clear()
        self.pipCalls.clear()
        self.dialogs.clear()
        self.confirmAnswer = True

    def install(self, monkeypatch=None) -> None:
        mods = {"slicer": self.slicer, "slicer.util": self.slicer.util, "slicer.i18n": self.slicer.i18n,
                "slicer.ScriptedLoadableModule": self.slicer.ScriptedLoadableModule, "qt": self.qt,
                "vtk": self.vtk}
        for name, module in mods.items():
            if monkeypatch is not None:
                monkeypatch.setitem(sys.modules, name, module)
            else:
                sys.modules[name] = module

    # -- test-side helpers (not Slicer API) -------------------------------------------------------------
    def addVolume(self, name: str, array: np.ndarray, spacing=(1, 1, 1), origin=(0, 0, 0), directions=None,
                  className: str = "vtkMRMLScalarVolumeNode") -> FakeVolumeNode:
        node = FakeVolumeNode(className)
        node.array = np.asarray(array)
        node.geometry = Geometry(spacing, origin, np.eye(3) if directions is None else directions)
        return self.scene._add(node, name)

    def addSegmentation(self, name: str, referenceVolume: FakeVolumeNode, segments: Dict[str, np.ndarray],
                        setReference: bool = True) -> FakeSegmentationNode:
        node = self.scene._add(FakeSegmentationNode(), name)
        seg = node.GetSegmentation()
        seg.geometry = referenceVolume.geometry.copy()
        seg.shape = tuple(referenceVolume.array.shape)
        for index, (segName, mask) in enumerate(segments.items()):
            seg._add(f"Segment_{index + 1}", FakeSegment(segName, np.asarray(mask, bool)))
        if setReference:
            node._references[node.GetReferenceImageGeometryReferenceRole()] = referenceVolume.GetID()
        return node

    def placeInFolder(self, node: FakeNode, folderName: str) -> int:
        sh = self.scene.subjectHierarchy
        folder = sh._newItem(sh.SCENE_ITEM, folderName)
        sh.parentOf[sh.itemOfNode[node.GetID()]] = folder
        return folder
