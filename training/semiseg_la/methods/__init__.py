"""Semi-supervised methods: one module per method, registered by name.

Adding a method = one file here (plus its model parts in `models/`), a preset and tests.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

from ..errors import ConfigError
from .base import Batch, Method, StepResult
from .caml import Caml
from .crln import Crln
from .mean_teacher import MeanTeacher
from .semicml import SemiCML, SemiCMLLA
from .site_adapter import SiteAdapter
from .supervised import Supervised

METHODS: Dict[str, Callable[..., Method]] = {
    Supervised.name: Supervised,
    MeanTeacher.name: MeanTeacher,
    SemiCML.name: SemiCML,
    SemiCMLLA.name: SemiCMLLA,
    Crln.name: Crln,
    Caml.name: Caml,
    SiteAdapter.name: SiteAdapter,
}


def register_method(name: str, factory: Callable[..., Method]) -> None:
    METHODS[name] = factory


def build_method(name: str, params: Mapping[str, Any], max_iterations: int) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name](params, max_iterations)


__all__ = ["Batch", "Method", "StepResult", "METHODS", "build_method", "register_method"]
