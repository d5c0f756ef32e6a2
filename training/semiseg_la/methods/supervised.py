"""Supervised baseline: V-Net on the labelled samples only, 0.5 (CE + Dice) as in UA-MT."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..models import VNet
from .base import Batch, Method, StepResult, check_param_names, unwrap
from .losses import supervised_ce_dice

#: its method_params: the V-Net's width, dropout, and the width of a site-adapted parent's input adapter
PARAMS = ("base", "dropout", "input_adapter")


class Supervised(Method):
    name = "supervised"
    trainable = ("net",)
    networks = ("net",)

    def __init__(self, params: Mapping[str, Any], max_iterations: int) -> None:
        check_param_names(self.name, params, PARAMS)
        super().__init__(params, max_iterations)
        self.net = VNet(in_channels=int(self.params.get("in_channels", 1)), n_classes=2,
                        has_dropout=bool(self.params.get("dropout", True)), base=int(self.params.get("base", 16)),
                        input_adapter=int(self.params.get("input_adapter", 0)))

    def training_step(self, batch: Batch, iteration: int) -> StepResult:
        logits = self.net(batch.image[batch.labeled])
        ce, dice = supervised_ce_dice(logits, batch.label[batch.labeled])
        loss = 0.5 * (ce + dice)
        return StepResult(loss, {"loss_ce": float(ce.detach()), "loss_dice": float(dice.detach())})

    def inference_network(self) -> nn.Module:
        return unwrap(self.net)
