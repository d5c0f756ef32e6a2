"""Training data: case preparation, the two-stream sampler and the LA augmentation.

Cases are prepared once (intensity normalisation over the case, by default a z-score; canonical
orientation; resampling to the model spacing) and held in memory; batches are drawn by a resumable
sampler whose whole state is plain Python data, so a kill -9 + `--resume` continues with the same stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, InputError
from ..io.datasets import CaseRecord
from ..io.volume import Volume
from ..preprocess.normalize import standardize, zscore, zscore_stats
from ..preprocess.resample import crop_to_roi, to_model_grid
from ..preprocess.site_shift import random_site_shifts
from ..preprocess.wide_fov import (
    REGION_MARGIN_MM,
    Donor,
    build_wide_case,
    make_donor,
    random_canvas_shape,
    region_around,
)
from .config import NORMALIZATIONS, WIDE_FOV_INTENSITIES, Z_SCORED


@dataclasses.dataclass
class TrainCase:
    """A case on the model grid: image (C, X, Y, Z) float32, label (X, Y, Z) uint8 or None."""

    case_id: str
    image: np.ndarray
    label: Optional[np.ndarray]
    #: (mean, std) that "zscore-volume" took out of the stored volume, so `stored_image` can put them back
    source_intensity: Optional[Tuple[float, float]] = None

    def stored_image(self) -> np.ndarray:
        """Channel 0 with the intensities as stored. The LA release's crops are z-scored over their whole
        scans, so these keep each crop's brightness relative to its own scan (what a whole scan shows)."""
        if self.source_intensity is None:
            return self.image[0]
        mean, std = self.source_intensity
        return (self.image[0] * np.float32(std) + np.float32(mean)).astype(np.float32)


def normalize_volume(array: np.ndarray, normalization: str = "zscore-volume",
                     reference: Optional[Sequence[float]] = None) -> np.ndarray:
    """One volume's intensities as a model expects them, float32:

    * "zscore-volume": (x - mean) / std over the whole volume (the default, and what `segment` does);
    * "standardized-zscore": matched by its own percentiles onto the model's `reference` landmarks
      (`preprocess.normalize.standardize`, undoing another scanner's contrast curve), then z-scored;
    * "stored": unchanged (the LA h5 release is z-scored over the whole uncropped scan already, and the
      official LA code feeds it as is; re-z-scoring the stored crop changes every intensity slightly);
    * "minmax-volume": (x - min) / (max - min) over the whole volume, [0, 1] (CRLN's LA loader; a constant
      volume maps to zeros).
    """
    if normalization == "zscore-volume":
        return zscore(array)
    if normalization == "standardized-zscore":
        return zscore(standardize(array, _reference(reference)))
    if normalization == "stored":
        return np.asarray(array, dtype=np.float32)
    if normalization == "minmax-volume":
        data = np.asarray(array)
        if data.size == 0:
            return data.astype(np.float32)
        low, high = float(np.min(data)), float(np.max(data))
        out = data.astype(np.float64) - low
        out *= 1.0 / max(high - low, 1e-8)
        return out.astype(np.float32)
    raise InputError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")


def _reference(reference: Optional[Sequence[float]]) -> np.ndarray:
    if reference is None:
        raise InputError("normalization standardized-zscore needs the model's intensity_reference landmarks")
    return np.asarray(reference, np.float64)


#: a loaded case (image, label or None) -> the part of it that a fine model is trained on (`prepare_case`);
#: raises RegionError when it finds no atrium in an unlabelled scan
RegionCut = Callable[[Volume, Optional[Volume]], Tuple[Volume, Optional[Volume]]]
#: the same, giving every view of the case a fine model is trained on (`prepare_views`): a labelled whole scan
#: may be cut several times, with different margins
RegionViews = Callable[[Volume, Optional[Volume]], List[Tuple[Volume, Optional[Volume]]]]


def prepare_case(record: CaseRecord, spacing: Sequence[float], with_label: bool = True,
                 normalization: str = "zscore-volume", cut: Optional[RegionCut] = None,
                 reference: Optional[Sequence[float]] = None) -> TrainCase:
    """Read, validate, cut (`cut`: a whole scan to its atrium's region), normalise over the case
    (`normalize_volume`; `reference`: the landmarks of "standardized-zscore") and resample to the model
    spacing."""
    views = (lambda image, label: [cut(image, label)]) if cut is not None else None
    return prepare_views(record, spacing, with_label, normalization, views, reference)[0]


def prepare_views(record: CaseRecord, spacing: Sequence[float], with_label: bool = True,
                  normalization: str = "zscore-volume", views: Optional[RegionViews] = None,
                  reference: Optional[Sequence[float]] = None) -> List[TrainCase]:
    """`prepare_case` for each view `views` gives of the case (read once), each normalised over itself."""
    image, label = record.load()
    pairs = views(image, label if with_label else None) if views is not None else [(image, label)]
    return [_on_model_grid(record.case_id, view, view_label, spacing, with_label, normalization, reference)
            for view, view_label in pairs]


def _on_model_grid(case_id: str, image: Volume, label: Optional[Volume], spacing: Sequence[float], with_label: bool,
                   normalization: str, reference: Optional[Sequence[float]]) -> TrainCase:
    source = image.array
    if normalization == "standardized-zscore":  # `stored_image` then gives the standardised intensities
        source = standardize(source, _reference(reference))
    removed = zscore_stats(source) if normalization in Z_SCORED else None  # kept on the case
    array = zscore(source, stats=removed) if removed else normalize_volume(source, normalization)
    resampled, _grid = to_model_grid(image.with_array(array), spacing, interpolation="linear")
    label_array = label_on_model_grid(case_id, label, spacing) if with_label else None
    return TrainCase(case_id, np.ascontiguousarray(resampled.array[None].astype(np.float32)), label_array, removed)


def label_roi(label: Volume, min_size_mm: Sequence[float], margins_mm: Optional[Sequence[float]] = None) -> List[int]:
    """The region `segment --region auto` shows a fine model of a labelled whole scan, as a voxel box
    [x0, y0, z0, x1, y1, z1]: the atrium's box with REGION_MARGIN_MM on each side (the region it settles on
    around the atrium it found; `margins_mm`: six others, lower X Y Z then upper), grown to at least
    `min_size_mm` (the fine patch)."""
    min_size = [int(np.ceil(float(mm) / float(s))) for mm, s in zip(min_size_mm, label.spacing)]
    margins = [REGION_MARGIN_MM] * 6 if margins_mm is None else [float(m) for m in margins_mm]
    box = region_around(np.asarray(label.array) > 0, label.spacing, margins, min_size)
    return [b.start for b in box] + [b.stop for b in box]


def cut_around_label(image: Volume, label: Volume, min_size_mm: Sequence[float],
                     margins_mm: Optional[Sequence[float]] = None) -> Tuple[Volume, Volume]:
    """A labelled whole scan cut to `label_roi` (normalised afterwards over the cut, as `segment` normalises
    a region)."""
    roi = label_roi(label, min_size_mm, margins_mm)
    return crop_to_roi(image, roi[:3], roi[3:]), crop_to_roi(label, roi[:3], roi[3:])


def label_on_model_grid(case_id: str, label: Optional[Volume], spacing: Sequence[float]) -> np.ndarray:
    """The label resampled by nearest neighbour; a labelled case without a label is an input error."""
    if label is None:
        raise InputError(f"{case_id}: case has no label but is used as a labelled case")
    on_grid, _ = to_model_grid(label, spacing, interpolation="nearest")
    return np.ascontiguousarray(on_grid.array.astype(np.uint8))


@dataclasses.dataclass
class Split:
    labeled: List[CaseRecord]
    unlabeled: List[CaseRecord]
    validation: List[CaseRecord]
    #: unlabelled scans read but not trained on, and why (no atrium found in a whole scan, an unusable image)
    left_out: Dict[str, str] = dataclasses.field(default_factory=dict)


def split_cases(records: Sequence[CaseRecord], labeled_num: int, val_num: int,
                extra_unlabeled: Sequence[CaseRecord] = (), use_unlabeled: bool = True,
                unseen_validation: bool = False) -> Split:
    """Labelled = the first N labelled records (list order); validation = the last `val_num` labelled
    records, used for selection only; their images (and every other record) join the unlabelled pool, as in
    the LA papers' protocol. `unseen_validation` keeps the validation images out of it too: a fine-tune's held-out
    cases judge the child against its parent, so the child must not have trained on them in any form."""
    with_label = [r for r in records if r.label_path is not None]
    validation = with_label[len(with_label) - val_num:] if val_num > 0 else []
    trainable = [r for r in with_label if r not in validation]
    if not trainable:
        raise InputError("no labelled case left for training after the validation split")
    if labeled_num > len(trainable):
        raise InputError(f"asked for {labeled_num} labelled cases but only {len(trainable)} labelled cases "
                         f"are available outside the {len(validation)} validation cases")
    labeled = trainable[:labeled_num]
    unseen = labeled + (validation if unseen_validation else [])
    unlabeled = [r for r in records if r not in unseen] + list(extra_unlabeled) if use_unlabeled else []
    return Split(labeled, unlabeled, validation)


class TwoStreamSampler:
    """Each batch: `labeled_bs` labelled indices (reshuffled every pass) + the rest from the unlabelled
    pool (cycled forever). With no unlabelled pool the whole batch comes from the labelled stream."""

    def __init__(self, n_labeled: int, n_unlabeled: int, batch_size: int, labeled_bs: int, seed: int) -> None:
        self.n_labeled, self.n_unlabeled = n_labeled, n_unlabeled
        self.labeled_bs = labeled_bs if n_unlabeled > 0 else batch_size
        self.unlabeled_bs = batch_size - self.labeled_bs
        self.rng = np.random.default_rng(seed)
        self.queues: Dict[str, List[int]] = {"labeled": [], "unlabeled": []}

    def _take(self, stream: str, size: int, count: int) -> List[int]:
        out = []
        while len(out) < count:
            if not self.queues[stream]:
                self.queues[stream] = [int(i) for i in self.rng.permutation(size)]
            out.append(self.queues[stream].pop(0))
        return out

    def next(self) -> Tuple[List[int], List[int]]:
        labeled = self._take("labeled", self.n_labeled, self.labeled_bs)
        unlabeled = self._take("unlabeled", self.n_unlabeled, self.unlabeled_bs) if self.unlabeled_bs else []
        return labeled, unlabeled

    def state_dict(self) -> Dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "queues": {k: list(v) for k, v in self.queues.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """A resumed run whose pool shrank (a scan removed from --unlabeled since) drops the indices past it."""
        self.rng.bit_generator.state = state["rng"]
        sizes = {"labeled": self.n_labeled, "unlabeled": self.n_unlabeled}
        self.queues = {k: [int(i) for i in v if int(i) < sizes.get(k, 0)] for k, v in state["queues"].items()}


@dataclasses.dataclass
class AugmentPlan:
    """One sample's random draws (`Augmentation.plan`), applied to arrays on the host or tensors on a device."""

    rotation: Optional[Tuple[int, int]]  # (in-plane quarter turns, flipped in-plane axis), or no rotation
    pads: List[int]  # zero padding per side of each axis
    box: Tuple[slice, ...]  # the crop in the padded case
    affine: Optional[Tuple[float, float]]  # intensity (scale, shift), or none


@dataclasses.dataclass
class Augmentation:
    """The LA pipeline (RandomRotFlip, RandomCrop) plus a random intensity affine.

    The intensity affine makes models robust to the field of view: the LA crops were z-scored with
    whole-scan statistics (crop means 0.05-1.88, stds 0.31-1.65), so a scan z-scored over another
    field of view differs from training data by such a scale and shift.
    """

    patch_size: Sequence[int]
    rot_flip: bool = True
    intensity_scale: Sequence[float] = (0.6, 1.6)
    intensity_shift: Sequence[float] = (-0.3, 1.0)
    intensity_prob: float = 0.8

    def plan(self, shape: Sequence[int], rng: np.random.Generator) -> AugmentPlan:
        """One sample's random draws for a case of `shape` (X, Y, Z), in the pipeline's order: rotation and
        flip, crop, intensity affine. The host path and `device_data` both apply it, so they draw alike."""
        rotation = None
        size = [int(s) for s in shape]
        if self.rot_flip:
            k = int(rng.integers(0, 4))
            axis = int(rng.integers(0, 2))
            rotation = (k, axis)
            if k % 2:  # a quarter turn swaps the in-plane axes before the crop is drawn
                size[0], size[1] = size[1], size[0]
        pads, box = crop_plan(size, self.patch_size, rng)
        affine = None
        if self.intensity_prob > 0 and rng.random() < self.intensity_prob:
            low, high = np.log(self.intensity_scale[0]), np.log(self.intensity_scale[1])
            scale = float(np.exp(rng.uniform(low, high)))
            affine = (scale, float(rng.uniform(*self.intensity_shift)))
        return AugmentPlan(rotation, pads, box, affine)

    def __call__(self, image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator):
        if label is None:
            label = np.zeros(image.shape[1:], np.uint8)
        plan = self.plan(label.shape, rng)
        if plan.rotation is not None:
            k, axis = plan.rotation
            image = np.flip(np.rot90(image, k, axes=(1, 2)), axis=axis + 1)
            label = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
        image, label = _pad_and_crop(image, label, plan.pads, plan.box)
        if plan.affine is not None:
            image = image * plan.affine[0] + plan.affine[1]
        return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label, np.uint8)


class WideFieldOfView:
    """Places a labelled training case in a whole-scan-sized canvas of the other labelled cases' tissue
    (with probability `prob`; a decoy atrium beside it with `decoy_prob`), then normalises the canvas as
    `segment` normalises a whole scan (`normalization`, `reference`: the model's, by default a z-score). The rest
    of the samples stay the benchmark's own crops.

    With `region_mm` (a fine model's view) the network gets what `segment --region auto` hands it instead:
    the box around the atrium, each face's margin drawn from `region_mm` (mm), grown to `min_size` voxels,
    normalised over itself, so it learns the tissue of a whole scan beyond a crop's own edges."""

    def __init__(self, cases: Sequence[TrainCase], spacing: Sequence[float], prob: float,
                 decoy_prob: float = 0.0, max_mm: float = 360.0, intensities: str = "normalized",
                 region_mm: Optional[Sequence[float]] = None, min_size: Sequence[int] = (0, 0, 0),
                 normalization: str = "zscore-volume", reference: Optional[Sequence[float]] = None,
                 site: Optional[SiteShiftAugmentation] = None) -> None:
        self.spacing, self.prob, self.decoy_prob, self.max_mm = tuple(spacing), prob, decoy_prob, max_mm
        self.cases, self.intensities = cases, intensities
        self.normalization, self.reference = normalization, reference
        self.region_mm, self.min_size = (tuple(region_mm) if region_mm else None), tuple(min_size)
        self.site = site  # `site_shift_on_canvas`: the canvas meets a simulated site before its region is cut
        self.donors = donors_from(cases, spacing, intensities)

    def __call__(self, image: np.ndarray, label: np.ndarray, index: int, rng: np.random.Generator):
        return self.draw(image, label, index, rng)[:2]

    def draw(self, image: np.ndarray, label: np.ndarray, index: int, rng: np.random.Generator
             ) -> Tuple[np.ndarray, np.ndarray, bool]:
        """(image, label, whether the sample met a simulated site over its whole canvas)."""
        if self.prob <= 0 or rng.random() >= self.prob:
            return image, label, False
        donors = [d for i, d in enumerate(self.donors) if i != index] or self.donors
        shape = random_canvas_shape(label.shape, self.spacing, rng, self.max_mm)
        wide = build_wide_case(canvas_intensities(self.cases[index], self.intensities), label, donors, shape, rng,
                               decoy=rng.random() < self.decoy_prob)
        canvas, target = wide.image, wide.label
        acquire = self.site.draw(rng) if self.site is not None else None
        if acquire is not None:
            canvas = acquire(canvas)
        if self.region_mm is not None:
            box = region_around(target, self.spacing, rng.uniform(*self.region_mm, size=6), self.min_size)
            canvas, target = canvas[box], target[box]
        return (normalize_volume(canvas, self.normalization, self.reference)[None].astype(np.float32),
                np.ascontiguousarray(target), acquire is not None)


def canvas_intensities(case: TrainCase, intensities: str) -> np.ndarray:
    """Channel 0 as a canvas takes it: "normalized" (as the model sees the crop alone) or "stored"."""
    return case.stored_image() if intensities == "stored" else case.image[0]


def donors_from(cases: Sequence[TrainCase], spacing: Sequence[float], intensities: str = "normalized") -> List[Donor]:
    """The labelled cases' tissue with their atria painted out: what wide canvases are tiled with (every
    canvas builder starts here, so the intensities are checked here once)."""
    if intensities not in WIDE_FOV_INTENSITIES:
        raise InputError(f"unknown wide_fov_intensities {intensities!r}; expected one of "
                         + ", ".join(WIDE_FOV_INTENSITIES))
    return [make_donor(canvas_intensities(c, intensities), c.label, spacing, seed=i)
            for i, c in enumerate(cases) if c.label is not None]


def wide_validation_cases(validation: Sequence[TrainCase], donor_cases: Sequence[TrainCase],
                          spacing: Sequence[float], max_mm: float = 360.0, seed: int = 0,
                          intensities: str = "normalized", region: bool = False,
                          min_size: Sequence[int] = (0, 0, 0), normalization: str = "zscore-volume",
                          reference: Optional[Sequence[float]] = None) -> List[TrainCase]:
    """Each validation crop as it is, then inside a canvas of `max_mm` in-plane tiled with the training cases'
    tissue, without and with a decoy atrium: what a model trained for whole scans must find there, scored on the
    same canvases at every validation (fixed seeds), so that the best checkpoint is the best on whole scans.
    With `region` (a fine model) each canvas is cut as `segment --region auto` cuts it: the atrium's box with
    REGION_MARGIN_MM a side, grown to `min_size` voxels. Each canvas is normalised as `segment` normalises a
    scan (`normalization`, `reference`)."""
    donors = donors_from(donor_cases, spacing, intensities)
    cases: List[TrainCase] = []
    for n, case in enumerate(validation):
        cases.append(case)
        rng = np.random.default_rng([seed, n])
        shape = tuple(max(int(round(max_mm / float(s))), int(c)) for s, c in zip(spacing[:2], case.label.shape[:2]))
        for decoy in (False, True):
            wide = build_wide_case(canvas_intensities(case, intensities), case.label, donors,
                                   (*shape, case.label.shape[2]), rng, decoy=decoy)
            box = (region_around(wide.label, spacing, [REGION_MARGIN_MM] * 6, min_size) if region
                   else (slice(None),) * 3)
            cases.append(TrainCase(f"{case.case_id}-{'region' if region else 'wide'}{'-decoy' if decoy else ''}",
                                   normalize_volume(wide.image[box], normalization, reference)[None]
                                   .astype(np.float32),
                                   np.ascontiguousarray(wide.label[box])))
    return cases


class SiteShiftAugmentation:
    """With probability `prob`, a training patch (or, with `site_shift_before_normalization`, the whole crop or
    region before it is normalised) as a random other site would have acquired it (`random_site_shifts`:
    contrast curve, bias field, slice thickness, resolution, noise, blur). The mean teacher compares the student
    on the shifted patch with the teacher on the patch as it was."""

    def __init__(self, spacing: Sequence[float], prob: float, max_strength: float = 1.0,
                 families: Sequence[str] = (), max_families: int = 3) -> None:
        self.spacing, self.prob, self.max_strength = tuple(float(s) for s in spacing), prob, max_strength
        self.families, self.max_families = tuple(families), max_families

    def draw(self, rng: np.random.Generator) -> Optional[Callable[[np.ndarray], np.ndarray]]:
        """The site one sample passes through, as a function of one (X, Y, Z) channel; None when the sample
        keeps its own appearance."""
        if self.prob <= 0 or rng.random() >= self.prob:
            return None
        shifts = random_site_shifts(rng, self.families, self.max_strength, self.max_families)
        case_seed = int(rng.integers(2 ** 31))

        def acquire(channel: np.ndarray) -> np.ndarray:
            for shift in shifts:
                channel = shift.apply_array(channel, self.spacing, case_seed)
            return channel

        return acquire

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> Optional[np.ndarray]:
        """The shifted (C, X, Y, Z) patch, or None when this sample keeps its own appearance."""
        acquire = self.draw(rng)
        if acquire is None:
            return None
        return np.ascontiguousarray(acquire(image[0])[None], np.float32)


class Prefetcher:
    """Makes the next batch in one background thread while the current training step runs.

    `make()` draws a batch from the run's streams (sampler, augmentation RNG); `snapshot()` copies their state.
    The state from before the batch in flight is kept, so a checkpoint taken meanwhile resumes with exactly
    the batch that was being prepared: runs are the same with and without prefetching, resumed or not."""

    def __init__(self, make: Callable[[], Any], snapshot: Callable[[], Dict[str, Any]]) -> None:
        self.make, self.snapshot = make, snapshot
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="semiseg-la-loader")
        self.pending: Optional[Future] = None
        self.pending_streams: Optional[Dict[str, Any]] = None

    def take(self) -> Any:
        if self.pending is None:
            self._submit()
        batch = self.pending.result()
        self._submit()
        return batch

    def _submit(self) -> None:
        self.pending_streams = self.snapshot()  # taken here, before the worker advances the streams
        self.pending = self.pool.submit(self.make)

    def streams_before_pending(self) -> Optional[Dict[str, Any]]:
        """The streams' state to checkpoint: from before the batch in flight (None when nothing is)."""
        return self.pending_streams if self.pending is not None else None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending = None


class WorkerLoader:
    """Makes host batches in `workers` processes, up to `2 * workers` batches ahead of the step: for a GPU
    whose step outruns one host core (wide-FOV canvases and simulated sites are made on the host).

    The run's streams draw each batch's cases and one seed (`draw()`), in order, here; a process makes the
    batch from them alone (`make(request)`). A run therefore draws the same batches with any number of
    processes (other ones than without them: each batch has its own seed), and the streams' state from
    before the oldest batch in flight is what a checkpoint keeps, so a resumed run continues identically.
    The processes are forked (they inherit the cases without a copy): Linux and macOS, not Windows."""

    def __init__(self, make: Callable[[Any], Any], draw: Callable[[], Any], snapshot: Callable[[], Dict[str, Any]],
                 workers: int) -> None:
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ConfigError("loader_workers needs processes started by fork, which this platform lacks; "
                             "use --set loader_workers=0 (the loader thread, prefetch, still works)")
        self.draw, self.snapshot, self.depth = draw, snapshot, 2 * int(workers)
        self.pool = ProcessPoolExecutor(max_workers=int(workers), mp_context=multiprocessing.get_context("fork"),
                                        initializer=_set_worker_maker, initargs=(make, os.getpid()))
        self.pending: deque = deque()  # (future, the streams' state before its request was drawn)

    def take(self) -> Any:
        self._fill()
        future, _streams = self.pending.popleft()
        batch = future.result()
        self._fill()
        return batch

    def _fill(self) -> None:
        while len(self.pending) < self.depth:
            streams = self.snapshot()
            self.pending.append((self.pool.submit(_make_in_worker, self.draw()), streams))

    def streams_before_pending(self) -> Optional[Dict[str, Any]]:
        """The streams' state to checkpoint: from before the oldest batch in flight (None when none is)."""
        return self.pending[0][1] if self.pending else None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()


_WORKER_MAKE: Optional[Callable[[Any], Any]] = None


def _set_worker_maker(make: Callable[[Any], Any], parent: int) -> None:
    global _WORKER_MAKE
    _WORKER_MAKE = make
    _end_with_parent(parent)


def _end_with_parent(parent: int) -> None:
    """A loader process ends when the training process does, even one killed outright (kill -9, a cancelled
    run's child killed), instead of waiting forever on a queue whose other end it holds itself (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # without prctl the check below still runs
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent had already gone before the line above
        os._exit(0)


def _make_in_worker(request: Any) -> Any:
    return _WORKER_MAKE(request)


def crop_plan(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator
              ) -> Tuple[List[int], Tuple[slice, ...]]:
    """(zero padding per side of each axis, crop box in the padded case): axes not larger than the patch are
    padded by (patch - size)//2 + 3 per side, then a uniform crop is drawn."""
    pads = [max((int(p) - int(s)) // 2 + 3, 0) if int(s) <= int(p) else 0 for s, p in zip(shape, patch)]
    padded = [int(s) + 2 * w for s, w in zip(shape, pads)]
    starts = [int(rng.integers(0, s - int(p) + 1)) for s, p in zip(padded, patch)]
    return pads, tuple(slice(a, a + int(p)) for a, p in zip(starts, patch))


def random_crop(image: np.ndarray, label: np.ndarray, patch: Sequence[int], rng: np.random.Generator):
    """Zero-pad axes not larger than the patch by (patch - size)//2 + 3 per side, then a uniform crop."""
    pads, box = crop_plan(label.shape, patch, rng)
    return _pad_and_crop(image, label, pads, box)


def _pad_and_crop(image: np.ndarray, label: np.ndarray, pads: Sequence[int], box: Tuple[slice, ...]):
    if any(pads):
        width = [(w, w) for w in pads]
        image = np.pad(image, [(0, 0)] + width)
        label = np.pad(label, width)
    return image[(slice(None),) + box], label[box]
