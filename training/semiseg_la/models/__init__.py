"""Networks: the shared V-Net and the method-specific parts."""

from .vnet import VNet, count_parameters

__all__ = ["VNet", "count_parameters"]
