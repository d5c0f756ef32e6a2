"""Multi-channel training data for the multi-modal Semi-CML path (docs/methods/semicml.md).

The shared pipeline (engine/data.py) prepares single-channel cases; this module builds TrainCase
objects whose image is (C, X, Y, Z) with one co-registered modality per channel. Each channel is
normalised (by default z-scored) on its own (modalities have unrelated intensity scales) and resampled to
the model grid; the channels share one grid, which is checked rather than assumed.

Accepted layouts: an nnU-Net folder with `{CASE}_0000`, `{CASE}_0001` channel files and a
dataset.json naming the channels, or two named modality folders with matching file names (plus an
optional labels folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..io.datasets import DATASET_JSON, CaseRecord, open_dataset, read_dataset_json
from ..io.volume import VOLUME_SUFFIXES
from ..preprocess.resample import to_model_grid
from .config import TrainConfig
from .data import Split, TrainCase, label_on_model_grid, normalize_volume, split_cases

N_MODALITIES = 2


def prepare_multimodal_case(record: CaseRecord, spacing: Sequence[float], with_label: bool = True,
                            n_channels: int = N_MODALITIES, normalization: str = "zscore-volume") -> TrainCase:
    """Every channel normalised on its own (`normalize_volume`, by default a z-score) and resampled to one model
    grid; label by nearest neighbour."""
    if record.n_channels != n_channels:
        raise InputError(f"case {record.case_id} has {record.n_channels} image channel(s); the multi-modal "
                         f"method needs {n_channels} co-registered modalities")
    images, label = record.load_channels()
    arrays, grid = [], None
    for channel, image in enumerate(images):
        normalized = image.with_array(normalize_volume(image.array, normalization))
        on_grid, this_grid = to_model_grid(normalized, spacing, interpolation="linear")
        if grid is not None and not grid.same_as(this_grid):
            raise InputError(f"case {record.case_id}: channel {channel} lands on another model grid than channel 0")
        grid = this_grid
        arrays.append(on_grid.array.astype(np.float32))
    label_array = label_on_model_grid(record.case_id, label, spacing) if with_label else None
    return TrainCase(record.case_id, np.ascontiguousarray(np.stack(arrays)), label_array)


def prepare_multimodal_cases(records: Sequence[CaseRecord], spacing: Sequence[float],
                             with_label: bool = True, normalization: str = "zscore-volume") -> List[TrainCase]:
    return [prepare_multimodal_case(r, spacing, with_label, normalization=normalization) for r in records]


def open_named_modalities(root: str | Path, modalities: Sequence[str], labels: Optional[str] = "labels",
                          labeled: bool = True) -> List[CaseRecord]:
    """Records from `root/<modality>/<case><ext>` folders with matching names (+ `root/<labels>/<case><ext>`)."""
    base = Path(root)
    if len(modalities) != N_MODALITIES:
        raise InputError(f"expected {N_MODALITIES} modality folder names, got {list(modalities)}")
    per_modality = [_volumes_by_case(base / m) for m in modalities]
    cases = sorted(set(per_modality[0]))
    problems = [f"{modalities[i]}/ lacks {', '.join(sorted(set(cases) - set(found)))}"
                for i, found in enumerate(per_modality) if set(found) != set(cases)]
    problems += [f"{modalities[0]}/ lacks {', '.join(sorted(set(found) - set(cases)))}"
                 for found in per_modality[1:] if set(found) - set(cases)]
    if problems:
        raise InputError(f"{base}: modality folders do not hold the same cases: " + "; ".join(problems))
    label_files = _volumes_by_case(base / labels) if labels and (base / labels).is_dir() else {}
    missing = [c for c in cases if c not in label_files]
    if labeled and missing:
        raise InputError(f"{base / str(labels)}: no label for {len(missing)} case(s): {', '.join(missing[:10])}")
    return [CaseRecord(c, tuple(found[c] for found in per_modality), label_files.get(c), "file") for c in cases]


def _volumes_by_case(folder: Path) -> Dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{folder}: modality folder not found")
    found: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True)
                       if path.name.lower().endswith(s)), None)
        if suffix is None or not path.is_file() or path.name.startswith("."):
            continue
        found[path.name[: -len(suffix)]] = path
    return found


def open_multimodal_dataset(root: str | Path, modalities: Optional[Sequence[str]] = None,
                            labeled: bool = False) -> List[CaseRecord]:
    """Two-channel records of an nnU-Net folder, or of named modality folders when `modalities` is given."""
    records = (open_named_modalities(root, modalities, labeled=labeled) if modalities
               else open_dataset(root, labeled=labeled))
    wrong = [r.case_id for r in records if r.n_channels != N_MODALITIES]
    if wrong:
        raise InputError(f"{root}: the multi-modal method needs {N_MODALITIES} channels per case; "
                         f"{len(wrong)} case(s) differ (e.g. {wrong[0]})")
    return records


def modality_names(root: str | Path, modalities: Optional[Sequence[str]] = None) -> List[str]:
    """Channel names for the model card: the folder names, dataset.json channel_names, or "channel i"."""
    if modalities:
        return [str(m) for m in modalities]
    path = Path(root) / DATASET_JSON
    names = read_dataset_json(path).get("channel_names", {}) if path.is_file() else {}
    return [str(names.get(str(i), f"channel {i}")) for i in range(N_MODALITIES)]


def prepare_multimodal_split(config: TrainConfig, modalities: Optional[Sequence[str]] = None,
                             unseen_validation: bool = False
                             ) -> Tuple[Split, List[TrainCase], List[TrainCase], List[TrainCase]]:
    """The multi-modal counterpart of the CLI's load_split: (split, labelled, unlabelled, validation)."""
    records = open_multimodal_dataset(config.data, modalities, labeled=False)
    split = split_cases(records, config.labeled_num, config.val_num, use_unlabeled=config.use_unlabeled,
                        unseen_validation=unseen_validation)
    labeled = prepare_multimodal_cases(split.labeled, config.spacing, True, config.normalization)
    unlabeled = prepare_multimodal_cases(split.unlabeled, config.spacing, False, config.normalization)
    validation = prepare_multimodal_cases(split.validation, config.spacing, True, config.normalization)
    return split, labeled, unlabeled, validation


def single_channel(cases: Sequence[TrainCase], channel: int) -> List[TrainCase]:
    """Views of multi-channel cases holding one channel (what a one-modality network sees)."""
    return [TrainCase(c.case_id, c.image[channel:channel + 1], c.label) for c in cases]
