"""Checkpoints: safetensors weights + JSON model card + SHA-256, the model catalog, .pth import.

Names are loaded lazily so that `semiseg_la.checkpoints.catalog` and `.card` (no torch) stay cheap
to import for the Slicer module; `store` and `import_pth` pull in torch only when used.
Only the CLI and the Slicer module import this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelCard": "card", "default_classes": "card", "default_inference": "card",
    "weights_fingerprint": "card", "CARD_FILE": "card",
    "save_model": "store", "load_model_weights": "store", "build_network": "store", "load_network": "store",
    "register_architecture": "store", "check_state_dict": "store", "software_versions": "store",
    "CatalogEntry": "catalog", "list_models": "catalog", "resolve_model": "catalog",
    "default_model_id": "catalog", "new_local_model_dir": "catalog", "remove_local_model": "catalog",
    "lineage": "catalog", "unique_model_id": "catalog", "find_model": "catalog", "models_home": "catalog",
    "local_models_dir": "catalog", "validation_model_id": "catalog",
    "import_pth": "import_pth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
