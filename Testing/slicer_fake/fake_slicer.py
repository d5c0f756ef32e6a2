"""An explicit stand-in for exactly the ``slicer`` (and ``qt``/``vtk``) calls SemiSegLA makes.

Not a MagicMock: every name below exists because the module calls it, anything else raises
AttributeError, unexpected keyword arguments raise TypeError, and every call is recorded. The nodes hold
numpy arrays (KJI order, as ``slicer.util.arrayFromVolume`` returns them) and an IJK-to-RAS geometry
(spacing, origin and axis directions in RAS, as MRML stores them). Files on disk are NRRD in LPS, written
and read with SimpleITK, as Slicer's NRRD IO does; the tests check that conversion against SimpleITK.

Where Slicer's own behaviour decides whether the module is right, the stand-in copies that behaviour (each
such place names the Slicer source it mirrors): parent transforms folded into the reference geometry and
applied on label-map import and export; node IDs reused after ``vtkMRMLScene::Clear``; the display,
storage and colour-table nodes that loading and exporting add to the scene (and that ``RemoveNode`` leaves
behind); ``RuntimeError`` from a failed load; the volume class tree, diffusion-weighted volumes included;
the terminology's recommended colours.

What it cannot show: voxel resampling, display pipelines, subject-hierarchy plugins, Qt rendering (the
widget's Qt calls are in fake_qt.py). Where the real Slicer would resample, this stand-in raises, so a grid
mismatch can never pass silently.
"""

import os
import sys
import tempfile
import types
import unittest
from typing import Dict, List, Optional

import numpy as np

from . import fake_qt

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

# the class tree of Libs/MRML/Core (vtkTypeMacro of each header)
CLASS_PARENTS = {
    "vtkMRMLNode": None,
    "vtkMRMLStorableNode": "vtkMRMLNode",
    "vtkMRMLTransformableNode": "vtkMRMLStorableNode",
    "vtkMRMLDisplayableNode": "vtkMRMLTransformableNode",
    "vtkMRMLVolumeNode": "vtkMRMLDisplayableNode",
    "vtkMRMLScalarVolumeNode": "vtkMRMLVolumeNode",
    "vtkMRMLLabelMapVolumeNode": "vtkMRMLScalarVolumeNode",
    "vtkMRMLDiffusionWeightedVolumeNode": "vtkMRMLScalarVolumeNode",
    "vtkMRMLTensorVolumeNode": "vtkMRMLScalarVolumeNode",
    "vtkMRMLDiffusionImageVolumeNode": "vtkMRMLTensorVolumeNode",
    "vtkMRMLDiffusionTensorVolumeNode": "vtkMRMLDiffusionImageVolumeNode",
    "vtkMRMLVectorVolumeNode": "vtkMRMLTensorVolumeNode",
    "vtkMRMLSegmentationNode": "vtkMRMLDisplayableNode",
    "vtkMRMLTransformNode": "vtkMRMLDisplayableNode",
    "vtkMRMLLinearTransformNode": "vtkMRMLTransformNode",
    "vtkMRMLStorageNode": "vtkMRMLNode",
    "vtkMRMLVolumeArchetypeStorageNode": "vtkMRMLStorageNode",
    "vtkMRMLDisplayNode": "vtkMRMLNode",
    "vtkMRMLVolumeDisplayNode": "vtkMRMLDisplayNode",
    "vtkMRMLScalarVolumeDisplayNode": "vtkMRMLVolumeDisplayNode",
    "vtkMRMLLabelMapVolumeDisplayNode": "vtkMRMLVolumeDisplayNode",
    "vtkMRMLSegmentationDisplayNode": "vtkMRMLDisplayNode",
    "vtkMRMLColorNode": "vtkMRMLStorableNode",
    "vtkMRMLColorTableNode": "vtkMRMLColorNode",
    "vtkMRMLScriptedModuleNode": "vtkMRMLNode",
    # Modules/Loadable/Markups/MRML (Slicer 5.6/5.8): vtkMRMLMarkupsNode : vtkMRMLDisplayableNode,
    # vtkMRMLMarkupsDisplayNode : vtkMRMLDisplayNode
    "vtkMRMLMarkupsNode": "vtkMRMLDisplayableNode",
    "vtkMRMLMarkupsROINode": "vtkMRMLMarkupsNode",
    "vtkMRMLMarkupsDisplayNode": "vtkMRMLDisplayNode",
    "vtkMRMLMarkupsROIDisplayNode": "vtkMRMLMarkupsDisplayNode",
}

# vtkCommand::ModifiedEvent (VTK Common/Core/vtkCommand.h); VTK's Python callbacks get the event's name
MODIFIED_EVENT = 33

# vtkSlicerColorLogic::GetDefaultLabelMapColorNodeID(): the colour table every loaded label map shows with
DEFAULT_LABEL_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileGenericAnatomyColors.txt"


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

    @classmethod
    def fromMatrix(cls, matrix: np.ndarray) -> "Geometry":
        """The geometry of an IJK-to-RAS matrix (after a linear transform: columns keep their lengths)."""
        matrix = np.asarray(matrix, dtype=float)
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        return cls(spacing, matrix[:3, 3], matrix[:3, :3] / spacing)

    def transformed(self, matrix: np.ndarray) -> "Geometry":
        return Geometry.fromMatrix(np.asarray(matrix, dtype=float) @ self.ijkToRas())


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


class FakeMatrix4x4:
    """vtkMatrix4x4 (only what the module's self-test uses)."""

    def __init__(self) -> None:
        self.array = np.eye(4)

    def GetElement(self, row, column):
        return float(self.array[row, column])

    def SetElement(self, row, column, value):
        self.array[row, column] = float(value)


# -- nodes --------------------------------------------------------------------------------------------------
class FakeNode:
    className = "vtkMRMLNode"

    def __init__(self) -> None:
        self._id: Optional[str] = None
        self._name = ""
        self._references: Dict[str, str] = {}
        self._displayIds: List[str] = []
        self._storageIds: List[str] = []
        self._attributes: Dict[str, str] = {}
        self._transformId: Optional[str] = None
        self._scene: Optional[FakeScene] = None

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name):
        RECORDER.record(f"{self.className}.SetName", name)
        self._name = str(name)

    def GetScene(self):
        return self._scene

    def IsA(self, className):
        return _isA(self.className, className)

    def GetClassName(self):
        return self.className

    def SetAttribute(self, name, value):
        RECORDER.record(f"{self.className}.SetAttribute", name, value)
        if value is None:
            self._attributes.pop(str(name), None)
        else:
            self._attributes[str(name)] = str(value)

    def GetAttribute(self, name):
        return self._attributes.get(str(name))

    def SetNodeReferenceID(self, role, nodeId):
        RECORDER.record(f"{self.className}.SetNodeReferenceID", role, nodeId)
        if nodeId:
            self._references[role] = nodeId
        else:
            self._references.pop(role, None)

    def GetNodeReference(self, role):
        nodeId = self._references.get(role)
        return self._scene.GetNodeByID(nodeId) if (nodeId and self._scene) else None

    # vtkMRMLTransformableNode
    def GetTransformNodeID(self):
        return self._transformId

    def SetAndObserveTransformNodeID(self, transformId):
        RECORDER.record(f"{self.className}.SetAndObserveTransformNodeID", transformId)
        self._transformId = transformId or None

    def GetParentTransformNode(self):
        # vtkMRMLTransformableNode::GetParentTransformNode: None for a missing or non-transform node
        node = self._scene.GetNodeByID(self._transformId) if (self._transformId and self._scene) else None
        return node if node is not None and node.IsA("vtkMRMLTransformNode") else None

    # vtkMRMLDisplayableNode
    def _referenced(self, ids: List[str]):
        return [self._scene.GetNodeByID(i) if self._scene else None for i in ids]

    def SetAndObserveDisplayNodeID(self, displayNodeId):
        self._displayIds = [displayNodeId] if displayNodeId else []

    def AddAndObserveDisplayNodeID(self, displayNodeId):
        if displayNodeId and displayNodeId not in self._displayIds:
            self._displayIds.append(displayNodeId)

    def GetDisplayNode(self):
        nodes = [n for n in self._referenced(self._displayIds) if n is not None]
        return nodes[0] if nodes else None

    def GetNumberOfDisplayNodes(self):
        return len(self._displayIds)

    def GetNthDisplayNode(self, index):
        return self._referenced(self._displayIds)[index] if 0 <= index < len(self._displayIds) else None

    # vtkMRMLStorableNode
    def SetAndObserveStorageNodeID(self, storageNodeId):
        self._storageIds = [storageNodeId] if storageNodeId else []

    def GetStorageNode(self):
        nodes = [n for n in self._referenced(self._storageIds) if n is not None]
        return nodes[0] if nodes else None

    def GetNumberOfStorageNodes(self):
        return len(self._storageIds)

    def GetNthStorageNode(self, index):
        return self._referenced(self._storageIds)[index] if 0 <= index < len(self._storageIds) else None

    def _dropReferencesTo(self, nodeId: str) -> None:
        # vtkMRMLScene::RemoveNode -> RemoveReferencesToNode: references to a removed node are cleared
        self._references = {role: i for role, i in self._references.items() if i != nodeId}
        self._displayIds = [i for i in self._displayIds if i != nodeId]
        self._storageIds = [i for i in self._storageIds if i != nodeId]


class FakeVolumeNode(FakeNode):
    def __init__(self, className: str = "vtkMRMLScalarVolumeNode") -> None:
        super().__init__()
        self.className = className
        self.array: Optional[np.ndarray] = None
        self.geometry = Geometry([1, 1, 1], [0, 0, 0], np.eye(3))

    def GetIJKToRASMatrix(self, matrix):
        matrix.array = self.geometry.ijkToRas()

    def SetIJKToRASMatrix(self, matrix):
        self.geometry = Geometry.fromMatrix(matrix.array)

    def CreateDefaultDisplayNodes(self):
        # vtkMRMLLabelMapVolumeNode/vtkMRMLScalarVolumeNode::CreateDefaultDisplayNodes: one display node,
        # added to the scene, with the default colour table
        RECORDER.record(f"{self.className}.CreateDefaultDisplayNodes")
        if self.GetDisplayNode() is not None:
            return
        if self._scene is None:
            raise RuntimeError("fake: CreateDefaultDisplayNodes needs the node in a scene")
        labelMap = self.IsA("vtkMRMLLabelMapVolumeNode")
        display = self._scene.AddNewNodeByClass(
            "vtkMRMLLabelMapVolumeDisplayNode" if labelMap else "vtkMRMLScalarVolumeDisplayNode")
        if labelMap:
            display.SetAndObserveColorNodeID(DEFAULT_LABEL_COLOR_NODE_ID)
        self.SetAndObserveDisplayNodeID(display.GetID())


class FakeDisplayNode(FakeNode):
    def __init__(self, className: str) -> None:
        super().__init__()
        self.className = className
        self._colorNodeId: Optional[str] = None

    def SetAndObserveColorNodeID(self, colorNodeId):
        self._colorNodeId = colorNodeId or None

    def GetColorNodeID(self):
        return self._colorNodeId

    def GetColorNode(self):
        return self._scene.GetNodeByID(self._colorNodeId) if (self._scene and self._colorNodeId) else None

    def _dropReferencesTo(self, nodeId: str) -> None:
        super()._dropReferencesTo(nodeId)
        if self._colorNodeId == nodeId:
            self._colorNodeId = None


class FakeColorTableNode(FakeNode):
    className = "vtkMRMLColorTableNode"
    User, File = 13, 14  # vtkMRMLColorTableNode type constants

    def __init__(self, colorType: int = 13) -> None:
        super().__init__()
        self._type = colorType

    def GetType(self):
        return self._type


class FakeTransformNode(FakeNode):
    className = "vtkMRMLLinearTransformNode"

    def __init__(self) -> None:
        super().__init__()
        self.matrixToParent = np.eye(4)

    def SetMatrixTransformToParent(self, matrix):
        RECORDER.record("vtkMRMLLinearTransformNode.SetMatrixTransformToParent")
        self.matrixToParent = np.array(matrix.array, dtype=float)


def worldFromNode(node: Optional[FakeNode]) -> np.ndarray:
    """The node's local (RAS) -> world matrix: its chain of parent linear transforms."""
    return worldFromTransform(node.GetParentTransformNode() if node is not None else None)


def worldFromTransform(transform: Optional["FakeTransformNode"]) -> np.ndarray:
    """A transform node's (None: the world's) to-world matrix: its own matrix, then its parents'."""
    matrix = np.eye(4)
    seen = set()
    while transform is not None and transform.GetID() not in seen:
        seen.add(transform.GetID())
        matrix = transform.matrixToParent @ matrix
        transform = transform.GetParentTransformNode()
    return matrix


class vtkMRMLTransformNode:
    """The static helper the module calls (every transform here is linear)."""

    @staticmethod
    def GetMatrixTransformBetweenNodes(sourceNode, targetNode, transformSourceToTarget):
        # vtkMRMLTransformNode::GetMatrixTransformBetweenNodes (Libs/MRML/Core/vtkMRMLTransformNode.cxx): None
        # is the world; fills the matrix from source to target coordinates and returns 1 (0 when non-linear)
        RECORDER.record("vtkMRMLTransformNode.GetMatrixTransformBetweenNodes",
                        sourceNode.GetID() if sourceNode else None, targetNode.GetID() if targetNode else None)
        transformSourceToTarget.array = np.linalg.inv(worldFromTransform(targetNode)) @ worldFromTransform(sourceNode)
        return 1


def transformBetweenNodes(source: FakeNode, target: FakeNode) -> np.ndarray:
    # vtkMRMLTransformNode::GetMatrixTransformBetweenNodes(source parent, target parent)
    return np.linalg.inv(worldFromNode(target)) @ worldFromNode(source)


class FakeROINode(FakeNode):
    """vtkMRMLMarkupsROINode, a box ROI (Modules/Loadable/Markups/MRML/vtkMRMLMarkupsROINode.{h,cxx}, Slicer
    5.6/5.8): ``Size`` (side lengths, node coordinates) and the ObjectToNode matrix (axes as columns, centre
    as translation). Every change of its geometry invokes ModifiedEvent: SetSize calls Modified();
    SetAndObserveObjectToNodeMatrix modifies the new matrix, which ProcessMRMLEvents answers with
    UpdateObjectToWorldMatrix -> Modified(); a new parent transform (OnTransformNodeReferenceChanged) too.
    Changing the returned matrix in place is not modelled (use SetAndObserveObjectToNodeMatrix)."""
    className = "vtkMRMLMarkupsROINode"

    def __init__(self) -> None:
        super().__init__()
        self._size = (0.0, 0.0, 0.0)
        self._objectToNode = FakeMatrix4x4()
        self._observers: List[tuple] = []  # (tag, event, callback)

    # vtkObject: AddObserver(event, callback, priority) -> tag; RemoveObserver(tag)
    def AddObserver(self, event, callback, priority=0.0):
        tag = (self._observers[-1][0] + 1) if self._observers else 1
        self._observers.append((tag, event, callback))
        return tag

    def RemoveObserver(self, tag):
        self._observers = [o for o in self._observers if o[0] != tag]

    def Modified(self):
        for _, event, callback in list(self._observers):
            if event in (MODIFIED_EVENT, "ModifiedEvent"):
                callback(self, "ModifiedEvent")

    def GetSize(self):
        return self._size  # vtkGetVector3Macro: a tuple in Python

    def SetSize(self, *size):
        RECORDER.record("vtkMRMLMarkupsROINode.SetSize", *size)
        size = tuple(float(v) for v in (size[0] if len(size) == 1 else size))
        if len(size) != 3:
            raise TypeError("fake: SetSize takes (x, y, z) or one 3-vector")
        if size != self._size:  # vtkMRMLMarkupsROINode::SetSize returns early when nothing changes
            self._size = size
            self.Modified()

    def GetObjectToNodeMatrix(self):
        return self._objectToNode

    def SetAndObserveObjectToNodeMatrix(self, objectToNodeMatrix):
        RECORDER.record("vtkMRMLMarkupsROINode.SetAndObserveObjectToNodeMatrix")
        if objectToNodeMatrix is self._objectToNode:
            return
        self._objectToNode = objectToNodeMatrix if objectToNodeMatrix is not None else FakeMatrix4x4()
        self.Modified()

    def SetAndObserveTransformNodeID(self, transformId):
        changed = (transformId or None) != self._transformId
        super().SetAndObserveTransformNodeID(transformId)
        if changed:
            self.Modified()

    def CreateDefaultDisplayNodes(self):
        # vtkMRMLMarkupsROINode::CreateDefaultDisplayNodes: a vtkMRMLMarkupsROIDisplayNode, unless there is one
        RECORDER.record("vtkMRMLMarkupsROINode.CreateDefaultDisplayNodes")
        if self.GetDisplayNode() is not None:
            return
        if self._scene is None:
            raise RuntimeError("fake: CreateDefaultDisplayNodes needs the node in a scene")
        display = self._scene.AddNewNodeByClass("vtkMRMLMarkupsROIDisplayNode")
        self.SetAndObserveDisplayNodeID(display.GetID())

    # not Slicer API: for assertions only
    def objectToNode(self) -> np.ndarray:
        return np.array(self._objectToNode.array, dtype=float)


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
    """vtkSegmentation: ordered segments whose masks lie on ``geometry`` with ``shape`` (KJI).

    ``geometry`` is the reference image geometry in the segmentation node's own coordinates (under its
    parent transform), as the conversion parameter stores it."""

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
        # vtkMRMLSegmentationNode::CreateDefaultDisplayNodes: a vtkMRMLSegmentationDisplayNode in the scene
        RECORDER.record("vtkMRMLSegmentationNode.CreateDefaultDisplayNodes")
        self.displayNodesCreated = True
        if self.GetDisplayNode() is None and self._scene is not None:
            display = self._scene.AddNewNodeByClass("vtkMRMLSegmentationDisplayNode")
            self.SetAndObserveDisplayNodeID(display.GetID())

    def GetSegmentation(self):
        return self._segmentation

    @staticmethod
    def GetReferenceImageGeometryReferenceRole():
        return "referenceImageGeometryRef"

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode):
        RECORDER.record("vtkMRMLSegmentationNode.SetReferenceImageGeometryParameterFromVolumeNode",
                        volumeNode.GetID())
        # vtkMRMLSegmentationNode::SetReferenceImageGeometryParameterFromVolumeNode: the transform between
        # the volume's and the segmentation's parent transforms is folded into the stored geometry
        self._segmentation.geometry = volumeNode.geometry.transformed(transformBetweenNodes(volumeNode, self))
        self._segmentation.shape = tuple(volumeNode.array.shape)
        self._references[self.GetReferenceImageGeometryReferenceRole()] = volumeNode.GetID()

    def CreateClosedSurfaceRepresentation(self):
        RECORDER.record("vtkMRMLSegmentationNode.CreateClosedSurfaceRepresentation")
        self.closedSurface = True
        return True


class FakeStorageNode(FakeNode):
    className = "vtkMRMLVolumeArchetypeStorageNode"

    def __init__(self) -> None:
        super().__init__()
        self._fileName = ""
        self._compress = True
        self.unregistered = False

    def SetFileName(self, fileName):
        RECORDER.record("vtkMRMLVolumeArchetypeStorageNode.SetFileName", fileName)
        self._fileName = str(fileName)

    def GetFileName(self):
        return self._fileName

    def UseCompressionOff(self):
        RECORDER.record("vtkMRMLVolumeArchetypeStorageNode.UseCompressionOff")
        self._compress = False

    def WriteData(self, node):
        RECORDER.record("vtkMRMLVolumeArchetypeStorageNode.WriteData", node.GetID(), self._fileName)
        if not isinstance(node, FakeVolumeNode) or node.array is None:
            return 0
        # vtkMRMLVolumeArchetypeStorageNode writes the node's own IJK-to-RAS; parent transforms are not applied
        writeNrrd(node.array, node.geometry, self._fileName, self._compress)
        return 1

    def UnRegister(self, obj):
        if obj is not None:
            raise TypeError("fake: UnRegister expects None")
        self.unregistered = True


class FakeScriptedModuleNode(FakeNode):
    className = "vtkMRMLScriptedModuleNode"

    def __init__(self) -> None:
        super().__init__()
        self._parameters: Dict[str, str] = {}

    def SetParameter(self, name, value):
        RECORDER.record("vtkMRMLScriptedModuleNode.SetParameter", name, value)
        self._parameters[str(name)] = str(value)

    def GetParameter(self, name):
        return self._parameters.get(str(name), "")

    def UnsetParameter(self, name):
        self._parameters.pop(str(name), None)


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
    StartCloseEvent, EndCloseEvent, NodeAddedEvent, NodeRemovedEvent, EndImportEvent = 66000, 66001, 66002, 66003, 66004

    def __init__(self) -> None:
        self._observers: List[tuple] = []  # (tag, event, callback): vtkObject::AddObserver
        self._nodes: Dict[str, FakeNode] = {}
        self._counters: Dict[str, int] = {}
        self.subjectHierarchy = FakeSubjectHierarchy()
        # Slicer's default colour tables live in every scene; the module must never remove them
        self._builtins: Dict[str, FakeNode] = {}
        default = FakeColorTableNode(FakeColorTableNode.File)
        default._id, default._name, default._scene = DEFAULT_LABEL_COLOR_NODE_ID, "GenericAnatomyColors", self
        self._builtins[default._id] = default

    def _create(self, className: str):
        if className == "vtkMRMLVolumeArchetypeStorageNode":
            return FakeStorageNode()
        if _isA(className, "vtkMRMLVolumeNode"):
            return FakeVolumeNode(className)
        if className == "vtkMRMLSegmentationNode":
            return FakeSegmentationNode()
        if className in ("vtkMRMLScalarVolumeDisplayNode", "vtkMRMLLabelMapVolumeDisplayNode",
                         "vtkMRMLSegmentationDisplayNode", "vtkMRMLMarkupsROIDisplayNode"):
            return FakeDisplayNode(className)
        if className == "vtkMRMLColorTableNode":
            return FakeColorTableNode()
        if className == "vtkMRMLLinearTransformNode":
            return FakeTransformNode()
        if className == "vtkMRMLScriptedModuleNode":
            return FakeScriptedModuleNode()
        if className == "vtkMRMLMarkupsROINode":
            return FakeROINode()
        raise AttributeError(f"fake slicer: node class {className} is not part of the stand-in")

    def _add(self, node: FakeNode, name: str = "") -> FakeNode:
        # vtkMRMLScene::GenerateUniqueID: <class name><n>, n from a per-class counter (reset by Clear)
        count = self._counters.get(node.className, 0) + 1
        while f"{node.className}{count}" in self._nodes:
            count += 1
        self._counters[node.className] = count
        node._id = f"{node.className}{count}"
        node._name = name or node._name or node._id
        node._scene = self
        self._nodes[node._id] = node
        if node.IsA("vtkMRMLDisplayableNode") or node.IsA("vtkMRMLColorTableNode"):
            # the subject hierarchy holds data nodes (and visible colour tables), never display/storage nodes
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

    def AddObserver(self, event, callback, priority=0.0):
        tag = len(self._observers) + 1
        self._observers.append((tag, event, callback))
        return tag

    def RemoveObserver(self, tag):
        self._observers = [o for o in self._observers if o[0] != tag]

    def InvokeEvent(self, event, callData=None):
        for _, observed, callback in list(self._observers):
            if observed == event:
                callback(self, event)

    def RemoveNode(self, node):
        RECORDER.record("vtkMRMLScene.RemoveNode", node.GetID() if node is not None else None)
        if node is not None and node.GetID() in self._builtins:
            raise AssertionError(f"fake: {node.GetID()} is one of Slicer's default colour tables; removing it "
                                 "breaks every label map in the scene")
        if node is not None and node.GetID() in self._nodes:
            # vtkMRMLScene::RemoveNode removes this node only: its display and storage nodes stay in the scene
            del self._nodes[node.GetID()]
            item = self.subjectHierarchy.itemOfNode.pop(node.GetID(), None)
            self.subjectHierarchy.parentOf.pop(item, None)
            node._scene = None
            for other in self._nodes.values():
                other._dropReferencesTo(node.GetID())
            self.InvokeEvent(self.NodeRemovedEvent, node)

    def Clear(self, removeSingletons=0):
        RECORDER.record("vtkMRMLScene.Clear", removeSingletons)
        self.InvokeEvent(self.StartCloseEvent)  # vtkMRMLScene::Clear sets, then unsets, the CloseState
        # vtkMRMLScene::Clear: every node is removed and the unique-ID counters are reset, so the next node of
        # a class gets the ID an old node had (vtkMRMLScalarVolumeNode1 again)
        for node in list(self._nodes.values()):
            self.RemoveNode(node)
        self._counters.clear()
        self.subjectHierarchy = FakeSubjectHierarchy()
        self.InvokeEvent(self.EndCloseEvent)

    def GetNodeByID(self, nodeId):
        return self._nodes.get(nodeId) or self._builtins.get(nodeId)

    def GetNumberOfNodesByClass(self, className):
        return sum(1 for node in [*self._nodes.values(), *self._builtins.values()] if node.IsA(className))

    # not Slicer API: for assertions only
    def fakeNodes(self) -> List[FakeNode]:
        """The scene's nodes in the order they were added (without Slicer's built-in colour tables)."""
        return list(self._nodes.values())


# -- module-level functions ------------------------------------------------------------------------------
class FakeSegmentationsLogic:
    def ImportLabelmapToSegmentationNode(self, labelmapNode, segmentationNode):
        RECORDER.record("vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode",
                        labelmapNode.GetID(), segmentationNode.GetID())
        segmentation = segmentationNode.GetSegmentation()
        # vtkSlicerSegmentationsModuleLogic::ImportLabelmapToSegmentationNode: display nodes are created when
        # missing, and the label map is brought into the segmentation's coordinates through the transform
        # between their parent transforms (GetTransformBetweenRepresentationAndSegmentation)
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        labelGeometry = labelmapNode.geometry.transformed(transformBetweenNodes(labelmapNode, segmentationNode))
        if segmentation.geometry is None:
            segmentation.geometry = labelGeometry
            segmentation.shape = tuple(labelmapNode.array.shape)
        if (not segmentation.geometry.close(labelGeometry)
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
        scene = segmentationNode.GetScene()
        if scene is None or labelmapNode.GetScene() is None:
            return False
        # vtkSlicerSegmentationsModuleLogic::ExportSegmentsToLabelmapNode: the label map goes under the
        # reference volume's parent transform, and the reference grid is compared in segmentation coordinates
        labelmapNode.SetAndObserveTransformNodeID(referenceVolumeNode.GetTransformNodeID())
        segmentation = segmentationNode.GetSegmentation()
        reference = referenceVolumeNode.geometry.transformed(transformBetweenNodes(referenceVolumeNode,
                                                                                   segmentationNode))
        if (segmentation.geometry is None or not segmentation.geometry.close(reference)
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
        # ... then display nodes for both, and a new user colour table "<segmentation>_ColorTable" added to the
        # scene (AddColorTableNodeForSegmentation) unless the label map already shows with a user table
        if labelmapNode.GetDisplayNode() is None:
            labelmapNode.CreateDefaultDisplayNodes()
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        display = labelmapNode.GetDisplayNode()
        color = display.GetColorNode()
        if color is None or color.GetType() != FakeColorTableNode.User:
            table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{segmentationNode.GetName()}_ColorTable")
            display.SetAndObserveColorNodeID(table.GetID())
        sh = scene.subjectHierarchy
        segItem, labelItem = sh.GetItemByDataNode(segmentationNode), sh.GetItemByDataNode(labelmapNode)
        if segItem and labelItem:
            sh.parentOf[labelItem] = sh.GetItemParent(segItem)
        return True


# Segmentation category and type - DICOM master list (Modules/Loadable/Terminologies/Resources/
# SegmentationCategoryTypeModifier-DICOM-Master.json): a few types of "Anatomical Structure" with their
# recommendedDisplayRGBValue, enough for the lookups the module makes
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
TERMINOLOGY_TYPES = {
    ("SCT", "123037004"): [  # Anatomical Structure
        ("SCT", "7742001", "Right atrium", (209, 131, 107)),
        ("SCT", "82471001", "Left atrium", (203, 108, 81)),
        ("SCT", "15825003", "Aorta", (224, 97, 76)),
    ],
}


class FakeTerminologyType:
    def __init__(self) -> None:
        self.scheme, self.value, self.meaning, self.rgb = "", "", "", (127, 127, 127)

    def GetCodingSchemeDesignator(self):
        return self.scheme

    def GetCodeValue(self):
        return self.value

    def GetCodeMeaning(self):
        return self.meaning

    def GetRecommendedDisplayRGBValue(self):
        return self.rgb


class FakeTerminologyEntry:
    """vtkSlicerTerminologyEntry: context name and category/type/modifier objects."""

    def __init__(self) -> None:
        self.context = ""
        self.category, self.type, self.modifier = FakeTerminologyType(), FakeTerminologyType(), FakeTerminologyType()

    def GetTerminologyContextName(self):
        return self.context

    def GetCategoryObject(self):
        return self.category

    def GetTypeObject(self):
        return self.type

    def GetTypeModifierObject(self):
        return self.modifier


class FakeTerminologiesLogic:
    def __init__(self) -> None:
        self.types = {key: list(value) for key, value in TERMINOLOGY_TYPES.items()}

    def DeserializeTerminologyEntry(self, serialized, entry):
        RECORDER.record("vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry", serialized)
        # vtkSlicerTerminologiesModuleLogic::DeserializeTerminologyEntry: 7 '~' parts, codes as scheme^value^meaning
        parts = str(serialized).split("~")
        if len(parts) != 7 or parts[1] == "^^":
            return False
        entry.context = parts[0]
        for target, text in ((entry.category, parts[1]), (entry.type, parts[2]), (entry.modifier, parts[3])):
            codes = text.split("^")
            if len(codes) == 3:
                target.scheme, target.value, target.meaning = codes
        return True

    def _types(self, contextName, category):
        if contextName != TERMINOLOGY_CONTEXT:
            return []
        return self.types.get((category.GetCodingSchemeDesignator(), category.GetCodeValue()), [])

    def GetNumberOfTypesInTerminologyCategory(self, contextName, category):
        return len(self._types(contextName, category))

    def GetNthTypeInTerminologyCategory(self, contextName, category, index, typeObject):
        types = self._types(contextName, category)
        if not 0 <= index < len(types):
            return False
        typeObject.scheme, typeObject.value, typeObject.meaning, typeObject.rgb = types[index]
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
        self.moduleDir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                      "SemiSegLA")
        self.slicer = self._buildSlicer()
        self.qt = fake_qt.buildModule(types.ModuleType)  # the widget's Qt calls (fake_qt.py)
        self.vtk = types.ModuleType("vtk")
        self.vtk.vtkStringArray = FakeStringArray
        self.vtk.vtkMatrix4x4 = FakeMatrix4x4
        self.vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent=MODIFIED_EVENT)
        self.reset()

    # -- the fake modules ---------------------------------------------------------------------------------
    def _buildSlicer(self) -> types.ModuleType:
        fake = self
        slicer = types.ModuleType("slicer")
        slicer.__path__ = []  # a package, so "from slicer.util import ..." works

        util = types.ModuleType("slicer.util")
        segmentationsLogic = FakeSegmentationsLogic()

        def loadLabelVolume(filename, properties=None):
            RECORDER.record("slicer.util.loadLabelVolume", filename, dict(properties or {}))
            unknown = set(properties or {}) - {"show", "name"}
            if unknown:
                raise TypeError(f"fake: unexpected loadLabelVolume properties {sorted(unknown)}")
            # slicer.util.loadNodeFromFile raises RuntimeError when the file cannot be loaded (never returns None)
            try:
                array, geometry = readNrrd(filename)
            except Exception as exc:
                raise RuntimeError(f"Failed to load node from file: {filename}\n{exc}") from None
            # vtkSlicerVolumesLogic::AddArchetypeVolume adds a display node (with the default label colour
            # table) and a storage node to the scene with the volume
            scene = fake.scene
            display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
            display.SetAndObserveColorNodeID(DEFAULT_LABEL_COLOR_NODE_ID)
            storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
            storage.SetFileName(filename)
            node = FakeVolumeNode("vtkMRMLLabelMapVolumeNode")
            node.array, node.geometry = array, geometry
            scene._add(node, (properties or {}).get("name", ""))
            node.SetAndObserveDisplayNodeID(display.GetID())
            node.SetAndObserveStorageNodeID(storage.GetID())
            return node

        def arrayFromVolume(volumeNode):
            RECORDER.record("slicer.util.arrayFromVolume", volumeNode.GetID())
            return volumeNode.array

        def updateVolumeFromArray(volumeNode, narray):
            RECORDER.record("slicer.util.updateVolumeFromArray", volumeNode.GetID(), str(narray.dtype))
            if tuple(narray.shape) != tuple(volumeNode.array.shape):
                raise ValueError("fake: updateVolumeFromArray with another shape is not modelled")
            volumeNode.array = np.array(narray, copy=True)

        def arrayFromVTKMatrix(vmatrix):
            # slicer.util.arrayFromVTKMatrix: a copy of the elements
            if not isinstance(vmatrix, FakeMatrix4x4):
                raise RuntimeError("Input must be vtk.vtkMatrix3x3 or vtk.vtkMatrix4x4")
            return np.array(vmatrix.array, dtype=float)

        def vtkMatrixFromArray(narray):
            matrix = FakeMatrix4x4()
            matrix.array = np.array(narray, dtype=float).reshape(4, 4)
            return matrix

        def addVolumeFromArray(narray, ijkToRAS=None, name=None, nodeClassName=None):
            RECORDER.record("slicer.util.addVolumeFromArray", name, nodeClassName)
            # slicer.util.addVolumeFromArray: a new node of that class, the array, the geometry, display nodes
            node = fake.scene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
            node.array = np.array(narray, copy=True)
            if ijkToRAS is not None:
                matrix = ijkToRAS if isinstance(ijkToRAS, FakeMatrix4x4) else vtkMatrixFromArray(ijkToRAS)
                node.SetIJKToRASMatrix(matrix)
            node.CreateDefaultDisplayNodes()
            return node

        def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
            RECORDER.record("slicer.util.arrayFromSegmentBinaryLabelmap", segmentationNode.GetID(), segmentId)
            # slicer.util.arrayFromSegmentBinaryLabelmap: export through a temporary label map, then remove its
            # colour table and the label map (its display node stays in the scene, as in Slicer)
            if referenceVolumeNode is None:
                referenceVolumeNode = segmentationNode.GetNodeReference(
                    segmentationNode.GetReferenceImageGeometryReferenceRole())
            ids = FakeStringArray()
            ids.InsertNextValue(segmentId)
            labelmap = fake.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__temp__")
            try:
                if not segmentationsLogic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap,
                                                                      referenceVolumeNode):
                    raise RuntimeError("Export of segment failed.")
                return np.array(labelmap.array, copy=True)
            finally:
                if labelmap.GetDisplayNode():
                    fake.scene.RemoveNode(labelmap.GetDisplayNode().GetColorNode())
                fake.scene.RemoveNode(labelmap)

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

        def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
            RECORDER.record("slicer.util.errorDisplay", text)
            fake.dialogs.append(("error", text, windowTitle))

        def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
            RECORDER.record("slicer.util.warningDisplay", text)
            fake.dialogs.append(("warning", text, windowTitle))

        def showStatusMessage(message, duration=0):
            RECORDER.record("slicer.util.showStatusMessage", message)

        class VTKObservationMixin:
            # slicer.util.VTKObservationMixin (Base/Python/slicer/util.py): addObserver puts a vtk observer on the
            # object (obj.AddObserver(event, method, priority); callback(caller, event)), once per method;
            # removeObserver(obj, event, method) takes one off, removeObservers all of them
            def __init__(self):
                self._observations = []

            def addObserver(self, obj, event, method, group="none", priority=0.0):
                if any(o[0] is obj and o[1] == event and o[2] == method for o in self._observations):
                    return  # "already has observer"
                self._observations.append((obj, event, method, obj.AddObserver(event, method, priority)))

            def removeObserver(self, obj, event, method):
                for observation in list(self._observations):
                    if observation[0] is obj and observation[1] == event and observation[2] == method:
                        obj.RemoveObserver(observation[3])
                        self._observations.remove(observation)

            def removeObservers(self, method=None):
                for obj, _, observed, tag in list(self._observations):
                    if method is None or observed == method:
                        obj.RemoveObserver(tag)
                        self._observations.remove((obj, _, observed, tag))

        for fn in (loadLabelVolume, arrayFromVolume, updateVolumeFromArray, getNodesByClass, pip_install,
                   confirmOkCancelDisplay, vtkMatrixFromArray, arrayFromVTKMatrix, addVolumeFromArray,
                   arrayFromSegmentBinaryLabelmap, errorDisplay, warningDisplay, showStatusMessage):
            setattr(util, fn.__name__, fn)
        util.loadUI = fake_qt.loadUI
        util.childWidgetVariables = fake_qt.childWidgetVariables
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

            def getParameterNode(self):
                # ScriptedLoadableModuleLogic.getParameterNode: one vtkMRMLScriptedModuleNode per module in the
                # scene (singleton tag = module name), created on first use and saved with the scene
                scene = fake.slicer.mrmlScene
                for node in scene.fakeNodes():
                    if node.IsA("vtkMRMLScriptedModuleNode") and node.GetAttribute("ModuleName") == "SemiSegLA":
                        return node
                node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "SemiSegLA")
                node.SetAttribute("ModuleName", "SemiSegLA")
                return node

        class ScriptedLoadableModuleWidget:
            # ScriptedLoadableModule.py: the panel's layout; without a parent a panel is made and set up
            def __init__(self, parent=None):
                self.parent = parent or fake_qt.FakeModulePanel()
                self.layout = self.parent.layout()
                self.moduleName = type(self).__name__[:-len("Widget")]
                if parent is None:
                    self.setup()

            def setup(self):
                pass  # the Reload & Test section appears in developer mode only

            def resourcePath(self, filename):
                return os.path.join(fake.moduleDir, "Resources", filename)

        class ScriptedLoadableModuleTest(unittest.TestCase):
            def delayDisplay(self, message, msec=1000):
                RECORDER.record("ScriptedLoadableModuleTest.delayDisplay", message)

        for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                    ScriptedLoadableModuleTest):
            setattr(slm, cls.__name__, cls)
        slicer.ScriptedLoadableModule = slm

        modules = types.ModuleType("slicer.modules")
        segmentations = types.ModuleType("slicer.modules.segmentations")
        segmentations.logic = lambda: segmentationsLogic
        modules.segmentations = segmentations
        terminologies = types.ModuleType("slicer.modules.terminologies")
        terminologies.logic = lambda: fake.terminologiesLogic
        modules.terminologies = terminologies
        slicer.modules = modules
        slicer.vtkSlicerTerminologyEntry = FakeTerminologyEntry

        class vtkMRMLSubjectHierarchyNode:
            @staticmethod
            def GetSubjectHierarchyNode(scene):
                return scene.subjectHierarchy

        slicer.vtkMRMLSubjectHierarchyNode = vtkMRMLSubjectHierarchyNode
        slicer.vtkMRMLTransformNode = vtkMRMLTransformNode

        class FakeApp:
            # qSlicerApplication: processEvents runs what the event loop has queued (fake_qt.EVENT_LOOP)
            temporaryPath = tempfile.gettempdir()

            def processEvents(self):
                fake_qt.EVENT_LOOP.processEvents()

            def commandOptions(self):
                return types.SimpleNamespace(testingEnabled=True)

        slicer.app = FakeApp()
        return slicer

    def reset(self) -> None:
        self.terminologiesLogic = FakeTerminologiesLogic()
        self.scene = FakeScene()
        self.slicer.mrmlScene = self.scene
        RECORDER.calls.clear()
        self.pipCalls.clear()
        self.dialogs.clear()
        self.confirmAnswer = True
        fake_qt.reset()

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
                  className: str = "vtkMRMLScalarVolumeNode", transform: Optional[FakeTransformNode] = None
                  ) -> FakeVolumeNode:
        node = FakeVolumeNode(className)
        node.array = np.asarray(array)
        node.geometry = Geometry(spacing, origin, np.eye(3) if directions is None else directions)
        self.scene._add(node, name)
        if transform is not None:
            node._transformId = transform.GetID()
        return node

    def addTransform(self, matrixToParent, name: str = "") -> FakeTransformNode:
        node = FakeTransformNode()
        node.matrixToParent = np.asarray(matrixToParent, dtype=float).reshape(4, 4)
        return self.scene._add(node, name)

    def addSegmentation(self, name: str, referenceVolume: FakeVolumeNode, segments: Dict[str, np.ndarray],
                        setReference: bool = True, attributes: Optional[Dict[str, str]] = None
                        ) -> FakeSegmentationNode:
        """A segmentation on the volume's grid, under the volume's transform, with its display node (as the
        Segment Editor leaves it)."""
        node = self.scene._add(FakeSegmentationNode(), name)
        node._transformId = referenceVolume._transformId
        display = self.scene._add(FakeDisplayNode("vtkMRMLSegmentationDisplayNode"))
        node.SetAndObserveDisplayNodeID(display.GetID())
        node._attributes.update(attributes or {})
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
