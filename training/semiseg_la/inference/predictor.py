"""The Predictor: a volume (file or array with geometry) in, a label map on the input's exact grid out.

Pipeline (DESIGN.md "Segment"): validate -> normalise over the whole (possibly user-cropped) volume
(the card's `normalization`: z-score by default) -> optional ROI -> canonical orientation + resampling
to the model spacing -> network windows -> foreground probability back on the input grid (linear) ->
threshold 0.5 -> largest connected component -> uint8 label map with the input's size, spacing, origin
and direction.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..engine.data import normalize_volume
from ..io.validate import validate_image
from ..io.volume import Volume
from ..preprocess.resample import crop_to_roi, from_model_grid, to_model_grid
from ..progress import ProgressReporter
from .sliding_window import legacy_la_inference, plan_whole_volume_window, sliding_window_inference

#: whole-volume windows up to this many voxels (a 288 x 288 x 48 volume at 1.25 mm is ~4 M)
DEFAULT_MAX_WHOLE_VOXELS = 12_000_000
#: a dropped component this share of the kept one or more, and RIVAL_MIN_ML (half the smallest training
#: atrium's 18.6 mL, rounded down) or more, is a second atrium-like region worth a warning
RIVAL_SHARE = 0.35
RIVAL_MIN_ML = 9.0
#: the legacy LA procedure's window strides in mm (18, 18, 4 voxels at 0.625 mm)
LEGACY_STRIDE_MM = (18 * 0.625, 18 * 0.625, 4 * 0.625)


@dataclasses.dataclass
class InferenceSpec:
    """What the network expects, read from its model card."""

    patch_size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    n_classes: int = 2
    normalization: str = "zscore-volume"
    #: "standardized-zscore"'s reference landmarks (the card's `inference.intensity_reference`)
    intensity_reference: Optional[Tuple[float, ...]] = None

    @classmethod
    def of_training(cls, config) -> InferenceSpec:
        """What a model trained with `config` (engine.config.TrainConfig) expects."""
        reference = config.intensity_reference
        return cls(tuple(config.patch_size), tuple(config.spacing), normalization=config.normalization,
                   intensity_reference=tuple(reference) if reference is not None else None)


@dataclasses.dataclass
class Prediction:
    label: Volume
    probability: Optional[Volume]
    timings: Dict[str, float]
    device: str
    windows: int
    network_voxels: int
    warnings: List[str] = dataclasses.field(default_factory=list)


#: flips averaged by `tta="flip"`: the in-plane flips training saw (rot_flip flips X or Y), not Z
TTA_FLIPS = ((), (2,), (3,), (2, 3))
#: `tta="mirror"`: the model grid's X axis (left-right) flip alone, half the cost of "flip" for nearly all of its
#: gain on the validation split (docs/results.md)
TTA_MIRROR = ((), (2,))
TTA_CHOICES = {"none": ((),), "mirror": TTA_MIRROR, "flip": TTA_FLIPS}


class AveragedNetwork(nn.Module):
    """Several networks and/or flipped inputs as one network: the mean of their softmax, returned as
    log-probabilities so that the inferers' softmax gives back exactly that mean."""

    def __init__(self, networks: Sequence[nn.Module], flips: Sequence[Tuple[int, ...]] = ((),)) -> None:
        super().__init__()
        self.members = nn.ModuleList(networks)
        self.flips = [tuple(f) for f in flips]
        self.fixed_window = any(getattr(n, "fixed_window", False) for n in networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for network in self.members:
            for dims in self.flips:
                logits = network(torch.flip(x, dims) if dims else x)
                probs = torch.softmax(logits.float(), dim=1)
                probs = torch.flip(probs, dims) if dims else probs
                total = probs if total is None else total + probs
        return torch.log((total / (len(self.members) * len(self.flips))).clamp_min(1e-12))


def combine_networks(network: nn.Module, ensemble: Sequence[nn.Module] = (), tta: str = "none") -> nn.Module:
    """`network` alone, or averaged with `ensemble` members and/or the TTA flips."""
    if tta not in TTA_CHOICES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose {', '.join(TTA_CHOICES)}")
    if not ensemble and tta == "none":
        return network
    return AveragedNetwork([network, *ensemble], TTA_CHOICES[tta])


class Predictor:
    """Segments volumes with one network. `mode`: "fast" (one whole-volume window when it fits, else a
    Gaussian sliding window), "sliding" (Gaussian sliding window at the training patch size), or
    "legacy" (the LA papers' stride 18/18/4 uniform averaging)."""

    def __init__(self, network: nn.Module, spec: InferenceSpec, device: str | torch.device = "auto",
                 overlap: float = 0.5, mode: str = "fast", sw_batch_size: int = 2,
                 largest_component: bool = True, max_whole_voxels: int = DEFAULT_MAX_WHOLE_VOXELS,
                 accumulate_on_cpu: bool = False) -> None:
        if mode not in ("fast", "sliding", "legacy"):
            raise ValueError(f"unknown inference mode {mode!r}")
        self.device = _device(device)
        self.network = network.to(self.device).eval()
        self.spec = spec
        self.overlap, self.mode, self.sw_batch_size = overlap, mode, sw_batch_size
        self.largest_component = largest_component
        self.max_whole_voxels = max_whole_voxels
        self.accumulate_on_cpu = accumulate_on_cpu

    def predict(self, image: Volume, roi: Optional[Sequence[int]] = None, want_probability: bool = False,
                reporter: Optional[ProgressReporter] = None) -> Prediction:
        reporter = reporter or ProgressReporter()
        timings: Dict[str, float] = {}
        t0 = time.perf_counter()
        reporter.start("preprocess", 1)
        validate_image(image)
        region = crop_to_roi(image, roi[:3], roi[3:]) if roi is not None else image
        # a region is normalised over itself, as each training crop was (engine/data.py prepare_case)
        region = region.with_array(normalize_volume(region.array, self.spec.normalization,
                                                    self.spec.intensity_reference))
        on_grid, grid = to_model_grid(region, self.spec.spacing, interpolation="linear")
        reporter.update(1)
        timings["preprocess_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        probability_grid, windows, voxels = self.probabilities(on_grid.array, reporter)
        timings["predict_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        reporter.start("postprocess", 1)
        foreground = from_model_grid(probability_grid, grid, region, interpolation="linear")
        label = (foreground >= 0.5).astype(np.uint8)
        warnings: List[str] = []
        if self.largest_component:
            voxel_ml = float(np.prod(image.spacing)) / 1000.0
            label, rivals = largest_component_and_rivals(label, voxel_ml)
            if rivals:
                warnings.append(f"{rivals + 1} separate atrium-sized regions were segmented; kept the largest. "
                                "If it is not the left atrium, give a region (--region, or the Slicer region box)")
        if roi is not None:
            label = _paste(label, image.shape, roi)
            foreground = _paste(foreground.astype(np.float32), image.shape, roi)
        reporter.update(1)
        timings["postprocess_s"] = time.perf_counter() - t2
        probability = image.with_array(foreground.astype(np.float32)) if want_probability else None
        return Prediction(image.with_array(label), probability, timings, str(self.device), windows, voxels,
                          warnings)

    @torch.inference_mode()
    def probabilities(self, array: np.ndarray, reporter: Optional[ProgressReporter] = None
                      ) -> Tuple[np.ndarray, int, int]:
        """Foreground probability for a normalised array on the model grid; also windows and voxels run."""
        reporter = reporter or ProgressReporter()
        tensor = torch.from_numpy(np.ascontiguousarray(array, np.float32))[None, None].to(self.device)
        patch = tuple(int(p) for p in self.spec.patch_size)
        counter = _WindowCounter(reporter)
        accumulate = torch.device("cpu") if self.accumulate_on_cpu else None
        if self.mode == "legacy":
            stride_xy, stride_z = legacy_strides(self.spec.spacing)
            probs = legacy_la_inference(tensor, self.network, patch=patch, stride_xy=stride_xy, stride_z=stride_z,
                                        on_window=counter, accumulate_device=accumulate)
            window = patch
        else:
            window = None
            if self.mode == "fast" and not getattr(self.network, "fixed_window", False):
                window = plan_whole_volume_window(array.shape, patch, self.max_whole_voxels)
            window = window or patch
            probs = sliding_window_inference(tensor, self.network, window, overlap=self.overlap, mode="gaussian",
                                             sw_batch_size=self.sw_batch_size, on_window=counter,
                                             accumulate_device=accumulate)
        foreground = probs[0, 1].float().cpu().numpy()
        return foreground, counter.total, counter.total * int(np.prod(window))


class _WindowCounter:
    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter, self.total, self.started = reporter, 0, False

    def __call__(self, done: int, total: int) -> None:
        if not self.started:
            self.reporter.start("predict", total)
            self.started = True
        self.total = total
        self.reporter.update(done)


def legacy_strides(spacing: Sequence[float]) -> Tuple[int, int]:
    """The LA papers' strides (18, 18, 4 voxels at 0.625 mm) kept in millimetres for other model spacings."""
    stride_xy = max(1, round(LEGACY_STRIDE_MM[0] / float(spacing[0])))
    stride_z = max(1, round(LEGACY_STRIDE_MM[2] / float(spacing[2])))
    return stride_xy, stride_z


def keep_largest_component(label: np.ndarray) -> np.ndarray:
    """Largest 26-connected foreground component (the LA is one connected structure)."""
    return largest_component_and_rivals(label, 0.0)[0]


def largest_component_and_rivals(label: np.ndarray, voxel_ml: float) -> Tuple[np.ndarray, int]:
    """(largest 26-connected component, how many dropped components were atrium-sized rivals: at least
    RIVAL_SHARE of the kept one and RIVAL_MIN_ML). `voxel_ml` 0 counts no rivals."""
    components, count = ndimage.label(label, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return label, 0
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = int(np.argmax(sizes))
    rivals = 0
    if voxel_ml > 0:
        floor = max(RIVAL_SHARE * sizes[keep], RIVAL_MIN_ML / voxel_ml)
        rivals = int(np.sum(sizes >= floor)) - 1
    return (components == keep).astype(np.uint8), max(rivals, 0)


def _paste(array: np.ndarray, shape: Sequence[int], roi: Sequence[int]) -> np.ndarray:
    full = np.zeros(tuple(shape), array.dtype)
    box = tuple(slice(int(lo), int(lo) + s) for lo, s in zip(roi[:3], array.shape))
    full[box] = array
    return full


def _device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
