"""preprocess layer: intensity normalisation and the model-grid geometry round trip."""

from .normalize import zscore
from .resample import (
    PERMUTATION_TOLERANCE,
    ModelGrid,
    covering_grid,
    crop_to_roi,
    from_model_grid,
    paste_roi,
    roi_from_physical,
    signed_permutation,
    to_model_grid,
)

__all__ = [
    "PERMUTATION_TOLERANCE", "ModelGrid", "covering_grid", "crop_to_roi", "from_model_grid", "paste_roi",
    "roi_from_physical", "signed_permutation", "to_model_grid", "zscore",
]
