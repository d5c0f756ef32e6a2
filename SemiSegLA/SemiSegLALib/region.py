"""Where to segment: *Automatic*, a *Box* (a markups ROI) or the *Whole volume*; and the exact conversion
between a box in Slicer's coordinates and the voxel box of the file the core reads.

The core takes ``--region auto|whole|X0 Y0 Z0 X1 Y1 Z1``: a voxel box of its input file (index order i, j,
k; upper bounds exclusive). The module writes the input volume with its own IJK-to-RAS (a parent transform
is not applied: vtkMRMLVolumeArchetypeStorageNode::WriteDataInternal passes ``GetRASToIJKMatrix``, the
node's own matrix), so the file's grid is the volume's grid in the volume's *local* RAS. A box is converted
in four steps, all linear:

  ROI object -> ROI node (its ObjectToNode matrix: axes and centre) -> volume node (the transform between
  the ROI's and the volume's parent transforms) -> RAS -> LPS -> IJK of the written file (its NRRD header:
  ``space directions`` and ``space origin``, read by geometry.gridFromNrrd).

Which voxels a box holds follows Slicer's own rule for an ROI, the Crop Volume module's voxel-based crop
(vtkSlicerCropVolumeLogic::GetVoxelBasedCropOutputExtent): the ROI's 8 corners in IJK, then
``ceil(min + 0.5 - 0.001)`` to ``floor(max - 0.5 + 0.001)``, i.e. the voxels that lie wholly inside, clipped
to the image. A box the module draws for a voxel box puts its faces on the voxels' outer faces, so the two
conversions round-trip exactly.

No Slicer import: the Slicer-facing half (reading and writing ROI nodes) is in nodes.py.
"""

import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .geometry import Grid

AUTO, BOX, WHOLE = "auto", "box", "whole"
CHOICES = (AUTO, BOX, WHOLE)  # the order of the panel's regionComboBox items
CHOICE_LABELS = {AUTO: "Automatic", BOX: "Box", WHOLE: "Whole volume"}

#: the box "Create box" makes, mm along the patient's right-left, anterior-posterior and superior-inferior
#: axes: a left atrium is 40-60 mm across, plus room to place the box by eye
TYPICAL_ATRIUM_BOX_MM = (100.0, 100.0, 80.0)
#: in voxels, as vtkSlicerCropVolumeLogic::GetVoxelBasedCropOutputExtent
VOXEL_TOLERANCE = 0.001

#: how the core ends every "give a region" message, and what a Slicer user does instead
CORE_HINT = "give a region with --region"
SLICER_HINT = "set Region to Box, place the box around the left atrium and click Segment atrium again"

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class RegionError(ValueError):
    """A box that cannot be used (outside the volume, thinner than a voxel, non-linear transform)."""


# -- matrices ------------------------------------------------------------------------------------------------
def ijkToRasFromGrid(grid: Grid) -> np.ndarray:
    """The 4x4 IJK-to-RAS of an NRRD grid (geometry.Grid holds LPS axis vectors and origin)."""
    ijkToLps = np.eye(4)
    ijkToLps[:3, :3] = np.array(grid.axes, dtype=float).T  # columns: the i, j, k axis vectors
    ijkToLps[:3, 3] = grid.origin
    return RAS_FROM_LPS @ ijkToLps


def _frame(ijkToRas: np.ndarray) -> np.ndarray:
    """A right-handed orthonormal frame closest to the volume's axis directions (the columns of IJK-to-RAS,
    normalised). Crop Volume aligns an ROI with a volume the same way (SnapROIToVoxelGrid copies the
    normalised IJK-to-RAS into the ROI's ObjectToNode matrix); a box is symmetric, so flipping one axis
    of a left-handed grid changes nothing but keeps the ROI a rotation."""
    directions = np.asarray(ijkToRas, dtype=float)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    u, _, vt = np.linalg.svd(directions)  # the nearest rotation (polar decomposition); exact when orthogonal
    frame = u @ vt
    if np.linalg.det(frame) < 0:
        frame[:, 2] = -frame[:, 2]
    return frame


def _corners(lower: Sequence[float], upper: Sequence[float]) -> np.ndarray:
    """The 8 corners (rows, homogeneous) of the box [lower, upper]."""
    return np.array([[*point, 1.0] for point in itertools.product(*zip(lower, upper))])


def boxCorners(objectToNode: np.ndarray, size: Sequence[float]) -> np.ndarray:
    """The 8 corners (rows, homogeneous) of an ROI in its node coordinates: centre and axes from the
    ObjectToNode matrix, side lengths ``size`` (vtkMRMLMarkupsROINode::GetObjectBounds: +-size/2)."""
    half = np.asarray(size, dtype=float) / 2.0
    return (np.asarray(objectToNode, dtype=float) @ _corners(-half, half).T).T


# -- ROI -> voxel box ----------------------------------------------------------------------------------------
def voxelBoxOfRoi(objectToNode: np.ndarray, size: Sequence[float], roiToVolume: np.ndarray,
                  ijkToRas: np.ndarray, shape: Sequence[int]) -> List[int]:
    """[i0, j0, k0, i1, j1, k1] (upper bounds exclusive): the voxels wholly inside the ROI, clipped to the
    image. ``roiToVolume`` maps the ROI's node coordinates to the volume's (local RAS); ``ijkToRas`` is the
    written file's grid (ijkToRasFromGrid). RegionError when no voxel is left."""
    rasToIjk = np.linalg.inv(np.asarray(ijkToRas, dtype=float))
    corners = (rasToIjk @ np.asarray(roiToVolume, dtype=float) @ boxCorners(objectToNode, size).T).T[:, :3]
    low = np.ceil(corners.min(axis=0) + 0.5 - VOXEL_TOLERANCE).astype(int)
    high = np.floor(corners.max(axis=0) - 0.5 + VOXEL_TOLERANCE).astype(int)  # inclusive
    shape = np.asarray(shape[:3], dtype=int)
    low, high = np.maximum(low, 0), np.minimum(high, shape - 1)
    if np.any(low > high):
        raise RegionError("it holds no whole voxel of the volume: it lies outside the volume or is thinner than "
                          "a voxel")
    return [int(v) for v in low] + [int(v) + 1 for v in high]


# -- voxel box -> ROI ----------------------------------------------------------------------------------------
def roiOfVoxelBox(box: Sequence[int], ijkToRas: np.ndarray) -> Tuple[np.ndarray, List[float]]:
    """(ObjectToNode matrix, size in mm) of an ROI in the volume's local RAS whose faces are the outer faces
    of the box's voxels, aligned with the volume's axes; ``voxelBoxOfRoi`` gives the box back exactly (on an
    orthogonal grid; on a sheared one the ROI covers the box)."""
    lower = np.asarray(box[:3], dtype=float) - 0.5
    upper = np.asarray(box[3:], dtype=float) - 0.5
    return _coveringRoi(_corners(lower, upper), ijkToRas)


def _coveringRoi(cornersIjk: np.ndarray, ijkToRas: np.ndarray, sizeLimit: Optional[Sequence[float]] = None
                 ) -> Tuple[np.ndarray, List[float]]:
    frame = _frame(ijkToRas)
    ras = (np.asarray(ijkToRas, dtype=float) @ cornersIjk.T).T[:, :3]
    inFrame = ras @ frame  # coordinates along the frame's axes
    low, high = inFrame.min(axis=0), inFrame.max(axis=0)
    objectToNode = np.eye(4)
    objectToNode[:3, :3] = frame
    objectToNode[:3, 3] = frame @ ((low + high) / 2.0)
    return objectToNode, [float(v) for v in high - low]


def defaultRoi(ijkToRas: np.ndarray, shape: Sequence[int], sizeMm: Sequence[float] = TYPICAL_ATRIUM_BOX_MM
               ) -> Tuple[np.ndarray, List[float]]:
    """(ObjectToNode matrix, size in mm) of a typical atrium box centred on the volume, in its local RAS,
    aligned with its axes: each side gets the size of the patient axis (R-L, A-P, S-I) it runs closest to,
    and never more than the volume's own extent along it."""
    shape = np.asarray(shape[:3], dtype=float)
    objectToNode, extent = _coveringRoi(_corners(-0.5 * np.ones(3), shape - 0.5), ijkToRas)  # the whole volume
    frame = objectToNode[:3, :3]
    size = [min(float(sizeMm[int(np.argmax(np.abs(frame[:, axis])))]), extent[axis]) for axis in range(3)]
    return objectToNode, size


def fingerprint(objectToNode: np.ndarray, size: Sequence[float], transformNodeId: Optional[str]) -> tuple:
    """What identifies an ROI's place: compared to notice that the user moved or resized a box."""
    values = list(np.asarray(objectToNode, dtype=float)[:3, :].ravel()) + [float(v) for v in size]
    return tuple(round(v, 4) for v in values) + (transformNodeId or "",)


# -- what the core reports -----------------------------------------------------------------------------------
def forSlicerUsers(text: str, inputPath: Optional[str] = None, volumeName: Optional[str] = None) -> str:
    """A core message as a Slicer user reads it: the temporary file named by its volume, and the Region row
    instead of the command-line flag."""
    if inputPath and volumeName:
        text = text.replace(str(inputPath), f"'{volumeName}'")
    return text.replace(CORE_HINT, SLICER_HINT)


class RegionRecord:
    """The ``region`` object of the core's ``done`` record."""

    def __init__(self, record: Dict) -> None:
        self.source = str(record.get("source") or "")
        box = record.get("box")
        self.box: Optional[List[int]] = [int(v) for v in box] if isinstance(box, list) and len(box) == 6 else None
        self.candidates = record.get("candidates")
        self.warnings = [str(w) for w in record.get("warnings") or []]
        volume = record.get("found_volume_ml")
        self.foundVolumeMl = float(volume) if isinstance(volume, (int, float)) else None
        self.cornersLps = record.get("corners_lps_mm")

    @classmethod
    def fromDone(cls, done: Dict) -> Optional["RegionRecord"]:
        record = done.get("region") if isinstance(done, dict) else None
        return cls(record) if isinstance(record, dict) else None

    def describe(self) -> str:
        """E.g. 'found automatically: voxels 10-90 x 20-100 x 4-40, atrium 52 mL'."""
        what = {AUTO: "found automatically", BOX: "the box", WHOLE: "the whole volume"}.get(self.source, self.source)
        if self.box is None or self.source == WHOLE:
            return what
        ranges = " x ".join(f"{lo}-{hi - 1}" for lo, hi in zip(self.box[:3], self.box[3:]))
        volume = f", atrium {self.foundVolumeMl:.0f} mL" if self.foundVolumeMl is not None else ""
        return f"{what}: voxels {ranges}{volume}"


class FirstPass:
    """The ``first_pass`` object of the core's ``done`` record (``segment --first-pass-out``): the label of the pass
    that settled an automatic region, the model that made it (a fine-tuned model's parent, else the model itself
    in one pass), its agreement with the result and whether the core called the result uncertain."""

    def __init__(self, record: Dict) -> None:
        self.path = str(record.get("output") or "")
        self.model = str(record.get("model") or "")
        agreement = record.get("agreement")
        self.agreement = float(agreement) if isinstance(agreement, (int, float)) else None
        self.uncertain = record.get("uncertain") is True

    @classmethod
    def fromDone(cls, done: Dict) -> Optional["FirstPass"]:
        record = done.get("first_pass") if isinstance(done, dict) else None
        return cls(record) if isinstance(record, dict) and record.get("output") else None

    def segmentationName(self, volumeName: str) -> str:
        """'<volume>: <model> (first pass)', beside the result '<volume> segmentation'."""
        return f"{volumeName}: {self.model} (first pass)"

    def notice(self, name: str) -> str:
        """What the status line adds when the first pass is shown beside an uncertain result."""
        agreement = f" (Dice {self.agreement:.2f} between the two)" if self.agreement is not None else ""
        return (f"The first pass it was compared with{agreement}, by {self.model}, is beside it as '{name}': "
                "compare the two where they differ; either may be the better one.")

