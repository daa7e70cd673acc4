"""External snapshots: ``blockdev-snapshot-sync``, ``blockdev-snapshot`` and their transaction actions.

Each action is *prepared* (checked, file created, overlay opened and put on
top) and returns an undo function; ``transaction`` prepares actions in order
and, when one fails, undoes the prepared ones in reverse order, so the graph
is as before (a file already created stays on disk, as in QEMU).  Checks and
texts follow ``block-jobs.md`` §2 and what ``qemu-system-x86_64`` 7.2
answers (``tests/daemon/test_external_snapshot_diff.py``).

The new overlay of ``blockdev-snapshot-sync`` (mode ``absolute-paths``) is
created as ``qemu-img create -f FMT -b OLD -F OLDFMT FILE SIZE``, where OLD
is the old active node's filename as the daemon knows it (relative stays
relative, ``json:`` is written verbatim) and SIZE its virtual size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vdkit.devices.graph import describe_node, json_filename
from vdkit.errors import VdkitError
from vdkit.monitor.commands import Arg, opt

if TYPE_CHECKING:
    from vdkit.block.node import Node
    from vdkit.devices.graph import GraphNode
    from vdkit.devices.registry import DeviceRegistry, Drive
    from vdkit.monitor.commands import CommandContext

Undo = Callable[[], None]

SYNC_SCHEMA = (opt("device"), opt("node-name"), Arg("snapshot-file"), opt("snapshot-node-name"), opt("format"),
               opt("mode", enum=("existing", "absolute-paths"), enum_label="mode"))
SNAPSHOT_SCHEMA = (Arg("node"), Arg("overlay"))


def _name_in_use(machine: DeviceRegistry, name: str) -> bool:
    return machine.find_drive(name) is not None or name in machine.all_node_names()


def _lookup(machine: DeviceRegistry, device: str | None,
            node_name: str | None) -> tuple[Drive | None, GraphNode | None]:
    """QEMU's bdrv_lookup_bs: a backend name first, then a node name; (drive, None) or (None, graph node)."""
    if device is not None:
        drive = machine.find_drive(device)
        if drive is not None:
            if drive.medium is None or drive.medium.dead:
                raise VdkitError(f"Device '{device}' has no medium")
            return drive, None
    if node_name is not None:
        for drive in machine.drives:
            m = drive.medium
            if m is None:
                continue
            for i, (fmt_name, _file_name) in enumerate(m.names):
                if fmt_name == node_name:
                    if i:  # a backing node: its parent blocks snapshots of it
                        raise VdkitError(f"Node '{node_name}' is busy: node is used as backing hd of "
                                         f"'{m.names[i - 1][0]}'")
                    return drive, None
        g = machine.graph.find(node_name)
        if g is not None:
            return None, g
    raise VdkitError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


def _check_new_name(machine: DeviceRegistry, name: str) -> None:
    from vdkit.monitor.graph_cmds import check_node_name

    check_node_name(machine, name)


def _create_overlay(path: str, fmt: str, backing: str, backing_fmt: str, size: int) -> None:
    from vdkit.formats.registry import FORMATS, format_module, is_known
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, with_file_options

    if not is_known(fmt):
        raise VdkitError(f"Unknown file format '{fmt}'")
    if fmt not in FORMATS or not hasattr(format_module(fmt), "create_image"):
        raise VdkitError(f"Creating '{fmt}' overlays is not supported by vdkit")
    mod = format_module(fmt)
    opts = CreateOpts(with_file_options(mod.create_options()))
    if "backing_file" not in opts.by_name:
        raise VdkitError(f"Backing file not supported for file format '{fmt}'")
    if backing == path:
        raise VdkitError("Error: Trying to create an image with the same filename as the backing file")
    opts.set("backing_file", backing)
    opts.set("backing_fmt", backing_fmt)
    opts.set_number("size", size)
    if path.startswith("json:"):  # options name no file to create (QEMU looks for a protocol 'json')
        raise VdkitError("Unknown protocol 'json'")
    try:  # an image this daemon (or anyone) holds is refused before it is overwritten, as QEMU does
        ImageFile(path, readonly=False).close()
    except VdkitError as exc:
        if exc.errno != 2:  # ENOENT: a new file
            raise
    mod.create_image(path, opts)


def _open_overlay(path: str, fmt: str | None, ro: bool) -> Node:
    from vdkit.block.node import open_image
    from vdkit.monitor.block_cmds import open_error

    try:
        if path.startswith("json:"):  # an existing overlay given by options, as -drive file=json:{...} takes them
            from vdkit.devices.option_media import open_json_image

            return open_json_image(path, fmt, readonly=ro, backing=False)
        return open_image(path, fmt, readonly=ro, backing=False)
    except VdkitError as exc:
        raise open_error(exc) from exc


def prepare_sync(ctx: CommandContext, args: dict[str, Any]) -> Undo:
    """``blockdev-snapshot-sync``: checks in QEMU's order, create (or open) the overlay, put it on top."""
    machine = ctx.machine
    device, node_name = args.get("device"), args.get("node-name")
    drive, graph_node = _lookup(machine, device, node_name)
    if drive is not None:
        from vdkit.monitor.job_cmds import check_root_busy

        check_root_busy(machine, drive, drain=True)
    new_name = args.get("snapshot-node-name")
    if node_name is not None and new_name is None:
        raise VdkitError("New overlay node-name missing")
    if new_name is not None and _name_in_use(machine, new_name):
        raise VdkitError("New overlay node-name already in use")
    fmt = args.get("format", "qcow2")
    path = args["snapshot-file"]
    existing = args.get("mode", "absolute-paths") == "existing"
    if drive is not None:
        assert drive.medium is not None
        old, ro = drive.medium.node, drive.medium.ro
    else:
        assert graph_node is not None
        if graph_node.node is None:
            raise VdkitError("Snapshots of protocol nodes are not supported by vdkit")
        old, ro = graph_node.node, graph_node.ro
    if not existing:
        _create_overlay(path, fmt, old.filename, old.format, old.size)
    overlay = _open_overlay(path, args.get("format") if existing else fmt, ro)
    try:
        if new_name is not None:
            _check_new_name(machine, new_name)
        if "backing_file" not in _create_option_names(overlay.format):
            raise VdkitError("The overlay does not support backing images")
    except BaseException:
        overlay.close()
        raise
    if drive is not None and drive.medium is not None and drive.medium.overlay_path is not None and not existing:
        # a snapshot=on drive: the new overlay inherits the temporary flag and is unlinked once open,
        # as QEMU does (an existing file given with mode existing is left alone: vdkit's choice)
        import os

        try:
            os.unlink(path)
        except OSError:
            pass
    if drive is None:
        assert graph_node is not None
        overlay.close()
        if _exported(machine, graph_node):
            assert new_name is not None  # node-name given: snapshot-node-name was required
            return _attach_to_export(machine, graph_node, path, overlay.format, new_name)
        # a parentless monitor-owned node: QEMU creates the overlay but keeps no node for it (§2.1.4);
        # the old node was still made read-only
        was_ro = graph_node.ro
        _set_graph_ro(graph_node, True)
        return lambda: _set_graph_ro(graph_node, was_ro)
    return _attach_to_drive(machine, drive, overlay, new_name)


def _exported(machine: DeviceRegistry, g: GraphNode) -> bool:
    """An NBD export's backend holds ``g`` (QEMU: the node has a BlockBackend parent)."""
    svc = machine.exports
    return svc is not None and g.backend is not None and any(e.node_name == g.name for e in svc.list_exports())


def _attach_to_export(machine: DeviceRegistry, g: GraphNode, path: str, fmt: str, name: str) -> Undo:
    """The overlay of an exported -blockdev node: a graph node over ``g`` (read-only now) that the
    export's backend moves onto, as QEMU's BlockBackend does; the export follows it."""
    from vdkit.devices.graph import delete_node, open_file_node, open_format_node

    was_ro = g.ro
    child = open_file_node(machine, {"filename": path}, name=None, ro=g.ro, auto_ro=False, cache=g.cache,
                           implicit=True)
    try:
        ovl = open_format_node(machine, fmt, child, name=name, ro=g.ro, cache=g.cache, detect_zeroes="off",
                               discard="ignore", auto_ro=False, implicit=True, backing=g)
    except BaseException:
        delete_node(machine, child)
        raise
    _set_graph_ro(g, True)
    moved = _move_backend(machine, g, ovl)

    def undo() -> None:
        moved()
        delete_node(machine, ovl)
        _set_graph_ro(g, was_ro)

    return undo


def _move_backend(machine: DeviceRegistry, g: GraphNode, ovl: GraphNode) -> Callable[[], None]:
    """Put the NBD exports' backend of ``g`` (if it is exported) on ``ovl``, as QEMU moves a
    BlockBackend to the overlay; the undo puts it back."""
    backend = g.backend
    if backend is None or backend.medium is None or not _exported(machine, g):
        return lambda: None
    medium = backend.medium
    assert ovl.node is not None and ovl.child is not None
    before = (medium.node, medium.names, medium.serials, medium.ro)
    medium.node, medium.names = ovl.node, [(ovl.name, ovl.child.name)]
    medium.serials, medium.ro = [(ovl.serial, ovl.child.serial)], ovl.ro
    g.backend, ovl.backend = None, backend
    _relock(machine, g, ovl)

    def undo() -> None:
        medium.node, medium.names, medium.serials, medium.ro = before
        g.backend, ovl.backend = backend, None
        _relock(machine, g, ovl)

    return undo


def _relock(machine: DeviceRegistry, *nodes: GraphNode) -> None:
    """The export's needs moved with it: the files' lock bytes follow."""
    from vdkit.devices.graph import lock_file_node

    for n in nodes:
        if n.child is not None:
            lock_file_node(machine, n.child)


def _create_option_names(fmt: str) -> set[str]:
    from vdkit.formats.registry import FORMATS, format_module

    if fmt not in FORMATS or not hasattr(format_module(fmt), "create_options"):
        return set()
    return {d.name for d in format_module(fmt).create_options()}


def _attach_to_drive(machine: DeviceRegistry, drive: Drive, overlay: Node, new_name: str | None) -> Undo:
    medium = drive.medium
    assert medium is not None
    old = medium.node
    stored = overlay.driver.backing_file
    if stored != old.filename:  # the header does not name the node below: QEMU's json: filename
        overlay.filename = json_filename(overlay, describe_node(old))
    (fmt_name, file_name), serials = machine.name_new_node(new_name)
    machine.push_overlay(medium, overlay, (fmt_name, file_name), serials)

    def undo() -> None:
        node = machine.pop_overlay(medium)
        machine.release_name(fmt_name)
        machine.release_name(file_name)
        node.close()

    return undo


def prepare_snapshot(ctx: CommandContext, args: dict[str, Any]) -> Undo:
    """``blockdev-snapshot``: an overlay from ``blockdev-add`` (no backing opened) goes on top of ``node``."""
    from vdkit.devices.graph import _BorrowedFile, refresh_filename

    machine = ctx.machine
    node_arg, ovl_arg = args["node"], args["overlay"]
    drive, target = _lookup(machine, node_arg, node_arg)
    ovl_drive, ovl = _lookup(machine, ovl_arg, ovl_arg)
    if drive is not None:
        from vdkit.monitor.job_cmds import check_root_busy

        check_root_busy(machine, drive, drain=True)
    if ovl_drive is not None or ovl is None or machine.graph.parents_of(ovl):
        raise VdkitError("The overlay is already in use")
    if target is not None:
        for p, role in machine.graph.parents_of(target):
            if role == "backing":
                raise VdkitError(f"Node '{target.name}' is busy: node is used as backing hd of '{p.name}'")
    if ovl.backing is not None:
        raise VdkitError("The overlay already has a backing image")
    if ovl.node is None or "backing_file" not in _create_option_names(ovl.driver):
        raise VdkitError("The overlay does not support backing images")
    if target is not None:  # both in the graph: only the links change
        if target is ovl:
            raise VdkitError("The overlay is already in use")
        ovl.backing, ovl.backing_override = target, True
        ovl.node.backing = target.node
        refresh_filename(ovl)
        was_ro = target.ro
        _set_graph_ro(target, True)  # the old active node becomes read-only (§1.3)
        moved = _move_backend(machine, target, ovl)

        def undo_graph() -> None:
            moved()
            ovl.backing, ovl.backing_override = None, False
            assert ovl.node is not None
            ovl.node.backing = None
            refresh_filename(ovl)
            _set_graph_ro(target, was_ro)

        return undo_graph
    assert drive is not None and drive.medium is not None
    child = ovl.child
    if child is None or not child.implicit or ovl.node.readonly != drive.medium.ro and not drive.medium.ro:
        raise VdkitError("An overlay whose file node is shared is not supported by vdkit")
    medium = drive.medium
    old = medium.node
    node = ovl.node
    node.filename = json_filename(node, describe_node(old)) if node.driver.backing_file != old.filename \
        else node.filename
    borrowed = node.driver.file
    machine.graph.nodes.remove(ovl)
    machine.graph.nodes.remove(child)
    if isinstance(borrowed, _BorrowedFile):
        borrowed.owns = True  # the drive's medium closes the file from now on
    machine.push_overlay(medium, node, (ovl.name, child.name), (ovl.serial, child.serial))
    machine.monitor_owned.add(ovl.name)

    def undo() -> None:
        machine.pop_overlay(medium)
        machine.monitor_owned.discard(ovl.name)
        if isinstance(borrowed, _BorrowedFile):
            borrowed.owns = False
        machine.graph.nodes.extend([child, ovl])
        machine.graph.nodes.sort(key=lambda g: g.serial)
        refresh_filename(ovl)

    return undo


def _set_graph_ro(g: GraphNode, ro: bool) -> None:
    from vdkit.devices.graph import set_node_readonly

    g.ro = ro
    if g.child is not None and g.child.implicit:  # reopened with its parent (it inherits the option)
        g.child.ro = ro
    if g.node is not None:
        set_node_readonly(g.node, ro)


def blockdev_snapshot_sync(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.machine.jobs.drain()  # a one-action transaction in QEMU: it drains first
    prepare_sync(ctx, args)


def blockdev_snapshot(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.machine.jobs.drain()
    prepare_snapshot(ctx, args)
