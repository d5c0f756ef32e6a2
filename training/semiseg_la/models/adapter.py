"""A per-voxel intensity adapter in front of a trained network (Karani et al., MedIA 2021, "Test-time
adaptable neural networks for robust medical image segmentation", pointwise form).

`x + f(x)`, `f` a small MLP applied to each voxel's intensities (1x1x1 convolutions), its output layer
initialised to zero: an added adapter leaves the network's predictions exactly as they were. Trained alone
on a site's scans it learns the site's intensity curve back to what the network knows, with a few hundred
parameters where a fine-tune of the network moves 9.4 million (docs/results.md, site adaptation). 1x1x1 on
purpose: a 3x3x3 first layer over-fitted the labelled site cases and lost 2 points.
"""

from __future__ import annotations

import torch
from torch import nn


class IntensityAdapter(nn.Module):
    """Residual per-voxel MLP over `channels` input channels with `hidden` units; the identity when created."""

    def __init__(self, channels: int = 1, hidden: int = 16) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"input adapter width must be >= 1, got {hidden}")
        self.mlp = nn.Sequential(nn.Conv3d(channels, hidden, 1), nn.GELU(), nn.Conv3d(hidden, hidden, 1), nn.GELU(),
                                 nn.Conv3d(hidden, channels, 1))
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        """Zero the output layer: f(x) = 0, so the adapter passes its input through unchanged."""
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)
