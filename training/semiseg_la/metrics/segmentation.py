"""Per-case segmentation metrics in two conventions (docs/methods.md 1.7, conventions.md 5).

* Millimetre convention (project default): Dice, Jaccard, HD95 and ASSD in mm from the image spacing;
  distances are NaN (missing) when either mask is empty, never a flattering 0.
* Legacy LA-table convention: medpy `dc`/`jc`/`hd95`/`asd` without spacing (voxels), ASD directed
  pred->gt, and every metric 0 for an empty prediction, so numbers compare with published LA tables.

Masks are bool or integer arrays; every non-zero voxel is foreground.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Union

import numpy as np

from .surface import SpacingLike, check_pair, check_spacing, surface_distances

NAN = float("nan")

MM_KEYS = ("dice", "jaccard", "hd95_mm", "asd_mm")
LEGACY_KEYS = ("dice_legacy", "jaccard_legacy", "hd95_vox_legacy", "asd_vox_legacy")
METRIC_KEYS = MM_KEYS + LEGACY_KEYS

METRIC_DEFINITIONS: Dict[str, str] = {
    "surface": "surface voxels = mask XOR binary erosion with the 6-connected element (outside the array "
               "is background); d(A->B) = distance from each surface voxel of A to the nearest of B",
    "dice": "Dice = 2|P and G| / (|P| + |G|); 1.0 when both masks are empty, 0.0 when exactly one is empty",
    "jaccard": "Jaccard = |P and G| / |P or G|; 1.0 when both masks are empty, 0.0 when exactly one is empty",
    "hd95_mm": "HD95 = 95th percentile of the pooled distances d(P->G) and d(G->P) (medpy hd95), in mm "
               "from the image spacing; NaN when either mask is empty",
    "asd_mm": "ASSD = (mean d(P->G) + mean d(G->P)) / 2 (medpy assd, symmetric), in mm; NaN when either "
              "mask is empty",
    "dice_legacy": "LA-table Dice: as dice, but 0 when the prediction is empty (also when both are empty)",
    "jaccard_legacy": "LA-table Jaccard: as jaccard, but 0 when the prediction is empty",
    "hd95_vox_legacy": "LA-table 95HD: medpy hd95 in voxels (spacing ignored); 0 when the prediction is "
                       "empty, NaN when only the ground truth is empty (medpy would raise)",
    "asd_vox_legacy": "LA-table ASD: medpy asd(pred, gt) = mean d(P->G) only (directed), in voxels; 0 when "
                      "the prediction is empty, NaN when only the ground truth is empty",
}

CaseMetrics = Dict[str, Union[float, bool]]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice as a fraction; both empty = 1.0 (nothing to find, nothing found)."""
    p, g = check_pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(p & g)) / total


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard (IoU) as a fraction; both empty = 1.0, as for `dice`."""
    p, g = check_pair(pred, gt)
    union = int(np.count_nonzero(p | g))
    return 1.0 if union == 0 else int(np.count_nonzero(p & g)) / union


def _both_present(pred: np.ndarray, gt: np.ndarray) -> bool:
    p, g = check_pair(pred, gt)
    return bool(p.any() and g.any())


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: SpacingLike = None) -> float:
    """medpy-style HD95 (pooled directions) in spacing units (voxels if None); NaN if a mask is empty."""
    if not _both_present(pred, gt):
        return NAN
    return _hd95_of(*surface_distances(pred, gt, spacing))


def asd(pred: np.ndarray, gt: np.ndarray, spacing: SpacingLike = None) -> float:
    """Directed mean d(pred->gt) (medpy `asd`, the LA papers' "ASD"); NaN if a mask is empty."""
    if not _both_present(pred, gt):
        return NAN
    return float(np.mean(surface_distances(pred, gt, spacing)[0]))


def assd(pred: np.ndarray, gt: np.ndarray, spacing: SpacingLike = None) -> float:
    """Symmetric (mean d(pred->gt) + mean d(gt->pred)) / 2 (medpy `assd`); NaN if a mask is empty."""
    if not _both_present(pred, gt):
        return NAN
    return _assd_of(*surface_distances(pred, gt, spacing))


def _hd95_of(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))


def _assd_of(d_pg: np.ndarray, d_gp: np.ndarray) -> float:
    return float((np.mean(d_pg) + np.mean(d_gp)) / 2.0)


def _distance_metrics(p: np.ndarray, g: np.ndarray, spacing: Sequence[float]) -> Dict[str, float]:
    """Both conventions' distances from at most two distance-transform passes (one if spacing is 1)."""
    if not (p.any() and g.any()):
        return {"hd95_mm": NAN, "asd_mm": NAN, "hd95_vox_legacy": NAN, "asd_vox_legacy": NAN}
    vox = surface_distances(p, g, None)
    mm = vox if all(s == 1.0 for s in spacing) else surface_distances(p, g, spacing)
    return {"hd95_mm": _hd95_of(*mm), "asd_mm": _assd_of(*mm),
            "hd95_vox_legacy": _hd95_of(*vox), "asd_vox_legacy": float(np.mean(vox[0]))}


def evaluate_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> CaseMetrics:
    """All metrics of one case in both conventions, plus `pred_empty`.

    Keys: dice, jaccard, hd95_mm, asd_mm (mm convention), dice_legacy, jaccard_legacy, hd95_vox_legacy,
    asd_vox_legacy (LA-table convention) and pred_empty (bool). Missing values are NaN.
    """
    p, g = check_pair(pred, gt)
    sampling = check_spacing(spacing, p.ndim)
    if sampling is None:
        raise ValueError("evaluate_case needs the voxel spacing (mm per axis)")
    pred_empty = not p.any()
    result: CaseMetrics = {"dice": dice(p, g), "jaccard": jaccard(p, g)}
    distances = _distance_metrics(p, g, sampling)
    result.update({"hd95_mm": distances["hd95_mm"], "asd_mm": distances["asd_mm"]})
    result.update(_legacy(result, distances, pred_empty))
    result["pred_empty"] = pred_empty
    return result


def _legacy(mm: CaseMetrics, distances: Dict[str, float], pred_empty: bool) -> Dict[str, float]:
    """LA-table policy: an empty prediction scores 0 on all four metrics."""
    if pred_empty:
        return dict.fromkeys(LEGACY_KEYS, 0.0)
    return {"dice_legacy": float(mm["dice"]), "jaccard_legacy": float(mm["jaccard"]),
            "hd95_vox_legacy": distances["hd95_vox_legacy"], "asd_vox_legacy": distances["asd_vox_legacy"]}


def is_missing(value: object) -> bool:
    """True for None and NaN: how summaries recognise an undefined metric."""
    if value is None:
        return True
    try:
        return math.isnan(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
