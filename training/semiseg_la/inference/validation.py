"""Validation during training: Dice of the network on prepared validation cases (model grid)."""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.data import TrainCase
from ..engine.multimodal import single_channel
from .predictor import InferenceSpec, Predictor, keep_largest_component


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    denominator = int(pred.sum()) + int(gt.sum())
    return 1.0 if denominator == 0 else 2.0 * float(np.logical_and(pred, gt).sum()) / denominator


def make_validator(cases: Sequence[TrainCase], patch_size: Sequence[int], spacing: Sequence[float],
                   device: torch.device | str = "cpu", overlap: float = 0.5):
    """validate(network) -> {"dice": mean Dice over the cases, "dice_<case>": ...} with the fast window."""
    spec = InferenceSpec(tuple(patch_size), tuple(spacing))

    def validate(network: nn.Module) -> Dict[str, float]:
        predictor = Predictor(network, spec, device=device, overlap=overlap, mode="fast", largest_component=False)
        scores = {}
        for case in cases:
            foreground, _, _ = predictor.probabilities(case.image[0])
            label = keep_largest_component((foreground >= 0.5).astype(np.uint8))
            scores[case.case_id] = dice_score(label, case.label)
        return {"dice": float(np.mean(list(scores.values()))), **{f"dice_{k}": v for k, v in scores.items()}}

    return validate


def make_multimodal_validator(cases: Sequence[TrainCase], patch_size: Sequence[int], spacing: Sequence[float],
                              channel_of: Callable[[], int], device: torch.device | str = "cpu"):
    """validate(network) on the channel the exported network takes; `channel_of` is asked at each call
    (e.g. `lambda: trainer.method.exported_channel`), because the better modality may change."""
    validators: Dict[int, Callable[[nn.Module], Dict[str, float]]] = {}

    def validate(network: nn.Module) -> Dict[str, float]:
        channel = int(channel_of())
        if channel not in validators:
            validators[channel] = make_validator(single_channel(cases, channel), patch_size, spacing, device)
        return {**validators[channel](network), "channel": float(channel)}

    return validate
