"""The contract between a method and the one training loop (engine).

A method builds its networks and computes its loss for one batch; it owns no loop, no data and
no I/O. The engine samples batches, steps the optimiser, wraps trainable networks for DDP,
checkpoints `state_dict()` and exports `inference_network()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn


@dataclasses.dataclass
class Batch:
    """`image` (B, C, X, Y, Z); `label` (B, X, Y, Z) long; the first `labeled_bs` samples are labelled.
    `clean_image`: the same patches before the site-shift augmentation (None when it is off); a teacher
    that looks at it asks the student to see through the simulated site."""

    image: torch.Tensor
    label: torch.Tensor
    labeled_bs: int
    clean_image: Optional[torch.Tensor] = None

    @property
    def labeled(self) -> slice:
        return slice(0, self.labeled_bs)

    @property
    def unlabeled(self) -> slice:
        return slice(self.labeled_bs, None)


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor
    logs: Dict[str, float]


class Method:
    """Base class. Subclasses set `name`, build networks in `__init__` and implement `training_step`."""

    name = "base"
    #: attribute names of the networks the optimiser trains (wrapped by DDP under torchrun)
    trainable: tuple = ()
    #: attribute names of every network whose state is checkpointed
    networks: tuple = ()

    def __init__(self, params: Mapping[str, Any], max_iterations: int) -> None:
        self.params = dict(params)
        self.max_iterations = max_iterations

    # -- the per-batch work ------------------------------------------------------------------
    def training_step(self, batch: Batch, iteration: int) -> StepResult:
        raise NotImplementedError

    def after_optimizer_step(self, iteration: int) -> None:
        """Hook for EMA teachers, memory banks, ..."""

    def inference_network(self) -> nn.Module:
        """The network exported to the catalog (a plain V-Net)."""
        raise NotImplementedError

    def gate_networks(self, iteration: int) -> Dict[Any, tuple]:
        """Networks the method wants scored on the validation split now, as {key: (network, input channel)};
        empty when nothing is due. Semi-CML's validation-gated teacher uses it."""
        return {}

    def on_gate_scores(self, scores: Optional[Dict[Any, float]]) -> None:
        """Validation Dice of the networks `gate_networks` returned; None when the run has no validation
        split (the method then falls back to a signal of its own)."""

    # -- what the engine needs -----------------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        for name in self.trainable:
            yield from getattr(self, name).parameters()

    def modules(self) -> Dict[str, nn.Module]:
        return {name: unwrap(getattr(self, name)) for name in self.networks}

    def to(self, device: torch.device) -> Method:
        for name in self.networks:
            getattr(self, name).to(device)
        return self

    def train(self, mode: bool = True) -> None:
        for name in self.networks:
            getattr(self, name).train(mode)

    def wrap_trainable(self, wrapper) -> None:
        """Replace each trainable network by `wrapper(network)` (DistributedDataParallel)."""
        for name in self.trainable:
            setattr(self, name, wrapper(getattr(self, name)))

    def state_dict(self) -> Dict[str, Any]:
        return {name: module.state_dict() for name, module in self.modules().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, module in self.modules().items():
            module.load_state_dict(state[name])

    def load_initial_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Start every network from the same V-Net weights (fine-tuning from a catalog model)."""
        for module in self.modules().values():
            module.load_state_dict(state_dict, strict=True)


#: method_params every method may receive: the engine passes the input channels to all of them
COMMON_PARAMS = ("in_channels",)


def check_param_names(method: str, params: Mapping[str, Any], known: Iterable[str]) -> None:
    """A misspelt `--set method_params.x=...` is an error, not a setting silently ignored."""
    allowed = set(known) | set(COMMON_PARAMS)
    unknown = sorted(set(params) - allowed)
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"{method}: unknown method_params {', '.join(unknown)}; it takes "
                          + ", ".join(sorted(allowed)))


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, iteration: int) -> None:
    """Mean-teacher EMA with the usual warm start: alpha = min(1 - 1/(t+1), decay)."""
    alpha = min(1.0 - 1.0 / (iteration + 1), decay)
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in unwrap(student).parameters()]
    torch._foreach_mul_(t_params, alpha)  # one fused kernel per list instead of two per tensor
    torch._foreach_add_(t_params, s_params, alpha=1.0 - alpha)
    t_bufs, s_bufs = list(teacher.buffers()), list(unwrap(student).buffers())
    if t_bufs:
        torch._foreach_copy_(t_bufs, s_bufs)
