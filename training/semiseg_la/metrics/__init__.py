"""metrics layer: Dice, Jaccard, HD95 and ASSD in mm plus the legacy LA-table convention.

numpy + scipy.ndimage only (no torch), so evaluation runs anywhere predictions exist.
"""

from .segmentation import (
    LEGACY_KEYS,
    METRIC_DEFINITIONS,
    METRIC_KEYS,
    MM_KEYS,
    asd,
    assd,
    dice,
    evaluate_case,
    hd95,
    jaccard,
)
from .summary import format_table, paired_interval, summarize
from .surface import surface, surface_distances

__all__ = [
    "LEGACY_KEYS", "METRIC_DEFINITIONS", "METRIC_KEYS", "MM_KEYS", "asd", "assd", "dice", "evaluate_case",
    "format_table", "hd95", "jaccard", "paired_interval", "summarize", "surface", "surface_distances",
]
