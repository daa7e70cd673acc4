"""NBD export QMP commands: ``nbd-server-start``/``-add``/``-remove``/``-stop``, ``block-export-add``/``-del``,
``query-block-exports``.

The handlers run like every command (worker thread, device lock held).
They check arguments and resolve drives here, in QEMU 7.2's order and with
its texts (``SocketAddressLegacy`` with its ``data`` wrapper, exports listed
newest first), and leave sockets and client connections to the machine's
export service (:class:`vdkit.devices.exports.ExportService`, implemented by
the daemon's NBD listener).  A removed export raises ``BLOCK_EXPORT_DELETED``
before the answer, or after it when clients were still connected (QEMU
deletes a busy export only once they are gone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vdkit.devices.exports import Address, ExportService, RemovedExport
from vdkit.errors import VdkitError
from vdkit.monitor.commands import Arg, CommandContext, CommandRegistry, Handler, opt, validate
from vdkit.opts import id_wellformed

if TYPE_CHECKING:
    from vdkit.block.dirty_bitmap import DirtyBitmap
    from vdkit.devices.graph import GraphNode
    from vdkit.devices.registry import Drive, Medium



def _service(ctx: CommandContext) -> ExportService:
    svc = ctx.machine.exports
    if svc is None:
        raise VdkitError("NBD server not available")  # the registry runs outside a daemon (unit tests)
    return svc


def emit_removed(ctx: CommandContext, removed: list[RemovedExport]) -> None:
    """``BLOCK_EXPORT_DELETED`` for each removed export: now, or after the answer if it had clients."""
    for r in removed:
        event = ("BLOCK_EXPORT_DELETED", {"id": r.id})
        if r.busy:
            ctx.late_events.append(event)
        else:
            ctx.emit(*event)


def medium_removed(ctx: CommandContext, drive: Drive, old: Medium) -> None:
    """A drive's medium was ejected or replaced: remove the nbd-server-add exports that named it."""
    svc = ctx.machine.exports
    if svc is not None:
        emit_removed(ctx, svc.remove_for_medium(drive.id, old))


def nbd_server_start(ctx: CommandContext, args: dict[str, Any]) -> None:
    svc = _service(ctx)
    if svc.running:
        raise VdkitError("NBD server already running")
    if "tls-creds" in args:
        raise VdkitError(f"No TLS credentials with id '{args['tls-creds']}'")
    svc.start(Address.from_qapi(args["addr"]))


def _resolve(ctx: CommandContext, device: str | None, node_name: str | None) -> tuple[Medium, Drive]:
    """QEMU's ``bdrv_lookup_bs``: a drive id (with a medium) or a top node name."""
    machine = ctx.machine
    if device is not None:
        d = machine.find_drive(device)
        if d is not None:
            if d.medium is None:
                raise VdkitError(f"Device '{device}' has no medium")
            return d.medium, d
    if node_name is not None:
        for d in machine.drives:
            if d.medium is not None and d.medium.node_name == node_name:
                return d.medium, d
        g = machine.graph.find(node_name)
        if g is not None:
            return _graph_backend(g)
    raise VdkitError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


def _unlisted(ctx: CommandContext, drive: Drive) -> Drive | None:
    """The backend of a -blockdev node's export (no listed drive)."""
    return None if any(d is drive for d in ctx.machine.drives) else drive


def _graph_backend(g: GraphNode) -> tuple[Medium, Drive]:
    """A ``-blockdev`` node exported: QEMU puts an unnamed BlockBackend on it; vdkit a drive no one lists
    (its medium is the node, for the export's I/O and statistics), made once per node."""
    from vdkit.devices.registry import Drive, DriveSpec, Medium

    if g.node is None or g.child is None:
        raise VdkitError(f"Exporting the protocol node '{g.name}' is not supported by vdkit")
    if g.backend is None or g.backend.medium is None or g.backend.medium.node is not g.node:
        medium = Medium(node=g.node, names=[(g.name, g.child.name)], ro=g.ro,
                        serials=[(g.serial, g.child.serial)])
        g.backend = Drive(DriveSpec(id=""), medium=medium)
    assert g.backend.medium is not None
    g.backend.medium.ro = g.ro
    return g.backend.medium, g.backend


def _check_id(svc: ExportService, id: str) -> None:
    if not id_wellformed(id):
        raise VdkitError("Invalid block export id")
    if any(e.id == id for e in svc.list_exports()):
        raise VdkitError(f"Block export id '{id}' is already in use")


def _export_bitmaps(medium: Medium, names: list[str], writable: bool) -> list[DirtyBitmap]:
    """The bitmaps an export serves, each the first of its name down the node's backing chain.

    As QEMU 7.2: a recording bitmap of a writable node under a read-only export is refused (its
    clients would see a bitmap change under an export that promises nothing changes), then a busy
    or inconsistent one.  Names may repeat (each is served)."""
    from vdkit.block.dirty_bitmap import CHECK_ALLOW_RO

    out = []
    for name in names:
        found = next(((n, b) for n in medium.node.chain() if (b := n.find_bitmap(name)) is not None), None)
        if found is None:
            raise VdkitError(f"Bitmap '{name}' is not found")
        node, bm = found
        if not writable and bm.enabled and not (medium.ro if node is medium.node else node.readonly):
            raise VdkitError(f"Enabled bitmap '{name}' incompatible with readonly export")
        bm.check(CHECK_ALLOW_RO)
        out.append(bm)
    return out


def nbd_server_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    svc = _service(ctx)
    device = args["device"]
    name = args.get("name", device)
    medium, drive = _resolve(ctx, device, device)  # QEMU looks the device up before the server
    if not svc.running:
        raise VdkitError("NBD server not running")
    # nbd-server-add downgrades a writable export of a read-only node, silently (QEMU 7.2)
    writable = bool(args.get("writable", False)) and not medium.ro
    on_eject = drive.id if ctx.machine.find_drive(device) is drive else None
    _check_id(svc, name)
    svc.check_name(name, args.get("description", ""))
    bitmaps = _export_bitmaps(medium, [args["bitmap"]] if "bitmap" in args else [], writable)
    svc.add(id=name, medium=medium, name=name, writable=writable, description=args.get("description", ""),
            on_eject_drive=on_eject, backend=_unlisted(ctx, drive), bitmaps=bitmaps)
    _relock(ctx, name)


def block_export_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    svc = _service(ctx)
    if args["type"] != "nbd":
        raise VdkitError(f"Export type '{args['type']}' is not supported by vdkit-daemon")
    _check_id(svc, args["id"])
    medium, drive = _resolve(ctx, None, args["node-name"])
    writable = bool(args.get("writable", False))
    if not svc.running:
        raise VdkitError("NBD server not running")
    if writable and medium.ro:
        raise VdkitError("Cannot export read-only node as writable")
    name = args.get("name", args["node-name"])
    svc.check_name(name, args.get("description", ""))
    bitmaps = _export_bitmaps(medium, args.get("bitmaps", []), writable)
    svc.add(id=args["id"], medium=medium, name=name, writable=writable,
            description=args.get("description", ""), backend=_unlisted(ctx, drive), bitmaps=bitmaps,
            allocation_depth=bool(args.get("allocation-depth", False)))
    _relock(ctx, args["id"])


def nbd_server_remove(ctx: CommandContext, args: dict[str, Any]) -> None:
    emit_removed(ctx, [_service(ctx).remove(args["name"], args.get("mode", "safe"))])
    _drop_unused_overlays(ctx)


def block_export_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    emit_removed(ctx, [_service(ctx).remove(args["id"], args.get("mode", "safe"))])
    _drop_unused_overlays(ctx)


def nbd_server_stop(ctx: CommandContext, args: dict[str, Any]) -> None:
    emit_removed(ctx, _service(ctx).stop())
    _drop_unused_overlays(ctx)


def _drop_unused_overlays(ctx: CommandContext) -> None:
    """An overlay an external snapshot put under an export's backend is owned by that backend alone:
    once no export uses it (and no node), it goes, as QEMU frees it with its BlockBackend."""
    from vdkit.devices.graph import delete_node

    machine = ctx.machine
    svc = machine.exports
    used = {e.node_name for e in svc.list_exports()} if svc is not None else set()
    for g in list(machine.graph.nodes):
        if g.implicit and g.backend is not None and g.name not in used and not machine.graph.parents_of(g):
            delete_node(machine, g)
    _relock(ctx)


def _relock(ctx: CommandContext, added: str | None = None) -> None:
    """An export's backend is a user of its node: the lock bytes of exported graph nodes' files follow
    (a raw node passes the export's needs down: QEMU's unshared resize).  An export ``added`` whose
    bytes another process refuses is taken back (QEMU creates none)."""
    from vdkit.devices.graph import lock_file_node

    try:
        for g in ctx.machine.graph.nodes:
            if g.backend is not None and g.child is not None:
                lock_file_node(ctx.machine, g.child)
    except VdkitError:
        if added is None:
            raise
        _service(ctx).remove(added, "hard")
        _relock(ctx)
        raise


def query_block_exports(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    svc = ctx.machine.exports
    if svc is None:
        return []
    # a job's filter above the exported node took the export's backend over (QEMU inserts it under every
    # parent): the export names the filter while the job lives
    filters = {id(f.below): f.name for f in ctx.machine.jobs.filters()}
    return [{"type": "nbd", "id": e.id, "node-name": filters.get(id(e.node), e.node_name), "shutting-down": False}
            for e in reversed(svc.list_exports())]


def _with_addr_branch(fn: Handler, unix: Arg, inet: Arg) -> Handler:
    """Validate ``addr.data`` against the branch ``addr.type`` selects, as QEMU's union visitor does."""

    def handler(ctx: CommandContext, args: dict[str, Any]) -> None:
        a = args["addr"]
        branch = {"unix": unix, "inet": inet}.get(a["type"])
        if branch is None:
            raise VdkitError(f"Socket address type '{a['type']}' is not supported by vdkit-daemon")
        data = validate(branch.members or (), a["data"], prefix="addr.data.")
        fn(ctx, {**args, "addr": {"type": a["type"], "data": data}})

    return handler


def register(reg: CommandRegistry) -> None:
    r = reg.register
    unix = Arg("data", "object", members=(Arg("path"), opt("abstract", "bool"), opt("tight", "bool")))
    inet = Arg("data", "object", members=(
        Arg("host"), Arg("port"), opt("numeric", "bool"), opt("to", "int"), opt("ipv4", "bool"),
        opt("ipv6", "bool"), opt("keep-alive", "bool"), opt("mptcp", "bool")))
    # SocketAddressLegacy: a union on 'type'; the branch decides the 'data' schema (checked in _with_addr_branch)
    addr = Arg("addr", "object", members=(Arg("type", enum=("inet", "unix", "vsock", "fd"), enum_label="type"),
                                          Arg("data", "object")))
    r("nbd-server-start", addr, opt("tls-creds"), opt("tls-authz"), opt("max-connections", "int"))(
        _with_addr_branch(nbd_server_start, unix, inet))
    r("nbd-server-add", Arg("device"), opt("name"), opt("description"), opt("writable", "bool"),
      opt("bitmap"))(nbd_server_add)
    mode = opt("mode", enum=("safe", "hard"))
    r("nbd-server-remove", Arg("name"), mode)(nbd_server_remove)
    r("nbd-server-stop")(nbd_server_stop)
    r("block-export-add", Arg("type", enum=("nbd", "vhost-user-blk", "fuse", "vduse-blk")), Arg("id"),
      opt("fixed-iothread", "bool"), opt("iothread"), Arg("node-name"), opt("writable", "bool"),
      opt("writethrough", "bool"), opt("name"), opt("description"), opt("bitmaps", "array", items=Arg("bitmaps")),
      opt("allocation-depth", "bool"))(block_export_add)
    r("block-export-del", Arg("id"), mode)(block_export_del)
    r("query-block-exports")(query_block_exports)
