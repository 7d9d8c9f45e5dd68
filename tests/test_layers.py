"""The package's layers (DESIGN.md): layers 1-3 (models, hooks, tokens, scoring, stats, tracing,
editing, evaluation, patches, requests, corpora, utils, presets) never import Lightning nor the
Lightning layer (callbacks, data, metrics, modules, cli, demo), not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_rome"
#: The Lightning layer, and the test helpers (which build on everything).
TOP = {"callbacks", "data", "metrics", "modules", "cli", "demo", "testing"}
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}
#: The metrics' functional core (pure torch, torchmetrics' functional/ split), which the
#: evaluation core scores with; the Metric classes beside it are Lightning-layer.
SHARED = "lightning_rome.metrics.functional"


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every imported module name of ``path`` (relative ones resolved), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
                base = base[: len(base) - node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


LOW = sorted(p for p in PACKAGE.rglob("*.py") if _part(p) not in TOP)


def test_the_low_layers_exist():
    parts = {_part(p) for p in LOW}
    assert {"models", "hooks", "tokens", "scoring", "stats", "tracing", "editing",
            "evaluation", "patches"} <= parts


@pytest.mark.parametrize("path", LOW, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_low_layer_module_imports_no_lightning_and_no_higher_layer(path):
    bad = []
    for line, name in _imports(path):
        root = name.split(".")[0]
        if root in LIGHTNING or (root == "lightning_rome" and len(name.split(".")) > 1
              and name.split(".")[1] in TOP and not name.startswith(SHARED)):
            bad.append(f"line {line}: {name}")
    assert not bad, f"{path.relative_to(PACKAGE)} imports the Lightning layer: {bad}"


def test_the_scan_sees_a_violation(tmp_path):
    """The checker itself: an import of Lightning inside a function is found."""
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from lightning.pytorch import Trainer\n")
    assert (2, "lightning.pytorch") in _imports(fake)
