"""Semi-CML + PReL (Zhang et al., Medical Image Analysis 83, 102656) on the shared V-Net.

Two forms (docs/methods.md 3.7, docs/methods/semicml.md):

* `semicml` (multi-modal, the paper's setting): the batch image holds two co-registered modalities
  (C = 2); network k sees channel k only, so a trained network segments from ONE modality.
* `semicml_la` (single-modality LA ADAPTATION, not the paper's method): LA has one modality, so the
  two networks see two independently augmented views of the same scan (optionally with different
  decoders), and ASC draws extra negatives from a queue because a 2 + 2 batch has too few.

Phase 1 (mutual learning): per network 10 BCE + 7 Dice on labelled samples, MSE between the two
probability maps and the area-similarity contrastive loss (ASC) on unlabelled samples. Phase 2
(PReL, from `prel_start`): a BMA teacher built from the better network by a validation gate gives
soft pseudo-labels (mean of several noisy MC-dropout passes) and both networks re-learn from them.
From `prel_start` the teacher is frozen (gate, weights and BatchNorm statistics), and what the method
exports is what the paper infers with: a student (the one better on the validation split, scored by the
engine during PReL as for the gate), so PReL changes the exported weights.
The gate is fed by each student's Dice on the validation split, scored by the engine when the gate is due
(`gate_networks` / `on_gate_scores`); with `gate_signal: proxy`, or a run without validation cases, a proxy
the method computes itself stands in (EMA of each network's Dice on the labelled samples of its batches);
`update_teacher` takes any
score dictionary, so real validation scores can drive it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import VNet
from .base import Batch, Method, StepResult, check_param_names, unwrap
from .losses import dice_loss_squared, sigmoid_rampup

#: the paper's schedule is 81 epochs; fractions of training below are its epochs / 81
PAPER_EPOCHS = 81

DEFAULTS: Dict[str, Any] = {
    # networks
    "base": 16, "norm": "batchnorm", "student_dropout": False,
    # phase-1 losses: L = sup_a + sup_b + asc_weight ASC + w(t) MSE, all times loss_scale
    "sup_bce_weight": 10.0, "sup_dice_weight": 7.0, "asc_weight": 3.5, "mse_weight": 1.0,
    "mse_rampup": 200 / PAPER_EPOCHS,  # S2: ramp length as a fraction of training (official: never completes)
    "loss_scale": 1.0 / 17.0,  # the paper's weights were tuned for Adam; the engine's SGD expects unit scale
    "asc_temperature": 1.0, "asc_smooth": 1e-6, "queue_size": 0,
    # validation gate (BMA teacher) and its proxy signal
    "better": "auto",  # S3: "auto" = by the gate's scores; 0 / 1 (or a modality name) = fixed
    "gate_start": 11 / PAPER_EPOCHS, "gate_every": None, "gate_pool": 6, "gate_alpha_cap": 0.99,
    "proxy_decay": 0.9,
    "gate_signal": "validation",  # validation split (engine-scored); "proxy" = labelled-batch Dice EMA
    # PReL
    "prel_start": 51 / PAPER_EPOCHS, "source_teach_start": 75 / PAPER_EPOCHS,
    "prel_alpha": [0.1, 0.1],  # ASC share in L_T for [the other network, the teacher's source network]
    "teacher_passes": 4, "teacher_noise_std": 0.1, "teacher_noise_clip": 0.2,
    "teacher_noise": "symmetric",  # S1: "symmetric" clamp(+-clip) | "official" clamp(0, clip)
    # S4: BatchNorm of the frozen teacher's pseudo-label passes: "running" (its running statistics, BN layers in
    # eval mode) or "batch" (the paper's train mode: batch statistics); neither updates the running statistics
    "teacher_bn": "running",
}

MULTIMODAL_DEFAULTS: Dict[str, Any] = {"up_type": 0, "modality_names": None}

LA_DEFAULTS: Dict[str, Any] = {
    "decoder_types": [0, 0], "queue_size": 8, "view_flip": True, "view_scale": [0.9, 1.1],
    "view_shift": 0.1, "view_noise_std": 0.1, "view_noise_clip": 0.2,
}

STUDENTS = ("net_a", "net_b")

#: every step logs these keys, in this order, NaN where a phase has no such value: the engine's CSV
#: log takes its columns from the first row, so the key set must not change between phases
LOG_KEYS = ("phase", "loss_sup_a", "loss_sup_b", "loss_bce_a", "loss_dice_a", "loss_bce_b", "loss_dice_b",
            "loss_mse", "loss_asc", "mse_weight", "loss_relearn_other", "loss_relearn_source", "source_weight",
            "pseudo_fg_fraction", "proxy_dice_a", "proxy_dice_b", "teacher_ready", "teacher_source",
            "teacher_updates", "gate_alpha")


# --- losses ----------------------------------------------------------------------------------------

def dice_similarity(x: torch.Tensor, y: torch.Tensor, smooth: float = 1e-6) -> torch.Tensor:
    """Soft Dice between rows: s(i, j) = (2 sum x_i y_j + e) / (sum x_i^2 + sum y_j^2 + e); (N, V), (M, V) -> (N, M).

    Run in float32 outside autocast: a bf16 matmul over ~1 M voxels would lose the similarity's digits.
    """
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        cross = x @ y.t()
        return (2 * cross + smooth) / ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] + smooth)


def asc_loss(maps_a: torch.Tensor, maps_b: torch.Tensor, negatives: Optional[torch.Tensor] = None,
             temperature: float = 1.0, smooth: float = 1e-6) -> torch.Tensor:
    """Area-similarity contrastive loss (NT-Xent with soft-Dice similarities as logits).

    Z = [a_1..a_B, b_1..b_B]; anchor k's positive is its counterpart (k +- B); the denominator runs over
    every other map of Z plus the optional `negatives` (M, V) (a queue of earlier maps):
    L = mean_k -log(exp(s(k, k+)/t) / sum_{j != k} exp(s(k, j)/t)).
    """
    batch = maps_a.shape[0]
    if batch == 0:
        return maps_a.sum() * 0.0
    z = torch.cat([maps_a.reshape(batch, -1), maps_b.reshape(batch, -1)]).float()
    n = z.shape[0]
    logits = dice_similarity(z, z, smooth) / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    if negatives is not None and negatives.shape[0] > 0:
        logits = torch.cat([logits, dice_similarity(z, negatives.to(z.device), smooth) / temperature], dim=1)
    positive = (torch.arange(n, device=z.device) + batch) % n
    return (torch.logsumexp(logits, dim=1) - logits[torch.arange(n, device=z.device), positive]).mean()


def soft_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of the foreground probability of a 2-class softmax against a (soft) target, from log-softmax
    for stability; with a hard target it equals cross-entropy."""
    log_p = F.log_softmax(logits.float(), dim=1)
    target = target.float()
    return -(target * log_p[:, 1] + (1 - target) * log_p[:, 0]).mean()


def bce_dice(logits: torch.Tensor, target: torch.Tensor, bce_weight: float, dice_weight: float
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted sum, BCE, Dice) of the foreground probability against a hard or soft target."""
    prob = torch.softmax(logits.float(), dim=1)[:, 1]
    bce = soft_bce(logits, target)
    dice = dice_loss_squared(prob, target.float())
    return bce_weight * bce + dice_weight * dice, bce, dice


def hard_dice(prob: torch.Tensor, label: torch.Tensor) -> float:
    """Dice of the thresholded map (1.0 when both are empty): the gate's proxy score."""
    pred, gt = prob > 0.5, label == 1
    denominator = int(pred.sum()) + int(gt.sum())
    return 1.0 if denominator == 0 else 2.0 * int((pred & gt).sum()) / denominator


# --- the validation gate of the BMA teacher ----------------------------------------------------------

@dataclasses.dataclass
class GateDecision:
    """What one gate evaluation did: "pool" (score recorded), "init" (teacher copied from `source`),
    "update" (teacher <- alpha teacher + (1 - alpha) source network) or "skip" (no improvement)."""

    action: str
    source: int
    alpha: Optional[float] = None


class TeacherGate(nn.Module):
    """Gate state as buffers, so checkpoints (and export from `best.pt`) know the teacher's source.

    Rule (docs/methods.md 3.4): the first `pool_size` evaluations fill a score pool per network; the
    next one picks the source (fixed, or the best pooled mean) and copies it into the teacher; after
    that an evaluation whose score D beats the worst pooled score D_min replaces it and moves the
    teacher with alpha = min(1 - (D - D_min) / D, cap); otherwise the teacher is left alone.
    """

    def __init__(self, pool_size: int, n_networks: int = 2) -> None:
        super().__init__()
        self.register_buffer("pools", torch.full((n_networks, pool_size), float("nan"), dtype=torch.float64))
        self.register_buffer("pool_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("source", torch.full((), -1, dtype=torch.long))
        self.register_buffer("teacher_ready", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("proxy", torch.full((n_networks,), -1.0, dtype=torch.float64))
        # PReL: whether it started (the export then switches to a student) and each student's latest
        # validation Dice scored during PReL (NaN: not scored yet)
        self.register_buffer("prel_started", torch.zeros((), dtype=torch.long))
        self.register_buffer("export_scores", torch.full((n_networks,), float("nan"), dtype=torch.float64))

    @property
    def ready(self) -> bool:
        return bool(self.teacher_ready.item())

    def decide(self, scores: Sequence[float], fixed: Optional[int], cap: float) -> GateDecision:
        """Apply the rule to one evaluation's scores (one per network); mutates the gate state."""
        pools = self.pools.cpu().numpy().copy()
        if not self.ready:
            count = int(self.pool_count.item())
            if count < pools.shape[1]:
                pools[:, count] = scores
                self.pools.copy_(torch.from_numpy(pools))
                self.pool_count.fill_(count + 1)
                return GateDecision("pool", self.best_source(fixed))
            return self.initialise(self.best_source(fixed))
        source = int(self.source.item())
        score, pool = float(scores[source]), pools[source]
        worst = int(np.argmin(pool))
        floor = float(pool[worst])
        if not (math.isfinite(score) and score > 0 and score > floor):
            return GateDecision("skip", source)
        alpha = min(1.0 - (score - floor) / score, cap)
        pools[source, worst] = score
        self.pools.copy_(torch.from_numpy(pools))
        self.updates.add_(1)
        return GateDecision("update", source, alpha)

    def initialise(self, source: int) -> GateDecision:
        self.source.fill_(source)
        self.teacher_ready.fill_(1)
        return GateDecision("init", source)

    def best_source(self, fixed: Optional[int]) -> int:
        """Fixed choice, else the best pooled mean score, else the best proxy, else network 0."""
        if fixed is not None:
            return fixed
        if self.ready:
            return int(self.source.item())
        pools = self.pools.cpu().numpy()
        if int(self.pool_count.item()) > 0:
            return int(np.argmax(np.nan_to_num(np.nanmean(pools[:, : int(self.pool_count.item())], axis=1),
                                               nan=-np.inf)))
        proxy = self.proxy.cpu().numpy()
        return int(np.argmax(proxy)) if (proxy >= 0).all() else 0

    def update_proxy(self, scores: Sequence[float], decay: float) -> None:
        new = torch.tensor(list(scores), dtype=self.proxy.dtype, device=self.proxy.device)
        self.proxy.copy_(torch.where(self.proxy < 0, new, decay * self.proxy + (1 - decay) * new))


@torch.no_grad()
def blend_into(teacher: nn.Module, source: nn.Module, alpha: float) -> None:
    """teacher <- alpha teacher + (1 - alpha) source, for parameters and float buffers (BN statistics);
    integer buffers (batch counters) are copied."""
    for t, s in zip(teacher.parameters(), source.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
    for t, s in zip(teacher.buffers(), source.buffers()):
        if t.is_floating_point():
            t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
        else:
            t.copy_(s)


@contextlib.contextmanager
def frozen_batchnorm(network: nn.Module, use_batch_statistics: bool = False) -> Iterator[None]:
    """Inside: `network`'s BatchNorm layers leave their running statistics alone. They normalise with them
    (eval mode), or with `use_batch_statistics` with the batch's own statistics as in train mode (the running
    buffers are not passed to batch_norm, so they are not updated). Other layers (dropout) keep their mode."""
    layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in layers]
    try:
        for m in layers:
            if use_batch_statistics:
                m.train(True)
                m.track_running_stats = False
            else:
                m.train(False)
        yield
    finally:
        for m, (training, track) in zip(layers, saved):
            m.train(training)
            m.track_running_stats = track


# --- the method -------------------------------------------------------------------------------------

View = Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class _SemiCMLBase(Method):
    """Shared by both forms: two student V-Nets, the BMA teacher and its gate, the ASC queue."""

    trainable = STUDENTS
    networks = STUDENTS + ("teacher", "gate")
    form_defaults: Dict[str, Any] = {}
    expected_channels = 1

    def __init__(self, params: Mapping[str, Any], max_iterations: int) -> None:
        super().__init__({**DEFAULTS, **self.form_defaults, **params}, max_iterations)
        self._check_params()
        self.up_types = self._up_types()
        self.net_a, self.net_b = (self._new_vnet(t, bool(self.params["student_dropout"])) for t in self.up_types)
        self.fixed_source = self._fixed_source()
        self.teacher = self._new_teacher(self.up_types[self.fixed_source or 0])
        self.gate = TeacherGate(int(self.params["gate_pool"]))
        self.queue: Optional[torch.Tensor] = None
        self.queue_ptr, self.queue_len = 0, 0
        self.last_decision: Optional[GateDecision] = None
        self._scoring: Optional[str] = None  # what the scores the engine is computing are for: "gate" | "export"
        self._schedule(max_iterations)

    # -- construction ------------------------------------------------------------------------------
    def _check_params(self) -> None:
        p = self.params
        check_param_names(self.name, p, (*DEFAULTS, *self.form_defaults))
        problems = []
        if int(p.get("in_channels", self.expected_channels)) != self.expected_channels:
            problems.append(f"in_channels must be {self.expected_channels} for {self.name} "
                            f"(got {p.get('in_channels')})")
        if int(p["gate_pool"]) < 1:
            problems.append("gate_pool must be >= 1")
        if p["gate_signal"] not in ("validation", "proxy"):
            problems.append("gate_signal must be 'validation' or 'proxy'")
        if p["teacher_noise"] not in ("symmetric", "official"):
            problems.append("teacher_noise must be 'symmetric' or 'official'")
        if p["teacher_bn"] not in ("running", "batch"):
            problems.append("teacher_bn must be 'running' or 'batch'")
        if int(p["teacher_passes"]) < 1:
            problems.append("teacher_passes must be >= 1")
        if len(p["prel_alpha"]) != 2:
            problems.append("prel_alpha must be [alpha_other, alpha_source]")
        if problems:
            raise ConfigError(f"{self.name}: " + "; ".join(problems))

    def _up_types(self) -> List[int]:
        raise NotImplementedError

    def _fixed_source(self) -> Optional[int]:
        better = self.params["better"]
        if better in (None, "auto"):
            return None
        if str(better) in ("0", "1"):
            return int(better)
        names = self.modality_names()
        if better in names:
            return names.index(better)
        raise ConfigError(f"{self.name}: better={better!r} must be 'auto', 0, 1 or one of {names}")

    def _new_vnet(self, up_type: int, dropout: bool) -> VNet:
        return VNet(in_channels=1, n_classes=2, base=int(self.params["base"]), norm=str(self.params["norm"]),
                    has_dropout=dropout, up_type=int(up_type))

    def _new_teacher(self, up_type: int) -> VNet:
        """Dropout on: PReL's pseudo-labels average noisy MC-dropout passes. No gradients."""
        teacher = self._new_vnet(up_type, dropout=True)
        for param in teacher.parameters():
            param.requires_grad_(False)
        return teacher

    def _schedule(self, total: int) -> None:
        p = self.params

        def at(fraction: float) -> int:
            return total + 1 if float(fraction) >= 1.0 else int(round(float(fraction) * total))

        self.gate_start_it = at(p["gate_start"])
        self.prel_start_it = at(p["prel_start"])
        self.source_teach_it = at(p["source_teach_start"])
        self.gate_every = int(p["gate_every"]) if p["gate_every"] else max(1, round(total / PAPER_EPOCHS))
        self.mse_rampup_it = float(p["mse_rampup"]) * total

    def modality_names(self) -> List[str]:
        return ["channel 0", "channel 1"]

    # -- form-specific inputs -------------------------------------------------------------------------
    def student_views(self, image: torch.Tensor) -> List[View]:
        """(input of network k, function mapping its output back onto the batch's voxel grid)."""
        raise NotImplementedError

    def teacher_input(self, image: torch.Tensor, source: int) -> torch.Tensor:
        raise NotImplementedError

    # -- training -------------------------------------------------------------------------------------
    def student(self, k: int) -> nn.Module:
        return getattr(self, STUDENTS[k])

    def training_step(self, batch: Batch, iteration: int) -> StepResult:
        if batch.image.shape[1] != self.expected_channels:
            raise ConfigError(f"{self.name} expects {self.expected_channels}-channel images, the batch has "
                              f"{batch.image.shape[1]}")
        if iteration >= self.prel_start_it:
            return self._prel_step(batch, iteration)
        return self._mutual_step(batch, iteration)

    def _mutual_step(self, batch: Batch, iteration: int) -> StepResult:
        p = self.params
        logits = [undo(self.student(k)(x).float()) for k, (x, undo) in enumerate(self.student_views(batch.image))]
        probs = [torch.softmax(lg, dim=1)[:, 1] for lg in logits]
        lab, unl = batch.labeled, batch.unlabeled
        target = (batch.label[lab] == 1).float()
        sups = [bce_dice(lg[lab], target, p["sup_bce_weight"], p["sup_dice_weight"]) for lg in logits]
        self._update_proxy(probs, batch)
        pa, pb = probs[0][unl], probs[1][unl]
        mse = torch.mean((pa - pb) ** 2) if pa.shape[0] else pa.sum() * 0.0
        asc = self._asc(pa, pb)
        weight = float(p["mse_weight"]) * sigmoid_rampup(iteration, self.mse_rampup_it)
        loss = p["loss_scale"] * (sups[0][0] + sups[1][0] + p["asc_weight"] * asc + weight * mse)
        self._enqueue(torch.cat([pa, pb]))
        logs = {"phase": 1.0, "loss_sup_a": _f(sups[0][0]), "loss_sup_b": _f(sups[1][0]),
                "loss_bce_a": _f(sups[0][1]), "loss_dice_a": _f(sups[0][2]), "loss_bce_b": _f(sups[1][1]),
                "loss_dice_b": _f(sups[1][2]), "loss_mse": _f(mse), "loss_asc": _f(asc), "mse_weight": weight}
        return StepResult(loss, _logs({**logs, **self._gate_logs()}))

    def _prel_step(self, batch: Batch, iteration: int) -> StepResult:
        p = self.params
        if not self.gate.ready:
            self._apply(self.gate.initialise(self.gate.best_source(self.fixed_source)))
        self.gate.prel_started.fill_(1)
        source = int(self.gate.source.item())
        image = batch.image[batch.unlabeled] if batch.image.shape[0] > batch.labeled_bs else batch.image
        pseudo = self.pseudo_label(self.teacher_input(image, source))
        source_weight = 1.0 if iteration >= self.source_teach_it else 0.0
        views = self.student_views(image)
        terms: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        for k, alpha in ((1 - source, p["prel_alpha"][0]), (source, p["prel_alpha"][1])):
            if k == source and source_weight == 0.0 and not _distributed():
                continue  # the source network only re-learns late; under DDP it must still join the graph
            x, undo = views[k]
            logits = undo(self.student(k)(x).float())
            prob = torch.softmax(logits, dim=1)[:, 1]
            fit = bce_dice(logits, pseudo, p["sup_bce_weight"], p["sup_dice_weight"])[0]
            terms[k] = (alpha * self._asc(pseudo, prob) + (1 - alpha) * fit, prob)
        other = terms[1 - source][0]
        relearn = other + source_weight * terms[source][0] if source in terms else other
        loss = p["loss_scale"] * relearn
        self._enqueue(torch.cat([t[1] for t in terms.values()]))
        logs = {"phase": 2.0, "loss_relearn_other": _f(other), "source_weight": source_weight,
                "loss_relearn_source": _f(terms[source][0]) if source in terms else math.nan,
                "pseudo_fg_fraction": _f((pseudo > 0.5).float().mean())}
        return StepResult(loss, _logs({**logs, **self._gate_logs()}))

    @torch.no_grad()
    def pseudo_label(self, image: torch.Tensor) -> torch.Tensor:
        """Soft pseudo-label: mean foreground probability of `teacher_passes` noisy passes of the teacher with
        its dropout on (MC dropout, as in the paper). The teacher is frozen in PReL, BatchNorm statistics
        included: its BN layers use their running statistics (`teacher_bn: running`) or the batch's
        (`batch`, the paper's train mode) without updating the running ones."""
        p = self.params
        total = torch.zeros_like(image[:, 0], dtype=torch.float32)
        low = 0.0 if p["teacher_noise"] == "official" else -float(p["teacher_noise_clip"])
        with frozen_batchnorm(self.teacher, use_batch_statistics=p["teacher_bn"] == "batch"):
            for _ in range(int(p["teacher_passes"])):
                noise = torch.clamp(torch.randn_like(image) * float(p["teacher_noise_std"]), low,
                                    float(p["teacher_noise_clip"]))
                total += torch.softmax(self.teacher(image + noise).float(), dim=1)[:, 1]
        return total / int(p["teacher_passes"])

    def _asc(self, maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
        negatives = self.queue[: self.queue_len] if self.queue is not None and self.queue_len else None
        if negatives is not None and negatives.shape[1] != maps_a[0].numel():
            negatives = None
        return asc_loss(maps_a, maps_b, negatives, float(self.params["asc_temperature"]),
                        float(self.params["asc_smooth"]))

    # -- the ASC negative queue ---------------------------------------------------------------------------
    @torch.no_grad()
    def _enqueue(self, maps: torch.Tensor) -> None:
        size = int(self.params["queue_size"])
        if size <= 0 or maps.shape[0] == 0:
            return
        flat = maps.detach().reshape(maps.shape[0], -1).half()
        if self.queue is None or self.queue.shape[1] != flat.shape[1]:
            self.queue = torch.zeros((size, flat.shape[1]), dtype=torch.float16, device=flat.device)
            self.queue_ptr, self.queue_len = 0, 0
        self.queue = self.queue.to(flat.device)
        for row in flat[-size:]:
            self.queue[self.queue_ptr] = row
            self.queue_ptr = (self.queue_ptr + 1) % size
            self.queue_len = min(self.queue_len + 1, size)

    # -- the gate ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_proxy(self, probs: Sequence[torch.Tensor], batch: Batch) -> None:
        label = batch.label[batch.labeled]
        scores = [hard_dice(prob[batch.labeled], label) for prob in probs]
        self.gate.update_proxy(scores, float(self.params["proxy_decay"]))

    def _gate_due(self, iteration: int) -> bool:
        return (self.gate_start_it <= iteration < self.prel_start_it and (iteration + 1) % self.gate_every == 0
                and bool((self.gate.proxy >= 0).all()))

    def after_optimizer_step(self, iteration: int) -> None:
        if self.params["gate_signal"] == "proxy" and self._gate_due(iteration):
            self.update_teacher(_mean_over_ranks(self.gate.proxy).tolist())

    def _export_scoring_due(self, iteration: int) -> bool:
        """In PReL, every `gate_every` iterations and at the last one: score both students for the export."""
        return iteration >= self.prel_start_it and ((iteration + 1) % self.gate_every == 0
                                                    or iteration + 1 == self.max_iterations)

    def gate_networks(self, iteration: int) -> Dict[Any, tuple]:
        """Both students, for the engine to score on the validation split: for the gate when it is due (with
        `gate_signal: validation`), and during PReL for the choice of the exported student."""
        if self.params["gate_signal"] == "validation" and self._gate_due(iteration):
            self._scoring = "gate"
        elif self._export_scoring_due(iteration):
            self._scoring = "export"
        else:
            self._scoring = None
            return {}
        return {k: (unwrap(self.student(k)), self.student_channel(k)) for k in range(len(STUDENTS))}

    def student_channel(self, k: int) -> int:
        """The input channel student k sees: its modality in the multi-modal form, 0 for the LA form."""
        return 0

    def on_gate_scores(self, scores: Optional[Dict[Any, float]]) -> None:
        """Validation Dice per student, or None (no validation split: the labelled-batch proxy stands in for the
        gate; in PReL the export then stays with the teacher's source network)."""
        scoring, self._scoring = self._scoring, None
        if scoring == "export":
            if scores is not None:
                values = [float(scores.get(k, scores.get(str(k), math.nan))) for k in range(len(STUDENTS))]
                self.gate.export_scores.copy_(torch.tensor(values, dtype=torch.float64))
            return
        if scores is None:
            self.update_teacher(_mean_over_ranks(self.gate.proxy).tolist())
        else:
            self.update_teacher(scores)

    def update_teacher(self, val_scores: Mapping[Any, float] | Sequence[float]) -> GateDecision:
        """One gate evaluation with a score per network ({0: dice_a, 1: dice_b} or a 2-list); see TeacherGate."""
        if isinstance(val_scores, Mapping):
            scores = [float(val_scores.get(k, val_scores.get(str(k), math.nan))) for k in range(len(STUDENTS))]
        else:
            scores = [float(s) for s in val_scores]
        decision = self.gate.decide(scores, self.fixed_source, float(self.params["gate_alpha_cap"]))
        self._apply(decision)
        return decision

    def _apply(self, decision: GateDecision) -> None:
        self.last_decision = decision
        source = unwrap(self.student(decision.source))
        if decision.action == "init":
            self._ensure_teacher_arch(self.up_types[decision.source])
            self.teacher.load_state_dict(source.state_dict())
        elif decision.action == "update":
            blend_into(self.teacher, source, float(decision.alpha))

    def _ensure_teacher_arch(self, up_type: int) -> None:
        """The two students may have different decoders; the teacher takes its source's."""
        if int(self.teacher.config["up_type"]) != int(up_type):
            device = next(self.teacher.parameters()).device
            training = self.teacher.training
            self.teacher = self._new_teacher(up_type).to(device).train(training)

    def _gate_logs(self) -> Dict[str, float]:
        """Gate state; `gate_alpha` is set only in the step after a teacher update."""
        proxy = self.gate.proxy.tolist()
        decision, self.last_decision = self.last_decision, None
        return {"proxy_dice_a": proxy[0], "proxy_dice_b": proxy[1], "teacher_ready": float(self.gate.ready),
                "teacher_source": float(self.gate.source.item()), "teacher_updates": float(self.gate.updates.item()),
                "gate_alpha": float(decision.alpha) if decision and decision.alpha is not None else math.nan}

    # -- export and state ---------------------------------------------------------------------------------
    @property
    def prel_started(self) -> bool:
        return bool(self.gate.prel_started.item())

    @property
    def exported_index(self) -> int:
        """Which student is exported (or, before PReL, sources the exported teacher).

        In PReL: the fixed `better` if set, else the student with the better validation Dice scored during
        PReL, else (no score yet, or no validation split) the teacher's source. Before PReL: the teacher's
        source, or (before the teacher exists) the better network by the gate's scores / the fixed choice."""
        if self.prel_started and self.fixed_source is None:
            scores = self.gate.export_scores.cpu().numpy()
            if np.isfinite(scores).all():
                return int(np.argmax(scores))
        return self.gate.best_source(self.fixed_source)

    @property
    def exported_network(self) -> str:
        name = STUDENTS[self.exported_index]
        if self.prel_started:
            return f"{name} (student, PReL)"
        return f"teacher (BMA of {name})" if self.gate.ready else name

    def inference_network(self) -> nn.Module:
        """ONE plain 1-channel V-Net. From PReL on, a student (`exported_index`): the paper infers with a
        student, and the teacher is frozen from `prel_start`, so exporting it would ignore PReL. Before PReL,
        the BMA teacher once built, else the better student."""
        if self.prel_started or not self.gate.ready:
            return unwrap(self.student(self.exported_index))
        return self.teacher

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        gate = state.get("gate", {})
        if "teacher_ready" in gate and int(gate["teacher_ready"]) and int(gate["source"]) >= 0:
            self._ensure_teacher_arch(self.up_types[int(gate["source"])])
        if "gate" in state:  # checkpoints written before the PReL export fields: PReL state unknown = not started
            current = self.gate.state_dict()
            state = {**state, "gate": {**{k: current[k] for k in ("prel_started", "export_scores")}, **gate}}
        super().load_state_dict(state)

    def load_initial_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Start both students (and the teacher) from one catalog V-Net; the gate starts fresh."""
        for name in STUDENTS + ("teacher",):
            unwrap(getattr(self, name)).load_state_dict(state_dict, strict=True)

    def extra_state(self) -> Dict[str, Any]:
        if self.queue is None:
            return {}
        return {"queue": self.queue.detach().cpu(), "queue_ptr": self.queue_ptr, "queue_len": self.queue_len}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "queue" in state:
            self.queue = state["queue"].to(torch.float16)
            self.queue_ptr, self.queue_len = int(state["queue_ptr"]), int(state["queue_len"])


class SemiCML(_SemiCMLBase):
    """Multi-modal Semi-CML + PReL: network k segments modality (channel) k."""

    name = "semicml"
    form_defaults = MULTIMODAL_DEFAULTS
    expected_channels = 2

    def _up_types(self) -> List[int]:
        return [int(self.params["up_type"])] * 2

    def modality_names(self) -> List[str]:
        names = self.params.get("modality_names") or ["channel 0", "channel 1"]
        if len(names) != 2:
            raise ConfigError(f"{self.name}: modality_names must name 2 channels, got {names}")
        return [str(n) for n in names]

    def student_views(self, image: torch.Tensor) -> List[View]:
        return [(image[:, k:k + 1], _identity) for k in range(2)]

    def teacher_input(self, image: torch.Tensor, source: int) -> torch.Tensor:
        return image[:, source:source + 1]

    def student_channel(self, k: int) -> int:
        return k

    @property
    def exported_channel(self) -> int:
        return self.exported_index

    @property
    def exported_modality(self) -> str:
        """For the model card: which input the exported network takes, e.g. "channel 0 (T1)"."""
        k = self.exported_index
        name = self.modality_names()[k]
        return f"channel {k}" if name == f"channel {k}" else f"channel {k} ({name})"


class SemiCMLLA(_SemiCMLBase):
    """Semi-CML-style single-modality LA ADAPTATION: two networks on independently augmented views."""

    name = "semicml_la"
    form_defaults = LA_DEFAULTS
    expected_channels = 1
    exported_channel = 0

    def _up_types(self) -> List[int]:
        types = [int(t) for t in self.params["decoder_types"]]
        if len(types) != 2:
            raise ConfigError(f"{self.name}: decoder_types must list 2 V-Net up types, got {types}")
        return types

    def student_views(self, image: torch.Tensor) -> List[View]:
        return [self._view(image) for _ in range(2)]

    def _view(self, image: torch.Tensor) -> View:
        """Random flips (undone on the output), intensity scale/shift per sample and clipped noise."""
        p = self.params
        b = image.shape[0]
        low, high = (math.log(float(s)) for s in p["view_scale"])
        scale = torch.exp(torch.empty(b, 1, 1, 1, 1, device=image.device).uniform_(low, high))
        shift = torch.empty(b, 1, 1, 1, 1, device=image.device).uniform_(-float(p["view_shift"]),
                                                                           float(p["view_shift"]))
        clip = float(p["view_noise_clip"])
        noise = torch.clamp(torch.randn_like(image) * float(p["view_noise_std"]), -clip, clip)
        view = image * scale + shift + noise
        dims = [d for d in (2, 3, 4) if p["view_flip"] and bool(torch.rand(()) < 0.5)]
        if not dims:
            return view, _identity
        return torch.flip(view, dims), lambda out: torch.flip(out, dims)

    def teacher_input(self, image: torch.Tensor, source: int) -> torch.Tensor:
        return image

    @property
    def exported_modality(self) -> str:
        return f"channel 0 (single modality; {self.exported_network})"


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _logs(values: Mapping[str, float]) -> Dict[str, float]:
    return {key: float(values.get(key, math.nan)) for key in LOG_KEYS}


def _f(value: torch.Tensor) -> float:
    return float(value.detach())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The proxy averaged over DDP ranks, so every rank's gate takes the same decision."""
    if not _distributed():
        return values.detach().cpu()
    total = values.detach().clone()
    torch.distributed.all_reduce(total)
    return (total / torch.distributed.get_world_size()).cpu()


__all__ = ["SemiCML", "SemiCMLLA", "TeacherGate", "GateDecision", "asc_loss", "dice_similarity", "soft_bce",
           "blend_into", "frozen_batchnorm"]
