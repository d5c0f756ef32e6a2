"""The only Slicer-facing helpers: MRML nodes <-> the NRRD files exchanged with the child.

* volume node -> uncompressed NRRD through a storage node that is never added to the scene (the scene's
  own storage nodes and file names stay untouched);
* label NRRD -> ``vtkMRMLSegmentationNode`` "<volume> segmentation" with one segment "Left atrium"
  (SNOMED CT 82471001, the terminology's recommended colour), the input as reference geometry, the input's
  parent transform and its subject-hierarchy folder; marked as SemiSegLA's automatic (not yet corrected)
  result;
* segmentation -> uint8 label NRRD on a volume's own grid (for fine-tuning);
* the scene -> the records the case table is built from;
* markups ROI nodes (the Region row's boxes) <-> voxel boxes of the written input file (the arithmetic is in
  region.py).

Every temporary node is removed with the display, storage and colour-table nodes that Slicer created for
it (``vtkMRMLScene::RemoveNode`` removes only the node itself), so nothing stray is left in the user's
scene.

``slicer`` is imported inside the functions: this file imports cleanly without Slicer, and the tests give
it an explicit stand-in (Testing/slicer_fake) that implements only the calls made here.
"""

from typing import Iterator, List, Optional, Sequence, Tuple

from . import region as regionMath
from .cases import (
    LABELLED,
    LEFT_ATRIUM_NAME,
    CaseRow,
    DatasetPlan,
    SegmentationInfo,
    SegmentInfo,
    VolumeInfo,
)
from .geometry import gridFromNrrd
from .paths import diskFullNote

LEFT_ATRIUM_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^123037004^Anatomical Structure"
    "~SCT^82471001^Left atrium"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~^^~^^"
)
# Used only where Slicer's terminology module cannot be asked: the recommendedDisplayRGBValue of SCT 82471001
# in "Segmentation category and type - DICOM master list" (Slicer's SegmentationCategoryTypeModifier-
# DICOM-Master.json). ``terminologyColor`` reads the colour from the loaded terminology.
LEFT_ATRIUM_RGB = (203, 108, 81)
LEFT_ATRIUM_COLOR = tuple(v / 255.0 for v in LEFT_ATRIUM_RGB)
#: the parent's result beside the new model's after a fine-tune (SemiSegLA.showDisagreement): a colour of its own
PARENT_RESULT_COLOR = (0.95, 0.85, 0.25)
TEMPORARY_LABEL_NAME = "SemiSegLA temporary label"

# Node attributes (saved with the scene): a segmentation SemiSegLA produced carries AUTOMATIC_ATTRIBUTE; it
# counts as a labelled case only once REVIEWED_ATTRIBUTE is "true" (the user's "Corrected" mark).
AUTOMATIC_ATTRIBUTE = "SemiSegLA.AutomaticResult"
REVIEWED_ATTRIBUTE = "SemiSegLA.Reviewed"
# another model's result, added beside a volume to compare with (a fine-tune's parent, an uncertain result's first
# pass): the case table never pairs it with its volume while another segmentation of the volume is there
COMPARISON_ATTRIBUTE = "SemiSegLA.ComparisonOnly"
# the volume classes that are cases: exactly the input selector's (nodeTypes vtkMRMLScalarVolumeNode with
# showChildNodeTypes false): label maps, diffusion-weighted, tensor and vector volumes are subclasses
CASE_VOLUME_CLASS = "vtkMRMLScalarVolumeNode"
ROI_CLASS = "vtkMRMLMarkupsROINode"
# the box an automatic run used carries these: a reference to its volume, and "true"
REGION_VOLUME_ROLE = "SemiSegLA.RegionVolume"
AUTOMATIC_REGION_ATTRIBUTE = "SemiSegLA.AutomaticRegion"


def _slicer():
    import slicer

    return slicer


def writeVolumeNode(volumeNode, path: str) -> str:
    """Write a volume (scalar or label map) as uncompressed NRRD without touching the scene."""
    slicer = _slicer()
    storage = slicer.mrmlScene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(path)
        storage.UseCompressionOff()
        if not storage.WriteData(volumeNode):
            raise OSError(f"Could not write '{volumeNode.GetName()}' to {path}{diskFullNote(path)}")
    finally:
        storage.UnRegister(None)
    return path


def terminologyColor(terminology: str = LEFT_ATRIUM_TERMINOLOGY,
                     fallback: Sequence[float] = LEFT_ATRIUM_COLOR) -> Tuple[float, float, float]:
    """The recommended display colour (0-1 RGB) of a serialized terminology entry, from the terminology
    Slicer has loaded; ``fallback`` when the terminology module or the entry is not available."""
    slicer = _slicer()
    try:
        logic = slicer.modules.terminologies.logic()
        entry = slicer.vtkSlicerTerminologyEntry()
        if not logic.DeserializeTerminologyEntry(terminology, entry):
            return tuple(fallback)
        context, category, wanted = entry.GetTerminologyContextName(), entry.GetCategoryObject(), entry.GetTypeObject()
        found = slicer.vtkSlicerTerminologyEntry()  # its type object receives each type of the category
        for index in range(logic.GetNumberOfTypesInTerminologyCategory(context, category)):
            logic.GetNthTypeInTerminologyCategory(context, category, index, found.GetTypeObject())
            candidate = found.GetTypeObject()
            if (candidate.GetCodingSchemeDesignator() == wanted.GetCodingSchemeDesignator()
                    and candidate.GetCodeValue() == wanted.GetCodeValue()):
                rgb = candidate.GetRecommendedDisplayRGBValue()
                return (rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0)
    except (AttributeError, TypeError, ValueError):  # no terminology module (or an older API): the fallback
        pass
    return tuple(fallback)


def removeNodeAndHelpers(node, removeColorNodes: bool = False) -> None:
    """Remove ``node`` with the display and storage nodes Slicer created for it (and, for a label map made by
    ``ExportSegmentsToLabelmapNode``, its own colour table). Never a shared colour table: only when asked."""
    if node is None:
        return
    scene = _slicer().mrmlScene
    helpers = []
    displayable, storable = node.IsA("vtkMRMLDisplayableNode"), node.IsA("vtkMRMLStorableNode")
    for index in range(node.GetNumberOfDisplayNodes() if displayable else 0):
        display = node.GetNthDisplayNode(index)
        if display is None:
            continue
        color = display.GetColorNode() if removeColorNodes and display.IsA("vtkMRMLVolumeDisplayNode") else None
        # only a user colour table (as ExportSegmentsToLabelmapNode creates): never one of Slicer's defaults
        if color is not None and color.IsA("vtkMRMLColorTableNode") and color.GetType() == color.User:
            helpers.append(color)
        helpers.append(display)
    for index in range(node.GetNumberOfStorageNodes() if storable else 0):
        helpers.append(node.GetNthStorageNode(index))
    if node.GetScene() is not None:
        scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is not None:
            scene.RemoveNode(helper)


def isAutomaticResult(segmentationNode) -> bool:
    return (segmentationNode.GetAttribute(AUTOMATIC_ATTRIBUTE) or "").lower() == "true"


def isComparison(segmentationNode) -> bool:
    return (segmentationNode.GetAttribute(COMPARISON_ATTRIBUTE) or "").lower() == "true"


def markAsComparison(segmentationNode) -> None:
    segmentationNode.SetAttribute(COMPARISON_ATTRIBUTE, "true")


def isReviewed(segmentationNode) -> bool:
    """The user's "Corrected" mark; without one, SemiSegLA's own results are not reviewed and every other
    segmentation (drawn or loaded by the user) is."""
    value = (segmentationNode.GetAttribute(REVIEWED_ATTRIBUTE) or "").lower()
    if value in ("true", "false"):
        return value == "true"
    return not isAutomaticResult(segmentationNode)


def setReviewed(segmentationNode, reviewed: bool) -> None:
    segmentationNode.SetAttribute(REVIEWED_ATTRIBUTE, "true" if reviewed else "false")


def loadTemporaryLabel(labelPath: str):
    """The label NRRD as a hidden label-map node; OSError naming the file when Slicer cannot read it."""
    slicer = _slicer()
    try:  # slicer.util.loadNodeFromFile raises RuntimeError on failure (Slicer 5); older ones returned None
        labelNode = slicer.util.loadLabelVolume(labelPath, {"show": False, "name": TEMPORARY_LABEL_NAME})
    except RuntimeError as exc:
        # its first line repeats the path; the next one (Slicer's reader message), if any, says why
        reasons = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        detail = f": {reasons[0][:200]}" if reasons else ""
        raise OSError(f"Slicer could not read the result {labelPath}{detail}") from exc
    if not labelNode:
        raise OSError(f"Slicer could not read the result {labelPath}")
    return labelNode


def importLabelAsSegmentation(labelPath: str, referenceVolume, name: Optional[str] = None,
                              segmentName: str = LEFT_ATRIUM_NAME,
                              color: Optional[Sequence[float]] = None,
                              terminology: str = LEFT_ATRIUM_TERMINOLOGY) -> Tuple[object, bool]:
    """(segmentation node, empty): a new segmentation from a label map (1 = left atrium) on the input's
    grid, under the input's parent transform. On any error every node created here (display and storage
    nodes included) is removed again, so the scene is unchanged."""
    slicer = _slicer()
    scene = slicer.mrmlScene
    created: List[object] = []
    labelNode = loadTemporaryLabel(labelPath)
    try:
        segNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                          name or f"{referenceVolume.GetName()} segmentation")
        created.append(segNode)
        segNode.CreateDefaultDisplayNodes()
        # Transforms first. SetReferenceImageGeometryParameterFromVolumeNode folds the transform between the
        # volume and the segmentation into the stored geometry, and ImportLabelmapToSegmentationNode moves
        # the label map through the transform between its parent and the segmentation's. With the volume's
        # parent transform on all three, both are the identity: the segment lies exactly where the volume is.
        transformId = referenceVolume.GetTransformNodeID()
        if transformId:
            segNode.SetAndObserveTransformNodeID(transformId)
            labelNode.SetAndObserveTransformNodeID(transformId)
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        segNode.SetNodeReferenceID(segNode.GetReferenceImageGeometryReferenceRole(), referenceVolume.GetID())
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segNode):
            raise RuntimeError("Slicer could not import the result label map into a segmentation")
        segmentation = segNode.GetSegmentation()
        count = segmentation.GetNumberOfSegments()
        empty = count == 0
        if count > 1:
            raise RuntimeError(f"The result holds {count} labels; SemiSegLA expects one (1 = left atrium)")
        rgb = list(color) if color is not None else list(terminologyColor(terminology))
        segmentId = segmentation.AddEmptySegment("", segmentName, rgb) if empty else segmentation.GetNthSegmentID(0)
        segment = segmentation.GetSegment(segmentId)
        segment.SetName(segmentName)
        segment.SetColor(*rgb)
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
        segNode.SetAttribute(AUTOMATIC_ATTRIBUTE, "true")  # not a labelled case until marked as corrected
        placeBesideInSubjectHierarchy(segNode, referenceVolume)
        created.clear()
        return segNode, empty
    finally:
        removeNodeAndHelpers(labelNode)  # its display and storage nodes too; not the shared colour table
        for node in created:
            removeNodeAndHelpers(node)


def placeBesideInSubjectHierarchy(node, referenceNode) -> None:
    """Put ``node`` in the same subject-hierarchy folder (patient/study) as ``referenceNode``."""
    slicer = _slicer()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    parent = sh.GetItemParent(sh.GetItemByDataNode(referenceNode))
    sh.SetItemParent(sh.GetItemByDataNode(node), parent)


def showIn3D(segmentationNode) -> None:
    segmentationNode.CreateClosedSurfaceRepresentation()


def writeLabelOnVolumeGrid(segmentationNode, segmentId: str, volumeNode, path: str) -> int:
    """Export one segment as a uint8 label map (1 inside) on ``volumeNode``'s exact grid; returns the
    number of labelled voxels. An empty segment is an error naming the case."""
    slicer = _slicer()
    import vtk

    scene = slicer.mrmlScene
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", TEMPORARY_LABEL_NAME)
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        logic = slicer.modules.segmentations.logic()
        if not logic.ExportSegmentsToLabelmapNode(segmentationNode, ids, labelNode, volumeNode):
            raise RuntimeError(f"Slicer could not export '{segmentationNode.GetName()}' on the grid of "
                               f"'{volumeNode.GetName()}'")
        array = slicer.util.arrayFromVolume(labelNode)
        inside = array > 0
        count = int(inside.sum())
        if count == 0:
            raise ValueError(f"{volumeNode.GetName()}: the '{LEFT_ATRIUM_NAME}' segment of "
                             f"'{segmentationNode.GetName()}' is empty")
        slicer.util.updateVolumeFromArray(labelNode, inside.astype("uint8"))
        writeVolumeNode(labelNode, path)
        return count
    finally:
        # as slicer.util.arrayFromSegmentBinaryLabelmap does: the export made a display node and its own
        # colour table for this label map; both go with it
        removeNodeAndHelpers(labelNode, removeColorNodes=True)


def isCaseVolume(node) -> bool:
    """A plain scalar volume: not a label map, nor a diffusion-weighted, tensor or vector volume (all
    subclasses of vtkMRMLScalarVolumeNode)."""
    return node is not None and node.GetClassName() == CASE_VOLUME_CLASS


def scanScene() -> Tuple[List[VolumeInfo], List[SegmentationInfo]]:
    """The scene's plain scalar volumes and its segmentations, as case-table records."""
    slicer = _slicer()
    volumes = []
    for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
        if not isCaseVolume(node):
            continue
        volumes.append(VolumeInfo(node.GetID(), node.GetName()))
    segmentations = []
    for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
        reference = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
        segmentation = node.GetSegmentation()
        segments = []
        for index in range(segmentation.GetNumberOfSegments()):
            segments.append(SegmentInfo(segmentation.GetNthSegmentID(index),
                                        segmentation.GetNthSegment(index).GetName()))
        segmentations.append(SegmentationInfo(node.GetID(), node.GetName(),
                                              reference.GetID() if reference else None, segments,
                                              reviewed=isReviewed(node), automatic=isAutomaticResult(node),
                                              comparison=isComparison(node)))
    return volumes, segmentations


def getNode(nodeId: str, what: str = "node"):
    node = _slicer().mrmlScene.GetNodeByID(nodeId)
    if node is None:
        raise LookupError(f"The {what} {nodeId} is no longer in the scene")
    return node


def iterWriteDataset(plan: DatasetPlan, log=None) -> Iterator[str]:
    """Write the nnU-Net-style folder (images, labels on the image grids, dataset.json) and the unlabelled
    folder the plan describes, one case per step (the job advances it from the panel's timer)."""
    log = log or (lambda text: None)
    plan.makeFolders()
    for row, imagePath, labelPath in plan.labelled:
        volume = getNode(row.volumeId, "volume")
        segmentation = getNode(row.segmentationId, "segmentation")
        writeVolumeNode(volume, imagePath)
        voxels = writeLabelOnVolumeGrid(segmentation, row.segmentId, volume, labelPath)
        log(f"Labelled case {row.caseId}: '{row.volumeName}' with '{row.segmentationName}' ({voxels} voxels)")
        yield row.caseId
    for row, path in plan.unlabelled:
        writeVolumeNode(getNode(row.volumeId, "volume"), path)
        log(f"Unlabelled case {row.caseId}: '{row.volumeName}'")
        yield row.caseId
    plan.writeDatasetJson()


def volumeBytes(volumeNode) -> Tuple[int, int]:
    """(bytes, voxels) of a volume's voxel array: what its uncompressed NRRD takes, and what a uint8 label on
    its grid takes."""
    array = _slicer().util.arrayFromVolume(volumeNode)  # a view of the image data: nothing is copied
    return int(array.nbytes), int(array.size)


def datasetBytes(rows: Sequence[CaseRow]) -> int:
    """What the dataset of these case-table rows takes: each labelled or unlabelled volume as stored, and a
    one-byte-a-voxel label for each labelled one."""
    total = 0
    for row in rows:
        if row.included:
            stored, voxels = volumeBytes(getNode(row.volumeId, "volume"))
            total += stored + (voxels if row.role == LABELLED else 0)
    return total


def writeDataset(plan: DatasetPlan, log=None) -> None:
    """``iterWriteDataset`` in one go (scripts)."""
    for _ in iterWriteDataset(plan, log):
        pass


# -- region boxes (markups ROI nodes) ------------------------------------------------------------------------
def _matrix(vtkMatrix):
    return _slicer().util.arrayFromVTKMatrix(vtkMatrix)


def volumeIjkToRas(volumeNode):
    """The volume's own IJK-to-RAS (4x4 numpy), without its parent transform."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return _matrix(matrix)


def matrixBetweenParents(sourceNode, targetNode):
    """The 4x4 from ``sourceNode``'s coordinates to ``targetNode``'s (through their parent transforms);
    RegionError when a transform on the way is not linear."""
    import vtk

    slicer = _slicer()
    matrix = vtk.vtkMatrix4x4()
    # vtkMRMLTransformNode::GetMatrixTransformBetweenNodes returns 0 for a non-linear transform
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            sourceNode.GetParentTransformNode(), targetNode.GetParentTransformNode(), matrix):
        raise regionMath.RegionError("a non-linear transform lies between it and the volume; harden the "
                                     "transform (Data module) or use a box without one")
    return _matrix(matrix)


def roiGeometry(roiNode):
    """(ObjectToNode matrix, size in mm) of a markups ROI: its centre and axes in its node coordinates."""
    return _matrix(roiNode.GetObjectToNodeMatrix()), [float(v) for v in roiNode.GetSize()]


def roiFingerprint(roiNode) -> tuple:
    objectToNode, size = roiGeometry(roiNode)
    return regionMath.fingerprint(objectToNode, size, roiNode.GetTransformNodeID())


def voxelBoxOfRoi(roiNode, volumeNode, writtenPath: str):
    """[i0, j0, k0, i1, j1, k1] of the volume's written file (``writeVolumeNode``) that the ROI holds. The
    file's own header gives the grid, so the box is exact for what the core reads. RegionError (one line
    naming the box) when the box cannot be used."""
    try:
        if roiNode.GetScene() is None:
            raise regionMath.RegionError("it is no longer in the scene")
        grid = gridFromNrrd(writtenPath)
        objectToNode, size = roiGeometry(roiNode)
        return regionMath.voxelBoxOfRoi(objectToNode, size, matrixBetweenParents(roiNode, volumeNode),
                                        regionMath.ijkToRasFromGrid(grid), grid.size)
    except regionMath.RegionError as exc:
        raise regionMath.RegionError(f"The box '{roiNode.GetName()}' cannot be used for "
                                     f"'{volumeNode.GetName()}': {exc}.") from None


def _setRoiGeometry(roiNode, objectToNode, size) -> None:
    # as Slicer's script repository does (Docs/developer_guide/script_repository/batch.md, an oriented ROI):
    # SetSize, then SetAndObserveObjectToNodeMatrix with the centre and axes
    roiNode.SetSize(float(size[0]), float(size[1]), float(size[2]))
    roiNode.SetAndObserveObjectToNodeMatrix(_slicer().util.vtkMatrixFromArray(objectToNode))


def _newRoi(volumeNode, name: str):
    slicer = _slicer()
    roiNode = slicer.mrmlScene.AddNewNodeByClass(ROI_CLASS, name)
    roiNode.CreateDefaultDisplayNodes()
    # under the volume's parent transform: the box is drawn in the volume's own (local) coordinates, and
    # moves with the volume when the transform changes
    roiNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    roiNode.SetNodeReferenceID(REGION_VOLUME_ROLE, volumeNode.GetID())
    placeBesideInSubjectHierarchy(roiNode, volumeNode)
    return roiNode


def createRegionBox(volumeNode, name: Optional[str] = None, sizeMm: Sequence[float] = regionMath.TYPICAL_ATRIUM_BOX_MM):
    """A new box of a typical atrium's size, centred on the volume and aligned with its axes, under its
    parent transform (so it lies on the volume as displayed)."""
    objectToNode, size = regionMath.defaultRoi(volumeIjkToRas(volumeNode), volumeShape(volumeNode), sizeMm)
    roiNode = _newRoi(volumeNode, name or f"{volumeNode.GetName()} box")
    _setRoiGeometry(roiNode, objectToNode, size)
    return roiNode


def volumeShape(volumeNode):
    array = _slicer().util.arrayFromVolume(volumeNode)  # KJI
    return [int(array.shape[2]), int(array.shape[1]), int(array.shape[0])]


def automaticRegionNode(volumeNode):
    """The box an automatic run of this volume showed (None when there is none)."""
    for node in _slicer().util.getNodesByClass(ROI_CLASS):
        volume = node.GetNodeReference(REGION_VOLUME_ROLE)
        if (node.GetAttribute(AUTOMATIC_REGION_ATTRIBUTE) == "true" and volume is not None
                and volume.GetID() == volumeNode.GetID()):
            return node
    return None


def showAutomaticRegion(volumeNode, box: Sequence[int], writtenPath: str, name: Optional[str] = None):
    """Show the voxel box an automatic run used as the ROI "<volume> region" (the one of an earlier run is
    moved, not duplicated): faces on the box's outer voxel faces, aligned with the volume, under its parent
    transform, so the user can move or resize it and segment again with it."""
    grid = gridFromNrrd(writtenPath)
    objectToNode, size = regionMath.roiOfVoxelBox(box, regionMath.ijkToRasFromGrid(grid))
    roiNode = automaticRegionNode(volumeNode)
    if roiNode is None:
        roiNode = _newRoi(volumeNode, name or f"{volumeNode.GetName()} region")
        roiNode.SetAttribute(AUTOMATIC_REGION_ATTRIBUTE, "true")
    elif roiNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
        roiNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    _setRoiGeometry(roiNode, objectToNode, size)
    return roiNode
