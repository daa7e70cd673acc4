"""Media given by node options (a ``json:{...}`` name, or a -drive's dotted keys), as QEMU opens and names them.

The daemon's ``-drive file=json:{...}`` (and its option-given drives) and the
monitor's ``blockdev-change-medium``/``change`` with a ``json:`` name share
these steps: the options go through the one ``--image-opts``/``json:``
interpreter (:func:`vdkit.block.image_opts.image_opts`, as ``vdkit-img`` and
``vdkit.open`` take them) in an open scope of the medium's own, which sees the
process's secrets and TLS objects but keeps the medium's ``backing`` member or
NBD address from any other open of the same file; the protocol node the
options name gets ``-drive``'s auto-read-only; the opened nodes are named as
QEMU names them (plain, by their options, or ``json:{"backing": ...}`` where the
options replaced a backing).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.node import Node
    from vdkit.block.secrets import OpenScope
    from vdkit.devices.registry import DeviceRegistry, Medium


def options_scope(warn: Callable[[str], None] | None) -> OpenScope:
    """A fresh open scope holding the process scope's secrets, objects, options and presets (copies), and
    ``warn`` for the interpreter's warnings."""
    from vdkit.block.secrets import PROCESS, OpenScope

    scope = OpenScope(PROCESS.secrets)
    scope.options = dict(PROCESS.options)
    scope.tables = {kind: dict(table) for kind, table in PROCESS.tables.items()}
    scope.warn = warn
    return scope


def interpret(name: str, options: dict[str, object]) -> tuple[str, str | None, bool]:
    """``options`` (flattened; ``name`` is how the user spelled them) in the current scope: (file name,
    format or None to probe, whether the node is a read-only protocol's own: curl at the top).  Errors are
    QEMU's texts without qemu-img's ``Could not open '<name>': `` prefix, as qemu-system reports them."""
    from vdkit.block.image_opts import image_opts
    from vdkit.errors import VdkitError

    try:
        filename, fmt = image_opts(name, dict(options))
    except VdkitError as exc:
        err = exc.prefixed("")
        err.message = exc.message.removeprefix(f"Could not open '{name}': ")
        err.args = (err.message,)
        raise err from None
    from vdkit.block.chain import protocol_of
    from vdkit.block.secrets import open_option
    from vdkit.protocols.registry import driver_for_prefix, is_protocol, protocol_module

    # (a file name given as an option is a local file, whatever its colons: the interpreter says so)
    proto = driver_for_prefix(protocol_of(filename)) if open_option(filename, "protocol") != "file" else None
    read_only = False
    if proto is not None:  # -drive sets auto-read-only on a protocol node, top or file
        mod = protocol_module(proto)
        auto_ro = getattr(mod, "AUTO_READ_ONLY", None)
        if auto_ro is not None:
            auto_ro.add(filename)
        read_only = is_protocol(fmt) and bool(getattr(mod, "READ_ONLY", False))
    return filename, fmt, read_only


def name_nodes(medium: Medium | Node, options: dict[str, object]) -> None:
    """Name a medium opened from ``options`` as QEMU does: by the options where they say what a plain name
    cannot (a raw window is named so by the interpreter already; an http cookie: the curl node keeps
    its own json: name too), and ``json:{"backing": ..., ...}`` for a layer whose backing the options
    replaced (:func:`vdkit.block.image_opts.name_replaced_backings`).  The monitor reports
    ``Node.filename`` (and the info collector a ``display_name`` first: it is cleared, so that a job
    that renames the node later is not contradicted)."""
    import json

    from vdkit.block.image_opts import image_opts_name, name_replaced_backings
    from vdkit.block.node import Node

    node = medium if isinstance(medium, Node) else medium.node
    own = image_opts_name("json:" + json.dumps(options))
    if own is not None and not node.filename.startswith("json:"):
        node.display_name = own
        below = json.loads(own[len("json:"):]).get("file")
        if isinstance(below, dict) and hasattr(node.driver.file, "json_filename"):  # curl's node: its own
            from vdkit.info.render_json import dumps_compact

            node.driver.file.json_filename = "json:" + dumps_compact(below)
    renamed = name_replaced_backings(node, options)
    for layer in [node, *renamed]:
        if layer.display_name is not None:  # the name moves to filename: jobs that change the chain rename it
            layer.filename, layer.display_name = layer.display_name, None


def open_json_medium(machine: DeviceRegistry, name: str, fmt: str | None, *, readonly: bool) -> Medium:
    """A ``json:{...}`` name as a new medium (``blockdev-change-medium``): ``fmt`` is the driver, over the
    name's; errors are QEMU's texts (the JSON grammar's, the interpreter's, the open's)."""
    from vdkit.block import json_name

    options = json_name.parse(name)
    if fmt is not None:
        options["driver"] = fmt
    with options_scope(None):
        filename, driver, top_ro = interpret(name, options)
        medium = machine.open_medium(filename, driver, readonly=readonly or top_ro)
        try:
            name_nodes(medium, options)
        except BaseException:
            machine.close_medium(medium)
            raise
    return medium


def open_json_image(name: str, fmt: str | None, *, readonly: bool, backing: bool) -> Node:
    """A ``json:{...}`` name as a job's target node (``drive-mirror``/``drive-backup`` ``mode: existing``, an
    existing overlay): ``fmt`` is the driver, over the name's; named as QEMU names it when its backing
    is opened."""
    from vdkit.block import json_name
    from vdkit.block.node import open_image

    options = json_name.parse(name)
    if fmt is not None:
        options["driver"] = fmt
    with options_scope(None):
        filename, driver, top_ro = interpret(name, options)
        node = open_image(filename, driver, readonly=readonly or top_ro, backing=backing)
        if backing:
            try:
                name_nodes(node, options)
            except BaseException:
                node.close()
                raise
    return node
