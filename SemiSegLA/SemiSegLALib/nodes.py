"""The only Slicer-facing helpers: MRML nodes <-> the NRRD files exchanged with the child.

* volume node -> uncompressed NRRD through a storage node that is never added to the scene (the scene's
  own storage nodes and file names stay untouched);
* label NRRD -> ``vtkMRMLSegmentationNode`` "<volume> segmentation" with one segment "Left atrium"
  (SNOMED CT 82471001, fixed colour), the input as reference geometry, the input's transform and its
  subject-hierarchy folder;
* segmentation -> uint8 label NRRD on a volume's own grid (for fine-tuning);
* the scene -> the records the case table is built from.

``slicer`` is imported inside the functions: this file imports cleanly without Slicer, and the tests give
it an explicit stand-in (Testing/slicer_fake) that implements only the calls made here.
"""

from typing import List, Optional, Sequence, Tuple

from .cases import (
    LEFT_ATRIUM_NAME,
    DatasetPlan,
    SegmentationInfo,
    SegmentInfo,
    VolumeInfo,
)

LEFT_ATRIUM_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^123037004^Anatomical Structure"
    "~SCT^82471001^Left atrium"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~^^~^^"
)
LEFT_ATRIUM_COLOR = (206 / 255.0, 110 / 255.0, 84 / 255.0)
TEMPORARY_LABEL_NAME = "SemiSegLA temporary label"


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
            raise OSError(f"Could not write '{volumeNode.GetName()}' to {path}")
    finally:
        storage.UnRegister(None)
    return path


def importLabelAsSegmentation(labelPath: str, referenceVolume, name: Optional[str] = None,
                              segmentName: str = LEFT_ATRIUM_NAME,
                              color: Sequence[float] = LEFT_ATRIUM_COLOR,
                              terminology: str = LEFT_ATRIUM_TERMINOLOGY) -> Tuple[object, bool]:
    """(segmentation node, empty): a new segmentation from a label map (1 = left atrium) on the input's
    grid. On any error every node created here is removed again, so the scene is unchanged."""
    slicer = _slicer()
    scene = slicer.mrmlScene
    created: List[object] = []
    labelNode = slicer.util.loadLabelVolume(labelPath, {"show": False, "name": TEMPORARY_LABEL_NAME})
    if not labelNode:
        raise OSError(f"Slicer could not read the result {labelPath}")
    try:
        segNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                          name or f"{referenceVolume.GetName()} segmentation")
        created.append(segNode)
        segNode.CreateDefaultDisplayNodes()
        # geometry first: the label map is imported onto the input's grid
        segNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        segNode.SetNodeReferenceID(segNode.GetReferenceImageGeometryReferenceRole(), referenceVolume.GetID())
        transformId = referenceVolume.GetTransformNodeID()
        if transformId:
            segNode.SetAndObserveTransformNodeID(transformId)
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segNode):
            raise RuntimeError("Slicer could not import the result label map into a segmentation")
        segmentation = segNode.GetSegmentation()
        count = segmentation.GetNumberOfSegments()
        empty = count == 0
        if count > 1:
            raise RuntimeError(f"The result holds {count} labels; SemiSegLA expects one (1 = left atrium)")
        if empty:
            segmentId = segmentation.AddEmptySegment("", segmentName, list(color))
        else:
            segmentId = segmentation.GetNthSegmentID(0)
        segment = segmentation.GetSegment(segmentId)
        segment.SetName(segmentName)
        segment.SetColor(*color)
        segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
        placeBesideInSubjectHierarchy(segNode, referenceVolume)
        created.clear()
        return segNode, empty
    finally:
        scene.RemoveNode(labelNode)
        for node in created:
            scene.RemoveNode(node)


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
        scene.RemoveNode(labelNode)


def scanScene() -> Tuple[List[VolumeInfo], List[SegmentationInfo]]:
    """The scene's scalar volumes (not label maps) and segmentations, as case-table records."""
    slicer = _slicer()
    volumes = []
    for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode"):
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
                                              reference.GetID() if reference else None, segments))
    return volumes, segmentations


def getNode(nodeId: str, what: str = "node"):
    node = _slicer().mrmlScene.GetNodeByID(nodeId)
    if node is None:
        raise LookupError(f"The {what} {nodeId} is no longer in the scene")
    return node


def writeDataset(plan: DatasetPlan, log=None) -> None:
    """Write the nnU-Net-style folder (images, labels on the image grids, dataset.json) and the
    unlabelled folder the plan describes."""
    log = log or (lambda text: None)
    plan.makeFolders()
    for row, imagePath, labelPath in plan.labelled:
        volume = getNode(row.volumeId, "volume")
        segmentation = getNode(row.segmentationId, "segmentation")
        writeVolumeNode(volume, imagePath)
        voxels = writeLabelOnVolumeGrid(segmentation, row.segmentId, volume, labelPath)
        log(f"Labelled case {row.caseId}: '{row.volumeName}' with '{row.segmentationName}' ({voxels} voxels)")
    for row, path in plan.unlabelled:
        writeVolumeNode(getNode(row.volumeId, "volume"), path)
        log(f"Unlabelled case {row.caseId}: '{row.volumeName}'")
    plan.writeDatasetJson()
