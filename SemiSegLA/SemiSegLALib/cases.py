"""Case-table rules for "Fine-tune semi-supervised", and the dataset folder the core reads.

Rules:

* every plain scalar volume of the scene is a row (label-map, diffusion-weighted, tensor and vector volumes
  are not cases);
* a volume is **labelled** when a segmentation is paired with it: by default a segmentation whose reference
  geometry is that volume (of several, the last reviewed one with a "Left atrium" segment, else the last with
  one), or the one the user picks in the Segmentation column;
* a labelled case's segmentation must contain a "Left atrium" segment (by name); otherwise the row is
  invalid and says how to fix it;
* only a **reviewed** segmentation makes a labelled case: SemiSegLA's own automatic results count only once
  the user marks them as corrected; until then their volume is offered as unlabelled (segmentations the
  user drew or loaded are reviewed unless the user unticks them);
* volumes without a segmentation are **unlabelled** (the semi-supervised pool);
* the user can leave any row out;
* fine-tuning needs at least one labelled case; without unlabelled volumes a semi-supervised method
  learns from the labelled cases only (a warning, not an error); with fewer than 3 labelled cases nothing
  checks the new model against its parent, and 2 helped at one benchmark site and not at another (a warning);
* labels are always exported on the volume's own grid (see ``nodes.exportLabelOnVolumeGrid``).

Plain Python on small records: ``nodes.scanScene`` builds the records from MRML nodes.
"""

import json
import os
import re
from typing import Dict, List, Optional, Sequence, Set, Tuple

LEFT_ATRIUM_NAME = "Left atrium"
LEFT_ATRIUM_ALIASES = ("left atrium", "left_atrium", "leftatrium", "left-atrium")

LABELLED = "labelled"
UNLABELLED = "unlabelled"
INVALID = "invalid"
EXCLUDED = "excluded"

NO_SEGMENTATION = ""  # explicit pairing value: "this volume has no segmentation"

# From this many labelled cases on the core holds one out to check the fine-tuned model against its parent
# (the core's cli/export.py HOLDOUT_FROM).
HOLDOUT_FROM = 3


class SegmentInfo:
    def __init__(self, segmentId: str, name: str) -> None:
        self.id = segmentId
        self.name = name


class SegmentationInfo:
    def __init__(self, nodeId: str, name: str, referenceVolumeId: Optional[str],
                 segments: Sequence[SegmentInfo], reviewed: bool = True, automatic: bool = False,
                 comparison: bool = False) -> None:
        self.id = nodeId
        self.name = name
        self.referenceVolumeId = referenceVolumeId
        self.segments = list(segments)
        self.reviewed = reviewed  # the user's "Corrected" mark (see nodes.isReviewed)
        self.automatic = automatic  # produced by SemiSegLA
        self.comparison = comparison  # another model's result beside it, to compare with (nodes.isComparison)

    def leftAtriumSegment(self) -> Optional[SegmentInfo]:
        return findLeftAtriumSegment(self.segments)


class VolumeInfo:
    def __init__(self, nodeId: str, name: str) -> None:
        self.id = nodeId
        self.name = name


class CaseRow:
    def __init__(self, volume: VolumeInfo) -> None:
        self.volumeId = volume.id
        self.volumeName = volume.name
        self.role = UNLABELLED
        self.segmentationId: Optional[str] = None
        self.segmentationName = ""
        self.segmentId: Optional[str] = None
        self.status = ""
        self.caseId = ""
        self.paired = "auto"  # "auto" or "user"
        self.reviewed = False  # the paired segmentation carries the user's "Corrected" mark
        self.automatic = False  # the paired segmentation is SemiSegLA's own result

    @property
    def included(self) -> bool:
        return self.role in (LABELLED, UNLABELLED)

    def __repr__(self) -> str:
        return f"CaseRow({self.volumeName!r}, {self.role}, seg={self.segmentationName!r})"


def findLeftAtriumSegment(segments: Sequence[SegmentInfo]) -> Optional[SegmentInfo]:
    for segment in segments:
        if segment.name.strip().lower() in LEFT_ATRIUM_ALIASES:
            return segment
    return None


def buildCaseTable(volumes: Sequence[VolumeInfo], segmentations: Sequence[SegmentationInfo],
                   pairing: Optional[Dict[str, str]] = None,
                   excluded: Optional[Set[str]] = None) -> List[CaseRow]:
    """One row per volume. ``pairing`` maps a volume id to the segmentation id the user chose
    (``NO_SEGMENTATION`` = none); ``excluded`` holds the volume ids the user left out."""
    pairing = pairing or {}
    excluded = excluded or set()
    segById = {s.id: s for s in segmentations}
    rows = []
    for volume in volumes:
        row = CaseRow(volume)
        candidates = [s for s in segmentations if s.referenceVolumeId == volume.id]
        chosen: Optional[SegmentationInfo] = None
        if volume.id in pairing:
            row.paired = "user"
            choice = pairing[volume.id]
            if choice != NO_SEGMENTATION:
                chosen = segById.get(choice)
                if chosen is None:
                    row.role = INVALID
                    row.status = "The segmentation chosen for this volume no longer exists; choose again."
        elif candidates:
            with_la = [s for s in candidates if s.leftAtriumSegment() is not None]
            corrected = [s for s in with_la if s.reviewed]  # a corrected one over SemiSegLA's unreviewed results
            # then the latest result over another model's added beside it to compare with, which a "Corrected"
            # tick on this row would otherwise turn into the label
            own = [s for s in with_la if not s.comparison]
            chosen = (corrected or own or with_la or candidates)[-1]
            if len(candidates) > 1:
                row.status = (f"{len(candidates)} segmentations use this volume as reference; using "
                              f"'{chosen.name}' (pick another in the Segmentation column).")
        if chosen is not None:
            row.segmentationId = chosen.id
            row.segmentationName = chosen.name
            row.reviewed, row.automatic = chosen.reviewed, chosen.automatic
            segment = chosen.leftAtriumSegment()
            if segment is None:
                row.role = INVALID
                names = ", ".join(f"'{s.name}'" for s in chosen.segments) or "none"
                row.status = (f"Segmentation '{chosen.name}' has no '{LEFT_ATRIUM_NAME}' segment (it has "
                              f"{names}); rename the atrium segment in Segment Editor.")
            elif not chosen.reviewed:
                # an unreviewed automatic result is not a label: the volume joins the unlabelled pool
                row.role = UNLABELLED
                row.segmentId = segment.id
                what = "SemiSegLA's automatic result" if chosen.automatic else "not marked as reviewed"
                row.status = (f"'{chosen.name}' is {what}: used as an unlabelled scan until you correct it in "
                              "Segment Editor and tick Corrected.")
            else:
                row.role = LABELLED
                row.segmentId = segment.id
        elif row.role != INVALID:
            row.role = UNLABELLED
        if volume.id in excluded and row.role != INVALID:
            row.role = EXCLUDED
            row.status = "Left out by the user."
        rows.append(row)
    assignCaseIds(rows)
    return rows


def isSemiSupervised(method: str) -> bool:
    return bool(method) and method.lower() != "supervised"


def counts(rows: Sequence[CaseRow]) -> Tuple[int, int]:
    labelled = sum(1 for r in rows if r.role == LABELLED)
    unlabelled = sum(1 for r in rows if r.role == UNLABELLED)
    return labelled, unlabelled


def validateCases(rows: Sequence[CaseRow], method: str) -> Tuple[List[str], List[str]]:
    """(errors, warnings) for starting a fine-tune with these rows and this method."""
    errors: List[str] = []
    warnings: List[str] = []
    labelled, unlabelled = counts(rows)
    if labelled == 0:
        errors.append("Fine-tuning needs at least one labelled case: segment a volume, correct the result in "
                      f"Segment Editor (segment '{LEFT_ATRIUM_NAME}'), tick Corrected for it in the case table, "
                      "then fine-tune.")
    if isSemiSupervised(method) and unlabelled == 0 and labelled:
        warnings.append(f"No unlabelled volume: the semi-supervised '{method}' method will learn from the "
                        "labelled cases only. Load scans without segmentation to use them.")
    unreviewed = [r.volumeName for r in rows if r.role == UNLABELLED and r.segmentationId and not r.reviewed]
    if unreviewed:
        warnings.append(f"Not marked as corrected, so used as unlabelled scans: {', '.join(unreviewed)}. Tick "
                        "Corrected once a result has been reviewed in Segment Editor.")
    invalid = [r for r in rows if r.role == INVALID]
    for row in invalid:
        warnings.append(f"{row.volumeName}: {row.status} This volume is not used.")
    if 0 < labelled < HOLDOUT_FROM:
        warnings.append(f"Only {labelled} labelled case{'s' if labelled > 1 else ''}: the fine-tuned model cannot "
                        f"be checked against its parent (one case is held out for that from {HOLDOUT_FROM} on). In "
                        "the site benchmark a fine-tune on 2 labelled scans helped at one simulated site and not at "
                        f"another, and nothing said which. Annotate at least {HOLDOUT_FROM}, better 4.")
    return errors, warnings


def summaryText(rows: Sequence[CaseRow]) -> str:
    labelled, unlabelled = counts(rows)
    invalid = sum(1 for r in rows if r.role == INVALID)
    excluded = sum(1 for r in rows if r.role == EXCLUDED)
    text = f"{labelled} labelled, {unlabelled} unlabelled"
    if invalid:
        text += f", {invalid} need attention"
    if excluded:
        text += f", {excluded} left out"
    return text


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sanitizeCaseId(name: str) -> str:
    """ASCII-only, file-name-safe case identifier (non-ASCII letters become '_')."""
    text = _UNSAFE.sub("_", name.strip()).strip("_-")
    text = re.sub(r"_+", "_", text)
    return text[:48] or "case"


def assignCaseIds(rows: Sequence[CaseRow]) -> None:
    used: Set[str] = set()
    for row in rows:
        base = sanitizeCaseId(row.volumeName)
        candidate, n = base, 2
        while candidate.lower() in used:
            candidate = f"{base}_{n}"
            n += 1
        used.add(candidate.lower())
        row.caseId = candidate


class DatasetPlan:
    """Where each file goes: ``datasetDir`` (nnU-Net style) and ``unlabeledDir``."""

    FILE_ENDING = ".nrrd"

    def __init__(self, root: str, rows: Sequence[CaseRow]) -> None:
        self.root = root
        self.datasetDir = os.path.join(root, "dataset")
        self.unlabeledDir = os.path.join(root, "unlabeled")
        self.labelled: List[Tuple[CaseRow, str, str]] = []
        self.unlabelled: List[Tuple[CaseRow, str]] = []
        for row in rows:
            if row.role == LABELLED:
                image = os.path.join(self.datasetDir, "imagesTr", f"{row.caseId}_0000{self.FILE_ENDING}")
                label = os.path.join(self.datasetDir, "labelsTr", f"{row.caseId}{self.FILE_ENDING}")
                self.labelled.append((row, image, label))
            elif row.role == UNLABELLED:
                self.unlabelled.append((row, os.path.join(self.unlabeledDir, f"{row.caseId}{self.FILE_ENDING}")))

    def datasetJson(self) -> Dict[str, object]:
        return {
            "channel_names": {"0": "LGE-MRI"},
            "labels": {"background": 0, "left_atrium": 1},
            "numTraining": len(self.labelled),
            "file_ending": self.FILE_ENDING,
        }

    def makeFolders(self) -> None:
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(self.datasetDir, sub), exist_ok=True)
        if self.unlabelled:
            os.makedirs(self.unlabeledDir, exist_ok=True)

    def writeDatasetJson(self) -> str:
        path = os.path.join(self.datasetDir, "dataset.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.datasetJson(), f, indent=2)
        return path


def leftOutNote(leftOut: Optional[Dict[str, str]], volumeNames: Optional[Dict[str, str]] = None) -> Optional[str]:
    """The unlabelled volumes the core read but did not train on, and why (the ``done`` record's
    ``left_out_unlabeled``: a whole scan where no atrium was found, or an unusable image such as a 2D localiser
    series of the study). Their problem does not stop a fine-tune, so the user is told after it."""
    if not isinstance(leftOut, dict) or not leftOut:
        return None
    names = volumeNames or {}
    # the core names its own temporary file first ("/tmp/.../unlabeled/x.nrrd: invalid image: ..."): drop it
    reasons = [f"'{names.get(str(case), case)}' ({re.sub(r'^.*?[.]nrrd: ', '', str(why))})"
               for case, why in leftOut.items()]
    return (f"{len(reasons)} unlabelled volume(s) were left out of the fine-tune: {'; '.join(reasons)}. Untick *Use* "
            "for such volumes in the case table if they are not scans of the atrium.")
