"""Dataset folders -> case records: the LA h5 release, nnU-Net folders, images/+labels/, plain folders.

Opening a dataset only lists files and reports every naming problem at once; voxels are read (and
validated) per case by `CaseRecord.load`, so a training run can list 80 cases in milliseconds and
an inference run over a folder does not read what it will not segment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import InputError
from . import la_cache
from .la_h5 import (
    find_la_case,
    h5_has_label,
    is_la_root,
    list_la_cases,
    locate_la_case,
    read_case_list,
    read_la_h5,
)
from .validate import validate_image, validate_label
from .volume import VOLUME_SUFFIXES, Volume, geometry_mismatches, read_volume

DEFAULT_LABELS: Dict[str, int] = {"background": 0, "left_atrium": 1}
DATASET_JSON = "dataset.json"

LAYOUTS_HELP = (
    "accepted layouts: a training cache (manifest.json, part-NN/<ID>.npz; scripts/build_la_cache.py); "
    "an LA h5 folder (<ID>/mri_norm2.h5 or '2018LA_Seg_Training Set/<ID>/mri_norm2.h5'); "
    "an nnU-Net folder (dataset.json, imagesTr/{CASE}_0000<ext>, labelsTr/{CASE}<ext>); "
    "images/ + labels/ folders with matching file names; "
    "or a folder of volume files (" + ", ".join(VOLUME_SUFFIXES) + ") or DICOM series folders (unlabelled)")

_SUBSETS = {"train": ("imagesTr", "labelsTr"), "tr": ("imagesTr", "labelsTr"),
            "test": ("imagesTs", "labelsTs"), "ts": ("imagesTs", "labelsTs")}
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_MAX_LISTED = 10


@dataclasses.dataclass
class CaseRecord:
    """One case on disk. `kind` "la_h5": image and label live in the same h5 file (label_path = that file
    when the case is labelled); "la_cache": the same in one file of a training cache (io/la_cache.py);
    "file": one volume file (or DICOM folder) per channel, label file apart."""

    case_id: str
    image_paths: Tuple[Path, ...]
    label_path: Optional[Path] = None
    kind: str = "file"
    classes: Tuple[int, ...] = (0, 1)

    def __post_init__(self) -> None:
        self.image_paths = tuple(Path(p) for p in self.image_paths)
        self.label_path = Path(self.label_path) if self.label_path is not None else None
        self.classes = tuple(int(c) for c in self.classes)
        if self.kind not in ("la_h5", "la_cache", "file"):
            raise ValueError(f"unknown case kind {self.kind!r}")
        if not self.image_paths:
            raise ValueError(f"case {self.case_id} has no image path")

    @property
    def n_channels(self) -> int:
        return len(self.image_paths)

    def load(self, channel: Optional[int] = None, validate: bool = True) -> Tuple[Volume, Optional[Volume]]:
        """Image (one channel) and label, both validated: the label as uint8 on the image's grid.

        `channel=None` means "the only channel"; a multi-channel case then raises, because the models
        take one MRI channel and silently picking one would hide a dataset mistake. `validate=False`
        skips the checks (the label keeps its stored dtype), except that an h5 image is always checked
        on read.
        """
        index = self._channel_index(channel)
        if self.kind in ("la_h5", "la_cache"):
            image, label = self._load_h5()
        else:
            image = read_volume(self.image_paths[index])
            label = read_volume(self.label_path) if self.label_path is not None else None
            if validate:
                validate_image(image)
        if validate and label is not None:
            label = label.with_array(validate_label(label, image, self.classes, allow_empty=False))
        return image, label

    def load_channels(self, validate: bool = True) -> Tuple[List[Volume], Optional[Volume]]:
        """Every channel (validated, all on one grid) and the label checked against channel 0."""
        if self.kind in ("la_h5", "la_cache"):
            image, label = self.load(validate=validate)
            return [image], label
        images = [read_volume(p) for p in self.image_paths]
        label = read_volume(self.label_path) if self.label_path is not None else None
        if validate:
            for image in images:
                validate_image(image)
            self._check_channel_grids(images)
            if label is not None:
                label = label.with_array(validate_label(label, images[0], self.classes, allow_empty=False))
        return images, label

    def _channel_index(self, channel: Optional[int]) -> int:
        if channel is None:
            if self.n_channels > 1:
                names = ", ".join(p.name for p in self.image_paths)
                raise InputError(f"case {self.case_id} has {self.n_channels} image channels ({names}); "
                                 "a single-channel case is required here")
            return 0
        if not 0 <= channel < self.n_channels:
            raise InputError(f"case {self.case_id} has no channel {channel} (it has {self.n_channels})")
        return channel

    def _load_h5(self) -> Tuple[Volume, Optional[Volume]]:
        if self.kind == "la_cache":
            image, label = la_cache.read_cached_case(self.image_paths[0], self.case_id)
            validate_image(image, f"{self.image_paths[0]} (case {self.case_id})")
        else:
            image, label = read_la_h5(self.image_paths[0], self.case_id)
        if self.label_path is None:
            return image, None
        if label is None:
            raise InputError(f"{self.image_paths[0]} (case {self.case_id}): no 'label' dataset, "
                             "but the case is used as labelled")
        return image, label

    def _check_channel_grids(self, images: Sequence[Volume]) -> None:
        problems = []
        for path, image in zip(self.image_paths[1:], images[1:]):
            mismatches = geometry_mismatches(image, images[0])
            if mismatches:
                problems.append(f"{path.name}: " + ", ".join(mismatches))
        if problems:
            raise InputError(f"case {self.case_id}: channels do not share the grid of {self.image_paths[0].name}: "
                             + "; ".join(problems))


def open_dataset(root: str | os.PathLike, list_file: str | os.PathLike | None = None, labeled: bool = True,
                 subset: str = "train") -> List[CaseRecord]:
    """Case records of a dataset folder, layout auto-detected (see LAYOUTS_HELP).

    `list_file` (a path, or a name inside `root` such as "train.list") restricts and orders the cases;
    without it cases come sorted by ID. `labeled=True` requires a label for every case; with False,
    cases without one get `label_path=None` (labels that exist are still attached). `subset` picks
    imagesTr/labelsTr ("train") or imagesTs/labelsTs ("test") in nnU-Net folders.
    """
    base = Path(root)
    if not base.exists():
        raise InputError(f"{base}: dataset folder not found")
    if not base.is_dir():
        raise InputError(f"{base}: not a folder; {LAYOUTS_HELP}")
    list_path = resolve_list_file(base, list_file) if list_file is not None else None
    if la_cache.is_la_cache(base):
        return _open_cache(base, list_path, labeled)
    if is_la_root(base):
        return _open_la(base, list_path, labeled)
    if _is_nnunet_folder(base):
        records = _open_nnunet(base, labeled, subset)
    elif (base / "images").is_dir():
        records = _open_paired(base, labeled)
    else:
        records = _scan_folder(base)
        if not records:
            raise InputError(f"{base}: unrecognised dataset layout; {LAYOUTS_HELP}")
        if labeled:
            raise InputError(f"{base}: folder holds {_count(records, 'image')} but no labels; labelled training needs "
                             "an LA h5, nnU-Net or images/ + labels/ folder (use this one as unlabelled cases)")
    return _apply_list(records, list_path, base) if list_path is not None else records


def open_unlabeled_folder(path: str | os.PathLike) -> List[CaseRecord]:
    """Unlabelled cases (label_path None): a volume file, a DICOM series folder, a folder of either, or the
    images of any labelled layout. `{CASE}_0000`-style names are grouped into channels of one case."""
    base = Path(path)
    if not base.exists():
        raise InputError(f"{base}: not found")
    if base.is_file():
        if not _is_volume_name(base.name):
            raise InputError(f"{base}: not a volume file ({', '.join(VOLUME_SUFFIXES)})")
        return [CaseRecord(_strip_volume_suffix(base.name), (base,), None, "file")]
    if la_cache.is_la_cache(base) or is_la_root(base) or _is_nnunet_folder(base) or (base / "images").is_dir():
        records = open_dataset(base, labeled=False)
        return [dataclasses.replace(r, label_path=None) for r in records]
    if _is_dicom_folder(base):
        return [CaseRecord(base.name, (base,), None, "file")]
    records = _scan_folder(base)
    if not records:
        raise InputError(f"{base}: no volume files ({', '.join(VOLUME_SUFFIXES)}) or DICOM series folders found")
    return records


def dataset_labels(root: str | os.PathLike) -> Dict[str, int]:
    """Label name -> value from the folder's dataset.json, else the LA default (background 0, left atrium 1)."""
    path = Path(root) / DATASET_JSON
    if not path.is_file():
        return dict(DEFAULT_LABELS)
    return _parse_labels(read_dataset_json(path), path)


def read_dataset_json(path: str | os.PathLike) -> Dict:
    """The parsed dataset.json; InputError naming line and column for malformed JSON."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: unreadable ({exc.__class__.__name__}: {exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a JSON object with keys channel_names, labels, file_ending")
    return data


def resolve_list_file(root: Path, list_file: str | os.PathLike) -> Path:
    """A list given as a name inside `root` (e.g. "train.list") or as a path."""
    given = Path(list_file)
    if not given.is_absolute() and (root / given).is_file():
        return root / given
    if given.is_file():
        return given
    raise InputError(f"{list_file}: case list not found (looked in {root} and the current folder)")


# --- LA h5 ---------------------------------------------------------------------------------------

def _open_la(root: Path, list_path: Optional[Path], labeled: bool) -> List[CaseRecord]:
    if list_path is not None:
        ids = read_case_list(list_path)
        missing = [c for c in ids if locate_la_case(root, c) is None]
        if len(missing) == 1:
            find_la_case(root, missing[0], str(list_path))  # raises the one-case message
        if missing:
            raise InputError(f"{len(missing)} cases named in {list_path} are missing under {root}: "
                             f"{_listing(missing)}")
        paths = [find_la_case(root, c, str(list_path)) for c in ids]
    else:
        ids = list_la_cases(root)
        paths = [find_la_case(root, c) for c in ids]
    with_label = {c: h5_has_label(p) for c, p in zip(ids, paths)}
    if labeled:
        unlabeled = [c for c in ids if not with_label[c]]
        if unlabeled:
            raise InputError(f"{root}: {_count(unlabeled, 'case')} without a 'label' dataset: {_listing(unlabeled)}")
    return [CaseRecord(c, (p,), p if with_label[c] else None, "la_h5") for c, p in zip(ids, paths)]


# --- training cache ------------------------------------------------------------------------------

def _open_cache(root: Path, list_path: Optional[Path], labeled: bool) -> List[CaseRecord]:
    """Cases of a training cache in its manifest's order (or the list's); every part must be present."""
    la_cache.check_complete(root)
    present = la_cache.list_cases(root)
    if list_path is not None:
        ids = read_case_list(list_path)
        missing = [c for c in ids if c not in present]
        if missing:
            raise InputError(f"{_count(missing, 'case')} named in {list_path} missing from the cache {root}: "
                             f"{_listing(missing)}")
    else:
        ids = present
    with_label = {c: la_cache.case_has_label(root, c) for c in ids}
    if labeled:
        unlabeled = [c for c in ids if not with_label[c]]
        if unlabeled:
            raise InputError(f"{root}: {_count(unlabeled, 'case')} without a label in the cache: {_listing(unlabeled)}")
    paths = {c: la_cache.case_path(root, c) for c in ids}
    return [CaseRecord(c, (paths[c],), paths[c] if with_label[c] else None, "la_cache") for c in ids]


# --- nnU-Net -------------------------------------------------------------------------------------

def _is_nnunet_folder(root: Path) -> bool:
    return (root / DATASET_JSON).is_file() or any((root / d).is_dir() for d in ("imagesTr", "imagesTs"))


def _open_nnunet(root: Path, labeled: bool, subset: str) -> List[CaseRecord]:
    json_path = root / DATASET_JSON
    if not json_path.is_file():
        raise InputError(f"{root}: nnU-Net-style folder without {DATASET_JSON} "
                         "(needs keys channel_names, labels, file_ending)")
    data = read_dataset_json(json_path)
    labels = _parse_labels(data, json_path)
    n_channels, ending = _parse_channels_and_ending(data, json_path)
    if subset.lower() not in _SUBSETS:
        raise InputError(f"unknown dataset subset {subset!r}; use 'train' or 'test'")
    images_dir, labels_dir = (root / d for d in _SUBSETS[subset.lower()])
    if not images_dir.is_dir():
        raise InputError(f"{root}: no {images_dir.name}/ folder")
    channels = _nnunet_channels(images_dir, ending, n_channels)
    classes = tuple(sorted(set(labels.values())))
    records, unlabeled = [], []
    for case, paths in sorted(channels.items()):
        label = labels_dir / f"{case}{ending}"
        if not label.is_file():
            unlabeled.append(case)
        records.append(CaseRecord(case, paths, label if label.is_file() else None, "file", classes))
    if labeled and unlabeled:
        raise InputError(f"{labels_dir}: no label for {_count(unlabeled, 'case')} of {images_dir.name}/: "
                         f"{_listing(unlabeled)} (expected {labels_dir.name}/{{CASE}}{ending})")
    return records


def _parse_labels(data: Dict, path: Path) -> Dict[str, int]:
    raw = data.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise InputError(f"{path}: 'labels' must be a non-empty object of name -> integer value")
    if all(str(k).isdigit() for k in raw) and all(isinstance(v, str) for v in raw.values()):
        raw = {v: int(k) for k, v in raw.items()}  # nnU-Net v1 / MSD: value -> name
    bad = [f"{k}={v!r}" for k, v in raw.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise InputError(f"{path}: label values must be non-negative integers (region-based labels are not "
                         f"supported): {', '.join(bad)}")
    if 0 not in raw.values():
        raise InputError(f"{path}: 'labels' must declare the background as 0")
    return {str(k): int(v) for k, v in raw.items()}


def _parse_channels_and_ending(data: Dict, path: Path) -> Tuple[int, str]:
    channels = data.get("channel_names", data.get("modality"))
    ending = data.get("file_ending")
    problems = []
    if not isinstance(channels, dict) or not channels:
        problems.append("'channel_names' must be a non-empty object such as {\"0\": \"MRI\"}")
    elif sorted(str(k) for k in channels) != [str(i) for i in range(len(channels))]:
        problems.append(f"'channel_names' keys must be 0..{len(channels) - 1}")
    if not isinstance(ending, str) or not ending.startswith("."):
        problems.append("'file_ending' must be a file extension such as \".nii.gz\" or \".nrrd\"")
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems))
    assert isinstance(channels, dict) and isinstance(ending, str)
    return len(channels), ending


def _nnunet_channels(images_dir: Path, ending: str, n_channels: int) -> Dict[str, Tuple[Path, ...]]:
    found: Dict[str, Dict[int, Path]] = {}
    problems = []
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        stem = path.name[: -len(ending)]
        match = _CHANNEL_SUFFIX.match(stem)
        if match is None:
            problems.append(f"{path.name} lacks the _XXXX channel suffix (e.g. {stem}_0000{ending})")
            continue
        found.setdefault(match["case"], {})[int(match["channel"])] = path
    if not found and not problems:
        raise InputError(f"{images_dir}: no {{CASE}}_0000{ending} image found")
    expected = list(range(n_channels))
    for case, by_channel in sorted(found.items()):
        if sorted(by_channel) != expected:
            have = ", ".join(f"_{c:04d}" for c in sorted(by_channel))
            problems.append(f"case {case} has channels {have}; dataset.json declares {n_channels}")
    if problems:
        raise InputError(f"{images_dir}: " + "; ".join(problems[:_MAX_LISTED])
                         + (f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""))
    return {case: tuple(by_channel[c] for c in expected) for case, by_channel in found.items()}


# --- images/ + labels/ and plain folders -----------------------------------------------------------

def _open_paired(root: Path, labeled: bool) -> List[CaseRecord]:
    images = _scan_folder(root / "images")
    if not images:
        raise InputError(f"{root / 'images'}: no volume files or DICOM series folders found")
    labels_dir = root / "labels"
    labels = _volume_files_by_case(labels_dir) if labels_dir.is_dir() else {}
    records = [dataclasses.replace(r, label_path=labels.get(r.case_id)) for r in images]
    unlabeled = [r.case_id for r in records if r.label_path is None]
    if labeled and unlabeled:
        raise InputError(f"{labels_dir}: no label for {_count(unlabeled, 'case')} of images/: {_listing(unlabeled)} "
                         "(a label has the image's file name)")
    return records


def _scan_folder(folder: Path) -> List[CaseRecord]:
    """Unlabelled records of a folder: volume files and DICOM series sub-folders, `_XXXX` names grouped."""
    files = _volume_files_by_case(folder)
    entries: Dict[str, Tuple[Path, ...]] = {case: (path,) for case, path in files.items()}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _is_dicom_folder(sub):
            if sub.name in entries:
                raise InputError(f"{folder}: case {sub.name} is both a file and a DICOM folder")
            entries[sub.name] = (sub,)
    entries = _group_channels(entries)
    return [CaseRecord(case, paths, None, "file") for case, paths in sorted(entries.items())]


def _group_channels(entries: Dict[str, Tuple[Path, ...]]) -> Dict[str, Tuple[Path, ...]]:
    """`A_0000`, `A_0001`, `B_0000`, `B_0001` -> cases A and B with two channels each.

    Grouped only when the pattern is unambiguous: every name carries a `_XXXX` suffix, every case has
    channels 0..k-1 with one k, and k == 1 or there are several cases. `patient_0001`, `patient_0002`
    (sequential IDs) and a lone `A_0000`, `A_0001` therefore stay separate cases.
    """
    grouped: Dict[str, Dict[int, Path]] = {}
    for name, paths in entries.items():
        match = _CHANNEL_SUFFIX.match(name)
        if match is None:
            return entries
        grouped.setdefault(match["case"], {})[int(match["channel"])] = paths[0]
    counts = {len(chans) for chans in grouped.values()}
    consecutive = all(sorted(chans) == list(range(len(chans))) for chans in grouped.values())
    if not grouped or len(counts) != 1 or not consecutive or (counts != {1} and len(grouped) < 2):
        return entries
    return {case: tuple(chans[c] for c in sorted(chans)) for case, chans in grouped.items()}


def _volume_files_by_case(folder: Path) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or not _is_volume_name(path.name):
            continue
        case = _strip_volume_suffix(path.name)
        if case in found:
            raise InputError(f"{folder}: two files for case {case}: {found[case].name} and {path.name}")
        found[case] = path
    return found


def _is_volume_name(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES)


def _strip_volume_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_folder(folder: Path, probe: int = 5) -> bool:
    """A folder with `.dcm` files, or whose first files carry the DICOM 'DICM' magic at byte 128."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if any(p.suffix.lower() == ".dcm" for p in files):
        return True
    for path in files[:probe]:
        try:
            with open(path, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    return True
        except OSError:
            continue
    return False


# --- lists ----------------------------------------------------------------------------------------

def _apply_list(records: List[CaseRecord], list_path: Path, root: Path) -> List[CaseRecord]:
    by_id = {r.case_id: r for r in records}
    ids = read_case_list(list_path)
    missing = [c for c in ids if c not in by_id]
    if len(missing) == 1:
        raise InputError(f"case {missing[0]} named in {list_path} is missing under {root}")
    if missing:
        raise InputError(f"{len(missing)} cases named in {list_path} are missing under {root}: {_listing(missing)}")
    return [by_id[c] for c in ids]


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _count(items: Sequence[object], noun: str) -> str:
    return f"{len(items)} {noun}{'s' * (len(items) != 1)}"
