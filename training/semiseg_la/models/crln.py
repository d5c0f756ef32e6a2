"""CRLN networks (docs/methods.md 4.1; docs/methods/crln.md): V-Net + representation head + DIM.

The Dynamic Interaction Module (DIM) lets K x M learnable class prototypes attend to the 64-channel
(1/4 scale, "x7") and 32-channel (1/2 scale, "x8") decoder features of the shared V-Net and turns the
prototype-voxel scores of the second level into a non-negative rectification map M(x) with the
logits' shape. Pseudo-labels and predictions are rectified as y + (1 - a) M(x) with one learned
scalar a (`Rectifier`).

Project defaults where the official code has bugs (methods.md 7):
* R1: prototypes are independent (class, prototype) query rows, so parameter slot i stays class i
  (the official code *reshapes* (B, K, M, C) to (B, M, K, C) and scrambles classes;
  `official_reshape=True` reproduces that as a fixed row permutation).
* R2: the prototype update is residual, Q'' = Q + DropPath(Q') (`official_update=True`: Q' + DropPath(Q')).
* R7: the official level-1 MLP branch is DropPath'ed too, Q''' = Q'' + DropPath(MLP(LN(Q''))); off by default,
  `mlp_drop_path=True` reproduces it. DropPath is the identity in eval mode, so inference is unchanged.
* R4 (extended): parts whose results the official code computes and discards are not built (the level-1
  score refinement and clue, the level-2 values / prototype update / next-level projection). Outputs are
  unchanged; unused parameters would also break DDP with `find_unused_parameters=False`.
* Patch size: the official LayerNorm over the flattened voxel axis fixes the patch size. Here its affine
  weights live on the configured grid; `size_policy="resample"` resamples them (trilinear) for another
  grid, `"strict"` refuses another grid with a clear error. At the configured size both are the official op.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .vnet import VNet

SIZE_POLICIES = ("resample", "strict")


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a whole sample with probability p (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class SpatialLayerNorm(nn.Module):
    """LayerNorm over the voxel axes of a score map (..., d, h, w), affine weights on a configured grid.

    Why: the official LayerNorm over N = d*h*w ties the model to one patch size; normalising is
    size-free, only the per-voxel affine is not, so it is resampled (or refused) for other grids.
    """

    def __init__(self, grid: Sequence[int], size_policy: str = "resample", eps: float = 1e-5) -> None:
        super().__init__()
        if size_policy not in SIZE_POLICIES:
            raise ValueError(f"size_policy must be one of {SIZE_POLICIES}, got {size_policy!r}")
        self.grid = tuple(int(g) for g in grid)
        self.size_policy = size_policy
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.grid))
        self.bias = nn.Parameter(torch.zeros(self.grid))

    def affine_for(self, grid: Tuple[int, int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        if grid == self.grid:
            return self.weight, self.bias
        if self.size_policy == "strict":
            raise ValueError(
                f"CRLN DIM configured for score grid {self.grid} (patch {tuple(2 * g for g in self.grid)}) got grid "
                f"{grid} (patch {tuple(2 * g for g in grid)}); set method_params.patch_size to the training patch "
                "or method_params.dim_size_policy=resample")
        both = torch.stack([self.weight, self.bias])[None]
        weight, bias = F.interpolate(both, size=grid, mode="trilinear", align_corners=False)[0]
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = tuple(int(s) for s in x.shape[-3:])
        weight, bias = self.affine_for(grid)
        return F.layer_norm(x.float(), grid, weight.float(), bias.float(), self.eps)  # fp32 statistics over N


class VoxelTokens(nn.Module):
    """Decoder features (B, C, d, h, w) -> tokens (B, N, C): Conv 1x1x1 then LayerNorm over channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(channels, channels, 1)
        self.norm = nn.LayerNorm(channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(features).flatten(2).transpose(1, 2))


def official_row_order(n_classes: int, n_prototypes: int) -> torch.Tensor:
    """Input row feeding each (class k, prototype m) slot under the official reshape: row m*K + k (R1)."""
    k = torch.arange(n_classes)[:, None]
    m = torch.arange(n_prototypes)[None, :]
    return (m * n_classes + k).reshape(-1)


class PrototypeAttention(nn.Module):
    """Single-head prototype->voxel attention: scores A = q k^T / sqrt(C), and optionally the message.

    `with_values=False` builds only what the scores need (level 2 of the DIM, whose message the
    official code discards).
    """

    def __init__(self, channels: int, with_values: bool, official_reshape: bool, n_classes: int,
                 n_prototypes: int) -> None:
        super().__init__()
        self.channels, self.with_values = channels, with_values
        self.q_norm = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv_norm = nn.LayerNorm(channels)
        self.kv = nn.Linear(channels, 2 * channels if with_values else channels)
        self.out = nn.Linear(channels, channels) if with_values else None
        order = official_row_order(n_classes, n_prototypes) if official_reshape else None
        self.register_buffer("row_order", order, persistent=False)

    def forward(self, prototypes: torch.Tensor, tokens: torch.Tensor
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """prototypes (B, R, C), tokens (B, N, C) -> scores (B, R, N), message (B, R, C) or None."""
        if self.row_order is not None:
            prototypes = prototypes[:, self.row_order]
        q = self.q(self.q_norm(prototypes))
        kv = self.kv(self.kv_norm(tokens))
        key = kv[..., :self.channels]
        scores = torch.matmul(q, key.transpose(1, 2)) * self.channels ** -0.5
        if not self.with_values:
            return scores, None
        attention = torch.softmax(scores.float(), dim=-1).to(kv.dtype)
        return scores, self.out(torch.matmul(attention, kv[..., self.channels:]))


class PrototypeUpdate(nn.Module):
    """Q'' = Q + DropPath(Q') (R2 default; official: Q' + DropPath(Q')), then Q''' = Q'' + MLP(LN(Q'')), or with
    `mlp_drop_path` (R7, official) Q''' = Q'' + DropPath(MLP(LN(Q''))) at the same DropPath rate."""

    def __init__(self, channels: int, drop_path: float, official_update: bool, mlp_drop_path: bool = False) -> None:
        super().__init__()
        self.official_update = official_update
        self.mlp_drop_path = mlp_drop_path
        self.drop_path = DropPath(drop_path)
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def forward(self, prototypes: torch.Tensor, message: torch.Tensor) -> torch.Tensor:
        base = message if self.official_update else prototypes
        updated = base + self.drop_path(message)
        branch = self.mlp(self.norm(updated))
        return updated + (self.drop_path(branch) if self.mlp_drop_path else branch)


class ClueHead(nn.Sequential):
    """Per-class score maps (B*K, M, d, h, w) -> one clue map each: separable conv, then Conv 1x1x1 M->1."""

    def __init__(self, n_prototypes: int) -> None:
        m = n_prototypes
        super().__init__(
            nn.Conv3d(m, m, 3, padding=1, groups=m), nn.BatchNorm3d(m), nn.ReLU(inplace=True),
            nn.Conv3d(m, m, 1), nn.BatchNorm3d(m), nn.ReLU(inplace=True),
            nn.Conv3d(m, 1, 1))


class DynamicInteraction(nn.Module):
    """The DIM: prototypes (1, K, M, C1) meet x7 (C1 channels), are projected to C2, meet x8 (C2 channels);
    the refined level-2 scores give the clue, upsampled to the logits' grid and made non-negative."""

    def __init__(self, n_classes: int = 2, n_prototypes: int = 16, channels: Tuple[int, int] = (64, 32),
                 grid: Sequence[int] = (56, 56, 40), drop_path: float = 1 / 30, size_policy: str = "resample",
                 official_reshape: bool = False, official_update: bool = False, mlp_drop_path: bool = False) -> None:
        super().__init__()
        c1, c2 = channels
        self.n_classes, self.n_prototypes = n_classes, n_prototypes
        self.prototypes = nn.Parameter(torch.zeros(1, n_classes, n_prototypes, c1))
        self.tokens1, self.tokens2 = VoxelTokens(c1), VoxelTokens(c2)
        self.attend1 = PrototypeAttention(c1, True, official_reshape, n_classes, n_prototypes)
        self.update1 = PrototypeUpdate(c1, drop_path, official_update, mlp_drop_path)
        self.next_level = nn.Conv2d(c1, c2, 1)
        self.attend2 = PrototypeAttention(c2, False, official_reshape, n_classes, n_prototypes)
        self.score_drop1, self.score_drop2 = DropPath(drop_path), DropPath(drop_path)
        self.score_norm = SpatialLayerNorm(grid, size_policy)
        self.clue = ClueHead(n_prototypes)
        self.upsample = nn.ConvTranspose3d(n_classes, n_classes, 2, stride=2)

    def forward(self, x7: torch.Tensor, x8: torch.Tensor) -> torch.Tensor:
        """x7 (B, C1, d/2, h/2, w/2), x8 (B, C2, d, h, w) -> M(x) (B, K, 2d, 2h, 2w), >= 0."""
        return F.relu(self.upsample(self.clues(x7, x8)))

    def clues(self, x7: torch.Tensor, x8: torch.Tensor) -> torch.Tensor:
        """Per-class rectification clues (B, K, d, h, w) on the x8 grid, before the upsampling."""
        batch, k, m = x8.shape[0], self.n_classes, self.n_prototypes
        rows = self.prototypes.expand(batch, -1, -1, -1).reshape(batch, k * m, -1)
        _, message = self.attend1(rows, self.tokens1(x7))
        rows = self.update1(rows, message)
        rows = self.next_level(rows.reshape(batch, k, m, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        scores, _ = self.attend2(rows.reshape(batch, k * m, -1), self.tokens2(x8))
        scores = scores.reshape(batch, k, m, *x8.shape[2:])
        scores = scores + self.score_drop1(scores)
        scores = scores + self.score_drop2(self.score_norm(scores))
        return self.clue(scores.reshape(batch * k, m, *x8.shape[2:])).reshape(batch, k, *x8.shape[2:])

    def class_prototypes(self) -> torch.Tensor:
        """(K, M): each prototype averaged over its channels, the pi_i that CPS blends into positives."""
        return self.prototypes[0].mean(-1)


@dataclasses.dataclass
class CrlnOutput:
    logits: torch.Tensor
    representation: torch.Tensor
    dim_map: Optional[torch.Tensor]


def representation_head(channels: int, width: int) -> nn.Sequential:
    """Conv 3x3x3 (no bias) -> BN -> ReLU -> Conv 1x1x1 on x9; width = prototypes per class (official)."""
    return nn.Sequential(nn.Conv3d(channels, width, 3, padding=1, bias=False), nn.BatchNorm3d(width),
                         nn.ReLU(inplace=True), nn.Conv3d(width, width, 1))


class CrlnNet(nn.Module):
    """Student / teacher of CRLN: V-Net backbone + representation head + DIM.

    `forward(x_dim, x_plain)` runs the backbone separately on both inputs (separate BN statistics, as the
    official two passes) inside one call, so a DDP-wrapped student sees one forward per backward.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 2, base: int = 16, n_prototypes: int = 16,
                 patch_size: Sequence[int] = (112, 112, 80), has_dropout: bool = True, drop_path: float = 1 / 30,
                 size_policy: str = "resample", official_reshape: bool = False, official_update: bool = False,
                 kaiming_init: bool = True, mlp_drop_path: bool = False) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "n_classes": n_classes, "base": base, "n_prototypes": n_prototypes,
                       "patch_size": [int(p) for p in patch_size], "has_dropout": has_dropout, "drop_path": drop_path,
                       "size_policy": size_policy, "official_reshape": official_reshape,
                       "official_update": official_update, "mlp_drop_path": mlp_drop_path}
        grid = tuple(int(p) // 2 for p in patch_size)
        self.backbone = VNet(in_channels, n_classes, base, "batchnorm", has_dropout, 0)
        self.rep_head = representation_head(base, n_prototypes)
        self.dim = DynamicInteraction(n_classes, n_prototypes, (4 * base, 2 * base), grid, drop_path, size_policy,
                                      official_reshape, official_update, mlp_drop_path)
        if kaiming_init:
            init_kaiming(self)

    def branch(self, x: torch.Tensor, with_dim: bool) -> CrlnOutput:
        logits, feats = self.backbone.forward_features(x)
        dim_map = self.dim(feats["x7"], feats["x8"]) if with_dim else None
        return CrlnOutput(logits, self.rep_head(feats["x9"]), dim_map)

    def forward(self, x_dim: Optional[torch.Tensor], x_plain: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[CrlnOutput], Optional[CrlnOutput]]:
        with_dim = self.branch(x_dim, True) if x_dim is not None else None
        plain = self.branch(x_plain, False) if x_plain is not None else None
        return with_dim, plain


def init_kaiming(module: nn.Module) -> None:
    """CRLN's V-Net init: Kaiming normal on every Conv3d, BatchNorm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Rectifier(nn.Module):
    """The "op module": y~ = y + (1 - a) M(x) with one learned scalar a (init 0), trained on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, logits: torch.Tensor, dim_map: torch.Tensor) -> torch.Tensor:
        return logits + (1.0 - self.alpha) * dim_map


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample min-max to [0, 1] over all non-batch axes (CRLN's LA input normalisation)."""
    flat = x.flatten(1)
    lo = flat.min(1).values.view(-1, *([1] * (x.dim() - 1)))
    hi = flat.max(1).values.view(-1, *([1] * (x.dim() - 1)))
    return (x - lo) / (hi - lo).clamp_min(eps)


class CrlnInference(nn.Module):
    """CRLN inference: EMA teacher + rectification, softmax-ready logits y + (1 - a) M(x).

    A plain `forward(x) -> logits` module, so the project's sliding window and `Predictor` run it. Windows
    must be the training patch, or the DIM resamples / refuses per its size policy. `minmax_input`
    normalises each window to [0, 1] for models trained in the official min-max input space.
    """

    #: the catalog architecture this module is saved and rebuilt as (checkpoints' registry)
    architecture_name = "crln-rectified"
    #: the DIM is tied to the training patch: the Predictor runs training-size windows, never one whole volume
    fixed_window = True

    def __init__(self, teacher: CrlnNet, rectifier: Rectifier, minmax_input: bool = False) -> None:
        super().__init__()
        self.teacher, self.rectifier, self.minmax_input = teacher, rectifier, minmax_input

    @property
    def config(self) -> dict:
        """Everything `build_crln_inference` needs to rebuild this module for a state dict."""
        return {**self.teacher.config, "has_dropout": False, "minmax_input": self.minmax_input}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.minmax_input:
            x = minmax(x)
        out, _ = self.teacher(x)
        return self.rectifier(out.logits.float(), out.dim_map.float())


def build_crln_inference(config: dict) -> CrlnInference:
    """Rebuild the exported CRLN inference module (teacher + DIM + rectifier) from its card config."""
    config = dict(config)
    minmax_input = bool(config.pop("minmax_input", False))
    teacher = CrlnNet(**{**config, "has_dropout": False}, kaiming_init=False)
    return CrlnInference(teacher, Rectifier(), minmax_input=minmax_input).eval()


class MinMaxVNet(VNet):
    """A V-Net that min-max normalises each input window first; same state dict as `VNet`.

    Used only for validating models trained in the official min-max input space (`input_space: minmax`).
    """

    def forward_features(self, x: torch.Tensor):
        return super().forward_features(minmax(x))
