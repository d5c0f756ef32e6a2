"""Site adapter: fine-tune only a per-voxel intensity adapter in front of a frozen parent V-Net.

The parent's weights and BatchNorm statistics stay exactly as they were; an `IntensityAdapter`
(models/adapter.py, identity when added) learns to map the site's intensities to what the parent knows.

Loss, per batch of `labeled_bs` labelled + unlabelled site patches:
- `supervised` x 0.5 (CE + Dice) on the labelled patches;
- `alignment` (off by default) x the distance between the batch statistics that reach each BatchNorm layer
  (every patch, labelled or not) and the running statistics the parent learnt on its training data: per
  channel, ((mean - running mean) / running std)^2 + (std / running std - 1)^2, averaged over channels and
  layers (the statistics-matching of DeepInversion, Yin et al., CVPR 2020, used here to adapt the input).
  It is how unlabelled site scans could teach the adapter; measured, it cost Dice at both simulated sites
  (docs/results.md), so it stays an option.

Why not fine-tune the network: with 3 labelled cases a fine-tune of 9.4 million weights over-fits within a
few dozen iterations; a few hundred adapter weights can only change the intensity curve. That wins where a
site differs by its contrast curve and loses where it differs by slices, blur or noise (docs/results.md,
"An intensity adapter in front of the parent").
"""

from __future__ import annotations

from typing import Any, List, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..models import VNet
from .base import Batch, Method, StepResult, check_param_names, unwrap
from .losses import supervised_ce_dice

DEFAULTS = {"input_adapter": 16, "supervised": 1.0, "alignment": 0.0}
ADAPTER_PREFIX = "input_adapter."


class SiteAdapter(Method):
    name = "site_adapter"
    trainable = ("net",)
    networks = ("net",)

    def __init__(self, params: Mapping[str, Any], max_iterations: int) -> None:
        check_param_names(self.name, params, (*DEFAULTS, "base", "dropout"))  # dropout: accepted, the body never drops
        super().__init__({**DEFAULTS, **params}, max_iterations)
        if int(self.params["input_adapter"]) < 1:
            raise ConfigError("site_adapter input_adapter (its width) must be >= 1, "
                              f"got {self.params['input_adapter']!r}")
        if float(self.params["supervised"]) < 0 or float(self.params["alignment"]) < 0:
            raise ConfigError("site_adapter supervised and alignment weights must be >= 0")
        self.net = VNet(in_channels=int(self.params.get("in_channels", 1)), n_classes=2,
                        base=int(self.params.get("base", 16)), input_adapter=int(self.params["input_adapter"]))
        self._freeze_body()
        self._norms = [m for m in self.net.modules() if isinstance(m, nn.BatchNorm3d)]
        self._batch_stats: List[torch.Tensor] = []

    def _freeze_body(self) -> None:
        for name, param in self.net.named_parameters():
            param.requires_grad_(name.startswith(ADAPTER_PREFIX))

    def load_initial_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """The parent's weights; an adapter it already has (a site child adapted again) is kept, else the new
        adapter starts as the identity. Every other tensor must fit exactly."""
        net = unwrap(self.net)
        fresh = {k: v for k, v in net.state_dict().items() if k.startswith(ADAPTER_PREFIX)}
        given = {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith(ADAPTER_PREFIX)}
        if given and given != {k: tuple(v.shape) for k, v in fresh.items()}:
            raise ConfigError("site_adapter: the parent's input adapter has another width than input_adapter "
                              f"{self.params['input_adapter']}")
        net.load_state_dict({**fresh, **state_dict}, strict=True)

    def train(self, mode: bool = True) -> None:
        """Only the adapter trains: the parent's body stays in eval mode, so its BatchNorm layers normalise with
        (and keep) the parent's running statistics and dropout stays off."""
        net = unwrap(self.net)
        net.train(False)
        if net.input_adapter is not None:
            net.input_adapter.train(mode)

    def training_step(self, batch: Batch, iteration: int) -> StepResult:
        align = float(self.params["alignment"]) > 0
        handles = [m.register_forward_hook(self._record_stats) for m in self._norms] if align else []
        self._batch_stats = []
        try:
            logits = self.net(batch.image)
        finally:
            for handle in handles:
                handle.remove()
        ce, dice = supervised_ce_dice(logits[batch.labeled], batch.label[batch.labeled])
        alignment = torch.stack(self._batch_stats).mean() if self._batch_stats else logits.new_zeros(())
        self._batch_stats = []
        loss = float(self.params["supervised"]) * 0.5 * (ce + dice) + float(self.params["alignment"]) * alignment
        return StepResult(loss, {"loss_ce": float(ce.detach()), "loss_dice": float(dice.detach()),
                                 "loss_alignment": float(alignment.detach())})

    def _record_stats(self, module: nn.BatchNorm3d, inputs, output) -> None:
        """The distance of this batch's per-channel statistics at `module`'s input from its running ones."""
        x = inputs[0].float()
        dims = (0, *range(2, x.dim()))
        mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
        running_std = (module.running_var.float() + module.eps).sqrt()
        std = (var + module.eps).sqrt()
        self._batch_stats.append((((mean - module.running_mean.float()) / running_std) ** 2).mean()
                                 + ((std / running_std - 1.0) ** 2).mean())

    def inference_network(self) -> nn.Module:
        return unwrap(self.net)
