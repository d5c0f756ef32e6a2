"""Slicer side, static checks: .ui widget names, CMake files, Python 3.9 syntax (module and core), no torch at load."""

import ast
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import slicer_fake

REPO = slicer_fake.REPO
MODULE_DIR = slicer_fake.MODULE_DIR
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SemiSegLA.ui"
MODULE_PY = sorted(p for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
# the core runs in Slicer's Python too (the module's child process): scripts/test_slicer_python.sh runs the
# suite there; this static check keeps CI, which has no Python 3.9 run, from letting a 3.10-only line in
CORE_PY = sorted(p for p in (REPO / "training" / "semiseg_la").rglob("*.py") if "__pycache__" not in p.parts)
QT_CLASSES = {"QWidget", "QLabel", "QComboBox", "QPushButton", "QCheckBox", "QSpinBox", "QDoubleSpinBox",
              "QLineEdit", "QTableWidget", "QProgressBar", "QPlainTextEdit"}


def ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}, root


def test_every_widget_name_used_in_code_exists_in_the_ui_file():
    widgets, _ = ui_widgets()
    used = set()
    for path in MODULE_PY:
        used |= set(re.findall(r"\bself\.ui\.([A-Za-z_][A-Za-z0-9_]*)", path.read_text(encoding="utf-8")))
    assert used, "the widget uses no .ui names?"
    missing = sorted(used - set(widgets))
    assert not missing, f"not in SemiSegLA.ui: {missing}"
    # every interactive widget of the .ui is wired in the code (nothing dead on the panel)
    interactive = {n for n, c in widgets.items() if c not in ("QLabel", "ctkCollapsibleButton", "qMRMLWidget")}
    unused = sorted(interactive - used)
    assert not unused, f"widgets in the .ui that the code never uses: {unused}"


def test_ui_file_is_well_formed_and_declares_its_custom_widgets():
    widgets, root = ui_widgets()
    assert root.find("class").text == "SemiSegLA"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "SemiSegLA"
    declared = {c.find("class").text for c in root.iter("customwidget")}
    custom = {c for c in widgets.values() if c not in QT_CLASSES}
    assert custom <= declared, custom - declared
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"
    assert widgets["show3DButton"] == "qMRMLSegmentationShow3DButton"
    # the volume selector gets the scene through the mrmlSceneChanged connection
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    assert "inputVolumeSelector" in receivers


def _cmake_list(text, variable):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, variable
    items = [line.split("#")[0].strip() for line in match.group(1).splitlines()]
    return [i.replace("${MODULE_NAME}", "SemiSegLA") for i in items if i]


def test_module_cmake_lists_every_python_file_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_py = sorted(str(p.relative_to(MODULE_DIR)).replace("\\", "/") for p in MODULE_PY)
    assert sorted(scripts) == on_disk_py
    on_disk_res = sorted(str(p.relative_to(MODULE_DIR)).replace("\\", "/")
                         for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file())
    assert sorted(resources) == on_disk_res
    for item in scripts + resources:
        assert (MODULE_DIR / item).is_file(), item
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "../training" in text and "Resources/semiseg-la" in text  # the core ships with the module
    for sub in ("Testing/CMakeLists.txt", "Testing/Python/CMakeLists.txt"):
        assert (MODULE_DIR / sub).is_file()


def test_top_level_cmake_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(SemiSegLA\)", text, re.M)
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf"set\({key} ", text), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(SemiSegLA)",
             "## NEXT_MODULE", "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(item) for item in order]
    assert positions == sorted(positions)
    # icon and screenshots point at real PNG files of this repository
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        urls = re.search(rf'set\({key} "([^"]+)"\)', text).group(1).split()
        for url in urls:
            assert url.startswith("${SEMISEGLA_RAW}/"), url
            path = REPO / url.split("}/", 1)[1]
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert "https://raw.githubusercontent.com/" in text


def test_icons_are_real_pngs():
    import struct

    for path, size in ((MODULE_DIR / "Resources" / "Icons" / "SemiSegLA.png", (128, 128)),
                       (REPO / "Resources" / "SemiSegLA.png", (128, 128))):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert struct.unpack(">II", data[16:24]) == size


def _py39_problems(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    problems = []
    future_annotations = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                             and any(a.name == "annotations" for a in n.names) for n in tree.body)
    for node in ast.walk(tree):
        if type(node).__name__ in ("Match", "TryStar"):
            problems.append(f"{type(node).__name__} at line {node.lineno}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in ("imp", "tomllib", "distutils"):
                    problems.append(f"import {name} at line {node.lineno}")
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                func = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if func == "zip" and kw.arg == "strict":
                    problems.append(f"zip(strict=) at line {node.lineno}")
                if func == "dataclass" and kw.arg in ("slots", "kw_only"):
                    problems.append(f"dataclass({kw.arg}=) at line {node.lineno}")
            if getattr(node.func, "id", "") == "isinstance" and len(node.args) == 2 and isinstance(
                    node.args[1], ast.BinOp):
                problems.append(f"isinstance with X | Y at line {node.lineno}")
        if isinstance(node, ast.With) and len(node.items) > 1:
            first = node.items[0].context_expr
            # parenthesised context managers put "(" before the first item on the with line
            line = source.splitlines()[node.lineno - 1]
            if re.match(r"\s*(async\s+)?with\s*\(\s*$", line) or (
                    re.match(r"\s*(async\s+)?with\s*\(", line) and first.col_offset > line.index("(")):
                problems.append(f"parenthesised context managers at line {node.lineno}")
        if not future_annotations:
            annotations = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                annotations += [a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation]
                annotations += [node.returns] if node.returns else []
            if isinstance(node, ast.AnnAssign):
                annotations.append(node.annotation)
            for ann in annotations:
                if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(ann)):
                    problems.append(f"X | Y annotation at line {ann.lineno}")
    return problems


def test_slicer_side_code_and_the_core_are_python39_compatible():
    assert len(CORE_PY) > 40
    problems = {str(p.relative_to(REPO)): _py39_problems(p) for p in MODULE_PY + CORE_PY}
    assert not {k: v for k, v in problems.items() if v}


def test_python39_checker_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import imp\n"
                   "def f(x: int | None) -> None:\n"
                   "    isinstance(x, int | str)\n"
                   "    zip([], [], strict=True)\n")
    found = " ".join(_py39_problems(bad))
    for text in ("import imp", "X | Y annotation", "isinstance with X | Y", "zip(strict=)"):
        assert text in found, text
    match_stmt = tmp_path / "m.py"
    match_stmt.write_text("match 1:\n    case 1:\n        pass\n")
    try:
        problems = _py39_problems(match_stmt)
    except SyntaxError:
        problems = ["rejected by the 3.9 grammar"]
    assert problems


def test_no_torch_import_at_module_level():
    for path in MODULE_PY:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "torch" for a in node.names), path
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "torch", path


def test_loading_the_module_imports_neither_torch_nor_the_core():
    """In a fresh interpreter: import SemiSegLA.py under the stand-in and every Lib module; torch and
    semiseg_la must not be imported, and only nodes.py may touch slicer (at call time)."""
    code = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(REPO / 'Testing')!r})\n"
        "import slicer_fake\n"
        "from SemiSegLALib import cases, catalog, commands, dependencies, events, geometry, jobs, nodes, paths\n"
        "from SemiSegLALib import process, progress, state\n"
        "lib_only = sorted(m for m in ('slicer', 'qt', 'vtk', 'torch', 'semiseg_la') if m in sys.modules)\n"
        "module = slicer_fake.loadModule()\n"
        "after = sorted(m for m in ('torch', 'semiseg_la') if m in sys.modules)\n"
        "print(json.dumps({'lib': lib_only, 'after': after, 'libs': list(module.LIB_MODULES)}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lib"] == [] and report["after"] == []
    lib_files = sorted(p.stem for p in (MODULE_DIR / "SemiSegLALib").glob("*.py") if p.stem != "__init__")
    assert sorted(report["libs"]) == lib_files  # onReload reloads every helper
