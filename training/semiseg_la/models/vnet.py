"""The V-Net of the LA semi-supervised literature (docs/methods.md 1.3).

Not Milletari's residual V-Net: plain conv stacks with additive skips, BatchNorm + ReLU, 16 base
filters, 9.45 M parameters. `up_type` 0 = transposed conv (CAML's V, UA-MT, MC-Net), 1 = trilinear
upsample + conv (CAML's A), 2 = nearest + conv. Spatial sizes must be multiples of 16. `input_adapter` N > 0
puts an `IntensityAdapter` of width N in front (a site-adapted child; models/adapter.py).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from .adapter import IntensityAdapter

DOWNSAMPLING_FACTOR = 16


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm3d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(16, channels)
    if kind == "instancenorm":
        return nn.InstanceNorm3d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {kind!r}")


class ConvBlock(nn.Sequential):
    """`stages` x [Conv3d 3x3x3 -> norm -> ReLU]."""

    def __init__(self, stages: int, cin: int, cout: int, norm: str) -> None:
        layers = []
        for i in range(stages):
            layers += [nn.Conv3d(cin if i == 0 else cout, cout, 3, padding=1), _norm(norm, cout),
                       nn.ReLU(inplace=True)]
        super().__init__(*layers)


class Down(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str) -> None:
        super().__init__(nn.Conv3d(cin, cout, 2, stride=2), _norm(norm, cout), nn.ReLU(inplace=True))


class Up(nn.Sequential):
    def __init__(self, cin: int, cout: int, norm: str, up_type: int) -> None:
        if up_type == 0:
            layers = [nn.ConvTranspose3d(cin, cout, 2, stride=2)]
        elif up_type == 1:
            layers = [nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
                      nn.Conv3d(cin, cout, 3, padding=1)]
        elif up_type == 2:
            layers = [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(cin, cout, 3, padding=1)]
        else:
            raise ValueError(f"unknown up_type {up_type}")
        super().__init__(*layers, _norm(norm, cout), nn.ReLU(inplace=True))


class VNetEncoder(nn.Module):
    def __init__(self, in_channels: int = 1, base: int = 16, norm: str = "batchnorm",
                 has_dropout: bool = False) -> None:
        super().__init__()
        f = base
        self.block_one = ConvBlock(1, in_channels, f, norm)
        self.block_one_dw = Down(f, 2 * f, norm)
        self.block_two = ConvBlock(2, 2 * f, 2 * f, norm)
        self.block_two_dw = Down(2 * f, 4 * f, norm)
        self.block_three = ConvBlock(3, 4 * f, 4 * f, norm)
        self.block_three_dw = Down(4 * f, 8 * f, norm)
        self.block_four = ConvBlock(3, 8 * f, 8 * f, norm)
        self.block_four_dw = Down(8 * f, 16 * f, norm)
        self.block_five = ConvBlock(3, 16 * f, 16 * f, norm)
        self.dropout = nn.Dropout3d(p=0.5) if has_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.dropout(self.block_five(self.block_four_dw(x4)))
        return x1, x2, x3, x4, x5


class VNetDecoder(nn.Module):
    def __init__(self, n_classes: int = 2, base: int = 16, norm: str = "batchnorm",
                 has_dropout: bool = False, up_type: int = 0) -> None:
        super().__init__()
        f = base
        self.block_five_up = Up(16 * f, 8 * f, norm, up_type)
        self.block_six = ConvBlock(3, 8 * f, 8 * f, norm)
        self.block_six_up = Up(8 * f, 4 * f, norm, up_type)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f, norm)
        self.block_seven_up = Up(4 * f, 2 * f, norm, up_type)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f, norm)
        self.block_eight_up = Up(2 * f, f, norm, up_type)
        self.block_nine = ConvBlock(1, f, f, norm)
        self.dropout = nn.Dropout3d(p=0.5) if has_dropout else nn.Identity()
        self.out_conv = nn.Conv3d(f, n_classes, 1)

    def forward(self, features: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        x1, x2, x3, x4, x5 = features
        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        x9 = self.dropout(self.block_nine(self.block_eight_up(x8) + x1))
        logits = self.out_conv(x9)
        # CRLN names the 64-channel (1/4 scale) and 32-channel (1/2 scale) outputs x7 and x8.
        return logits, {"x6": x6, "x7": x7, "x8": x8, "x9": x9}


class VNet(nn.Module):
    """V-Net: `forward` returns logits (B, n_classes, X, Y, Z); `forward_features` adds decoder features."""

    def __init__(self, in_channels: int = 1, n_classes: int = 2, base: int = 16, norm: str = "batchnorm",
                 has_dropout: bool = False, up_type: int = 0, input_adapter: int = 0) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "n_classes": n_classes, "base": base, "norm": norm,
                       "has_dropout": has_dropout, "up_type": up_type}
        self.input_adapter = None
        if input_adapter:  # recorded only when present: a plain V-Net's card is unchanged
            self.config["input_adapter"] = int(input_adapter)
            self.input_adapter = IntensityAdapter(in_channels, int(input_adapter))
        self.encoder = VNetEncoder(in_channels, base, norm, has_dropout)
        self.decoder = VNetDecoder(n_classes, base, norm, has_dropout, up_type)

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        check_spatial_size(x.shape[2:])
        if self.input_adapter is not None:
            x = self.input_adapter(x)
        features = self.encoder(x)
        logits, decoder_features = self.decoder(features)
        decoder_features["x5"] = features[4]
        return logits, decoder_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


def check_spatial_size(size) -> None:
    bad = [int(s) for s in size if int(s) % DOWNSAMPLING_FACTOR]
    if bad:
        raise ValueError(f"V-Net input sizes must be multiples of {DOWNSAMPLING_FACTOR}, got {tuple(size)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
