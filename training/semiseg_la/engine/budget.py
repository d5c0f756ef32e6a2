"""Fit a run's schedule to a time budget, from a step measured on the user's own device.

A clinician asks for "10 minutes"; the run must end in 10 minutes with its schedule complete (LR
decay, ramp-ups and phase starts are fractions of `max_iterations`), not be cut off half way. So a
throwaway copy of the method takes a few real steps first; their time and the validation time
decide how many iterations fit in what is left once loading and the final export are paid for.
The run checks the plan once more against its own step time after a tenth of it (`Trainer._replan`):
a few probe steps can meet a passing load.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from typing import Callable, List, Mapping, Optional

import torch

from ..errors import ConfigError
from ..progress import ProgressReporter
from .config import TrainConfig
from .data import TrainCase
from .loop import Trainer, Validator
from .precision import device_name

#: seconds kept for writing the model folder and the process's own exit, beyond the measured evaluations
EXPORT_OVERHEAD_S = 8.0


@dataclasses.dataclass
class BudgetPlan:
    step_s: float
    validation_s: float
    spent_s: float
    export_s: float
    loop_s: float
    iterations: int
    capped: bool

    def message(self, budget_s: float, device: str) -> str:
        cap = " (the preset's cap)" if self.capped else ""
        validation = f", {self.validation_s:.1f} s per validation" if self.validation_s > 0 else ""  # none: no split
        return (f"time estimate on {device}: {self.step_s:.2f} s per iteration{validation}; "
                f"{self.iterations} iterations{cap} fit in the {budget_s:.0f} s budget "
                f"(about {self.loop_s / 60:.1f} min of training, {self.spent_s:.0f} s already spent loading and "
                f"measuring, {self.export_s:.0f} s kept for the export)")


def plan_to_budget(config: TrainConfig, labeled: List[TrainCase], unlabeled: List[TrainCase],
                   validator: Optional[Validator], initial_weights: Optional[Mapping[str, torch.Tensor]],
                   spent_s: Callable[[], float], reporter: Optional[ProgressReporter] = None,
                   export_evaluations: int = 2, steps: int = 2) -> TrainConfig:
    """The config with `max_iterations` and `loop_budget_s` sized to `config.time_budget_s`.

    `spent_s()` is the time the command has used so far; `export_evaluations` is how many validation
    passes the export makes after training (the child, and the parent it is compared with)."""
    budget = float(config.time_budget_s or 0.0)
    probe = Trainer(dataclasses.replace(config, output="", time_budget_s=None, fit_to_budget=False), labeled,
                    unlabeled, None, ProgressReporter(), initial_weights)
    step_s = probe.measure_step_seconds(steps)
    validation_s = _time_validation(probe, validator)
    if probe.loader is not None:  # its thread or processes are not needed any more
        probe.loader.close()
    del probe
    gc.collect()
    export_s = export_evaluations * validation_s + EXPORT_OVERHEAD_S
    spent = spent_s()
    loop_s = budget - spent - export_s
    per_iteration = step_s + (validation_s / config.validate_every if validator and config.validate_every else 0.0)
    fit = math.floor((loop_s - validation_s) / per_iteration) if loop_s > 0 else 0
    if fit < 1:
        needed = spent + export_s + validation_s + step_s
        raise ConfigError(f"a time budget of {budget:.0f} s leaves no time to train on this device "
                          f"({step_s:.1f} s per iteration, {spent:.0f} s spent loading); give at least "
                          f"{math.ceil(needed * 1.2)} s")
    iterations = min(fit, config.max_iterations)
    plan = BudgetPlan(step_s, validation_s, spent, export_s, loop_s, iterations, capped=fit > config.max_iterations)
    if reporter is not None:
        reporter.log(plan.message(budget, device_name(config.device)))
    return dataclasses.replace(config, max_iterations=iterations, loop_budget_s=round(loop_s, 1),
                               iteration_cap=config.max_iterations)


def _time_validation(trainer: Trainer, validator: Optional[Validator]) -> float:
    if validator is None:
        return 0.0
    network = trainer.method.inference_network()
    network.eval()
    start = time.perf_counter()
    validator(network)
    return time.perf_counter() - start
