"""CAML's network parts (docs/methods.md 2.1): sub-network V, sub-network A with the CMA module, heads.

V holds a plain `VNet` (transposed-conv decoder) so that exporting it needs no key mapping. A is the
same encoder with Cross-sample Mutual Attention (CMA) after block four and a trilinear-upsampling
decoder. Both return (logits, embedding) with the embedding = x9 after dropout (16 channels). The
voxel-wise projection / prediction heads live in their own module so V's state dict stays a V-Net's.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn

from .vnet import VNet, VNetDecoder, VNetEncoder, check_spatial_size


class CrossSampleMutualAttention(nn.Module):
    """Intra-sample attention over the spatial tokens of each sample, then inter-sample attention over
    the batch at each spatial position (two post-norm Transformer encoder layers, no positional
    encoding). The identity in eval mode, so inference never depends on what else is in the batch."""

    def __init__(self, channels: int = 128, heads: int = 4, ffn: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        self.intra = nn.TransformerEncoderLayer(channels, heads, ffn, dropout, batch_first=True)
        self.inter = nn.TransformerEncoderLayer(channels, heads, ffn, dropout, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        b, c = x.shape[:2]
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C): a sequence of N spatial tokens per sample
        tokens = self.intra(tokens)
        tokens = self.inter(tokens.transpose(0, 1)).transpose(0, 1)  # (N, B, C): a sequence of B samples
        return tokens.transpose(1, 2).reshape(b, c, *x.shape[2:])


class SubNetworkV(nn.Module):
    """Sub-network V: a plain V-Net (exported as is); forward returns (logits, x9 embedding)."""

    def __init__(self, in_channels: int = 1, n_classes: int = 2, base: int = 16, has_dropout: bool = True) -> None:
        super().__init__()
        self.vnet = VNet(in_channels, n_classes, base, "batchnorm", has_dropout, up_type=0)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.vnet.forward_features(x)
        return logits, features["x9"]


class SubNetworkA(nn.Module):
    """Sub-network A: V-Net encoder with CMA on x4 (its output feeds both the skip and the next
    downsampling) and a trilinear-upsampling decoder; forward returns (logits, x9 embedding)."""

    def __init__(self, in_channels: int = 1, n_classes: int = 2, base: int = 16, has_dropout: bool = True,
                 cma_heads: int = 4, cma_ffn: int = 512, cma_dropout: float = 0.5) -> None:
        super().__init__()
        self.config: Dict[str, Any] = {"in_channels": in_channels, "n_classes": n_classes, "base": base,
                                       "has_dropout": has_dropout, "up_type": 1}
        self.encoder = VNetEncoder(in_channels, base, "batchnorm", has_dropout)
        self.cma = CrossSampleMutualAttention(8 * base, cma_heads, cma_ffn, cma_dropout)
        self.decoder = VNetDecoder(n_classes, base, "batchnorm", has_dropout, up_type=1)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        e = self.encoder
        x1 = e.block_one(x)
        x2 = e.block_two(e.block_one_dw(x1))
        x3 = e.block_three(e.block_two_dw(x2))
        x4 = self.cma(e.block_four(e.block_three_dw(x3)))
        x5 = e.dropout(e.block_five(e.block_four_dw(x4)))
        return x1, x2, x3, x4, x5

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        check_spatial_size(x.shape[2:])
        logits, features = self.decoder(self.encode(x))
        return logits, features["x9"]


def mlp_head(in_dim: int, dim: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU -> Linear, applied to (rows, in_dim) voxel features."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


class CamlHeads(nn.Module):
    """Projection (g) and prediction (h) heads of both sub-networks, width `dim` (32 in the released runs).

    `forward` gives the OCC queries h(g(e)) in train mode; `memory_features` gives the memory
    entries (g_v(e_v) + g_a(e_a)) / 2, which CAML computes with the heads in eval mode.
    """

    def __init__(self, embedding_channels: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.dim = dim
        self.proj_v = mlp_head(embedding_channels, dim)
        self.pred_v = mlp_head(dim, dim)
        self.proj_a = mlp_head(embedding_channels, dim)
        self.pred_a = mlp_head(dim, dim)

    def forward(self, rows_v: torch.Tensor, rows_a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if rows_v.shape[0] < 2:
            # BatchNorm1d needs two rows; return empty queries that still touch every parameter, so
            # that DDP (find_unused_parameters=False) sees the same parameters on every rank.
            anchor = sum(p.sum() for p in self.parameters()) * 0.0
            empty = rows_v.new_zeros((0, self.dim)) + anchor
            return empty, empty.clone()
        return self.pred_v(self.proj_v(rows_v)), self.pred_a(self.proj_a(rows_a))

    def memory_features(self, rows_v: torch.Tensor, rows_a: torch.Tensor) -> torch.Tensor:
        return (self.proj_v(rows_v) + self.proj_a(rows_a)) / 2
