"""The node graph from the monitor: ``blockdev-add``, ``blockdev-del``, ``block_resize``.

Options are checked as QEMU's QAPI visitor checks ``BlockdevOptions`` (the
whole tree, inline children included, before anything is opened), then the
node-name rules, then the nodes are opened children first.  The model lives
in :mod:`vdkit.devices.graph`; ``-blockdev`` on the command line goes
through :func:`add_node` too.  Texts are QEMU 7.2's, captured from
``qemu-system-x86_64`` (``tests/daemon/test_graph_diff.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vdkit.devices.graph import (
    GraphNode,
    check_file_parents,
    child_perms,
    delete_node,
    open_file_node,
    open_format_node,
    open_protocol_node,
)
from vdkit.errors import VdkitError
from vdkit.formats.registry import PASSES_PERMISSIONS, is_known
from vdkit.info.model import BlockdevCacheInfo
from vdkit.monitor.commands import Arg, CommandContext, CommandRegistry, opt, validate
from vdkit.opts import dotted_parent, id_wellformed, parse_bool
from vdkit.protocols import blkdebug
from vdkit.protocols.registry import is_protocol

if TYPE_CHECKING:
    from vdkit.block.node import Node
    from vdkit.devices.registry import DeviceRegistry
    from vdkit.io.file import ImageFile

# QAPI BlockdevDriver (7.2): every value is accepted by the schema; vdkit opens the ones it has
QEMU_DRIVERS = (
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
    "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps", "gluster", "host_cdrom", "host_device",
    "http", "https", "iscsi", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate",
    "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk",
    "vpc", "vvfat",
)

_BASE = (
    Arg("driver", enum=QEMU_DRIVERS), opt("node-name"), opt("discard", enum=("ignore", "unmap")),
    opt("cache", "object", members=(opt("direct", "bool"), opt("no-flush", "bool"))),
    opt("read-only", "bool"), opt("auto-read-only", "bool"), opt("force-share", "bool"),
    opt("detect-zeroes", enum=("off", "on", "unmap")),
)
_BLKDEBUG_EVENTS, _BLKDEBUG_IOTYPES = blkdebug.EVENTS, blkdebug.IOTYPES
_PERMS = ("consistent-read", "write", "write-unchanged", "resize")  # QAPI BlockPermission

_VARIANTS: dict[str, tuple[Arg, ...]] = {
    "file": (Arg("filename"), opt("pr-manager"), opt("locking", enum=("off", "on", "auto")),
             opt("aio", enum=("threads", "native", "io_uring")), opt("aio-max-batch", "int"),
             opt("drop-cache", "bool"), opt("x-check-cache-dropped", "bool")),
    "raw": (Arg("file", "any"), opt("offset", "int"), opt("size", "int")),
    # QAPI BlockdevOptionsCurlHttp(s) (7.2); the secrets, username and proxy members are refused
    # when opened (vdkit.protocols.http has no authentication but a URL's user:password)
    "http": (Arg("url"), opt("readahead", "int"), opt("timeout", "int"), opt("username"),
             opt("password-secret"), opt("proxy-username"), opt("proxy-password-secret"), opt("cookie"),
             opt("cookie-secret")),
    "https": (Arg("url"), opt("readahead", "int"), opt("timeout", "int"), opt("username"),
              opt("password-secret"), opt("proxy-username"), opt("proxy-password-secret"), opt("cookie"),
              opt("sslverify", "bool"), opt("cookie-secret")),
    # QAPI BlockdevOptionsNbd (7.2): server is a SocketAddress (type inet/unix/fd, checked when it opens)
    "nbd": (Arg("server", "any"), opt("export"), opt("tls-creds"), opt("tls-hostname"), opt("x-dirty-bitmap"),
            opt("reconnect-delay", "int"), opt("open-timeout", "int")),
    # QAPI BlockdevOptionsRbd (7.2); encrypt is refused (vdkit.protocols.rbd has no RBD encryption)
    "rbd": (Arg("pool"), opt("namespace"), Arg("image"), opt("conf"), opt("snapshot"), opt("encrypt", "any"),
            opt("user"), opt("auth-client-required", "any"), opt("key-secret"), opt("server", "any")),
    # QAPI BlockdevOptionsGenericFormat / GenericCOWFormat (7.2)
    **dict.fromkeys(("bochs", "cloop", "dmg", "parallels", "vdi", "vhdx", "vpc"), (Arg("file", "any"),)),
    **dict.fromkeys(("qed", "vmdk"), (Arg("file", "any"), opt("backing", "any"))),
    # QAPI BlockdevOptionsBlkdebug (7.2); the rules' events and I/O types as vdkit.protocols.blkdebug lists them
    "blkdebug": (Arg("image", "any"), opt("config"), opt("align", "int"), opt("max-transfer", "int"),
                 opt("opt-write-zero", "int"), opt("max-write-zero", "int"), opt("opt-discard", "int"),
                 opt("max-discard", "int"),
                 opt("inject-error", "array", items=Arg("", "object", members=(
                     Arg("event", enum=_BLKDEBUG_EVENTS, enum_label="event"), opt("state", "int"),
                     opt("iotype", enum=_BLKDEBUG_IOTYPES, enum_label="iotype"), opt("errno", "int"),
                     opt("sector", "int"), opt("once", "bool"), opt("immediately", "bool")))),
                 opt("set-state", "array", items=Arg("", "object", members=(
                     Arg("event", enum=_BLKDEBUG_EVENTS, enum_label="event"), opt("state", "int"),
                     Arg("new_state", "int")))),
                 opt("take-child-perms", "array", items=Arg("", enum=_PERMS)),
                 opt("unshare-child-perms", "array", items=Arg("", enum=_PERMS))),
    "qcow2": (Arg("file", "any"), opt("backing", "any"), opt("lazy-refcounts", "bool"),
              opt("pass-discard-request", "bool"), opt("pass-discard-snapshot", "bool"),
              opt("pass-discard-other", "bool"), opt("overlap-check", "any"), opt("cache-size", "int"),
              opt("l2-cache-size", "int"), opt("l2-cache-entry-size", "int"), opt("refcount-cache-size", "int"),
              opt("cache-clean-interval", "int"), opt("encrypt", "any"), opt("data-file", "any")),
}
# the union of every member, for the registry's first pass (the handler checks per driver)
_ALL = _BASE + tuple({a.name: opt(a.name, "any") for v in _VARIANTS.values() for a in v}.values())

# members that change what the node reads: vdkit refuses them rather than ignoring them
_CHANGE_DATA = ("offset", "size", "data-file", "encrypt")



def check_options(opts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """QAPI's pass over one ``BlockdevOptions`` object (children given inline included)."""
    if "driver" not in opts:
        raise VdkitError(f"Parameter '{prefix}driver' is missing")
    validate(_BASE[:1], {"driver": opts["driver"]}, prefix=prefix)
    driver = opts["driver"]
    variant = _VARIANTS.get(driver)  # QEMU's schema; what opens is the registries' to say
    if variant is None or not (driver == "file" or is_protocol(driver) or is_known(driver)):
        raise VdkitError(f"Driver '{driver}' is not supported by vdkit's blockdev-add")
    out = validate(_BASE + variant, opts, prefix=prefix)
    for key in _CHANGE_DATA:
        if key in out:  # accepting them without effect would show other data than QEMU does
            raise VdkitError(f"The '{driver}' option '{key}' is not supported by vdkit")
    for key in ("file", "backing"):
        if key not in out:
            continue
        ref = out[key]
        if isinstance(ref, dict):
            out[key] = check_options(ref, prefix=f"{prefix}{key}.")
        elif ref is None and key == "backing":
            pass
        elif not isinstance(ref, str):
            raise VdkitError(f"Invalid parameter type for '{prefix}{key}', expected: "
                             + ("BlockdevRefOrNull" if key == "backing" else "BlockdevRef"))
    return out


def _member_types() -> dict[str, str]:
    out = {a.name: a.type for v in _VARIANTS.values() for a in v}
    # members of list elements (blkdebug's rules: ``inject-error.0.errno=5``)
    out.update({m.name: m.type for v in _VARIANTS.values() for a in v
                if a.items is not None and a.items.members for m in a.items.members})
    out.update({a.name: a.type for a in _BASE})
    out.update({"direct": "bool", "no-flush": "bool"})
    return out


def keyval_options(items: list[tuple[str, str]]) -> dict[str, Any]:
    """``-blockdev``'s dotted keys (``file.filename=x``) as the nested object QMP would send.

    Values of boolean and integer members are converted as QEMU's keyval
    visitor converts them (``on``/``off``/``true``/``false``/``yes``/``no``).
    """
    types = _member_types()
    out: dict[str, Any] = {}
    for key, value in items:
        cur, last = dotted_parent(out, key, lambda prefix: VdkitError(f"Parameters '{prefix}.*' used inconsistently"))
        typed: Any = value
        t = types.get(last)
        if t == "bool":
            typed = parse_bool(key, value)
        elif t == "int":
            try:
                typed = int(value, 0)
            except ValueError:
                raise VdkitError(f"Parameter '{key}' expects integer") from None
        elif last == "backing" and value == "":
            typed = None  # QEMU's keyval spelling of "backing": null
        cur[last] = typed
    listed: dict[str, Any] = _lists(out)
    return listed


def _lists(value: Any) -> Any:
    """keyval's arrays: an object whose keys are 0, 1, ... n-1 is the list of its members."""
    if not isinstance(value, dict):
        return value
    out = {k: _lists(v) for k, v in value.items()}
    if out and all(k.isdigit() for k in out) and sorted(map(int, out)) == list(range(len(out))):
        return [out[str(i)] for i in range(len(out))]
    return out


def check_node_name(machine: DeviceRegistry, name: str) -> None:
    if not id_wellformed(name):
        raise VdkitError(f"Invalid node-name: '{name}'")
    if len(name) > 31:
        raise VdkitError("Node name too long")
    if machine.find_drive(name) is not None:
        raise VdkitError(f"node-name={name} is conflicting with a device id")
    if name in machine.all_node_names():
        raise VdkitError(f"Duplicate nodes with node-name='{name}'")


def _reference(machine: DeviceRegistry, name: str) -> GraphNode:
    g = machine.graph.find(name)
    if g is None:
        raise VdkitError(f"Cannot find device='{name}' nor node-name='{name}'")
    return g


def _open(machine: DeviceRegistry, opts: dict[str, Any], *, parent: dict[str, Any] | None) -> GraphNode:
    """Open one node and the inline children it names (they inherit read-only, cache and discard)."""
    name = opts.get("node-name")
    inherited = parent or {}
    ro = opts.get("read-only", inherited.get("read-only", False))
    force_share = opts.get("force-share", inherited.get("force-share", False))
    if force_share and not ro:  # checked before the node gets its name (QEMU's order)
        raise VdkitError("force-share=on can only be used with read-only images")
    if name is not None:
        check_node_name(machine, name)
    auto_ro = opts.get("auto-read-only", inherited.get("auto-read-only", False))
    cache_opts = {**inherited.get("cache", {}), **opts.get("cache", {})}
    cache = BlockdevCacheInfo(writeback=True, direct=bool(cache_opts.get("direct", False)),
                              no_flush=bool(cache_opts.get("no-flush", False)))
    discard = opts.get("discard", inherited.get("discard", "ignore"))
    detect_zeroes = opts.get("detect-zeroes", "off")
    if detect_zeroes == "unmap" and discard != "unmap":
        raise VdkitError("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
    implicit = parent is not None
    driver = opts["driver"]
    if is_protocol(driver):  # a network protocol: its module opens the node (protocols.registry)
        return open_protocol_node(machine, opts, name=name, ro=ro, auto_ro=auto_ro, cache=cache, implicit=implicit)
    if driver == "file":
        return open_file_node(machine, {**opts, "force-share": force_share}, name=name, ro=ro, auto_ro=auto_ro,
                              cache=cache, implicit=implicit)
    assert is_known(driver)  # a format of the registry (check_options let only those and the protocols pass)
    own = {"read-only": ro, "auto-read-only": auto_ro, "cache": cache_opts, "discard": discard,
           "force-share": force_share}
    ref = opts["file"]
    child = _reference(machine, ref) if isinstance(ref, str) else _open(machine, ref, parent=own)
    if child.file is None:
        if child.implicit:
            delete_node(machine, child)
        raise VdkitError(f"A '{driver}' node over the format node '{child.name}' is not supported by vdkit")
    if not ro and child.ro and driver not in PASSES_PERMISSIONS:
        # a format keeping metadata in its file writes it at open: a read-only (curl) file is refused
        if child.implicit:
            delete_node(machine, child)
        raise VdkitError("Block node is read-only")
    if isinstance(ref, str):
        check_file_parents(machine, child, name or "", driver, ro)
    try:
        backing: GraphNode | None | str | Callable[[], GraphNode] = "header"
        if "backing" in opts:  # only the schemas of formats with a backing child have the member
            b = opts["backing"]
            # opened once the node itself is (its name taken): QEMU opens the backing last
            backing = None if b is None else functools.partial(_open_backing, machine, b, own)
        return open_format_node(machine, driver, child, name=name, ro=ro, cache=cache,
                                detect_zeroes=detect_zeroes, discard=discard, auto_ro=auto_ro, implicit=implicit,
                                backing=backing, force_share=force_share)
    except BaseException:
        if child.implicit:
            delete_node(machine, child)
        raise


def _open_backing(machine: DeviceRegistry, ref: str | dict[str, Any], parent: dict[str, Any]) -> GraphNode:
    """A backing given by reference or inline; an inline one is read-only unless it says otherwise and
    inherits the cache mode and force-share but not discard (QEMU's backing options)."""
    if isinstance(ref, str):
        g = _reference(machine, ref)
    else:
        g = _open(machine, ref, parent={**parent, "read-only": True, "auto-read-only": False, "discard": "ignore"})
    if g.node is None:
        if g.implicit:
            delete_node(machine, g)
        raise VdkitError(f"A protocol node as backing ('{g.name}') is not supported by vdkit")
    return g


def add_node(machine: DeviceRegistry, opts: dict[str, Any]) -> GraphNode:
    """``blockdev-add``/``-blockdev``: check everything, then open (nothing stays open on failure)."""
    checked = check_options(opts)
    if "node-name" not in checked:
        raise VdkitError("'node-name' must be specified for the root node")
    return _open(machine, checked, parent=None)


def blockdev_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    add_node(ctx.machine, args)


def blockdev_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    machine = ctx.machine
    name = args["node-name"]
    _refuse_drive_node(machine, name)
    g = machine.graph.find(name)
    svc = machine.exports
    if g is not None and svc is not None and any(e.node_name == name for e in svc.list_exports()):
        raise VdkitError(f"Node {name} is in use")  # an export's BlockBackend holds it
    if g is None or g.implicit:
        if g is not None:
            raise VdkitError(f"Node {name} is not owned by the monitor")
        raise VdkitError(f"Failed to find node with node-name='{name}'")
    job = machine.jobs.job_on(g.node) if g.node is not None else None
    if job is not None:  # the job's op blocker is the newest: QEMU reports it first
        raise VdkitError(f"Node '{name}' is busy: block device is in use by block job: {job.type}")
    parents = machine.graph.parents_of(g)
    for p, role in parents:
        if role == "backing":
            raise VdkitError(f"Node '{name}' is busy: node is used as backing hd of '{p.name}'")
    if parents:
        raise VdkitError(f"Block device {name} is in use")
    delete_node(machine, g)


def _refuse_drive_node(machine: DeviceRegistry, name: str) -> None:
    """A node of a drive: its root is in use by the drive, the others are not the monitor's to delete."""
    for drive in machine.drives:
        m = drive.medium
        if m is None:
            continue
        for i, (fmt_name, file_name) in enumerate(m.names):
            if name == fmt_name and i == 0:
                raise VdkitError(f"Node {name} is in use")
            if name in (fmt_name, file_name):
                if name in machine.monitor_owned and name == fmt_name:
                    raise VdkitError(f"Node '{name}' is busy: node is used as backing hd of '{m.names[i - 1][0]}'")
                if name in machine.monitor_owned:
                    raise VdkitError(f"Block device {name} is in use")
                raise VdkitError(f"Node {name} is not owned by the monitor")


# --------------------------------------------------------------------------
# block_resize
# --------------------------------------------------------------------------


# QEMU's BDRV_MAX_LENGTH: INT64_MAX rounded down to 1 GiB
MAX_LENGTH = (1 << 63) - (1 << 30)


def block_resize(ctx: CommandContext, args: dict[str, Any]) -> None:
    """QEMU's order: the size's sign, the lookup (backend name, else node name), medium, op blockers,
    then the block layer's checks (maximum length, read-only) and the driver's."""
    from vdkit.block.io import truncate

    device, node_name, size = args.get("device"), args.get("node-name"), args["size"]
    if size < 0:
        raise VdkitError("Parameter 'size' expects a >0 size")
    ro, node, file = _resize_target(ctx.machine, device, node_name)
    for e in getattr(ctx.machine.exports, "exports", []):
        if node is not None and e.medium.node is node:  # an export's backend refuses to share resize
            name = e.node_name
            raise VdkitError(f"Permission conflict on node '{name}': permissions 'resize' are both required by an "
                             f"unnamed block device (uses node '{name}' as 'root' child) and unshared by an "
                             f"unnamed block device (uses node '{name}' as 'root' child).")
    if size > MAX_LENGTH:
        raise VdkitError(f"offset({size}) exceeds maximum({MAX_LENGTH})")
    if ro:
        raise VdkitError("Image is read-only")
    # the file's own truncate (a raw node's file child is filter-like): QEMU's file-posix text
    protocol = node is None or node.format in PASSES_PERMISSIONS
    try:
        if node is not None:
            truncate(node, size)
        elif file is not None:
            file.truncate(size)
    except (OSError, VdkitError) as exc:
        from vdkit.errors import os_error_message

        text = os_error_message(exc) if isinstance(exc, OSError) else exc.message
        if protocol and not text.startswith("Could not resize file: "):
            text = "Could not resize file: " + text
        raise VdkitError(text) from exc


def _resize_target(machine: DeviceRegistry, device: str | None,
                   node_name: str | None) -> tuple[bool, Node | None, ImageFile | None]:
    """(read-only, format node, protocol node's file) named by ``device`` or ``node-name``."""
    if device is not None:
        drive = machine.find_drive(device)
        if drive is None:
            raise VdkitError(f"Cannot find device='{device}' nor node-name='{node_name or ''}'")
        if drive.medium is None or drive.medium.dead:
            raise VdkitError(f"Device '{device}' has no medium")
        if machine.jobs.job_on(drive.medium.node) is not None:
            raise VdkitError(f"Device '{device}' is in use")
        return drive.medium.ro, drive.medium.node, None
    if node_name is not None:
        for drive in machine.drives:
            m = drive.medium
            if m is None:
                continue
            for i, (fmt_name, _file_name) in enumerate(m.names):
                if fmt_name == node_name:
                    if i or machine.jobs.job_on(m.node) is not None:
                        # a backing node (its parent's op blocker) or a job's node: QEMU prints the
                        # absent device name
                        raise VdkitError("Device '(null)' is in use")
                    return m.ro, m.node, None
        g = machine.graph.find(node_name)
        if g is not None:
            parents = machine.graph.parents_of(g)
            if any(role == "backing" for _, role in parents):
                raise VdkitError("Device '(null)' is in use")
            for p, _role in parents:
                if p.driver not in PASSES_PERMISSIONS:  # a format node above with metadata in the file
                    raise VdkitError(f"Permission conflict on node '{g.name}': permissions 'resize' are both "
                                     f"required by an unnamed block device (uses node '{g.name}' as 'root' child) "
                                     f"and unshared by node '{p.name}' (uses node '{g.name}' as 'file' child).")
            return g.ro, g.node, g.file
    raise VdkitError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


# --------------------------------------------------------------------------
# x-debug-query-block-graph
# --------------------------------------------------------------------------

_PERM_NAMES = ((0x8, "resize"), (0x4, "write-unchanged"), (0x2, "write"), (0x1, "consistent-read"))
_SHARE_ALL = 0xF
_BACKEND_ROOT = (0x1, _SHARE_ALL)  # a -drive's BlockBackend without a guest device reads and shares all
_EXPORT_SHARED = 0x7  # an NBD export's BlockBackend shares all but resize (it reads, and writes if writable)
# the jobs' own BlockBackends (needed, shared), as qemu-system-x86_64's graph shows them
_MIRROR_TARGET_BACKEND = (0x2, 0x4)  # a mirror's on its target: writes, shares only unchanged writes
_COMMIT_BASE_BACKEND = (0x2, 0x7)  # an active commit's on the base: writes, shares all but resize
_COMMIT_BASE_WRITER = (0x3, 0x5)  # an intermediate commit's on the base: reads and writes, shares no writes
_STREAM_BACKEND = (0x1, 0x7)  # a stream's on its copy-on-read filter: reads, shares all but resize


@dataclass(eq=False)
class _Vertex:
    """One block node of the debug graph: its name, creation serial, writability and children."""

    name: str
    serial: int
    driver: str
    ro: bool
    force_share: bool = False  # its parents share everything with others
    children: list[tuple[str, _Vertex]] = field(default_factory=list)  # newest first, as QEMU keeps them
    parents: list[tuple[str, _Vertex]] = field(default_factory=list)
    users: list[tuple[int, int]] = field(default_factory=list)  # BlockBackends' root edges (needed, shared)

    def perms(self, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
        """What this node's users need and share, all parents together."""
        if id(self) not in memo:
            perm, shared = 0, _SHARE_ALL
            for up, us in self.users:
                perm, shared = perm | up, shared & us
            for role, p in self.parents:
                pp, ps = p.child_perms(role, self, memo)
                perm, shared = perm | pp, shared & ps
            memo[id(self)] = (perm, shared)
        return memo[id(self)]

    def child_perms(self, role: str, child: _Vertex, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
        perm, shared = child_perms(self.driver, self.ro, role, *self.perms(memo))
        return perm, _SHARE_ALL if child.force_share else shared


_CR, _W, _WU = 0x1, 0x2, 0x4
_PASS = 0xF  # what a filter passes down of its users' needs (QEMU's passthrough permissions)


class _FilterVertex(_Vertex):
    """The filter node a job puts in, with its driver's rule for its child (observed in qemu-system-x86_64's
    graph): ``mirror_top`` passes its users' needs but resize (an active commit's, not even reads: the
    base's overlays refuse them to everybody), ``commit_top`` takes nothing, ``copy-on-read`` writes
    unchanged data back, ``copy-before-write`` passes its users' needs to its ``file`` (sharing no
    writes) and writes its ``target``."""

    commit: bool = False  # a mirror_top of an active commit

    def child_perms(self, role: str, child: _Vertex, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
        perm, shared = self.perms(memo)
        if self.driver == "commit_top":
            return 0, _SHARE_ALL
        if self.driver == "copy-on-read":
            return perm & _PASS | _WU, shared & _PASS | _CR | _WU
        if self.driver == "copy-before-write":
            if role == "target":
                return _W, _EXPORT_SHARED
            return perm & _PASS, shared & (_CR | _WU)
        return perm & (_EXPORT_SHARED & ~_CR if self.commit else _EXPORT_SHARED), _EXPORT_SHARED


class _JobVertex(_Vertex):
    """A block job: each edge carries the job's own permissions on that node (``edge_perms``, by role and
    child), as QEMU's job takes them when it is created."""

    def __init__(self, name: str) -> None:
        super().__init__(name, 0, "block-job", False)
        self.edge_perms: dict[tuple[str, int], tuple[int, int]] = {}

    def add(self, role: str, child: _Vertex, perm: int, shared: int) -> None:
        _link(self, role, child)
        self.edge_perms[role, id(child)] = perm, shared

    def child_perms(self, role: str, child: _Vertex, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
        return self.edge_perms[role, id(child)]


def _link(parent: _Vertex, role: str, child: _Vertex) -> None:
    parent.children.insert(0, (role, child))
    child.parents.append((role, parent))


_Backend = tuple[str, "_Vertex | None", tuple[int, int]]  # a BlockBackend: name, root, root edge's permissions


def _below(v: _Vertex | None) -> set[int]:
    """``v`` and every vertex under it."""
    seen: set[int] = set()
    todo = [v] if v is not None else []
    while todo:
        cur = todo.pop()
        if id(cur) not in seen:
            seen.add(id(cur))
            todo += [c for _, c in cur.children]
    return seen


def _insert_filter(fv: _FilterVertex, role: str, src: _Vertex, tops: dict[int, _Vertex],
                   drive_backends: list[_Backend], keep: set[int]) -> None:
    """Put ``fv`` above ``src`` under every parent (a node's child edge, a drive's and exports'
    BlockBackends), as QEMU's graph change does when a job starts, but those in ``keep`` (the filter's
    own children: a fleecing target over its source keeps it as its backing, no loop)."""
    for p_role, parent in list(src.parents):
        if id(parent) in keep:
            continue
        parent.children = [(r, fv if c is src and r == p_role else c) for r, c in parent.children]
        fv.parents.append((p_role, parent))
        src.parents.remove((p_role, parent))
    for key, top in list(tops.items()):
        if top is src:
            tops[key] = fv
    for i, (name, root, perm) in enumerate(drive_backends):
        if root is src:  # the drive's BlockBackend now has the filter as its root
            drive_backends[i] = (name, fv, perm)
            src.users.remove(perm)
            fv.users.append(perm)
    _link(fv, role, src)


def _listed_vertices(listed: Any, by_node: dict[int, _Vertex], all_nodes: list[_Vertex]) -> _Vertex:
    """The vertices of the nodes a job opened for its target (drive-mirror's, drive-backup's with the
    backing chain its header names); a backing node that is the live source's is linked, not drawn twice."""
    chain: list[_Vertex] = []
    nodes = list(listed.node.chain())
    for i, (fmt_name, file_name) in enumerate(listed.names):
        node = nodes[i]
        fmt_serial, file_serial = listed.serials[i]
        ro = bool(i and node.readonly)
        fmt = _Vertex(fmt_name, fmt_serial, node.format, ro)
        file = _Vertex(file_name, file_serial, "file", ro)
        _link(fmt, "file", file)
        if chain:
            _link(chain[-1], "backing", fmt)
        chain.append(fmt)
        all_nodes += [file, fmt]
    below = nodes[len(chain)] if len(nodes) > len(chain) else None
    if below is not None and id(below) in by_node:  # sync none: the source is the target's backing
        _link(chain[-1], "backing", by_node[id(below)])
    return chain[0]


def _job_vertices(machine: DeviceRegistry, by_node: dict[int, _Vertex], tops: dict[int, _Vertex],
                  all_nodes: list[_Vertex], drive_backends: list[_Backend]) -> tuple[list[_JobVertex],
                                                                                    list[_Backend]]:
    """The running jobs as QEMU draws them: the ``block-job`` vertex with its edges, the filter it put
    above its node, the target's nodes it opened, and the BlockBackends it holds (QEMU 7.2):

    * mirror: ``main node`` (its ``mirror_top``), ``source``, ``target``; a backend writing the target;
    * active commit: as a mirror onto the base, plus an ``intermediate node`` edge per dropped layer;
    * intermediate commit: ``main node`` (the active image), ``intermediate node`` per layer from top to
      the base, ``base``; a ``commit_top`` filter above top; backends on the base (writes) and on top;
    * stream: ``main node`` (its ``copy-on-read`` filter), ``active node``, an ``intermediate node`` per
      layer it drops; a backend on the filter;
    * backup: ``main node`` (its ``copy-before-write`` filter, whose ``target`` child is the target) and
      ``target``; no backend.

    ``by_node``: the vertex of each vdkit node (drives' format nodes and graph nodes).
    """
    from vdkit.block.commit import CommitJob
    from vdkit.block.jobs import Status

    jobs: list[_JobVertex] = []
    backends: list[_Backend] = []
    for job in machine.jobs.jobs:
        f, drv = job.driver.filter, job.driver
        if f is None or job.status in (Status.CONCLUDED, Status.NULL):
            continue
        src = by_node.get(id(f.below))
        if src is None:
            continue
        kind = drv.job_type
        tgt: _Vertex | None = None
        if kind in ("mirror", "backup"):
            tgt = by_node.get(id(getattr(drv, "target", None)))
            listed = getattr(drv, "listed_target", None)
            if tgt is None and listed is not None and listed.names:  # the target nodes the job opened
                tgt = _listed_vertices(listed, by_node, all_nodes)
            if tgt is None:
                continue
        fv = _FilterVertex(f.name, f.serial, f.driver, False)
        all_nodes.append(fv)
        _insert_filter(fv, "file" if f.driver in ("copy-on-read", "copy-before-write") else "backing", src, tops,
                       drive_backends, _below(tgt) if kind == "backup" else set())
        jv = _JobVertex(job.id)
        if kind == "mirror":
            assert tgt is not None
            jv.add("main node", fv, _CR, _EXPORT_SHARED)
            jv.add("source", src, 0, _EXPORT_SHARED)
            jv.add("target", tgt, 0, _SHARE_ALL)
            tgt.users.append(_MIRROR_TARGET_BACKEND)
            backends.append(("", tgt, _MIRROR_TARGET_BACKEND))
        elif kind == "backup":
            assert tgt is not None
            _link(fv, "target", tgt)
            jv.add("main node", fv, 0, _SHARE_ALL)
            jv.add("target", tgt, 0, _SHARE_ALL)
        elif kind == "stream":
            jv.add("main node", fv, 0, _SHARE_ALL)
            jv.add("active node", src, 0, _EXPORT_SHARED)
            for n in drv.nodes()[1:]:
                if id(n) in by_node:
                    jv.add("intermediate node", by_node[id(n)], 0, _WU | _CR)
            fv.users.append(_STREAM_BACKEND)
            backends.append(("", fv, _STREAM_BACKEND))
        elif isinstance(drv, CommitJob):
            chain, top_i, base_i = drv.chain, drv.top_index, drv.base_index
            base = by_node.get(id(chain[base_i]))
            if base is None:
                continue
            middle = [by_node[id(n)] for n in chain[max(top_i, 1):base_i] if id(n) in by_node]
            if top_i == 0:  # an active commit: a mirror onto the base
                fv.commit = True
                jv.add("main node", fv, _CR, _EXPORT_SHARED)
                jv.add("source", src, 0, _EXPORT_SHARED)
                jv.add("target", base, 0, _SHARE_ALL)
                for v in middle:
                    jv.add("intermediate node", v, 0, _W | _WU)
                base.users.append(_COMMIT_BASE_BACKEND)
                backends.append(("", base, _COMMIT_BASE_BACKEND))
            else:
                active = by_node.get(id(chain[0]))
                if active is None:
                    continue
                jv.add("main node", active, 0, _SHARE_ALL)
                for v in middle:
                    jv.add("intermediate node", v, 0, _W | _WU)
                jv.add("base", base, 0, _SHARE_ALL)
                base.users.append(_COMMIT_BASE_WRITER)
                src.users.append((0, _SHARE_ALL))
                backends += [("", base, _COMMIT_BASE_WRITER), ("", src, (0, _SHARE_ALL))]
        else:
            continue
        jobs.append(jv)
    return jobs, backends


def _vertices(machine: DeviceRegistry) -> tuple[list[_Backend], list[_JobVertex], list[_Vertex]]:
    """The BlockBackends (name, root, root edge's permissions), the jobs drawn and every block node in
    creation order.

    The drives' backends come first, then the NBD exports' (unnamed, also on -blockdev nodes), then the
    jobs' (a mirror's on its target, a commit's, a stream's), as QEMU creates them.
    """
    backends: list[tuple[str, _Vertex | None, tuple[int, int]]] = []
    all_nodes: list[_Vertex] = []
    tops: dict[int, _Vertex] = {}
    node_vertex: dict[int, _Vertex] = {}  # a vdkit node's vertex (format nodes)
    for drive in machine.drives:
        m = drive.medium
        if m is None:
            backends.append((drive.id, None, _BACKEND_ROOT))
            continue
        chain: list[_Vertex] = []
        for i, (node, (fmt_name, file_name)) in enumerate(zip(m.node.chain(), m.names, strict=False)):
            fmt_serial, file_serial = m.serials[i] if i < len(m.serials) else (0, 0)
            ro = m.ro if i == 0 else node.readonly
            fmt = _Vertex(fmt_name, fmt_serial, node.format, ro)
            file = _Vertex(file_name, file_serial, "file", ro if m.file_ro is None or i else m.file_ro)
            _link(fmt, "file", file)
            if chain:
                _link(chain[-1], "backing", fmt)
            chain.append(fmt)
            all_nodes += [file, fmt]
        chain[0].users.append(_BACKEND_ROOT)
        backends.append((drive.id, chain[0], _BACKEND_ROOT))
        tops[id(m)] = chain[0]
        node_vertex.update((id(n), v) for n, v in zip(m.node.chain(), chain, strict=False))
    by_node: dict[int, _Vertex] = {}
    for g in machine.graph.nodes:
        by_node[id(g)] = _Vertex(g.name, g.serial, g.driver, g.ro, g.force_share)
    for g in machine.graph.nodes:
        v = by_node[id(g)]
        if g.child is not None:  # a protocol node's child is a filter's image (blkdebug's)
            _link(v, "file" if g.node is not None else "image", by_node[id(g.child)])
        if g.backing is not None:
            _link(v, "backing", by_node[id(g.backing)])
        all_nodes.append(v)
        if g.backend is not None and g.backend.medium is not None:
            tops[id(g.backend.medium)] = v
    node_vertex.update((id(g.node), by_node[id(g)]) for g in machine.graph.nodes if g.node is not None)
    jobs, job_backends = _job_vertices(machine, node_vertex, tops, all_nodes, backends)
    for e in getattr(machine.exports, "exports", []):  # the NBD service's exports, oldest first
        top = tops.get(id(e.medium))
        if top is not None:
            perm = (0x1, 0x3)[bool(e.writable)], _EXPORT_SHARED
            top.users.append(perm)
            backends.append(("", top, perm))
    backends += job_backends
    all_nodes.sort(key=lambda v: v.serial)
    return backends, jobs, all_nodes


def x_debug_query_block_graph(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    """QEMU's debug dump of the block graph: BlockBackends, then every node by creation; ids are handed
    out as nodes are first met (a root when its backend's edge is drawn), lists newest entry first.

    Jobs are drawn as QEMU draws them (a ``block-job`` vertex, the filter it puts in, the target's nodes,
    its backends: :func:`_job_vertices`).
    """
    backends, jobs, all_nodes = _vertices(ctx.machine)
    ids: dict[int, int] = {}
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    memo: dict[int, tuple[int, int]] = {}

    def num(obj: object) -> int:
        return ids.setdefault(id(obj), len(ids) + 1)

    def names(bits: int) -> list[str]:
        return [n for b, n in _PERM_NAMES if bits & b]

    def edge(role: str, parent: object, child: _Vertex, perm: int, shared: int) -> None:
        p = num(parent)
        edges.insert(0, {"name": role, "parent": p, "shared-perm": names(shared), "perm": names(perm),
                         "child": num(child)})

    kept: list[object] = []  # the backends' markers stay alive: their id() must not be reused
    for name, root, perm in backends:
        marker = object()
        nodes.insert(0, {"name": name, "type": "block-backend", "id": num(marker)})
        kept.append(marker)
        if root is not None:
            edge("root", marker, root, *perm)
    for jv in jobs:
        nodes.insert(0, {"name": jv.name, "type": "block-job", "id": num(jv)})
        for role, c in jv.children:
            edge(role, jv, c, *jv.child_perms(role, c, memo))
    for v in all_nodes:
        nodes.insert(0, {"name": v.name, "type": "block-driver", "id": num(v)})
        for role, c in v.children:
            edge(role, v, c, *v.child_perms(role, c, memo))
    return {"edges": edges, "nodes": nodes}


def register(reg: CommandRegistry) -> None:
    r = reg.register
    r("blockdev-add", *_ALL)(blockdev_add)
    r("blockdev-del", Arg("node-name"))(blockdev_del)
    r("block_resize", opt("device"), opt("node-name"), Arg("size", "int"))(block_resize)
    r("x-debug-query-block-graph")(x_debug_query_block_graph)
