"""Monitor-owned block nodes: the graph built by ``-blockdev`` and ``blockdev-add``.

QEMU's block layer is a graph of nodes; a ``-drive`` hides most of it behind
one BlockBackend (``registry.Medium``), but ``-blockdev``/``blockdev-add``
create nodes one by one: a protocol node (``file``) and format nodes
(``raw``, ``qcow2``) whose ``file`` child and ``backing`` child are either
opened inline (implicit nodes, auto-named, deleted with their parent) or
references to nodes added earlier.  A qcow2 node without a ``backing`` option
opens the chain its header names (implicit, read-only nodes); ``backing:
null`` opens none.

The vdkit ``Node`` of a format node is linked to its graph backing
(``node.backing``), so reads go through the graph.  A format node on a
referenced protocol node shares that node's open file (``_BorrowedFile``):
closing the format node leaves the file node open.

When a node's children differ from what its own header names (a backing
given by reference, ``backing: null`` over a header that names one), QEMU
calls it by a ``json:{...}`` pseudo-filename describing the graph
(``block-jobs.md`` §1.1); :func:`refresh_filename` computes it.

A protocol node's lock bytes follow QEMU's permission system, not the node's
own read-only flag: a file node takes what its parents need (observed on
``qemu-system-x86_64`` 7.2 through ``/proc/locks``).  A qcow2 parent needs
consistent read (write and resize too when writable) and refuses others'
writes and resizes, because its metadata must not change under it; a raw
parent passes on only what its own users need, and a node nobody uses needs
nothing, so a lone file or raw node holds no lock at all and a read-only qcow2
node may open the same file elsewhere.  :func:`lock_file_node` applies the rule.

No asyncio here (``tests/unit/test_layering.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vdkit.errors import VdkitError
from vdkit.formats.registry import PASSES_PERMISSIONS
from vdkit.info.model import BlockdevCacheInfo
from vdkit.io.file import ImageFile

if TYPE_CHECKING:
    from vdkit.block.chain import BackingWalk
    from vdkit.block.node import Node
    from vdkit.devices.registry import DeviceRegistry, Drive

class _BorrowedFile(ImageFile):
    """A protocol node's open file lent to a format node above it: the format node may not close it."""

    def __init__(self, owner: ImageFile) -> None:  # noqa: D107 - no new file is opened
        self.__dict__.update(owner.__dict__)
        self._owner = owner
        self.owns = False  # set when the protocol node is handed over with the format node

    def close(self) -> None:
        if self.owns:  # else the protocol node owns the descriptor and its locks
            self._owner.close()


class _BorrowedProxy:
    """A network protocol node's file object (``HttpFile``) lent to a format node: same rule as
    :class:`_BorrowedFile`, by delegation."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner
        self.owns = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner, name)

    def close(self) -> None:
        if self.owns:
            self._owner.close()


def _borrow(f: Any) -> Any:
    # a subclass (blkdebug's file) keeps its own methods: lent by delegation
    return _BorrowedFile(f) if type(f) is ImageFile else _BorrowedProxy(f)


@dataclass(eq=False)
class GraphNode:
    """One node of the graph: a protocol node (``file`` set) or a format node (``node`` set)."""

    name: str
    driver: str
    serial: int
    ro: bool
    cache: BlockdevCacheInfo = field(default_factory=BlockdevCacheInfo)
    detect_zeroes: str = "off"
    discard: str = "ignore"
    auto_ro: bool = False
    implicit: bool = False  # opened inline or from a header: deleted with its parent
    file: ImageFile | None = None
    node: Node | None = None
    child: GraphNode | None = None  # a format node's protocol child
    backing: GraphNode | None = None
    # the backing child was given by the options (reference or null), not taken from the header
    backing_override: bool = False
    filename: str = ""
    # permissions this node's own users take (a raw node written by a job): passed down by raw
    user_perm: int = 0
    # (needed, shared) of a job's BlockBackend on this node (a mirror's on its target), while the job lives
    job_use: tuple[int, int] = (0, 0x1F)
    # refuses nothing to other users (a file node: to other processes; its parents' needs stay); inherited
    # by inline children and the chain opened from a header
    force_share: bool = False
    # the unnamed backend of this node's NBD exports (vdkit.monitor.nbd_cmds), made on the first one
    backend: Drive | None = None

    @property
    def is_format(self) -> bool:
        return self.node is not None

    def children(self) -> list[GraphNode]:
        return [c for c in (self.child, self.backing) if c is not None]

    def size(self) -> int:
        if self.node is not None:
            return self.node.size
        assert self.file is not None
        return self.file.size()

    def plain_filename(self) -> str:
        """The filename without the json: rule: the protocol child's."""
        if self.child is not None:
            return self.child.filename
        assert self.file is not None
        return self.file.filename

    def describe(self) -> Any:
        """The node as QEMU's json: filename describes it (a dict, or the text of a node described by
        its options, :class:`JsonText`; dumped by :func:`dumps_described`)."""
        if self.file is not None:
            options = getattr(self.file, "open_options", None)  # blkdebug: its options, however it is named
            if options is not None:
                return JsonText(options)
            if self.filename.startswith("json:"):  # named by its options (curl)
                return JsonText(self.filename[5:])
            return {"driver": self.driver, "filename": self.file.filename}
        d: dict[str, Any] = {"driver": self.driver}
        assert self.child is not None
        d["file"] = self.child.describe()
        if self.filename.startswith("json:"):
            d["backing"] = self.backing.describe() if self.backing is not None else None
        return d

    def close(self) -> None:
        if self.node is not None:
            self.node.backing = None  # the backing node is a graph node of its own
            self.node.close()
            self.node = None
        if self.file is not None:
            self.file.close()
            self.file = None


def refresh_filename(g: GraphNode) -> None:
    """QEMU's filename: plain when the graph is what the header says, else ``json:{...}`` (§1.1)."""
    if not g.is_format:
        return
    assert g.child is not None
    if g.backing_override and _backing_differs(g):
        d = {"backing": g.backing.describe() if g.backing is not None else None, "driver": g.driver,
             "file": g.child.describe()}
        g.filename = "json:" + dumps_described(d)
    elif g.child.filename.startswith("json:") and g.child.file is not None:  # a curl or blkdebug child
        g.filename = "json:" + dumps_described({"driver": g.driver, "file": JsonText(g.child.filename[5:])})
    else:
        g.filename = g.plain_filename()
    if g.node is not None:
        g.node.filename = g.filename


class JsonText(str):
    """JSON text of a node described by its options, kept as QEMU printed it: parsed and printed again,
    keys sharing a hash bucket would swap."""


def dumps_described(value: Any) -> str:
    """A node description as QEMU prints it: objects in QEMU's dictionary order (for the members a graph
    description has, the sorted order), :class:`JsonText` as it is."""
    from vdkit.info.render_json import dumps_compact, qdict_order, quote

    if isinstance(value, JsonText):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{quote(k)}: {dumps_described(value[k])}" for k in qdict_order(list(value))) + "}"
    return dumps_compact(value)


def _backing_differs(g: GraphNode) -> bool:
    """QEMU's rule: the header's backing string differs from the backing node's filename."""
    assert g.node is not None
    stored = g.node.driver.backing_file
    if g.backing is None:
        return stored is not None
    return stored != g.backing.filename


def describe_node(node: Node) -> dict[str, Any]:
    """A drive's node as a json: filename describes it: its backing only if its own name is json:."""
    d: dict[str, Any] = {"driver": node.format, "file": {"driver": "file", "filename": node.driver.file.filename}}
    if node.filename.startswith("json:"):
        d["backing"] = describe_node(node.backing) if node.backing is not None else None
    return d


def json_filename(node: Node, backing: dict[str, Any] | None) -> str:
    """``json:{...}`` for ``node`` over the backing described by ``backing``."""
    d: dict[str, Any] = {"backing": backing, "driver": node.format,
                         "file": {"driver": "file", "filename": node.driver.file.filename}}
    return "json:" + json.dumps(d, sort_keys=True)


def set_node_readonly(node: Node, ro: bool) -> None:
    """Reopen ``node`` read-only (or back read-write): its lock bytes change, its descriptor stays.

    QEMU makes the old active image read-only after an external snapshot,
    which drops its write permission, so other processes may read it.
    """
    from vdkit.io.file import LockMode

    if node.readonly == ro:
        return
    # persistent dirty bitmaps: stored and made read-only before the node stops writing (QEMU's
    # reopen), marked in use again when it writes again
    node.driver.reopen_bitmaps(readonly=ro)
    node.readonly = ro
    lock = getattr(node.driver.file, "lock", None)
    if lock is not None:
        lock.release()
        lock.mode = LockMode.for_open(readonly=ro, force_share=False)
        lock.acquire()


# QEMU's permission bits (vdkit.io.file.Perm) and the one only the graph knows: changing children
_CR, _W, _WU, _RS, _GRAPH_MOD = 0x1, 0x2, 0x4, 0x8, 0x10
_ALL = 0x1F
_PASSTHROUGH = _CR | _W | _WU | _RS


def _users(machine: DeviceRegistry, g: GraphNode) -> tuple[int, int]:
    """(needed, shared) of ``g``'s own users: its NBD exports' backend (reads, writes when writable,
    shares all but resize), a job writing a raw node (:func:`_raw_write_perm`) and a job's backend."""
    perm, shared = g.user_perm | g.job_use[0], g.job_use[1]
    backend = g.backend
    if backend is not None:
        for e in getattr(machine.exports, "exports", []):
            if e.medium is backend.medium:
                perm |= _CR | (_W if e.writable else 0)
                shared &= _CR | _W | _WU
    return perm, shared


def _file_need(machine: DeviceRegistry, p: GraphNode) -> tuple[int, int]:
    """(needed, shared) the format node ``p`` takes on its ``file`` child."""
    return child_perms(p.driver, p.ro, "file", *_users(machine, p))


def child_perms(driver: str, ro: bool, role: str, perm: int, shared: int) -> tuple[int, int]:
    """(needed, shared) on a child of a format node whose users need ``perm`` and share ``shared``.

    QEMU 7.2's default rules: a ``backing`` child is only read, and may
    change under its parent as far as the parent's users allow writes; a raw
    ``file`` child is filtered (the users' needs pass through); a ``file``
    child holding metadata is read consistently, written and resized when the
    node is writable, and shared with nobody who writes or resizes.
    """
    if role == "backing":
        return perm & _CR, (_W | _RS if shared & _W else 0) | _CR | _WU
    perm, shared = perm & _PASSTHROUGH, shared & _PASSTHROUGH
    if driver in PASSES_PERMISSIONS or role == "image":  # (a filter's image: blkdebug passes its users' needs)
        return perm, shared
    perm |= _CR | (0 if ro else _W | _RS)
    shared &= ~(_W | _RS)
    if perm & _WU:
        perm |= _W
    if perm & _W:
        perm |= _RS
    return perm, shared


def _perm_names(bits: int) -> str:
    from vdkit.io.file import PERM_NAMES

    return ", ".join(n for p, n in PERM_NAMES.items() if bits & p)


def check_file_parents(machine: DeviceRegistry, child: GraphNode, name: str, driver: str, ro: bool) -> None:
    """QEMU's conflict check among the parents of ``child`` once a new ``file`` parent joins.

    QEMU keeps a node's parents newest first and asks, pair by pair, whether
    the first shares what the second needs; the first refusal is the error.
    """
    if child.force_share:  # its parents share everything (QEMU's force-share)
        return
    parents = [(name, child_perms(driver, ro, "file", 0, _ALL))]
    parents += [(p.name, _file_need(machine, p))
                for p, role in reversed(machine.graph.parents_of(child)) if role == "file"]
    for i, (a_name, (_, a_shared)) in enumerate(parents):
        for j, (b_name, (b_perm, _)) in enumerate(parents):
            if i != j and b_perm & ~a_shared:
                raise VdkitError(
                    f"Permission conflict on node '{child.name}': permissions '{_perm_names(b_perm & ~a_shared)}' "
                    f"are both required by node '{b_name}' (uses node '{child.name}' as 'file' child) and "
                    f"unshared by node '{a_name}' (uses node '{child.name}' as 'file' child).")


def lock_file_node(machine: DeviceRegistry, child: GraphNode, pending: tuple[str, bool] | None = None) -> None:
    """Hold on ``child``'s file the lock bytes its parents' permissions need (``pending``: one about to join).

    On a refusal the bytes held before are taken again and the lock error raised.
    """
    from vdkit.io.file import LockMode

    f = child.file
    lock = getattr(f, "lock", None) if isinstance(f, ImageFile) else None
    if lock is None:
        return
    perm, shared = 0, _ALL
    wanted = [_file_need(machine, p) for p, role in machine.graph.parents_of(child) if role == "file"]
    if pending is not None:
        wanted.append(child_perms(*pending, "file", 0, _ALL))
    for p, s in wanted:
        perm, shared = perm | p, shared & s
    if child.force_share:
        shared = _ALL
    mode = LockMode(perm & _PASSTHROUGH, ~shared & _PASSTHROUGH)
    if lock.mode != mode:
        lock.switch(mode)


def _raw_write_perm(machine: DeviceRegistry, g: GraphNode) -> None:
    """A raw node being written (a job's target) needs write on its file from now on, as its user would."""
    if g.child is None or _users(machine, g)[0] & _W:  # already held (a writable export's backend)
        return
    g.user_perm |= _CR | _W
    try:
        lock_file_node(machine, g.child)
    except VdkitError:
        g.user_perm &= ~_W
        raise


@dataclass
class Graph:
    """The monitor-owned nodes of one daemon (creation order)."""

    nodes: list[GraphNode] = field(default_factory=list)

    def find(self, name: str) -> GraphNode | None:
        for g in self.nodes:
            if g.name == name:
                return g
        return None

    def parents_of(self, target: GraphNode) -> list[tuple[GraphNode, str]]:
        out = []
        for g in self.nodes:
            if g.child is target:
                out.append((g, "file"))
            if g.backing is target:
                out.append((g, "backing"))
        return out


# -- opening ---------------------------------------------------------------------------


def open_file_node(machine: DeviceRegistry, opts: dict[str, Any], *, name: str | None, ro: bool, auto_ro: bool,
                   cache: BlockdevCacheInfo, implicit: bool) -> GraphNode:
    """A ``file`` protocol node (``auto-read-only``: read-only if the file cannot be opened for writing)."""
    from vdkit.errors import OpenError

    filename = opts["filename"]
    force_share = bool(opts.get("force-share", False))
    from vdkit.io.file import LockMode

    try:
        f = ImageFile(filename, readonly=ro, lock=False)
    except OpenError as exc:
        if not (auto_ro and not ro and exc.errno in (13, 30)):  # EACCES, EROFS: auto-read-only falls back
            raise
        ro = True
        f = ImageFile(filename, readonly=True, lock=False)
    if opts.get("locking") != "off":  # locking=off: QEMU takes no lock bytes on the file at all
        f.take_lock(LockMode(0, 0))  # nobody uses a new node yet: no bytes until a parent needs some
    g = GraphNode(name="", driver="file", serial=0, ro=ro, cache=cache, auto_ro=auto_ro, implicit=implicit,
                  file=f, filename=filename, force_share=force_share)
    _register(machine, g, name)
    return g


def open_protocol_node(machine: DeviceRegistry, opts: dict[str, Any], *, name: str | None, ro: bool, auto_ro: bool,
                       cache: BlockdevCacheInfo, implicit: bool) -> GraphNode:
    """A network protocol node (``http``, ``https``, ``rbd``...: ``vdkit.protocols.registry.open_blockdev``),
    named as its protocol names it (a URL, QEMU's ``json:{...}``)."""
    from vdkit.protocols.registry import open_blockdev

    driver = opts["driver"]
    f, filename, ro = open_blockdev(driver, opts, readonly=ro, auto_read_only=auto_ro)
    g = GraphNode(name="", driver=driver, serial=0, ro=ro, cache=cache, auto_ro=auto_ro, implicit=implicit,
                  file=f, filename=filename)  # type: ignore[arg-type]  # protocol files are file-like
    _register(machine, g, name)
    if getattr(f, "has_image_child", False):  # blkdebug: its image is listed as a file node below it
        _image_child(machine, g)
    return g


def _image_child(machine: DeviceRegistry, g: GraphNode) -> None:
    """The implicit ``file`` node of a filter's local image (QEMU lists it, newer than its parent).

    It shares the filter's descriptor (no rules in front) and takes no lock bytes of its own: the
    filter's file holds what the filter's parents need, which a filter passes down unchanged.
    """
    assert g.file is not None
    view = _BorrowedFile(g.file)
    view.lock = None
    child = GraphNode(name="", driver="file", serial=0, ro=g.ro, cache=g.cache, auto_ro=g.auto_ro, implicit=True,
                      file=view, filename=view.filename)
    _register(machine, child, None)
    g.child = child


def _open_protocol_name(machine: DeviceRegistry, driver: str, name: str, *, cache: BlockdevCacheInfo,
                        force_share: bool) -> GraphNode:
    """An implicit read-only node for a protocol's ``proto:`` name (a backing file a header names)."""
    from vdkit.protocols.registry import open_name

    f, filename = open_name(driver, name, readonly=True, force_share=force_share)
    g = GraphNode(name="", driver=driver, serial=0, ro=True, cache=cache, auto_ro=False, implicit=True,
                  file=f, filename=filename)  # type: ignore[arg-type]  # protocol files are file-like
    _register(machine, g, None)
    return g


def _register(machine: DeviceRegistry, g: GraphNode, name: str | None) -> None:
    g.serial = machine.next_serial()
    g.name = name if name is not None else machine.auto_name()
    if name is not None:
        machine.claim_name(name)
    machine.graph.nodes.append(g)


def open_format_node(machine: DeviceRegistry, driver: str, child: GraphNode, *, name: str | None, ro: bool,
                     cache: BlockdevCacheInfo, detect_zeroes: str, discard: str, auto_ro: bool, implicit: bool,
                     backing: GraphNode | None | str | Callable[[], GraphNode] = "header",
                     walk: BackingWalk | None = None,
                     force_share: bool = False) -> GraphNode:
    """A format node over ``child``; ``backing``: a graph node, None (``backing: null``), ``"header"`` or
    a function opening the backing node once this one is registered.

    With ``"header"`` the chain the image names is opened as implicit,
    read-only, auto-named nodes (as QEMU opens a backing file from the header),
    through one :class:`~vdkit.block.chain.BackingWalk` (depth limit, policy,
    loop detection: a chain that loops fails instead of opening forever).
    """
    from vdkit.block.chain import BackingWalk
    from vdkit.block.driver import OpenContext
    from vdkit.block.node import Node
    from vdkit.formats import registry as formats

    assert child.file is not None
    # the format node's permissions on its file are taken before the format reads it (QEMU attaches
    # the child first); nothing is left held if the open fails
    lock_file_node(machine, child, (driver, ro))
    ctx = OpenContext(child.file.filename, readonly=ro)
    try:
        drv = formats.open_driver(driver, _borrow(child.file), ctx)
    except BaseException:
        lock_file_node(machine, child)
        raise
    node = Node(child.file.filename, drv, readonly=ro)
    try:
        drv.open_children(ctx)
    except BaseException:
        node.close()
        lock_file_node(machine, child)
        raise
    g = GraphNode(name="", driver=driver, serial=0, ro=ro, cache=cache, detect_zeroes=detect_zeroes,
                  discard=discard, auto_ro=auto_ro, implicit=implicit, node=node, child=child,
                  filename=child.file.filename, force_share=force_share)
    _register(machine, g, name)
    try:
        if backing == "header":
            if drv.backing_file is not None:
                if walk is None:
                    walk = BackingWalk()
                    walk.visit(g.filename, child.file.fd)
                g.backing = _open_header_backing(machine, g, walk)
        else:
            assert not isinstance(backing, str)
            if callable(backing):  # a backing opened after its parent (inline or by reference)
                try:
                    backing = backing()
                except VdkitError as exc:
                    raise exc.prefixed("Could not open backing file: ") from exc
            g.backing = backing
            g.backing_override = True
        if g.backing is not None:
            assert g.backing.node is not None or g.backing.file is not None
            node.backing = g.backing.node if g.backing.node is not None else None
        refresh_filename(g)
        if driver in PASSES_PERMISSIONS and not ro:
            node.before_write.append(lambda _offset, _length: _raw_write_perm(machine, g))
        node.bitmaps  # noqa: B018 - QEMU loads persistent bitmaps at open (a writable image marks them in use)
    except BaseException:
        delete_node(machine, g)
        raise
    return g


def _open_header_backing(machine: DeviceRegistry, g: GraphNode, walk: BackingWalk) -> GraphNode:
    from vdkit.formats import registry as formats

    assert g.node is not None
    drv = g.node.driver
    assert drv.backing_file is not None
    try:
        if drv.backing_file.startswith("json:"):  # QEMU writes one for a backing node named so
            return _open_json_backing(machine, g, walk, drv.backing_file)
        resolved = walk.backing_of(g.filename, drv.backing_file)
        assert resolved is not None
        from vdkit.block.chain import protocol_of
        from vdkit.protocols.registry import driver_for_prefix

        proto = driver_for_prefix(protocol_of(resolved))
        if proto is not None:  # a backing file next to an http image, an export, an RBD image
            child = _open_protocol_name(machine, proto, resolved, cache=g.cache, force_share=g.force_share)
        else:
            child = open_file_node(machine, {"filename": resolved, "force-share": g.force_share}, name=None,
                                   ro=True, auto_ro=False, cache=g.cache, implicit=True)
        try:
            assert child.file is not None
            fmt = drv.backing_format
            if fmt is None:
                fmt = formats.probe_format(child.file.pread(0, formats.PROBE_SIZE), resolved)
            # QEMU takes the format's permissions on the file first: a loop back to a writable
            # image fails on its lock before vdkit's loop check (QEMU has none: a read-only loop hangs)
            lock_file_node(machine, child, (fmt, True))
            walk.visit(resolved, child.file.fd)
            return open_format_node(machine, fmt, child, name=None, ro=True, cache=g.cache, detect_zeroes="off",
                                    discard="ignore", auto_ro=False, implicit=True, walk=walk,
                                    force_share=g.force_share)
        except BaseException:
            delete_node(machine, child)
            raise
    except VdkitError as exc:
        raise exc.prefixed("Could not open backing file: ") from exc


def _open_json_backing(machine: DeviceRegistry, g: GraphNode, walk: BackingWalk, stored: str) -> GraphNode:
    """The nodes a ``json:{...}`` backing name describes, opened as QEMU opens them: new read-only nodes
    (a chain the daemon has open already is opened again, so a writable one refuses them its lock).

    A drive-backup/drive-mirror target with ``sync: top`` over a chain whose backing was given by
    reference gets such a name in its header.  vdkit opens the form QEMU writes there: format nodes
    over local files, each with a ``backing`` of the same form, ``null`` or none (its header's chain);
    every file is subject to the open policy as a backing file named plainly is.
    """
    from vdkit.block.json_name import parse
    from vdkit.opts import dotted_parent

    tree: dict[str, Any] = {}
    for key, value in parse(stored).items():  # dotted keys back into objects
        cur, last = dotted_parent(tree, key, lambda prefix: VdkitError(f"Invalid json: backing name '{stored}'"))
        cur[last] = value
    if walk.depth + 1 >= walk.policy.max_chain_depth:
        from vdkit.errors import OpenError

        raise OpenError(f"Backing chain is deeper than {walk.policy.max_chain_depth} images")
    walk.depth += 1
    return _open_described(machine, g, walk, tree, stored)


def _open_described(machine: DeviceRegistry, g: GraphNode, walk: BackingWalk, d: dict[str, Any],
                    stored: str) -> GraphNode:
    from vdkit.errors import UnsupportedError
    from vdkit.formats.registry import is_known

    driver, f = d.get("driver"), d.get("file")
    if not (isinstance(driver, str) and is_known(driver) and isinstance(f, dict) and f.get("driver") == "file"
            and isinstance(f.get("filename"), str) and set(f) <= {"driver", "filename"}
            and set(d) <= {"driver", "file", "backing"} and isinstance(d.get("backing", {}), dict | None)):
        raise UnsupportedError(f"vdkit opens json: backing names of format nodes over local files only: '{stored}'")
    path = f["filename"]
    walk.policy.check("backing file", stored, path)
    child = open_file_node(machine, {"filename": path, "force-share": g.force_share}, name=None, ro=True,
                           auto_ro=False, cache=g.cache, implicit=True)
    try:
        assert child.file is not None
        lock_file_node(machine, child, (driver, True))
        walk.visit(path, child.file.fd)
        backing: GraphNode | None | str | Callable[[], GraphNode] = "header"
        if "backing" in d:
            below = d["backing"]
            backing = None if below is None else (lambda: _open_described(machine, g, walk, below, stored))
        return open_format_node(machine, driver, child, name=None, ro=True, cache=g.cache, detect_zeroes="off",
                                discard="ignore", auto_ro=False, implicit=True, backing=backing, walk=walk,
                                force_share=g.force_share)
    except BaseException:
        delete_node(machine, child)
        raise


def delete_node(machine: DeviceRegistry, g: GraphNode) -> None:
    """Close ``g`` and every implicit child no other node uses."""
    if g in machine.graph.nodes:
        machine.graph.nodes.remove(g)
    machine.release_name(g.name)
    g.close()
    for c in g.children():
        if c.implicit and not machine.graph.parents_of(c):
            delete_node(machine, c)
        elif c.file is not None and c in machine.graph.nodes:
            lock_file_node(machine, c)  # what it still holds for its other parents


def chain_depth(g: GraphNode) -> int:
    n, cur = 0, g.backing
    while cur is not None:
        n += 1
        cur = cur.backing
    return n
