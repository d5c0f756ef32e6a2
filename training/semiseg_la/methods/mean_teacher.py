"""Mean teacher (Tarvainen & Valpola; the LA configuration of UA-MT without the uncertainty mask).

Student: 0.5 (CE + Dice) on labelled samples plus an MSE between its softmax and the EMA teacher's
softmax on a noisy copy of every sample, weighted by `consistency` x sigmoid ramp-up
(iteration // `rampup_unit` over `consistency_rampup`; the LA family counts in units of 150 iterations,
or over `rampup_fraction` of the run). Teacher: EMA of the student (decay 0.99).

`consistency_on: unlabeled` computes the teacher and the consistency on the unlabelled samples only:
the labelled ones already have a label, and the teacher pass costs half as much (fine-tuning on a CPU).

`consistency_loss: pseudo_label` replaces the MSE by self-training: cross-entropy towards the teacher's
class wherever the teacher is at least `pseudo_threshold` sure. In a 50-iteration fine-tune the MSE on
softmax outputs stays 20 to 60 times below the supervised loss (docs/results.md, "Site adaptation"),
so the unlabelled scans change nothing; a cross-entropy has the supervised loss's scale.

`consistency_loss: copy_paste` is BCP's bidirectional copy-paste (Bai et al., CVPR 2023): each unlabelled
patch is mixed with a labelled one, a box (`paste_fraction` of each side, at a random place) of one
pasted into the other, alternately each way; the student learns the mixed patch against the same mix
of the label and the teacher's hard pseudo-label, whose voxels weigh `unlabeled_weight`. The unlabelled scans
then give the labelled anatomy new surroundings, the site's own. The teacher runs on the unlabelled samples.

`export: student` makes the student the network that is validated and exported (default: the teacher).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..models import VNet
from .base import Batch, Method, StepResult, check_param_names, ema_update
from .losses import consistency_weight, pseudo_label_ce, supervised_ce_dice, weighted_ce_dice

DEFAULTS = {"consistency": 0.1, "consistency_rampup": 40.0, "rampup_unit": 150, "rampup_fraction": None,
            "ema_decay": 0.99, "noise_std": 0.1, "noise_clip": 0.2, "consistency_on": "all",
            "consistency_loss": "mse", "pseudo_threshold": 0.9, "paste_fraction": 2 / 3, "unlabeled_weight": 0.5,
            "export": "teacher"}
CONSISTENCY_LOSSES = ("mse", "pseudo_label", "copy_paste")
EXPORTS = ("teacher", "student")


class MeanTeacher(Method):
    name = "mean_teacher"
    trainable = ("student",)
    networks = ("student", "teacher")

    def __init__(self, params: Mapping[str, Any], max_iterations: int) -> None:
        check_param_names(self.name, params, (*DEFAULTS, "base", "dropout", "input_adapter"))
        super().__init__({**DEFAULTS, **params}, max_iterations)
        fraction = self.params["rampup_fraction"]
        # (length, unit): a fraction of the run (a budget-fitted fine-tune) or the LA family's units
        self.rampup = ((max(float(fraction) * max_iterations, 1.0), 1) if fraction is not None else
                       (float(self.params["consistency_rampup"]), int(self.params["rampup_unit"])))
        if self.params["consistency_on"] not in ("all", "unlabeled"):
            raise ConfigError(f"mean_teacher consistency_on must be 'all' or 'unlabeled', "
                              f"got {self.params['consistency_on']!r}")
        if self.params["consistency_loss"] not in CONSISTENCY_LOSSES:
            raise ConfigError(f"mean_teacher consistency_loss must be one of {', '.join(CONSISTENCY_LOSSES)}, "
                              f"got {self.params['consistency_loss']!r}")
        if not 0 < float(self.params["paste_fraction"]) < 1 or float(self.params["unlabeled_weight"]) < 0:
            raise ConfigError("mean_teacher paste_fraction must be in (0, 1) and unlabeled_weight >= 0, got "
                              f"{self.params['paste_fraction']!r}, {self.params['unlabeled_weight']!r}")
        if self.params["export"] not in EXPORTS:
            raise ConfigError(f"mean_teacher export must be one of {', '.join(EXPORTS)}, got {self.params['export']!r}")
        self.student = VNet(in_channels=int(self.params.get("in_channels", 1)), n_classes=2,
                            has_dropout=bool(self.params.get("dropout", True)), base=int(self.params.get("base", 16)),
                            input_adapter=int(self.params.get("input_adapter", 0)))
        self.teacher = copy.deepcopy(self.student)
        for param in self.teacher.parameters():
            param.requires_grad_(False)

    def training_step(self, batch: Batch, iteration: int) -> StepResult:
        if self.params["consistency_loss"] == "copy_paste":
            return self._copy_paste_step(batch, iteration)
        logits = self.student(batch.image)
        ce, dice = supervised_ce_dice(logits[batch.labeled], batch.label[batch.labeled])
        supervised = 0.5 * (ce + dice)
        rows = batch.unlabeled if self.params["consistency_on"] == "unlabeled" else slice(None)
        # the teacher sees the patch as acquired; the student may see it through a simulated other site
        image = (batch.clean_image if batch.clean_image is not None else batch.image)[rows]
        noise = torch.clamp(torch.randn_like(image) * self.params["noise_std"],
                            -self.params["noise_clip"], self.params["noise_clip"])
        with torch.no_grad():
            teacher_prob = torch.softmax(self.teacher(image + noise).float(), dim=1)
        consistency = (self._consistency(logits[rows].float(), teacher_prob) if image.shape[0]
                       else logits.sum() * 0)
        weight = consistency_weight(self.params["consistency"], iteration, *self.rampup)
        loss = supervised + weight * consistency
        return StepResult(loss, {"loss_ce": float(ce.detach()), "loss_dice": float(dice.detach()),
                                 "loss_consistency": float(consistency.detach()), "consistency_weight": weight})

    def _consistency(self, student_logits: torch.Tensor, teacher_prob: torch.Tensor) -> torch.Tensor:
        if self.params["consistency_loss"] == "mse":
            return torch.mean((torch.softmax(student_logits, dim=1) - teacher_prob) ** 2)
        return pseudo_label_ce(student_logits, teacher_prob, float(self.params["pseudo_threshold"]))

    def _copy_paste_step(self, batch: Batch, iteration: int) -> StepResult:
        labeled, label = batch.image[batch.labeled], batch.label[batch.labeled]
        unlabeled = batch.image[batch.unlabeled]
        with torch.no_grad():
            teacher_view = (batch.clean_image if batch.clean_image is not None else batch.image)[batch.unlabeled]
            pseudo = self.teacher(teacher_view).argmax(dim=1) if len(unlabeled) else None
        alpha = float(self.params["unlabeled_weight"])
        mixed, target, voxel_weight = [], [], []
        for k in range(len(unlabeled)):
            inside = self._paste_box(label.shape[1:], label.device)
            if k % 2:  # the other direction: the unlabelled box in the labelled patch
                inside = ~inside
            source = k % len(labeled)
            mixed.append(torch.where(inside, labeled[source], unlabeled[k]))
            target.append(torch.where(inside, label[source], pseudo[k]))
            voxel_weight.append(torch.where(inside, 1.0, alpha))
        logits = self.student(torch.cat([labeled, *[m[None] for m in mixed]]))
        ce, dice = supervised_ce_dice(logits[batch.labeled], label)
        if mixed:
            mixed_ce, mixed_dice = weighted_ce_dice(logits[batch.unlabeled], torch.stack(target),
                                                    torch.stack(voxel_weight))
            mixed_loss = 0.5 * (mixed_ce + mixed_dice)
        else:
            mixed_loss = logits.sum() * 0
        weight = consistency_weight(self.params["consistency"], iteration, *self.rampup)
        loss = 0.5 * (ce + dice) + weight * mixed_loss
        return StepResult(loss, {"loss_ce": float(ce.detach()), "loss_dice": float(dice.detach()),
                                 "loss_consistency": float(mixed_loss.detach()), "consistency_weight": weight})

    def _paste_box(self, shape, device: torch.device) -> torch.Tensor:
        """A boolean (X, Y, Z) mask: True in a box `paste_fraction` of each side, at a random place."""
        inside = torch.zeros(tuple(shape), dtype=torch.bool, device=device)
        box = []
        for size in shape:
            side = max(1, round(float(self.params["paste_fraction"]) * size))
            start = int(torch.randint(0, size - side + 1, ()))
            box.append(slice(start, start + side))
        inside[tuple(box)] = True
        return inside

    def after_optimizer_step(self, iteration: int) -> None:
        ema_update(self.teacher, self.student, self.params["ema_decay"], iteration)

    def train(self, mode: bool = True) -> None:
        self.student.train(mode)
        self.teacher.train(mode)

    def inference_network(self) -> nn.Module:
        """The EMA teacher by default: the smoother of the two, as the mean-teacher literature reports.

        `export: student` validates and exports the student instead: in a short fine-tune the teacher is
        close to a uniform average of all the student's steps, so it lags behind the adapted student.
        """
        return self.student if self.params["export"] == "student" else self.teacher
