"""Validation during training: Dice of the network on prepared validation cases (model grid)."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.data import TrainCase
from .memory import Attempt, StickyFallback
from .predictor import InferenceSpec, Predictor, keep_largest_component


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    denominator = int(pred.sum()) + int(gt.sum())
    return 1.0 if denominator == 0 else 2.0 * float(np.logical_and(pred, gt).sum()) / denominator


def make_validator(cases: Sequence[TrainCase], patch_size: Sequence[int], spacing: Sequence[float],
                   device: torch.device | str = "cpu", overlap: float = 0.5,
                   log: Optional[Callable[[str], None]] = None):
    """validate(network, channel=None) -> {"dice": mean Dice over the cases, "dice_<case>": ...} with the fast
    window; `channel` picks the input channel of multi-channel cases (default 0). A case that does not fit
    in GPU memory moves down the out-of-memory ladder (`inference.memory`), and later cases start there."""
    spec = InferenceSpec(tuple(patch_size), tuple(spacing))
    fallback = StickyFallback(str(device), "fast", log)

    def validate(network: nn.Module, channel: Optional[int] = None) -> Dict[str, float]:
        index = 0 if channel is None else int(channel)
        scores = {}
        for case in cases:
            def foreground_of(where: Attempt, image=case.image[index]) -> np.ndarray:
                predictor = Predictor(network, spec, device=where.device, overlap=overlap, mode=where.mode,
                                      largest_component=False, accumulate_on_cpu=where.accumulate_on_cpu)
                return predictor.probabilities(image)[0]

            label = keep_largest_component((fallback(foreground_of) >= 0.5).astype(np.uint8))
            scores[case.case_id] = dice_score(label, case.label)
        return {"dice": float(np.mean(list(scores.values()))), **{f"dice_{k}": v for k, v in scores.items()}}

    return validate


def make_multimodal_validator(cases: Sequence[TrainCase], patch_size: Sequence[int], spacing: Sequence[float],
                              channel_of: Callable[[], int], device: torch.device | str = "cpu",
                              log: Optional[Callable[[str], None]] = None):
    """validate(network, channel=None) on multi-channel cases; without a channel, the one the exported
    network takes (`channel_of`, asked at each call, since the better modality may change)."""
    validate_channel = make_validator(cases, patch_size, spacing, device, log=log)

    def validate(network: nn.Module, channel: Optional[int] = None) -> Dict[str, float]:
        index = int(channel_of()) if channel is None else int(channel)
        return {**validate_channel(network, index), "channel": float(index)}

    return validate
