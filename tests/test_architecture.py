"""The architecture stays visible: imports run front ends -> rules -> core -> engine, one
autograd node, modules under ~400 lines."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "torchopt_metagrad"
FILES = sorted(ROOT.rglob("*.py"))


def _module(path: pathlib.Path) -> str:
    name = ".".join(("torchopt_metagrad", *path.relative_to(ROOT).with_suffix("").parts))
    return name.removesuffix(".__init__")


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            found |= {f"{base}.{a.name}" if base.count(".") < 2 else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("torchopt_metagrad")}


ALLOWED = {
    # layer: what it may import from the package (besides itself)
    "torchopt_metagrad._core.engine": ("torchopt_metagrad.errors",),
    "torchopt_metagrad._core": ("torchopt_metagrad._core", "torchopt_metagrad.errors"),
    "torchopt_metagrad.rules": (
        "torchopt_metagrad.rules",
        "torchopt_metagrad._core",
        "torchopt_metagrad.errors",
    ),
}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_never_point_back_up(path):
    module = _module(path)
    layer = next((k for k in ALLOWED if module == k or module.startswith(k + ".")), None)
    if layer is None:
        return  # front ends, diagnostics and the package root may import any layer
    bad = [m for m in _imports(path) if not m.startswith(ALLOWED[layer])]
    assert not bad, f"{module} imports {bad}, above its layer"


def test_exactly_one_autograd_function_links_records_to_parameters():
    functions = [
        (path.name, node.name)
        for path in FILES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(b).endswith("autograd.Function") for b in node.bases)
    ]
    assert functions == [("link.py", "Link")]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_under_about_400_lines(path):
    assert len(path.read_text().splitlines()) <= 420
