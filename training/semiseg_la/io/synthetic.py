"""Synthetic co-registered two-contrast volumes for testing the multi-modal Semi-CML path.

No multi-modal LA data exists in the project, so tests render ONE anatomy (a body, an ellipsoid
"atrium", a "ventricle" beside it and a vessel tube) through two intensity mappings with different
noise levels. The two contrasts are exactly co-registered (same voxels, same grid), the label is the
atrium, and contrast "T2" is deliberately noisier and lower-contrast so that one modality is the
better one, as in the paper's setting (docs/methods/semicml.md).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .atomic import atomic_write_text
from .volume import Volume, write_volume

#: tissue ids of the rendered anatomy
BACKGROUND, BODY, ATRIUM, VENTRICLE, VESSEL = 0, 1, 2, 3, 4

#: intensity per tissue for each contrast (bright-blood "T1" vs. dark-blood, low-contrast "T2")
CONTRASTS: Dict[str, Dict[int, float]] = {
    "T1": {BACKGROUND: 0.0, BODY: 0.35, ATRIUM: 1.0, VENTRICLE: 0.8, VESSEL: 0.9},
    "T2": {BACKGROUND: 0.0, BODY: 0.75, ATRIUM: 0.3, VENTRICLE: 0.45, VESSEL: 0.4},
}
#: noise standard deviation per contrast (relative to the 0..1 intensity range)
NOISE: Dict[str, float] = {"T1": 0.06, "T2": 0.15}


@dataclasses.dataclass
class TwoContrastCase:
    """One synthetic case: two co-registered contrasts and the atrium label, arrays (X, Y, Z)."""

    case_id: str
    images: Tuple[np.ndarray, np.ndarray]
    label: np.ndarray
    spacing: Tuple[float, float, float]

    def stacked(self) -> np.ndarray:
        """(2, X, Y, Z) float32: the layout of a multi-modal TrainCase image."""
        return np.stack(self.images).astype(np.float32)


def _ellipsoid(grid: Sequence[np.ndarray], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def render_tissues(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A tissue-id map: body ellipsoid, atrium, ventricle touching it, and a vessel tube along z."""
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    size = np.asarray(shape, np.float32)
    tissues = np.zeros(tuple(shape), np.uint8)
    tissues[_ellipsoid(grid, size / 2, size * 0.47)] = BODY
    atrium_c = size * rng.uniform(0.4, 0.6, 3)
    atrium_r = size * rng.uniform(0.14, 0.2, 3)
    ventricle_c = atrium_c + np.array([atrium_r[0] * 1.5, -atrium_r[1] * 0.6, 0.0], np.float32)
    tissues[_ellipsoid(grid, ventricle_c, atrium_r * 0.9)] = VENTRICLE
    vessel_xy = atrium_c[:2] - atrium_r[:2] * np.array([1.3, -1.2], np.float32)
    tube = (grid[0] - vessel_xy[0]) ** 2 + (grid[1] - vessel_xy[1]) ** 2 <= (0.06 * size[:2].min()) ** 2
    tissues[tube & (tissues > 0)] = VESSEL
    tissues[_ellipsoid(grid, atrium_c, atrium_r)] = ATRIUM
    return tissues


def render_contrast(tissues: np.ndarray, mapping: Mapping[int, float], noise: float,
                    rng: np.random.Generator, blur: float = 0.8) -> np.ndarray:
    """Intensity mapping -> partial-volume blur -> Gaussian noise, as float32."""
    lut = np.array([mapping.get(t, 0.0) for t in range(int(tissues.max()) + 1)], np.float32)
    image = ndimage.gaussian_filter(lut[tissues], blur) if blur > 0 else lut[tissues]
    return (image + rng.normal(0.0, noise, tissues.shape)).astype(np.float32)


def make_two_contrast_case(case_id: str = "case000", shape: Sequence[int] = (48, 48, 32), seed: int = 0,
                           spacing: Sequence[float] = (1.0, 1.0, 1.0),
                           contrasts: Sequence[str] = ("T1", "T2")) -> TwoContrastCase:
    """The same random anatomy rendered in both contrasts (exactly co-registered)."""
    rng = np.random.default_rng(seed)
    tissues = render_tissues(shape, rng)
    images = tuple(render_contrast(tissues, CONTRASTS[c], NOISE[c], rng) for c in contrasts)
    label = (tissues == ATRIUM).astype(np.uint8)
    return TwoContrastCase(case_id, images, label, tuple(float(s) for s in spacing))  # type: ignore[arg-type]


def make_two_contrast_cases(n: int, shape: Sequence[int] = (48, 48, 32), seed: int = 0) -> List[TwoContrastCase]:
    return [make_two_contrast_case(f"case{i:03d}", shape, seed + i) for i in range(n)]


def write_two_channel_nnunet(root: str | Path, n_cases: int, shape: Sequence[int] = (48, 48, 32), seed: int = 0,
                             n_unlabeled: int = 0, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                             origin: Sequence[float] = (0.0, 0.0, 0.0)) -> Path:
    """An nnU-Net-style two-channel folder: imagesTr/caseNNN_0000.nrrd (T1), _0001.nrrd (T2),
    labelsTr/caseNNN.nrrd, dataset.json with channel_names {"0": "T1", "1": "T2"}. The last
    `n_unlabeled` cases get no label file (they become the unlabelled pool)."""
    base = Path(root)
    (base / "imagesTr").mkdir(parents=True, exist_ok=True)
    (base / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        case = make_two_contrast_case(f"case{i:03d}", shape, seed + i, spacing)
        for channel, image in enumerate(case.images):
            write_volume(Volume(image, spacing, origin), base / "imagesTr" / f"{case.case_id}_{channel:04d}.nrrd")
        if i < n_cases - n_unlabeled:
            write_volume(Volume(case.label, spacing, origin), base / "labelsTr" / f"{case.case_id}.nrrd")
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "left_atrium": 1},
            "numTraining": n_cases, "file_ending": ".nrrd",
            "description": "synthetic co-registered two-contrast volumes (SemiSegLA test fixture)"}
    atomic_write_text(base / "dataset.json", json.dumps(meta, indent=2) + "\n")
    return base


def write_named_modality_folders(root: str | Path, n_cases: int, shape: Sequence[int] = (48, 48, 32),
                                 seed: int = 0, names: Sequence[str] = ("T1", "T2"),
                                 spacing: Sequence[float] = (1.0, 1.0, 1.0),
                                 labels: Optional[str] = "labels") -> Path:
    """The "two named folders" layout: root/T1/caseNNN.nrrd, root/T2/caseNNN.nrrd, root/labels/caseNNN.nrrd."""
    base = Path(root)
    for name in list(names) + ([labels] if labels else []):
        (base / name).mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        case = make_two_contrast_case(f"case{i:03d}", shape, seed + i, spacing)
        for name, image in zip(names, case.images):
            write_volume(Volume(image, spacing), base / name / f"{case.case_id}.nrrd")
        if labels:
            write_volume(Volume(case.label, spacing), base / labels / f"{case.case_id}.nrrd")
    return base
