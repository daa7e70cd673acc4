"""Module-level imports only point down the layer list (docs/ARCHITECTURE.md).

Function-level (lazy) imports are allowed to reach up: ``Node.info()`` is a
convenience that calls the collector, and lazy imports are also how the CLI
stays quick to start.  What must never happen is a lower layer needing an
upper one just to be imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "vdkit"
# ``block.driver`` is the operations table the formats implement, so it sits
# below them (as QEMU's BlockDriver definition sits below block/qcow2.c);
# ``block.snapshot`` holds the generic snapshot descriptor's limits.  The QAPI
# shapes (``info.model``) and QEMU's option syntax (``opts``) are plain data
# every layer speaks, as QEMU's generated QAPI types sit below the block layer.
LAYERS = ["errors", "record", "opts", "info.model", "io", "block.driver", "formats", "block", "info", "cli", "nbd",
          "monitor", "daemon"]
_LOW_MODULES = {("block", "driver"): "block.driver", ("block", "snapshot"): "block.driver",
                ("info", "model"): "info.model"}
# Front ends are siblings: none may import another at module level.
SIBLINGS = {"cli": {"monitor", "daemon", "nbd"}, "monitor": {"cli"}, "nbd": {"cli", "monitor"}}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "vdkit" or len(parts) < 2:
        return None
    low = _LOW_MODULES.get((parts[1], parts[2] if len(parts) > 2 else ""))
    return low if low is not None else parts[1]


def _module_level_imports(tree: ast.Module) -> list[str]:
    out: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue  # typing-only imports cost nothing at run time
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path: Path) -> None:
    rel = path.relative_to(PKG)
    own = _layer("vdkit." + ".".join(rel.with_suffix("").parts)) or ""
    if own not in LAYERS:
        return  # vdkit/__init__.py: the public facade may import anything lazily
    for imported in _module_level_imports(ast.parse(path.read_text())):
        layer = _layer(imported)
        if layer is None or layer == own or layer not in LAYERS:
            continue
        assert LAYERS.index(layer) < LAYERS.index(own), f"{rel} imports {imported} (upward)"
        assert layer not in SIBLINGS.get(own, set()), f"{rel} imports sibling front end {imported}"
