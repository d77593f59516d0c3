"""The package's layers (docs/ARCHITECTURE.md, "Layers"), enforced by parsing every import.

``ops`` are leaves; ``boxes``/``anchors``/``matching`` sit on ``ops``; ``rpn`` and ``heads``
never import each other (the model wires the stages); ``data`` knows no network; ``model``
knows no training loop and draws nothing; ``engine`` reports through return values (no
plots); only ``viz``, ``widgets`` and ``cli`` import matplotlib, ipywidgets or argparse.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mrcnn_edu"
UI_LIBS = ("matplotlib", "ipywidgets", "argparse")
UI_MODULES = ("viz", "widgets", "cli")

# module (first component under mrcnn_edu) -> parts of the package it must never import
FORBIDDEN: dict[str, set[str]] = {
    "ops": {
        "utils",
        "structures",
        "boxes",
        "anchors",
        "matching",
        "rpn",
        "heads",
        "poolers",
        "backbone",
        "model",
        "config",
        "weights",
        "data",
        "transforms",
        "engine",
        "viz",
        "widgets",
        "cli",
    },
    "structures": {
        "boxes",
        "anchors",
        "matching",
        "rpn",
        "heads",
        "poolers",
        "backbone",
        "model",
        "config",
        "weights",
        "data",
        "transforms",
        "engine",
        "viz",
        "widgets",
        "cli",
    },
    "utils": {
        "ops",
        "boxes",
        "anchors",
        "matching",
        "rpn",
        "heads",
        "poolers",
        "backbone",
        "model",
        "config",
        "weights",
        "data",
        "transforms",
        "engine",
        "viz",
        "widgets",
        "cli",
    },
}
for _leaf in ("boxes", "anchors", "matching"):
    FORBIDDEN[_leaf] = {
        "rpn",
        "heads",
        "poolers",
        "backbone",
        "model",
        "config",
        "weights",
        "data",
        "transforms",
        "engine",
        "viz",
        "widgets",
        "cli",
    }
FORBIDDEN["rpn"] = {
    "heads",
    "poolers",
    "model",
    "config",
    "weights",
    "engine",
    "viz",
    "widgets",
    "cli",
    "data",
}
FORBIDDEN["heads"] = {
    "rpn",
    "model",
    "config",
    "weights",
    "engine",
    "viz",
    "widgets",
    "cli",
    "data",
}
FORBIDDEN["poolers"] = {"rpn", "heads", "model", "engine", "viz", "widgets", "cli", "data"}
FORBIDDEN["backbone"] = {
    "rpn",
    "heads",
    "poolers",
    "model",
    "engine",
    "viz",
    "widgets",
    "cli",
    "data",
}
FORBIDDEN["data"] = {
    "rpn",
    "heads",
    "poolers",
    "backbone",
    "model",
    "config",
    "weights",
    "engine",
    "viz",
    "widgets",
    "cli",
}
FORBIDDEN["transforms"] = {
    "rpn",
    "heads",
    "poolers",
    "backbone",
    "model",
    "engine",
    "viz",
    "widgets",
    "cli",
}
FORBIDDEN["model"] = {"engine", "viz", "widgets", "cli"}
FORBIDDEN["config"] = {"engine", "viz", "widgets", "cli"}
FORBIDDEN["weights"] = {"engine", "viz", "widgets", "cli"}
FORBIDDEN["engine"] = {"viz", "widgets", "cli"}
FORBIDDEN["viz"] = {"widgets", "cli"}


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts[:-1]  # the package a relative import starts from (same for __init__)
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # from . import x, y
                    out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
                    continue
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            if mod in ("mrcnn_edu",):  # from mrcnn_edu import heads
                out += [(node.lineno, f"mrcnn_edu.{a.name}") for a in node.names]
    return out


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("").parts
    return rel[0]


def test_import_parser_resolves_relative_imports(tmp_path: Path) -> None:
    # the parser is the test's own machinery: check it on this package's known imports
    rpn = {name: line for line, name in _imports(PKG / "rpn.py")}
    assert "mrcnn_edu.anchors" in rpn and "mrcnn_edu.matching" in rpn and "mrcnn_edu.ops" in rpn


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_module_respects_layers(path: Path) -> None:
    layer = _layer(path)
    forbidden = FORBIDDEN.get(layer, set())
    bad = []
    for line, name in _imports(path):
        top = name.split(".")[0]
        if top in UI_LIBS and layer not in UI_MODULES:
            bad.append(f"line {line}: imports {name} (only viz, widgets, cli may)")
        if name.startswith("mrcnn_edu."):
            target = name.split(".")[1]
            if target in forbidden and target != layer:
                bad.append(f"line {line}: {layer} imports mrcnn_edu.{target}")
    assert not bad, f"{path.relative_to(PKG.parent)} breaks the layers:\n" + "\n".join(bad)
