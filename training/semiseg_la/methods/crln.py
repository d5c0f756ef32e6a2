"""CRLN - Cooperative Rectification Learning Network (arXiv 2502.11456; docs/methods.md 4, docs/methods/crln.md).

Per iteration (2 labelled + 2 unlabelled):
1. loader view: LA brightness jitter x U(0.75, 1.25) clipped in the [0, 1] (min-max) view of each patch;
2. EMA teacher (train mode, R5) pseudo-labels the unlabelled pair, rectified by y + (1 - a) M(x) from
   epoch 4 on (epoch = 200 iterations);
3. strong view of the unlabelled pair: in-plane rescale [0.5, 1.5] + centre crop, CutMix (Beta(4, 4),
   full depth), brightness / noise / rot-flip, keeping image, pseudo-label and confidence aligned;
4. student loss: supervised CE + Dice on logits and on the DIM map, confidence-weighted CE on the strong
   view, Collaborative Positive Supervision (CPS) on the representation head;
5. after the SGD step: EMA of the parameters (not BN buffers, R5), then one step of the rectifier's own
   optimiser on the labelled pair with the student in eval mode.

Input space: with `input_space: zscore` (presets) the network sees the engine's z-scored patches and the
official [0, 1]-space augmentations are applied in a min-max view of each patch and mapped back, so the
exported teacher V-Net works in the z-scoring Predictor. `input_space: minmax` feeds [0, 1] patches (min-max
per patch: the method only sees patches). `input_space: minmax_volume` with the engine's `normalization:
minmax-volume` is the official input: the whole volume min-max scaled to [0, 1] before cropping, used as is
(the model card records the normalisation, so the Predictor scales inputs the same way).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.crln import CrlnInference, CrlnNet, CrlnOutput, MinMaxVNet, Rectifier, minmax
from .base import Batch, Method, StepResult, check_param_names, unwrap
from .losses import supervised_ce_dice

DEFAULTS: Dict[str, Any] = {
    # networks
    "base": 16, "prototypes": 16, "patch_size": [112, 112, 80], "dropout": True, "kaiming_init": True,
    "drop_path": 1 / 30, "dim_size_policy": "resample", "official_reshape": False, "official_update": False,
    "mlp_drop_path": False,  # R7: official DropPath on the level-1 MLP branch
    # teacher and schedule
    "ema_decay": 0.99, "teacher_eval_mode": False, "iterations_per_epoch": 200, "rectify_from_epoch": 4,
    # losses
    "unsup_weight": 0.5, "cps_weight": 0.5, "xi": 0.6, "strong_threshold": 0.97, "weak_threshold": 0.7,
    "temperature": 0.5, "num_anchors": 256, "num_negatives": 512,
    # R8: L_u's mean runs over voxels whose weighted loss is > 0 ("weighted"), or as the official code over those
    # whose unweighted loss is > 0 ("unweighted": a sample without confident voxels adds zeros to the mean)
    "unsup_denominator": "weighted",
    # input space and augmentation
    "input_space": "zscore", "loader_brightness": True, "brightness_range": [0.75, 1.25],
    "scale_range": [0.5, 1.5], "cutmix": True, "cutmix_beta": 4.0, "appearance_brightness_prob": 0.8,
    "noise_prob": 0.5, "noise_std": 0.1, "noise_clip": 0.2, "rot_flip_prob": 0.5,
    # the rectification scalar's own optimiser (official: same settings as the student)
    "rectifier_lr": 2.5e-3, "rectifier_momentum": 0.9, "rectifier_weight_decay": 5e-4, "rectifier_nesterov": True,
    "poly_power": 0.9,
    # the rectifier's poly schedule: per iteration ("iteration"), or as the official PolyLR per epoch of
    # `iterations_per_epoch` iterations with a 1e-6 floor ("epoch")
    "rectifier_schedule": "iteration",
    # what the catalog gets: "rectified" (teacher + DIM + rectifier) or "teacher" (its plain V-Net)
    "export": "rectified",
}


#: the network's input: the engine's normalised patch (zscore), each patch min-max scaled to [0, 1] (minmax), or
#: the engine's whole-volume [0, 1] intensities as they are (minmax_volume, with `normalization: minmax-volume`)
INPUT_SPACES = ("zscore", "minmax", "minmax_volume")


def checked_params(params: Mapping[str, Any]) -> Dict[str, Any]:
    """Defaults + given values; unknown keys and impossible values are configuration errors."""
    check_param_names("crln", params, DEFAULTS)
    p = {**DEFAULTS, **params}
    problems = []
    if p["export"] not in ("rectified", "teacher"):
        problems.append(f"export must be rectified or teacher, got {p['export']!r}")
    if p["input_space"] not in INPUT_SPACES:
        problems.append(f"input_space={p['input_space']!r} must be one of {', '.join(INPUT_SPACES)}")
    if p["unsup_denominator"] not in ("weighted", "unweighted"):
        problems.append(f"unsup_denominator={p['unsup_denominator']!r} must be weighted or unweighted")
    if p["rectifier_schedule"] not in ("iteration", "epoch"):
        problems.append(f"rectifier_schedule={p['rectifier_schedule']!r} must be iteration or epoch")
    if p["dim_size_policy"] not in ("resample", "strict"):
        problems.append(f"dim_size_policy={p['dim_size_policy']!r} must be resample or strict")
    if len(p["patch_size"]) != 3 or any(int(s) % 16 for s in p["patch_size"]):
        problems.append(f"patch_size={p['patch_size']} must be 3 multiples of 16")
    if int(p["iterations_per_epoch"]) < 1:
        problems.append("iterations_per_epoch must be >= 1")
    if problems:
        raise ConfigError("crln: " + "; ".join(problems))
    return p


# -- intensity views ---------------------------------------------------------------------------------

def unit_view(x: torch.Tensor, input_space: str = "zscore") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x in [0, 1] per sample, lo, hi): the space in which CRLN's intensity augmentations are defined. With
    `minmax_volume` the input is already the whole volume's [0, 1] view (the official loader's), kept as is."""
    if input_space == "minmax_volume":
        ones = torch.ones((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x, ones * 0.0, ones
    flat = x.flatten(1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    lo, hi = flat.min(1).values.view(shape), flat.max(1).values.view(shape)
    return (x - lo) / (hi - lo).clamp_min(1e-8), lo, hi


def from_unit(unit: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, input_space: str) -> torch.Tensor:
    """Back to the network's input space: [0, 1] itself (minmax, minmax_volume) or the patch's original range
    (zscore)."""
    return unit if input_space in ("minmax", "minmax_volume") else unit * (hi - lo) + lo


def _uniform(low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand(()))


def brightness(unit: torch.Tensor, value_range: Sequence[float], prob: float) -> torch.Tensor:
    """Per sample, with probability `prob`: multiply by U(range) and clip to [0, 1]."""
    out = unit.clone()
    for b in range(unit.shape[0]):
        if float(torch.rand(())) < prob:
            out[b] = (unit[b] * _uniform(*value_range)).clamp(0.0, 1.0)
    return out


# -- strong view of the unlabelled pair (image (B, 1, X, Y, Z), label / confidence (B, X, Y, Z)) -----------

def rescale_in_plane(image: torch.Tensor, label: torch.Tensor, conf: torch.Tensor, factor: float
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample: resize x and y by `factor` (bicubic image, nearest label / confidence; z unchanged), reflect-pad
    the image, pad label with -1 (ignore) and confidence with 0, and centre-crop back to the input size."""
    _, nx0, ny0, _ = image.shape
    size = (max(1, round(nx0 * factor)), max(1, round(ny0 * factor)))
    img = F.interpolate(image.permute(3, 0, 1, 2), size=size, mode="bicubic", align_corners=False)
    maps = torch.stack([label.float(), conf.float()], 0).permute(3, 0, 1, 2)
    maps = F.interpolate(maps, size=size, mode="nearest")
    pad = _centre_pad(size, (nx0, ny0))
    if any(pad):
        img = F.pad(img, pad, mode="reflect")
        lab = F.pad(maps[:, 0], pad, value=-1.0)
        cf = F.pad(maps[:, 1], pad, value=0.0)
    else:
        lab, cf = maps[:, 0], maps[:, 1]
    box = _centre_box(img.shape[-2:], (nx0, ny0))
    img, lab, cf = img[..., box[0], box[1]], lab[..., box[0], box[1]], cf[..., box[0], box[1]]
    return img.permute(1, 2, 3, 0), lab.permute(1, 2, 0).long(), cf.permute(1, 2, 0).to(conf.dtype)


def _centre_pad(size: Sequence[int], target: Sequence[int]) -> Tuple[int, int, int, int]:
    """F.pad widths (y_before, y_after, x_before, x_after) growing `size` to at least `target`."""
    px, py = max(target[0] - size[0], 0), max(target[1] - size[1], 0)
    return (py // 2, py - py // 2, px // 2, px - px // 2)


def _centre_box(size: Sequence[int], target: Sequence[int]) -> Tuple[slice, slice]:
    sx, sy = (int(size[0]) - target[0]) // 2, (int(size[1]) - target[1]) // 2
    return slice(sx, sx + target[0]), slice(sy, sy + target[1])


def geometric_step(image: torch.Tensor, label: torch.Tensor, conf: torch.Tensor, scale_range: Sequence[float]
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: random in-plane rescale + centre crop, then min-max (official step 3)."""
    parts = [rescale_in_plane(image[b], label[b], conf[b], _uniform(*scale_range)) for b in range(image.shape[0])]
    img, lab, cf = (torch.stack(t) for t in zip(*parts))
    return minmax(img), lab, cf


def cutmix_box(nx: int, ny: int, beta: float) -> Tuple[slice, slice]:
    """x-y box covering a sqrt(1 - lambda) fraction of each side, lambda ~ Beta(beta, beta), centre uniform in
    [X/8, X) x [Y/8, Y); the caller uses the full depth."""
    lam = float(torch.distributions.Beta(torch.tensor(float(beta)), torch.tensor(float(beta))).sample())
    cut = math.sqrt(1.0 - lam)
    w, h = int(nx * cut), int(ny * cut)
    cx = int(torch.randint(nx // 8, nx, ()))
    cy = int(torch.randint(ny // 8, ny, ()))
    return (slice(max(cx - w // 2, 0), min(cx + w // 2, nx)), slice(max(cy - h // 2, 0), min(cy + h // 2, ny)))


def cutmix(image: torch.Tensor, label: torch.Tensor, conf: torch.Tensor, beta: float = 4.0,
           partner: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste a full-depth box of image, pseudo-label and confidence from a randomly permuted partner.

    The official config calls this "classmix" but always runs CutMix (R6)."""
    partner = torch.randperm(image.shape[0]) if partner is None else partner
    img, lab, cf = image.clone(), label.clone(), conf.clone()
    for b in range(image.shape[0]):
        bx, by = cutmix_box(image.shape[2], image.shape[3], beta)
        src = int(partner[b])
        img[b, :, bx, by] = image[src, :, bx, by]
        lab[b, bx, by] = label[src, bx, by]
        cf[b, bx, by] = conf[src, bx, by]
    return img, lab, cf


def rot_flip(image: torch.Tensor, label: torch.Tensor, conf: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample: rot90 in the x-y plane (half turns only when x != y) and a flip along x or y."""
    square = image.shape[1] == image.shape[2]
    k = int(torch.randint(0, 4, ())) if square else 2 * int(torch.randint(0, 2, ()))
    axis = int(torch.randint(0, 2, ()))
    image = torch.flip(torch.rot90(image, k, dims=(1, 2)), dims=(1 + axis,))
    label = torch.flip(torch.rot90(label, k, dims=(0, 1)), dims=(axis,))
    conf = torch.flip(torch.rot90(conf, k, dims=(0, 1)), dims=(axis,))
    return image, label, conf


def appearance_step(image: torch.Tensor, label: torch.Tensor, conf: torch.Tensor, p: Mapping[str, Any]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample (official step 5): brightness (p 0.8), clipped Gaussian noise (p 0.5), rot-flip (p 0.5), min-max."""
    img = brightness(image, p["brightness_range"], p["appearance_brightness_prob"])
    imgs, labs, cfs = [], [], []
    for b in range(img.shape[0]):
        x, y, c = img[b], label[b], conf[b]
        if float(torch.rand(())) < p["noise_prob"]:
            x = x + (torch.randn_like(x) * p["noise_std"]).clamp(-p["noise_clip"], p["noise_clip"])
        if float(torch.rand(())) < p["rot_flip_prob"]:
            x, y, c = rot_flip(x, y, c)
        imgs.append(x)
        labs.append(y)
        cfs.append(c)
    return minmax(torch.stack(imgs)), torch.stack(labs), torch.stack(cfs)


# -- losses ------------------------------------------------------------------------------------------------

def unsupervised_ce(logits: torch.Tensor, target: torch.Tensor, conf: torch.Tensor, strong: float,
                    denominator: str = "weighted") -> torch.Tensor:
    """Mean of w_b * CE, w_b = #(conf >= strong) / #(target >= 0) per sample, over the voxels whose weighted
    loss is > 0 (`denominator="weighted"`), or, as the official code, whose unweighted CE is > 0
    (`"unweighted"`: voxels of a sample with w_b = 0 then count as zeros)."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=-1, reduction="none")
    valid = target >= 0
    confident = (conf >= strong) & valid
    weight = confident.flatten(1).sum(1).float() / valid.flatten(1).sum(1).clamp_min(1).float()
    weighted = ce * weight.view(-1, *([1] * (ce.dim() - 1)))
    positive = (ce > 0) if denominator == "unweighted" else (weighted > 0)
    return weighted[positive].mean() if bool(positive.any()) else logits.sum() * 0.0


@torch.no_grad()
def class_means(rep: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, n_classes: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(K, M) mean representation of the valid voxels of each class, and the (K,) voxel counts."""
    rep = rep.float()
    means, counts = [], []
    for i in range(n_classes):
        mask = (valid & (label == i)).float()
        count = mask.sum()
        means.append(torch.einsum("bm...,b...->m", rep, mask) / count.clamp_min(1.0))
        counts.append(count)
    return torch.stack(means), torch.stack(counts)


def positive_keys(means: torch.Tensor, prototypes: Optional[torch.Tensor], xi: float) -> torch.Tensor:
    """CPS "unassertive" positives: (mu_i + xi pi_i) / (1 + xi) once teacher prototypes are used, else mu_i."""
    if prototypes is None:
        return means
    return (means + xi * prototypes.to(means)) / (1.0 + xi)


def _gather(flat_rep: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows (n, M) of a (B, M, S) representation at flat (b * S + s) voxel indices."""
    size = flat_rep.shape[2]
    return flat_rep[index // size, :, index % size]


def _sample(pool: torch.Tensor, count: int) -> torch.Tensor:
    return pool[torch.randint(pool.numel(), (count,), device=pool.device)]


@torch.no_grad()
def _negatives(flat_rep: torch.Tensor, pools: Dict[int, torch.Tensor], means: torch.Tensor, anchor_class: int,
               shape: Tuple[int, int], temperature: float) -> torch.Tensor:
    """(n, negatives, M): each negative's class drawn by softmax of class-mean cosine / T (trivial for K = 2)."""
    others = [j for j in pools if j != anchor_class]
    sim = F.cosine_similarity(means[anchor_class][None], means[others], dim=1)
    choice = torch.multinomial(torch.softmax(sim / temperature, 0), shape[0] * shape[1], replacement=True)
    index = torch.empty(shape[0] * shape[1], dtype=torch.long, device=flat_rep.device)
    for t, j in enumerate(others):
        chosen = (choice == t).to(flat_rep.device)
        index[chosen] = _sample(pools[j], int(chosen.sum()))
    return _gather(flat_rep, index).float().view(shape[0], shape[1], -1)


def contrast(anchors: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: CE over [cos(a, k+), cos(a, n_1..n_J)] / T with target 0, mean over anchors."""
    a = F.normalize(anchors.float(), dim=1)
    pos = a @ F.normalize(key.float(), dim=0)
    neg = torch.einsum("nm,njm->nj", a, F.normalize(negatives, dim=2))
    logits = torch.cat([pos[:, None], neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def cps_loss(rep: torch.Tensor, label: torch.Tensor, valid: torch.Tensor, prob: torch.Tensor,
             prototypes: Optional[torch.Tensor], xi: float, strong: float = 0.97, temperature: float = 0.5,
             num_anchors: int = 256, num_negatives: int = 512) -> torch.Tensor:
    """Collaborative Positive Supervision (methods.md 4.2) on rep (B, M, ...), label / valid (B, ...),
    student prob (B, K, ...). Anchors are hard (prob < strong) valid voxels of each class and carry gradient;
    the positive key and negatives do not. Zero (with a graph) when fewer than 2 classes are present."""
    n_classes = prob.shape[1]
    means, counts = class_means(rep, label, valid, n_classes)
    present = [i for i in range(n_classes) if float(counts[i]) > 0]
    if len(present) < 2:
        return rep.sum() * 0.0
    keys = positive_keys(means, prototypes, xi)
    flat_rep, label, valid = rep.flatten(2), label.flatten(), valid.flatten()
    pools = {i: torch.nonzero(valid & (label == i)).squeeze(1) for i in present}
    class_prob = prob.detach().transpose(0, 1).reshape(n_classes, -1)
    total = rep.sum() * 0.0
    for i in present:
        hard = torch.nonzero(valid & (label == i) & (class_prob[i] < strong)).squeeze(1)
        if hard.numel() == 0:
            continue
        anchors = _gather(flat_rep, _sample(hard, num_anchors))
        negatives = _negatives(flat_rep, pools, means, i, (num_anchors, num_negatives), temperature)
        total = total + contrast(anchors, keys[i], negatives, temperature)
    return total / len(present)


# -- teacher -----------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_parameters(teacher: nn.Module, student: nn.Module, decay: float, iteration: int,
                   copy_buffers: bool = False) -> None:
    """theta_bar <- a theta_bar + (1 - a) theta, a = min(1 - 1/(t + 1), decay); CRLN leaves the teacher's BN
    buffers to its own train-mode passes (R5), so buffers are copied only for the eval-mode-teacher option."""
    alpha = min(1.0 - 1.0 / (iteration + 1), decay)
    for t_param, s_param in zip(teacher.parameters(), student.parameters()):
        t_param.mul_(alpha).add_(s_param.detach(), alpha=1.0 - alpha)
    if copy_buffers:
        for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
            t_buf.copy_(s_buf)


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


class Crln(Method):
    """CRLN on the shared V-Net: student, EMA teacher (exported) and the rectification scalar."""

    name = "crln"
    trainable = ("student",)
    networks = ("student", "teacher", "rectifier")

    def __init__(self, params: Mapping[str, Any], max_iterations: int) -> None:
        super().__init__(checked_params(params), max_iterations)
        p = self.params
        self.student = CrlnNet(int(p.get("in_channels", 1)), 2, int(p["base"]), int(p["prototypes"]),
                               p["patch_size"], bool(p["dropout"]), float(p["drop_path"]), p["dim_size_policy"],
                               bool(p["official_reshape"]), bool(p["official_update"]), bool(p["kaiming_init"]),
                               bool(p["mlp_drop_path"]))
        self.teacher = copy.deepcopy(self.student)
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.rectifier = Rectifier()
        self.rectifier_optimizer = torch.optim.SGD(
            self.rectifier.parameters(), lr=float(p["rectifier_lr"]), momentum=float(p["rectifier_momentum"]),
            weight_decay=float(p["rectifier_weight_decay"]), nesterov=bool(p["rectifier_nesterov"]))
        self._op_batch: Optional[Tuple[torch.Tensor, torch.Tensor, bool]] = None
        self._op_loss = float("nan")

    # -- schedule ---------------------------------------------------------------------------------------
    def epoch(self, iteration: int) -> int:
        return iteration // int(self.params["iterations_per_epoch"])

    def rectifying(self, iteration: int) -> bool:
        """Teacher pseudo-labels (and CPS prototypes) use the DIM from epoch `rectify_from_epoch` on."""
        return self.epoch(iteration) >= int(self.params["rectify_from_epoch"])

    # -- the step ---------------------------------------------------------------------------------------
    def training_step(self, batch: Batch, iteration: int) -> StepResult:
        p = self.params
        rectify = self.rectifying(iteration)
        with _no_autocast(batch.image):
            x = self.loader_view(batch.image)
        x_l, x_u = x[batch.labeled], x[batch.unlabeled]
        label_l = batch.label[batch.labeled]
        has_u = x_u.shape[0] > 0
        x_s = pseudo_s = conf_s = None
        prototypes = None
        if has_u:
            pseudo, conf, prototypes = self.pseudo_labels(x_u, rectify)
            with _no_autocast(batch.image):
                x_s, pseudo_s, conf_s = self.strong_view(x_u, pseudo, conf)
        out_l, out_u = self.student(x_l, x_s)
        supervised = self.supervised_loss(out_l, label_l)
        unsup = (unsupervised_ce(out_u.logits, pseudo_s, conf_s, p["strong_threshold"], p["unsup_denominator"])
                 if has_u else supervised * 0.0)
        cps = self.cps(out_l, out_u, label_l, pseudo_s, conf_s, prototypes)
        loss = supervised + p["unsup_weight"] * unsup + p["cps_weight"] * cps
        device_type = batch.image.device.type
        amp = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        self._op_batch = (x_l.detach(), label_l, amp)
        logs = {"loss_sup": float(supervised.detach()), "loss_unsup": float(unsup.detach()),
                "loss_cps": float(cps.detach()), "loss_rectifier": self._op_loss,
                "alpha": float(self.rectifier.alpha.detach()), "rectify": float(rectify)}
        if has_u:
            logs["confident_fraction"] = float(((conf_s >= p["strong_threshold"]) & (pseudo_s >= 0)).float().mean())
        return StepResult(loss, logs)

    def loader_view(self, image: torch.Tensor) -> torch.Tensor:
        """The LA loader's brightness jitter (every sample, clipped in the [0, 1] view) in the input space."""
        unit, lo, hi = unit_view(image.float(), self.params["input_space"])
        if self.params["loader_brightness"]:
            unit = brightness(unit, self.params["brightness_range"], 1.0)
        return from_unit(unit, lo, hi, self.params["input_space"])

    @torch.no_grad()
    def pseudo_labels(self, x_u: torch.Tensor, rectify: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(pseudo-label, confidence, teacher prototypes pi (K, M) or None) from the EMA teacher."""
        was_training = self.teacher.training
        if self.params["teacher_eval_mode"]:
            self.teacher.eval()
        try:
            if rectify:
                out, _ = self.teacher(x_u)
                logits = self.rectifier(out.logits.float(), out.dim_map.float())
            else:
                _, out = self.teacher(None, x_u)
                logits = out.logits.float()
        finally:
            self.teacher.train(was_training)
        conf, pseudo = torch.softmax(logits, dim=1).max(dim=1)
        prototypes = self.teacher.dim.class_prototypes().detach() if rectify else None
        return pseudo, conf, prototypes

    def strong_view(self, x_u: torch.Tensor, pseudo: torch.Tensor, conf: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Geometric step, CutMix, appearance step in the [0, 1] view, then back to the input space."""
        p = self.params
        unit, lo, hi = unit_view(x_u.float(), p["input_space"])
        img, lab, cf = geometric_step(unit, pseudo, conf, p["scale_range"])
        if p["cutmix"]:
            img, lab, cf = cutmix(img, lab, cf, float(p["cutmix_beta"]))
        img, lab, cf = appearance_step(img, lab, cf, p)
        return from_unit(img, lo, hi, p["input_space"]), lab, cf

    @staticmethod
    def supervised_loss(out: CrlnOutput, label: torch.Tensor) -> torch.Tensor:
        """0.5 [CE + Dice] on the logits plus the same on the DIM map, supervised directly as logits."""
        ce, dice = supervised_ce_dice(out.logits, label)
        ce_m, dice_m = supervised_ce_dice(out.dim_map, label)
        return 0.5 * (ce + dice + ce_m + dice_m)

    def cps(self, out_l: CrlnOutput, out_u: Optional[CrlnOutput], label_l: torch.Tensor,
            pseudo: Optional[torch.Tensor], conf: Optional[torch.Tensor],
            prototypes: Optional[torch.Tensor]) -> torch.Tensor:
        """CPS over all volumes: labelled voxels, plus unlabelled voxels with confidence >= the weak threshold."""
        p = self.params
        reps: List[torch.Tensor] = [out_l.representation]
        labels, valid = [label_l], [label_l >= 0]
        logits = [out_l.logits]
        if out_u is not None:
            reps.append(out_u.representation)
            labels.append(pseudo)
            valid.append((conf >= p["weak_threshold"]) & (pseudo >= 0))
            logits.append(out_u.logits)
        with _no_autocast(label_l):
            prob = torch.softmax(torch.cat(logits).detach().float(), dim=1)
            return cps_loss(torch.cat(reps), torch.cat(labels), torch.cat(valid), prob, prototypes,
                            float(p["xi"]), float(p["strong_threshold"]), float(p["temperature"]),
                            int(p["num_anchors"]), int(p["num_negatives"]))

    # -- after the student's step -------------------------------------------------------------------
    def after_optimizer_step(self, iteration: int) -> None:
        ema_parameters(self.teacher, unwrap(self.student), float(self.params["ema_decay"]), iteration,
                       copy_buffers=bool(self.params["teacher_eval_mode"]))
        self.rectifier_step(iteration)

    def rectifier_lr(self, iteration: int) -> float:
        """Poly schedule of the rectifier's optimiser: per iteration like the engine's default student LR, or
        (`rectifier_schedule: epoch`) the official PolyLR, stepped per epoch and floored at 1e-6."""
        p = self.params
        if p["rectifier_schedule"] == "epoch":
            per_epoch = int(p["iterations_per_epoch"])
            epochs = max(self.max_iterations // per_epoch, 1)
            frac = min(self.epoch(iteration) / epochs, 1.0)
            return max(float(p["rectifier_lr"]) * (1.0 - frac) ** float(p["poly_power"]), 1e-6)
        frac = min(iteration / max(self.max_iterations, 1), 1.0)
        return float(p["rectifier_lr"]) * (1.0 - frac) ** float(p["poly_power"])

    def rectifier_step(self, iteration: int) -> None:
        """L_op = 0.5 [CE + Dice] of y + (1 - a) M on the labelled pair, student in eval mode, only a updated."""
        if self._op_batch is None:
            return
        x_l, label, amp = self._op_batch
        self._op_batch = None
        student = unwrap(self.student)
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad(), torch.autocast(x_l.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                out, _ = student(x_l)
        finally:
            student.train(was_training)
        for group in self.rectifier_optimizer.param_groups:
            group["lr"] = self.rectifier_lr(iteration)
        ce, dice = supervised_ce_dice(self.rectifier(out.logits.float(), out.dim_map.float()), label)
        loss = 0.5 * (ce + dice)
        self.rectifier_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(self.rectifier)
        self.rectifier_optimizer.step()
        self._op_loss = float(loss.detach())

    # -- state and export ------------------------------------------------------------------------------
    def extra_state(self) -> Dict[str, Any]:
        return {"rectifier_optimizer": self.rectifier_optimizer.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "rectifier_optimizer" in state:
            self.rectifier_optimizer.load_state_dict(state["rectifier_optimizer"])

    def load_initial_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Fine-tuning from a catalog V-Net: both backbones start from it; heads, DIM and a keep their init."""
        unwrap(self.student).backbone.load_state_dict(state_dict, strict=True)
        self.teacher.backbone.load_state_dict(state_dict, strict=True)

    def inference_network(self) -> nn.Module:
        """CRLN's inference, teacher + DIM + rectification (catalog architecture "crln-rectified"), by default;
        with `export: teacher` the EMA teacher's plain V-Net (architecture "vnet", no rectification)."""
        if self.params["export"] == "rectified":
            return self.rectified_inference()
        backbone = self.teacher.backbone
        if self.params["input_space"] != "minmax":
            return backbone
        net = MinMaxVNet(**backbone.config)
        net.load_state_dict(backbone.state_dict())
        return net.to(next(backbone.parameters()).device)

    def rectified_inference(self) -> CrlnInference:
        """Teacher + DIM + rectification, the official inference, as a plain `forward(x) -> logits` module."""
        return CrlnInference(self.teacher, self.rectifier, minmax_input=self.params["input_space"] == "minmax")


def _average_gradients(module: nn.Module) -> None:
    """Under torchrun every rank steps its own copy of a; averaging its gradient keeps the copies equal."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for param in module.parameters():
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(world)
