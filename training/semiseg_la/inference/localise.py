"""Finding the left atrium in a whole scan, so the fine model runs on the atrium's region only.

A clinician loads a whole scan (360-400 mm in-plane), while the fine models were trained on
atrium-centred crops (92-152 x 82-100 mm). A small localiser network at 2.5 mm, trained on crops placed
in whole-scan-like canvases (preprocess/wide_fov.py), looks at the whole field of view in one pass;
the bounding box of the atrium it finds, with a margin, becomes the region that the fine model
segments. That is also what makes a whole scan about as fast as its crop.

Failure is explicit: no atrium found, or a found one whose volume is far outside the training labels'
range, raises RegionError ("no left atrium found; give a region with --region"); two or more
atrium-sized candidates are reported as a warning rather than silently resolved.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from torch import nn

from ..engine.data import normalize_volume
from ..errors import RegionError
from ..io.volume import Volume
from ..preprocess.normalize import zscore, zscore_stats
from ..preprocess.resample import ModelGrid, roi_from_physical, to_model_grid
from ..preprocess.wide_fov import REGION_MARGIN_MM
from .predictor import InferenceSpec, Predictor, largest_component_and_rivals

#: LA volumes of the 80 labelled LA cases: 18.6-132.1 mL (median 49.0); a found atrium outside half the
#: smallest to twice the largest is not trusted
PLAUSIBLE_VOLUME_ML = (9.0, 265.0)
#: margin around the found atrium: the training crops had 6-12 mm around the label, plus localisation error
#: (a fine model trained with `wide_fov_region_mm` saw boxes cut this way)
DEFAULT_MARGIN_MM = REGION_MARGIN_MM
#: the localiser's map is smoothed over a (4 mm) voxel and thresholded low: it only has to find the atrium,
#: the fine model outlines it, and a hesitant map's pieces must join into one region
FIND_THRESHOLD = 0.3
FIND_SMOOTHING_VOXELS = 1.0
#: found regions smaller than this are specks, not an atrium of any size
NOISE_ML = 1.0
#: the message every "not found" path ends with (the Slicer module shows it as is)
NOT_FOUND_HINT = "give a region with --region"


@dataclasses.dataclass
class Region:
    """An index box of the input (upper bounds exclusive) and how it was chosen."""

    lower: Tuple[int, int, int]
    upper: Tuple[int, int, int]
    source: str  # "auto" | "box" | "whole"
    found_volume_ml: Optional[float] = None
    candidates: int = 1
    warnings: List[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    settle_seconds: float = 0.0  # the first fine pass over an automatic region, which settles it
    refined: bool = False  # grown (or narrowed) once around the fine result
    searched_whole: bool = False  # "auto" without a usable localiser box: the fine model searched everything
    scout_agreement: Optional[float] = None  # Dice between the first pass that settled it and the label given

    @property
    def box(self) -> List[int]:
        return [*self.lower, *self.upper]

    def to_dict(self, image: Optional[Volume] = None) -> Dict[str, object]:
        """JSON-ready: the voxel box, and with the image its physical corners (LPS mm, voxel centres)."""
        data: Dict[str, object] = {"source": self.source, "box": self.box, "candidates": self.candidates,
                                   "warnings": list(self.warnings), "refined": self.refined,
                                   "searched_whole": self.searched_whole}
        if self.found_volume_ml is not None:
            data["found_volume_ml"] = round(self.found_volume_ml, 1)
        if self.scout_agreement is not None:
            data["scout_agreement"] = round(self.scout_agreement, 4)
        if image is not None:
            data["corners_lps_mm"] = [physical_point(image, self.lower),
                                      physical_point(image, [u - 1 for u in self.upper])]
        return data


def physical_point(image: Volume, index: Sequence[int]) -> List[float]:
    """The LPS position (mm) of a voxel centre: origin + direction @ (spacing * index), ITK's convention."""
    direction = np.asarray(image.direction, np.float64).reshape(3, 3)
    point = np.asarray(image.origin) + direction @ (np.asarray(image.spacing) * np.asarray(index, np.float64))
    return [round(float(v), 3) for v in point]


def whole_region(shape: Sequence[int]) -> Region:
    return Region((0, 0, 0), tuple(int(s) for s in shape[:3]), "whole")  # type: ignore[arg-type]


class Localiser:
    """Runs a localiser model (card role "localiser") over a whole scan and returns the atrium's region."""

    def __init__(self, network: nn.Module, spec: InferenceSpec, device: str = "auto",
                 margin_mm: float = DEFAULT_MARGIN_MM,
                 plausible_volume_ml: Tuple[float, float] = PLAUSIBLE_VOLUME_ML) -> None:
        self.predictor = Predictor(network, spec, device=device, largest_component=False)
        self.spec, self.margin_mm, self.plausible = spec, float(margin_mm), plausible_volume_ml

    def find(self, image: Volume, min_size_mm: Optional[Sequence[float]] = None) -> Region:
        """The atrium's region: its bounding box on the coarse grid plus `margin_mm`, grown to at least
        `min_size_mm` (the fine model's patch, so it sees as much context as in training)."""
        started = time.perf_counter()
        coarse, grid = to_model_grid(image, self.spec.spacing, "linear")
        probability, _, _ = self.predictor.probabilities(self.normalised(image, coarse.array))
        voxel_ml = float(np.prod(grid.spacing)) / 1000.0
        smooth = ndimage.gaussian_filter(probability, FIND_SMOOTHING_VOXELS)
        mask, rivals = largest_component_and_rivals((smooth >= FIND_THRESHOLD).astype(np.uint8), voxel_ml)
        volume_ml, candidates = float(mask.sum()) * voxel_ml, rivals + 1
        if volume_ml < NOISE_ML:
            raise RegionError(f"{image.source}: no left atrium found", NOT_FOUND_HINT)
        high = self.plausible[1]  # too small is judged on the fine result: the coarse map may find a part
        if volume_ml > high:
            raise RegionError(f"{image.source}: no left atrium found (the most atrium-like region is "
                              f"{volume_ml:.0f} mL, more than the {high:g} mL of a plausible atrium)", NOT_FOUND_HINT)
        lower, upper = box_on_input(image, grid, mask, self.margin_mm, min_size_mm)
        region = Region(lower, upper, "auto", volume_ml, candidates, seconds=time.perf_counter() - started)
        if candidates > 1:
            region.warnings.append(f"{candidates} atrium-like regions found; segmented the largest. If it is not "
                                   f"the left atrium, {NOT_FOUND_HINT}")
        return region

    def normalised(self, image: Volume, coarse: np.ndarray) -> np.ndarray:
        """The coarse scan's intensities as the localiser's card says. A z-score uses the whole scan's figures
        (linear interpolation commutes with it: the same values without a float copy of the full-resolution
        scan); any other normalisation is taken on the coarse grid, as the training canvases were built there."""
        if self.spec.normalization != "zscore-volume":
            return normalize_volume(coarse, self.spec.normalization, self.spec.intensity_reference)
        return zscore(coarse, stats=zscore_stats(image.array))


def check_plausible_volume(label: np.ndarray, image: Volume,
                           plausible_volume_ml: Tuple[float, float] = PLAUSIBLE_VOLUME_ML) -> float:
    """The segmented volume in mL; RegionError when it is outside the plausible range (not an atrium)."""
    volume_ml = float(np.count_nonzero(label)) * float(np.prod(image.spacing)) / 1000.0
    low, high = plausible_volume_ml
    if not low <= volume_ml <= high:
        raise RegionError(f"{image.source}: no left atrium found (the segmented region is {volume_ml:.0f} mL, "
                          f"outside the {low:g}-{high:g} mL of plausible atria)", NOT_FOUND_HINT)
    return volume_ml


def settle_region(region: Region, label: np.ndarray, image: Volume,
                  margin_mm: float = DEFAULT_MARGIN_MM) -> Tuple[Region, bool]:
    """After the fine pass over an automatic region: (the region to keep, whether to segment once more).

    A whole-scan search (no localiser, or it found nothing) is narrowed to the atrium it segmented plus
    `margin_mm`, to be segmented again as a crop is (z-scored over itself). A localiser's box that the fine
    result reaches closer than the margin (the localiser may have found part of the atrium) is grown to
    hold it. RegionError when nothing was segmented."""
    if not label.any():
        raise RegionError(f"{image.source}: no left atrium found in the region {region.box}", NOT_FOUND_HINT)
    where = np.nonzero(label)
    margin = [int(np.ceil(margin_mm / float(s))) for s in image.spacing]
    low = [max(0, int(w.min()) - m) for w, m in zip(where, margin)]
    high = [min(int(n), int(w.max()) + 1 + m) for w, n, m in zip(where, image.shape, margin)]
    if region.searched_whole:
        return dataclasses.replace(region, lower=tuple(low), upper=tuple(high), refined=True), True
    if all(a >= b for a, b in zip(low, region.lower)) and all(a <= b for a, b in zip(high, region.upper)):
        return region, False
    lower = tuple(min(a, b) for a, b in zip(low, region.lower))
    upper = tuple(max(a, b) for a, b in zip(high, region.upper))
    return dataclasses.replace(region, lower=lower, upper=upper, refined=True), True


def box_on_input(image: Volume, grid: ModelGrid, mask: np.ndarray, margin_mm: float,
                 min_size_mm: Optional[Sequence[float]] = None) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """The component's bounding box (identity-direction model grid, so world-axis-aligned) with a margin,
    as an index box of the input, clipped to it."""
    where = np.nonzero(mask)
    spacing, origin = np.asarray(grid.spacing), np.asarray(grid.origin)
    low = origin + (np.array([w.min() for w in where]) - 0.5) * spacing
    high = origin + (np.array([w.max() for w in where]) + 0.5) * spacing
    size = high - low + 2 * margin_mm
    if min_size_mm is not None:
        size = np.maximum(size, np.asarray(min_size_mm, np.float64))
    return roi_from_physical(image, (low + high) / 2, size)


__all__ = ["PLAUSIBLE_VOLUME_ML", "DEFAULT_MARGIN_MM", "NOT_FOUND_HINT", "Region", "Localiser", "whole_region",
           "box_on_input", "physical_point", "settle_region", "check_plausible_volume"]
