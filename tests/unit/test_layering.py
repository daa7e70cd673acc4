"""Imports only point down the layer list (docs/ARCHITECTURE.md), at module level and inside functions.

A lower layer must never need an upper one, neither to be imported nor to
run: that is how cycles between packages start.  Imports inside functions
(lazy imports, which keep start-up cheap) are held to the same rule; the few
that knowingly reach up are listed in ``ALLOWED_UPWARD`` with the reason.
Imports under ``if TYPE_CHECKING:`` cost nothing at run time and are not
counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "vdkit"
# ``block.driver`` is the operations table the formats implement, so it sits
# below them (as QEMU's BlockDriver definition sits below block/qcow2.c);
# ``block.snapshot`` holds the generic snapshot descriptor's limits and lookup.
# The QAPI shapes (``info.model``) and QEMU's option syntax (``opts``) are
# plain data every layer speaks, as QEMU's generated QAPI types sit below the
# block layer.  ``devices`` (the daemon's machine: drives, media, throttling;
# no asyncio) sits below the front ends, so the monitor's handlers use it and
# the daemon only plugs its services in.
# ``block.secrets`` (the --object secret store the luks format and the rbd protocol look keys up in, as
# QEMU's secret objects sit below its block layer) needs only errors: it sits with ``opts``.
# ``info.render_json`` (QEMU's JSON writer: QDict key order, escaping) needs only ``record``: it sits
# with the QAPI shapes, so protocols can name nodes ``json:{...}``; so does the ``info`` package itself
# (its ``__init__``: the records' QObject form both renderers build on).
# ``block.chain`` (backing-name resolution, the open policy, the chain walker) needs nothing above it and
# is used by formats that name files (VMDK extents).  ``block.target`` (the copy engine's targets) needs
# only the driver table: formats subclass its Target in their ``copy_target`` slot.  ``protocols`` are
# what bytes are read from besides local files (NBD); the NBD client shares ``nbd.wire`` (constants and
# layouts only) with the server.  ``qjson`` (QEMU's JSON reader) needs nothing: QMP input and the JSON of
# command lines (json: names, -blockdev) are read by it.
LAYERS = ["errors", "record", "qjson", "opts", "info.model", "io", "protocols", "block.driver", "formats", "block",
          "info", "devices", "cli", "nbd", "monitor", "daemon"]
_LOW_MODULES = {("block", "driver"): "block.driver", ("block", "snapshot"): "block.driver",
                ("block", "chain"): "block.driver", ("block", "target"): "block.driver", ("block", "secrets"): "opts",
                ("info", "render_json"): "info.model", ("info", ""): "info.model", ("info", "__init__"): "info.model",
                ("block", "dirty_bitmap"): "block.driver",
                ("info", "model"): "info.model", ("info", "monitor_model"): "info.model",
                ("info", "extra_model"): "info.model", ("nbd", "wire"): "io"}
# Front ends are siblings: none may import another.
SIBLINGS = {"cli": {"monitor", "daemon", "nbd"}, "monitor": {"cli"}, "nbd": {"cli", "monitor"}}

# Function-level imports allowed to reach up: (importing file, imported module).  Keep this short.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "vdkit" or len(parts) < 2:
        return None
    low = _LOW_MODULES.get((parts[1], parts[2] if len(parts) > 2 else ""))
    return low if low is not None else parts[1]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.Module, package: str) -> list[tuple[str, bool]]:
    """Every run-time import as ``(module, at module level)``; relative imports made absolute."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue  # typing-only imports cost nothing at run time
            if isinstance(child, ast.Import):
                out.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                out.append((name, top))
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(tree, True)
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path: Path) -> None:
    rel = path.relative_to(PKG)
    dotted = "vdkit." + ".".join(rel.with_suffix("").parts)
    own = _layer(dotted) or ""
    if own not in LAYERS:
        return  # vdkit/__init__.py: the public facade may import anything lazily
    package = dotted if path.name == "__init__.py" else dotted.rsplit(".", 1)[0]
    bad: list[str] = []
    for imported, top in _imports(ast.parse(path.read_text()), package):
        layer = _layer(imported)
        if layer is None or layer == own or layer not in LAYERS:
            continue
        where = "" if top else " inside a function"
        if not top and any(str(rel) == f and (imported == m or imported.startswith(m + "."))
                           for f, m in ALLOWED_UPWARD):
            continue
        if LAYERS.index(layer) > LAYERS.index(own):
            bad.append(f"{rel} imports {imported}{where} (upward)")
        elif layer in SIBLINGS.get(own, set()):
            bad.append(f"{rel} imports sibling front end {imported}{where}")
    assert not bad, "\n".join(bad)


def test_allow_list_is_used() -> None:
    """Every allowed upward import still exists (a stale entry would hide a new one)."""
    for file, module in ALLOWED_UPWARD:
        imported = [m for m, _ in _imports(ast.parse((PKG / file).read_text()), "")]
        assert any(m == module or m.startswith(module + ".") for m in imported), (file, module)


@pytest.mark.parametrize("package", ["devices", "monitor", "nbd"])
def test_no_asyncio_below_the_daemon(package: str) -> None:
    """The machine, the command handlers and the NBD core are sans-I/O: only ``daemon/`` runs an event loop."""
    for path in sorted((PKG / package).rglob("*.py")):
        dotted = "vdkit." + ".".join(path.relative_to(PKG).with_suffix("").parts)
        names = [m for m, _ in _imports(ast.parse(path.read_text()), dotted.rsplit(".", 1)[0])]
        assert not [m for m in names if m.split(".")[0] == "asyncio"], f"{path.relative_to(PKG)} imports asyncio"


def test_qcow2_is_imported_only_through_the_registry() -> None:
    """No module outside ``vdkit/formats/qcow2/`` imports it at run time (issue 10): front ends, engines and
    the monitor reach qcow2 through the format registry and the driver table's slots."""
    bad = []
    for path in _modules():
        rel = path.relative_to(PKG)
        if rel.parts[:2] == ("formats", "qcow2"):
            continue
        dotted = "vdkit." + ".".join(rel.with_suffix("").parts)
        package = dotted if path.name == "__init__.py" else dotted.rsplit(".", 1)[0]
        for imported, _ in _imports(ast.parse(path.read_text()), package):
            if imported == "vdkit.formats.qcow2" or imported.startswith("vdkit.formats.qcow2."):
                bad.append(f"{rel} imports {imported}")
    assert not bad, "\n".join(bad)


# Where a registered format or protocol name may appear in a comparison: its own module or folder and the
# registries.  Elsewhere only QEMU's user-facing names that are not the driver's (here: block-export-add's
# export type, which the NBD export service answers to).
_NAME_HOMES = ("formats/registry.py", "formats/raw.py", "formats/nbd.py", "formats/http.py", "formats/rbd.py")
_NAME_ALLOWED = {("monitor/nbd_cmds.py", "nbd")}


def _compared_names(tree: ast.Module, names: set[str]) -> list[tuple[int, str]]:
    """String constants among ``names`` on either side of a comparison (``==``, ``!=``, ``in (...)``) or
    given to ``startswith``/``endswith``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        sides: list[ast.expr] = []
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith")):
            sides = list(node.args)
        for side in sides:
            elts = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            elts = [x for e in elts for x in ((e.body, e.orelse) if isinstance(e, ast.IfExp) else (e,))]
            for e in elts:
                if isinstance(e, ast.Constant) and isinstance(e.value, str) and e.value.rstrip(":/") in names:
                    out.append((node.lineno, e.value))
    return out


def test_no_format_or_protocol_names_compared_outside_their_modules() -> None:
    """Issue 10: front ends, engines and the monitor ask the registries and the driver slots what a format
    or protocol can do; none compares its name (``fmt == "qcow2"``, ``proto in ("nbd", ...)``)."""
    from vdkit.formats.registry import FORMATS
    from vdkit.protocols.registry import PREFIXES, PROTOCOLS

    names = set(FORMATS) | set(PROTOCOLS) | set(PREFIXES)
    bad = []
    for path in _modules():
        rel = path.relative_to(PKG).as_posix()
        if rel.startswith("protocols/") or (rel.startswith("formats/") and rel.count("/") == 2) or rel in _NAME_HOMES:
            continue
        for line, name in _compared_names(ast.parse(path.read_text()), names):
            if (rel, name) not in _NAME_ALLOWED:
                bad.append(f"{rel}:{line} compares {name!r}")
    assert not bad, "\n".join(bad)
