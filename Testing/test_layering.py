"""The one direction of dependency: io -> preprocess -> models -> methods -> engine -> inference ->
checkpoints -> cli. A module may import its own layer and earlier ones, never a later one."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "training" / "semiseg_la"
ORDER = ["io", "preprocess", "models", "methods", "engine", "inference", "checkpoints", "cli"]
BASE = {"errors", "progress", "metrics", "presets", "catalog"}  # usable from every layer


def _imported_layers(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package_parts = path.relative_to(PACKAGE).parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
                if not target and node.names:
                    target = [node.names[0].name]
            elif node.module and node.module.startswith("semiseg_la"):
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                yield node.lineno, target[0]


def test_no_module_imports_a_later_layer():
    problems = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if parts[0] not in ORDER:
            continue
        own = ORDER.index(parts[0])
        for lineno, layer in _imported_layers(path):
            if layer in ORDER and ORDER.index(layer) > own:
                problems.append(f"{path.relative_to(REPO)}:{lineno} ({parts[0]}) imports {layer}")
    assert not problems, "\n".join(problems)


def test_metrics_and_io_do_not_import_torch():
    for folder in ("metrics", "io"):
        for path in (PACKAGE / folder).rglob("*.py"):
            assert "import torch" not in path.read_text(encoding="utf-8"), path
