"""The one training loop every method shares.

Iteration-based: each step draws a two-stream batch, lets the method compute its loss, steps the
optimiser (and the method's EMA/memory hooks), follows the LR schedule, logs, validates every K
iterations and writes atomic, resumable checkpoints (`last.pt` with everything, `best.pt` with the
networks of the best validation Dice).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import platform
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import StorageError
from ..io.atomic import atomic_write_text
from ..methods import Batch, Method, build_method
from ..progress import ProgressReporter
from .config import TrainConfig, dump_config
from .data import (
    Augmentation,
    Prefetcher,
    SiteShiftAugmentation,
    TrainCase,
    TwoStreamSampler,
    WideFieldOfView,
    WorkerLoader,
    normalize_volume,
)
from .distributed import (
    DistContext,
    barrier,
    broadcast_flag,
    broadcast_values,
    cleanup,
    gather_objects,
    init_distributed,
    ranks_where,
)
from .precision import amp_dtype, grad_scaler
from .state import load_state, rng_state, save_state, set_rng_state

#: Room left beyond the run's own files (logs, the exported model's card, the rest of the system).
FREE_SPACE_MARGIN = 64 * 2**20

#: validate(network, channel=None) -> {"dice": mean, ...}; injected by the caller (inference sits above
#: the engine); `channel` picks the input modality of multi-channel cases
Validator = Callable[..., Dict[str, float]]


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    best_iteration: Optional[int]
    best_metrics: Dict[str, float]
    last_metrics: Dict[str, float]
    elapsed_s: float
    stopped_early: bool
    method: Method


def resolve_device(name: str, ctx: Optional[DistContext] = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            from ..errors import ConfigError

            raise ConfigError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
        return torch.device("cuda", ctx.local_rank if ctx else 0)
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


class Trainer:
    """Runs one training (or fine-tuning) into `config.output`."""

    def __init__(self, config: TrainConfig, labeled: List[TrainCase], unlabeled: List[TrainCase],
                 validator: Optional[Validator] = None, reporter: Optional[ProgressReporter] = None,
                 initial_weights: Optional[Mapping[str, torch.Tensor]] = None,
                 should_stop: Optional[Callable[[], bool]] = None) -> None:
        self.config = config
        self.ctx = init_distributed("cuda" if config.device in ("cuda", "auto") and torch.cuda.is_available()
                                    else "cpu")
        self.device = resolve_device(config.device, self.ctx)
        self.labeled, self.unlabeled = labeled, unlabeled
        self.validator = validator
        self.reporter = reporter or ProgressReporter()
        self.should_stop = should_stop or (lambda: False)
        self.run_dir = Path(config.output)
        self.ckpt_dir = self.run_dir / "checkpoints"
        seed_everything(config.seed + self.ctx.rank, config.deterministic)
        self.method = method_for(config)
        if initial_weights is not None:
            self.method.load_initial_weights(initial_weights)
        self.method.to(self.device)
        freeze_parameters(self.method, config.freeze, config.train_only)
        # L2-SP: the trained parameters' starting point (the parent's weights in a fine-tune)
        self.anchor = ([(p, p.detach().clone()) for p in self.method.parameters() if p.requires_grad]
                       if config.anchor_weight > 0 and initial_weights is not None else [])
        if self.ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            if config.sync_batchnorm:
                self.method.wrap_trainable(nn.SyncBatchNorm.convert_sync_batchnorm)
            unused = bool(getattr(self.method, "ddp_find_unused_parameters", False))
            self.method.wrap_trainable(lambda m: DDP(m, device_ids=ids, find_unused_parameters=unused))
        self.amp_dtype = amp_dtype(self.device, config.amp)
        self.fault_iteration = _injected_fault(self.ctx.rank)
        self.scaler = grad_scaler(self.amp_dtype)
        self.optimizer = make_optimizer(config, [p for p in self.method.parameters() if p.requires_grad])
        self.sampler = TwoStreamSampler(len(labeled), len(unlabeled) if config.use_unlabeled else 0,
                                        config.batch_size, config.labeled_bs, config.seed + 7919 * self.ctx.rank)
        self.augment = Augmentation(config.patch_size, config.rot_flip, config.intensity_scale,
                                    config.intensity_shift, config.intensity_prob)
        self.aug_rng = np.random.default_rng(config.seed + 104729 * (self.ctx.rank + 1))
        self.device_batcher = None
        self.site_shift = (SiteShiftAugmentation(config.spacing, config.site_shift_prob, config.site_shift_strength,
                                                 config.site_shift_families, config.site_shift_max_families)
                           if config.site_shift_prob > 0 else None)
        # wide-FOV canvases and simulated sites are made on the host
        if config.device_data and config.wide_fov_prob <= 0 and self.site_shift is None:
            from .device_data import DeviceBatcher

            self.device_batcher = DeviceBatcher(labeled, unlabeled if config.use_unlabeled else [], self.augment,
                                                self.device)
        self.widen = (WideFieldOfView(labeled, config.spacing, config.wide_fov_prob, config.wide_fov_decoy_prob,
                                      config.wide_fov_max_mm, config.wide_fov_intensities,
                                      config.wide_fov_region_mm, config.patch_size, config.normalization,
                                      config.intensity_reference,
                                      site=self.site_shift if config.site_shift_on_canvas else None)
                      if config.wide_fov_prob > 0 else None)
        self.loader = self._host_loader(config)  # after everything a loader process inherits by fork
        self.iteration = 0
        self.history: List[Dict[str, float]] = []
        self.best = {"dice": -1.0, "iteration": None}
        self.elapsed_before = 0.0

    def _host_loader(self, config: TrainConfig) -> Optional[Union[Prefetcher, WorkerLoader]]:
        """Who makes the host batches ahead of the step: loader processes (`loader_workers`), one thread
        (`prefetch`, on by default on a GPU), or nobody (each batch made in the step)."""
        if self.device_batcher is not None:
            return None
        if config.loader_workers > 0:
            return WorkerLoader(self._seeded_host_batch, self._batch_request, self._streams_snapshot,
                                config.loader_workers)
        prefetch = config.prefetch if config.prefetch is not None else self.device.type == "cuda"
        return Prefetcher(self._make_host_batch, self._streams_snapshot) if prefetch else None

    # -- state ----------------------------------------------------------------------------------
    def rank_state(self) -> Dict[str, Any]:
        """What differs between ranks: each rank's sampler, augmentation and RNG streams."""
        streams = self.loader.streams_before_pending() if self.loader is not None else None
        return {**(streams or self._streams_snapshot()), "rng": rng_state()}

    def _streams_snapshot(self) -> Dict[str, Any]:
        """The batch streams' state (sampler and augmentation RNG), copied."""
        return copy.deepcopy({"sampler": self.sampler.state_dict(), "aug_rng": self.aug_rng.bit_generator.state})

    def state(self) -> Dict[str, Any]:
        """The whole resumable state; under torchrun it carries every rank's streams (`rank_states`), so a
        resumed run's ranks keep drawing different batches. Every rank must call it (a collective)."""
        own = self.rank_state()
        ranks = gather_objects(self.ctx, own) if self.ctx.enabled else None
        return {
            "format": "semiseg-la-train-state-1",
            "iteration": self.iteration,
            "config": json.loads(json.dumps(self.config.to_dict())),
            "networks": self.method.state_dict(),
            "method_extra": self.method_extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": own["sampler"],
            "aug_rng": own["aug_rng"],
            "rng": own["rng"],
            **({"rank_states": ranks} if ranks is not None else {}),
            "history": self.history,
            "best": dict(self.best),
            "elapsed_s": self.elapsed_before + (time.monotonic() - self.t_start),
        }

    def method_extra_state(self) -> Dict[str, Any]:
        extra = getattr(self.method, "extra_state", None)
        return extra() if callable(extra) else {}

    def resume(self) -> None:
        state = load_state(self.ckpt_dir / "last.pt")
        self.method.load_state_dict(state["networks"])
        load_extra = getattr(self.method, "load_extra_state", None)
        if callable(load_extra):
            load_extra(state.get("method_extra", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        saved = state.get("rank_states") or [state]
        if len(saved) != self.ctx.world_size:
            from ..errors import ConfigError

            raise ConfigError(f"{self.ckpt_dir / 'last.pt'} was saved by {len(saved)} process(es); resume it with "
                              f"as many (torchrun --nproc_per_node), not {self.ctx.world_size}")
        streams = saved[self.ctx.rank]
        self.sampler.load_state_dict(streams["sampler"])
        self.aug_rng.bit_generator.state = streams["aug_rng"]
        set_rng_state(streams["rng"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        if self.ctx.is_main:
            for name in ("train_log.csv", "validation.csv"):
                _drop_rows_after(self.run_dir / name, self.iteration)
        self.reporter.log(f"resumed from {self.ckpt_dir / 'last.pt'} at iteration {self.iteration}")

    def _check_free_space(self) -> None:
        """Refuse to start where the first checkpoint could not be written: a full disk found now costs the user
        nothing, found at the first save it costs the iterations before it. Under torchrun the main rank raises
        and the others stop at the first collective, as for any error on one rank."""
        networks = sum(t.numel() * t.element_size() for module in self.method.modules().values()
                       for t in module.state_dict().values())
        trainable = sum(p.numel() * p.element_size() for p in self.method.parameters() if p.requires_grad)
        moments = 2 if self.config.optimizer == "adam" else 1 if self.config.momentum else 0
        checkpoint = networks + moments * trainable  # `last.pt`: the networks and the optimiser's moments
        need = 2 * checkpoint + 2 * networks + FREE_SPACE_MARGIN  # old and new during a replace; best.pt; model
        free = shutil.disk_usage(self.run_dir).free
        if free < need:
            raise StorageError(f"{self.run_dir}: {free / 2**20:.0f} MiB free on its disk, and this run needs about "
                               f"{need / 2**20:.0f} MiB for its checkpoints and model; free some space or write the "
                               "run to another folder (--output)")

    def _save_checkpoint(self, name: str, state: Optional[Dict[str, Any]] = None) -> None:
        """`last.pt` (state None) is collective under torchrun: every rank calls this at the same iteration."""
        if state is None:
            state = self.state()
        if self.ctx.is_main:
            try:
                save_state(self.ckpt_dir / name, state)
            except StorageError as exc:
                resume = " (with --resume it continues from the last checkpoint)" if name == "last.pt" else ""
                raise StorageError(f"{exc}{resume}") from exc

    # -- schedule and batches ----------------------------------------------------------------------
    def learning_rate(self, iteration: int) -> float:
        """The schedule at `iteration`. It counts iterations, or with `lr_epochs` the official per-epoch
        schedulers' epochs (max_iterations / lr_epochs iterations each); a warm-up (factor (e + 1) / lr_warmup)
        comes first, and `min_lr` floors the result."""
        c = self.config
        epoch, epochs = iteration, c.max_iterations
        if c.lr_epochs:
            epochs = int(c.lr_epochs)
            epoch = iteration * epochs // c.max_iterations
        if epoch < c.lr_warmup:
            lr = c.base_lr * (epoch + 1) / c.lr_warmup
        elif c.lr_policy == "step":
            lr = c.base_lr * c.lr_gamma ** (epoch // c.lr_step)
        elif c.lr_policy == "poly":
            lr = c.base_lr * max(1 - epoch / epochs, 0.0) ** c.poly_power
        elif c.lr_policy == "multistep":
            lr = c.base_lr * c.lr_gamma ** sum(1 for m in c.lr_milestones if m <= epoch)
        else:
            lr = c.base_lr
        return max(lr, c.min_lr)

    def next_batch(self) -> Batch:
        if self.device_batcher is not None:  # cases already on the device: augment and crop there
            labeled_ids, unlabeled_ids = self.sampler.next()
            image, label = self.device_batcher.batch(labeled_ids, unlabeled_ids, self.aug_rng)
            return Batch(image, label, self.sampler.labeled_bs)
        images, labels, clean = self.loader.take() if self.loader is not None else self._make_host_batch()
        batch = Batch(self._to_device(images), self._to_device(labels).long(), self.sampler.labeled_bs)
        if clean is not None:
            batch.clean_image = self._to_device(clean)
        return batch

    def _make_host_batch(self) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(images, labels, images before the site shift or None) of the next batch, as numpy arrays."""
        labeled_ids, unlabeled_ids = self.sampler.next()
        return self._host_batch(labeled_ids, unlabeled_ids, self.aug_rng)

    def _batch_request(self) -> Tuple[List[int], List[int], int]:
        """The next batch as the loader processes take it: its cases, and a seed for its own draws."""
        labeled_ids, unlabeled_ids = self.sampler.next()
        return labeled_ids, unlabeled_ids, int(self.aug_rng.integers(2 ** 63))

    def _seeded_host_batch(self, request: Tuple[List[int], List[int], int]
                           ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """`_host_batch` of one `_batch_request` (what a loader process runs)."""
        labeled_ids, unlabeled_ids, seed = request
        return self._host_batch(labeled_ids, unlabeled_ids, np.random.default_rng(seed))

    def _host_batch(self, labeled_ids: Sequence[int], unlabeled_ids: Sequence[int], rng: np.random.Generator
                    ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        images, labels, clean = [], [], []
        picked = [(i, self.labeled[i]) for i in labeled_ids] + [(None, self.unlabeled[i]) for i in unlabeled_ids]
        for index, case in picked:
            source, source_label, met_site = case.image, case.label, False
            if self.widen is not None and index is not None:
                source, source_label, met_site = self.widen.draw(source, source_label, index, rng)
            if self.site_shift is not None and self.config.site_shift_before_normalization and not met_site:
                image, label, shifted = self._augment_shifted_before_normalization(source, source_label, rng)
            else:
                image, label = self.augment(source, source_label, rng)
                shifted = (self.site_shift(image, rng) if self.site_shift is not None and not met_site
                           else None)
            clean.append(image)
            images.append(image if shifted is None else shifted)
            labels.append(label)
        return np.stack(images), np.stack(labels), np.stack(clean) if self.site_shift is not None else None

    def _augment_shifted_before_normalization(self, source: np.ndarray, label: Optional[np.ndarray],
                                              rng: np.random.Generator
                                              ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """(patch, label, the same patch from another site or None): the whole crop or region passes through the
        site and is normalised again, as `segment` normalises another site's scan, and both versions are rotated
        and cut alike (stacked as channels through one augmentation draw)."""
        acquire = self.site_shift.draw(rng)
        if acquire is None:
            image, label = self.augment(source, label, rng)
            return image, label, None
        c = self.config
        other_site = normalize_volume(acquire(source[0]), c.normalization, c.intensity_reference)[None]
        both, label = self.augment(np.concatenate([source, other_site.astype(np.float32)]), label, rng)
        return both[:1], label, both[1:]

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """Labels travel as uint8 (an eighth of int64) and widen on the device; on CUDA page-locked memory
        lets the copy overlap the previous step."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        self.t_start = time.monotonic()
        if resume:
            self.resume()
        elif self.ctx.is_main:
            self._write_run_files()
        if self.ctx.is_main:
            self._check_free_space()
        c = self.config
        self.reporter.start("train", c.max_iterations, f"{c.method} on {self.device}")
        self.reporter.update(self.iteration)
        last_metrics: Dict[str, float] = {}
        validated_at = -1  # the same on every rank (last_metrics is filled on rank 0 only)
        stopped_early = False
        budget_s = c.loop_budget_s if c.loop_budget_s is not None else c.time_budget_s
        step_started = time.monotonic()
        loop_started, first_iteration = time.monotonic(), self.iteration
        replan_at = self._replan_iteration(budget_s)
        try:
            while self.iteration < c.max_iterations:
                lr, result = self.train_step()
                self.iteration += 1
                record = {"iteration": self.iteration, "lr": lr, "loss": float(result.loss.detach()), **result.logs}
                self._log_iteration(record)
                if self.validator is not None and self._due(c.validate_every) and self.iteration >= c.validate_from:
                    last_metrics = self._validate()
                    validated_at = self.iteration
                if self.iteration == replan_at:
                    per_iteration = (time.monotonic() - loop_started) / (self.iteration - first_iteration)
                    self._replan(budget_s, per_iteration)
                step_s = time.monotonic() - step_started
                step_started = time.monotonic()
                # stop when the next step would not end inside the budget
                out_of_time = budget_s is not None and self._elapsed() + step_s >= budget_s
                stop = broadcast_flag(self.ctx, out_of_time or self.should_stop())
                if self._due(c.checkpoint_every) or stop or self.iteration == c.max_iterations:
                    self._save_checkpoint("last.pt")
                if stop and self.iteration < c.max_iterations:
                    stopped_early = True
                    self.reporter.log(f"stopping at iteration {self.iteration}: "
                                      + ("time budget reached" if out_of_time else "stop requested"))
                    break
        finally:  # the loader thread's batch in flight is not needed any more
            if self.loader is not None:
                self.loader.close()
        if self.validator is not None and validated_at != self.iteration:
            last_metrics = self._validate()
            self._save_checkpoint("last.pt")
        self.reporter.end()
        barrier(self.ctx)
        result = TrainResult(self.run_dir, self.iteration, self.best["iteration"],
                             {k: v for k, v in self.best.items() if k != "iteration"}, last_metrics,
                             self._elapsed(), stopped_early, self.method)
        cleanup(self.ctx)
        return result

    def train_step(self) -> tuple:
        """One optimiser step at `self.iteration` (which the caller advances): (learning rate, StepResult)."""
        self.method.train(True)
        lr = self.learning_rate(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.next_batch()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            result = self.method.training_step(batch, self.iteration)
        finite = bool(torch.isfinite(result.loss)) and self.iteration != self.fault_iteration
        failed = ranks_where(self.ctx, not finite)
        if failed:  # every rank stops here, before a gradient all-reduce could die of it elsewhere
            from ..errors import SemiSegError

            where = f" on rank(s) {', '.join(map(str, failed))}" if self.ctx.enabled else ""
            value = "" if finite else f" {float(result.loss)}"
            error = SemiSegError(f"loss became{value or ' non-finite'} at iteration {self.iteration}{where}; "
                                 "lower base_lr or check the data")
            error.report_on_this_rank = self.ctx.rank == failed[0]
            raise error
        self.optimizer.zero_grad(set_to_none=True)
        loss = result.loss
        if self.anchor:
            loss = loss + self.config.anchor_weight * sum(((p - start) ** 2).sum() for p, start in self.anchor)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_optimizer_step(self.iteration)
        self._score_gate_networks()
        return lr, result

    def measure_step_seconds(self, steps: int = 2) -> float:
        """Seconds per step on this device: one warm-up step, then the median of `steps` timed ones.

        It trains this Trainer's method, so measure on a throwaway Trainer and build the real one after
        (the real one re-seeds everything). Under torchrun every rank takes rank 0's figure."""
        times = []
        for i in range(steps + 1):
            start = time.perf_counter()
            self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if i:
                times.append(time.perf_counter() - start)
        return float(broadcast_values(self.ctx, [float(np.median(times))])[0])

    def _replan_iteration(self, budget_s: Optional[float]) -> Optional[int]:
        """When a budget-fitted run checks its plan: after a tenth of it (at least 5 iterations), once."""
        c = self.config
        if not (c.fit_to_budget and budget_s and c.iteration_cap):
            return None
        at = max(5, c.max_iterations // 10)
        return at if self.iteration < at < c.max_iterations else None

    def _replan(self, budget_s: float, per_iteration: float) -> None:
        """Resize the schedule to the step time measured in the run itself: the plan's few probe steps can
        meet a passing load (another program, a first-call kernel cache) and misjudge the device."""
        c = self.config
        left = budget_s - self._elapsed()
        fit = self.iteration + max(int(left // per_iteration), 1)
        wanted = int(broadcast_values(self.ctx, [min(fit, c.iteration_cap)])[0])
        if abs(wanted - c.max_iterations) <= max(1, c.max_iterations // 20):
            return
        self.reporter.log(f"re-planned at iteration {self.iteration}: {per_iteration:.2f} s per iteration measured "
                          f"in this run, so {wanted} iterations instead of {c.max_iterations} fit in the budget")
        c.max_iterations = wanted
        if self.ctx.is_main:
            atomic_write_text(self.run_dir / "config.yaml", dump_config(c))
        self.reporter.start("train", c.max_iterations, f"{c.method} on {self.device}")
        self.reporter.update(self.iteration)

    def _score_gate_networks(self) -> None:
        """Validation Dice of the networks a method asks about (Semi-CML's gate), computed on rank 0."""
        wanted = self.method.gate_networks(self.iteration)
        if not wanted:
            return
        if self.validator is None:
            self.method.on_gate_scores(None)
            return
        keys = sorted(wanted, key=str)
        values = [0.0] * len(keys)
        if self.ctx.is_main:
            for i, key in enumerate(keys):
                network, channel = wanted[key]
                was_training = network.training
                network.eval()
                values[i] = float(self.validator(network, channel)["dice"])
                network.train(was_training)
        values = broadcast_values(self.ctx, values)
        self.method.on_gate_scores(dict(zip(keys, values)))

    def _due(self, every: int) -> bool:
        return every > 0 and self.iteration % every == 0

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t_start)

    def _validate(self) -> Dict[str, float]:
        metrics: Dict[str, float] = {}
        if self.ctx.is_main:
            network = self.method.inference_network()
            was_training = network.training
            network.eval()
            metrics = {"iteration": self.iteration, **self.validator(network)}
            network.train(was_training)
            self.history.append(metrics)
            self._append_csv("validation.csv", metrics)
            self.reporter.log(f"validation at {self.iteration}: dice {metrics.get('dice', float('nan')):.4f}")
            self.reporter.update(self.iteration, val_dice=round(metrics.get("dice", math.nan), 4))
            if metrics.get("dice", -1.0) > self.best["dice"]:
                self.best = {"iteration": self.iteration, **{k: v for k, v in metrics.items() if k != "iteration"}}
                self._save_checkpoint("best.pt", {"format": "semiseg-la-best-1", "iteration": self.iteration,
                                                  "networks": self.method.state_dict(), "metrics": self.best})
        barrier(self.ctx)
        return metrics

    def _log_iteration(self, record: Dict[str, float]) -> None:
        if not self.ctx.is_main:
            return
        if self.iteration % self.config.log_every == 0 or self.iteration == 1:
            self._append_csv("train_log.csv", record)
            self._tensorboard(record)
        self.reporter.update(self.iteration, loss=round(record["loss"], 5), lr=record["lr"])

    def _append_csv(self, name: str, record: Dict[str, Any]) -> None:
        """Columns are fixed by the file's header: later keys are dropped, missing ones left empty."""
        path = self.run_dir / name
        fields = _csv_header(path)
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields or list(record), extrasaction="ignore")
            if not fields:
                writer.writeheader()
            writer.writerow(record)

    def _tensorboard(self, record: Dict[str, float]) -> None:
        if not hasattr(self, "_tb"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self._tb = None
        if self._tb is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, self.iteration)

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
        env = {"semiseg_la": __version__, "torch": torch.__version__, "numpy": np.__version__,
               "python": platform.python_version(), "platform": platform.platform(), "device": str(self.device),
               "world_size": self.ctx.world_size, "git": _git_hash(),
               "labeled_cases": [c.case_id for c in self.labeled],
               "unlabeled_cases": [c.case_id for c in self.unlabeled]}
        atomic_write_text(self.run_dir / "environment.json", json.dumps(env, indent=2) + "\n")
        for name in ("train_log.csv", "validation.csv"):
            (self.run_dir / name).unlink(missing_ok=True)


NORM_TYPES = (nn.BatchNorm3d, nn.BatchNorm1d, nn.GroupNorm, nn.InstanceNorm3d, nn.LayerNorm)


def freeze_parameters(method: Method, prefixes, train_only: Optional[str] = None) -> None:
    """Keep the trainable networks' parameters whose names start with one of `prefixes` fixed, or (with
    `train_only: norm`) every parameter outside the normalisation layers (fine-tuning fewer parameters on a
    few site cases). BatchNorm running statistics still follow the site's data."""
    from ..errors import ConfigError
    from ..methods.base import unwrap

    if train_only not in (None, "norm"):
        raise ConfigError(f"train_only must be 'norm' or unset, got {train_only!r}")
    matched = set()
    for name in method.trainable:
        network = unwrap(getattr(method, name))
        if train_only == "norm":
            for module in network.modules():
                if not isinstance(module, NORM_TYPES):
                    for param in module.parameters(recurse=False):
                        param.requires_grad_(False)
        for param_name, param in network.named_parameters():
            hits = [p for p in prefixes or () if param_name.startswith(p)]
            if hits:
                param.requires_grad_(False)
                matched.update(hits)
    missing = [p for p in prefixes or () if p not in matched]
    if missing:
        raise ConfigError(f"freeze: no parameter name starts with {', '.join(map(repr, missing))}")
    if not any(p.requires_grad for p in method.parameters()):
        raise ConfigError("freeze leaves nothing to train")


#: "RANK:ITERATION": make that rank's loss count as non-finite at that iteration (tests of the stop path)
FAULT_ENV = "SEMISEG_LA_INJECT_NONFINITE"


def _injected_fault(rank: int) -> Optional[int]:
    """The iteration at which this rank's loss is to count as non-finite, or None."""
    spec = os.environ.get(FAULT_ENV, "")
    fault_rank, _, iteration = spec.partition(":")
    return int(iteration) if fault_rank == str(rank) and iteration.isdigit() else None


def _csv_header(path: Path) -> List[str]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, newline="") as handle:
        return next(csv.reader(handle), [])


def _drop_rows_after(path: Path, iteration: int) -> None:
    """Rows logged after the checkpoint a run resumes from are replayed, so drop them first."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(r for r in rows if int(float(r["iteration"])) <= iteration)
    atomic_write_text(path, buffer.getvalue())


def _git_hash() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def train(config: TrainConfig, labeled: List[TrainCase], unlabeled: List[TrainCase],
          validator: Optional[Validator] = None, reporter: Optional[ProgressReporter] = None,
          initial_weights: Optional[Mapping[str, torch.Tensor]] = None, resume: bool = False) -> TrainResult:
    """Train `config.method` into `config.output`; `resume` continues from `checkpoints/last.pt`."""
    return Trainer(config, labeled, unlabeled, validator, reporter, initial_weights).run(resume=resume)


def method_for(config: TrainConfig) -> Method:
    """The run's method, freshly initialised; its method_params are checked here (ConfigError)."""
    params = {"in_channels": config.in_channels, **config.method_params}
    return build_method(config.method, params, config.max_iterations)


def make_optimizer(config: TrainConfig, parameters: List[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay) or Adam (weight decay as its L2 term, default betas)."""
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.base_lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.base_lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov)


def restore_method(method_name: str, params: Mapping[str, Any], networks: Mapping[str, Any]) -> Method:
    """A method rebuilt from checkpoint network states: what it exports (and, for Semi-CML, which network and
    input channel that is) follows the checkpoint, not the run's last state."""
    method = build_method(method_name, params, 1)
    method.load_state_dict(networks)
    return method


def build_for_export(method_name: str, params: Mapping[str, Any], networks: Mapping[str, Any]) -> nn.Module:
    """The exported network of a method, restored from checkpoint network states."""
    return restore_method(method_name, params, networks).inference_network()
