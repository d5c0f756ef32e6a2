"""Losses and schedule helpers shared by the methods (docs/methods.md 1.4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dice_loss_squared(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """UA-MT / CRLN form: 1 - (2 sum pg + s) / (sum p^2 + sum g^2 + s), one scalar over the batch."""
    target = target.float()
    intersect = (prob * target).sum()
    return 1 - (2 * intersect + smooth) / ((prob * prob).sum() + (target * target).sum() + smooth)


def dice_loss_linear(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1e-8) -> torch.Tensor:
    """MC-Net / CAML form ("Binary_dice_loss"): no squares in the denominator."""
    target = target.float()
    intersect = (prob * target).sum()
    return 1 - (2 * intersect + smooth) / (prob.sum() + target.sum() + smooth)


def supervised_ce_dice(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and squared-form Dice on the foreground channel (UA-MT's 0.5 (CE + Dice))."""
    ce = F.cross_entropy(logits.float(), label)
    prob = torch.softmax(logits.float(), dim=1)[:, 1]
    return ce, dice_loss_squared(prob, label == 1)


def weighted_ce_dice(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`supervised_ce_dice` with a weight per voxel (B, X, Y, Z): BCP's mixed loss, where the voxels whose
    target is a teacher's pseudo-label count less than the labelled ones."""
    weight = weight.float()
    ce = (F.cross_entropy(logits.float(), label, reduction="none") * weight).sum() / weight.sum().clamp_min(1e-8)
    prob = torch.softmax(logits.float(), dim=1)[:, 1]
    target = (label == 1).float()
    intersect = (weight * prob * target).sum()
    dice = 1 - (2 * intersect + 1e-5) / ((weight * prob * prob).sum() + (weight * target).sum() + 1e-5)
    return ce, dice


def pseudo_label_ce(student_logits: torch.Tensor, teacher_prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cross-entropy towards the teacher's class on the voxels where the teacher is at least `threshold` sure.

    Averaged over the confident voxels only (0 when there are none), with no host synchronisation.
    """
    confidence, target = teacher_prob.max(dim=1)
    mask = (confidence >= threshold).float()
    ce = F.cross_entropy(student_logits, target, reduction="none")
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)


def sigmoid_rampup(current: float, length: float) -> float:
    """Laine & Aila: exp(-5 (1 - t/T)^2), 1 when T = 0; the LA family evaluates it at iteration // 150."""
    if length == 0:
        return 1.0
    t = min(max(current, 0.0), length)
    phase = 1.0 - t / length
    return float(math.exp(-5.0 * phase * phase))


def consistency_weight(weight: float, iteration: int, rampup: float, unit: int = 150) -> float:
    return weight * sigmoid_rampup(iteration // unit, rampup)
