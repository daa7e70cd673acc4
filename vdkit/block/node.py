"""Node: one open image with its driver and the nodes below it.

A node owns its file (and external data file) for as long as it is open,
including the QEMU-compatible locks on them.  Its ``backing`` is another node,
opened through the same function with the format the image records (or
probed), so a chain is a linked list of nodes that each know only their own
format.
"""

from __future__ import annotations

import os

from vdkit.block.chain import (
    QEMU_PROTOCOLS,
    BackingWalk,
    OpenPolicy,
    protocol_of,
    resolve_backing_name,
)
from vdkit.block.driver import OpenContext
from vdkit.errors import OpenError, UnsupportedError, VdkitError
from vdkit.formats import registry
from vdkit.io.file import ImageFile, LockMode

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import TypeAlias

    from vdkit.block.dirty_bitmap import DirtyBitmap
    from vdkit.block.driver import FormatDriver
    from vdkit.block.io import MapEntry
    from vdkit.block.secrets import BackingOverride
    from vdkit.block.snapshot import SnapshotRecord
    from vdkit.info.model import SnapshotInfo
    from vdkit.protocols.nbd import NbdFile

    SnapshotRef: TypeAlias = SnapshotInfo | SnapshotRecord | str  # what the snapshot methods accept


class Node:
    """An open image.  Use :func:`open_image` (or ``vdkit.open``) to make one.

    Guest requests (:meth:`read`, :meth:`write`, ...) are checked against the virtual size first, as
    QEMU's block layer checks every request: a negative offset or length, or a range that does not lie
    within the disk, fails with ``EIO`` (``Input/output error``) instead of returning zeros.
    """

    def __init__(self, filename: str, driver: FormatDriver, *, readonly: bool) -> None:
        self.filename = filename
        # The name QEMU shows for a node opened from options its file name cannot express (json:{...}:
        # luks's key-secret, curl's cookie): info reports it, the chain still resolves from filename.
        self.display_name: str | None = None
        self.driver = driver
        self.readonly = readonly
        self.backing: Node | None = None
        # Called with (offset, length) before a guest write to this node lands: a backup job's
        # copy-before-write saves the old data there (vdkit.block.io runs them).
        self.before_write: list[Callable[[int, int], None]] = []
        # Called with (offset, length) after a guest write (data, zeroes, discard) to this node landed:
        # a write-blocking mirror copies it to its target before the write completes.
        self.after_write: list[Callable[[int, int], None]] = []

    @property
    def format(self) -> str:
        """The format driver's name (``"qcow2"``, ``"raw"``, ...) as ``qemu-img info`` prints it."""
        return self.driver.format_name

    @property
    def backing_filename_resolved(self) -> str | None:
        """The stored backing file name resolved as QEMU resolves it (relative to this image's folder).

        ``None`` when the image names no backing file; the name is computed, not checked to exist.
        """
        stored = self.driver.backing_file
        return None if stored is None else resolve_backing_name(self.filename, stored)

    def chain(self) -> Iterator[Node]:
        """This node, then each opened backing node down to the base (``backing=False`` opens just one)."""
        node: Node | None = self
        while node is not None:
            yield node
            node = node.backing

    def warnings(self) -> list[tuple[str, str | None]]:
        """Open-time warnings of the chain, top first, as ``(message, hint)``; front ends print them."""
        out: list[tuple[str, str | None]] = []
        for node in self.chain():
            out.extend(getattr(node.driver, "open_warnings", ()))
        return out

    def snapshots(self) -> list[SnapshotInfo]:
        """Internal snapshots in table order, as ``qemu-img snapshot -l`` lists them (empty without any).

        Each item can be handed back to :meth:`snapshot_revert`, :meth:`snapshot_delete` and
        :meth:`read_vmstate`.
        """
        from vdkit.block.snapshot import snapshot_infos

        return snapshot_infos(self.driver)

    # -- internal snapshots (thin wrappers; the driver does the work) ----------
    def snapshot_create(self, name: str, *, date_sec: int | None = None, date_nsec: int | None = None,
                        vm_clock_nsec: int = 0, vm_state_size: int = 0, icount: int | None = None,
                        vm_state: bytes | None = None) -> SnapshotRecord:
        """Take an internal snapshot ``name`` of the image as it is now; returns the new table entry.

        The date defaults to now at microsecond precision and the VM clock to 0, as ``qemu-img
        snapshot -c`` records them (no VM ran).  ``vm_state`` (``savevm``'s data) is stored with it.
        Formats without internal snapshots raise :class:`~vdkit.errors.UnsupportedError`.
        """
        if date_sec is None or date_nsec is None:
            import time

            now_us = time.time_ns() // 1000
            date_sec = now_us // 1_000_000 if date_sec is None else date_sec
            date_nsec = now_us % 1_000_000 * 1000 if date_nsec is None else date_nsec
        return self.driver.snapshot_create(name, date_sec=date_sec, date_nsec=date_nsec,
                                           vm_clock_nsec=vm_clock_nsec, vm_state_size=vm_state_size,
                                           icount=icount, vm_state=vm_state)

    def _snapshot_entry(self, snapshot: SnapshotRef) -> SnapshotRecord:
        """The table entry ``snapshot`` names: an entry as is, a ``SnapshotInfo`` by its ID and name
        together, a string as an ID first and then as a name (``qemu-img snapshot -a``'s lookup)."""
        from vdkit.info.model import SnapshotInfo

        if not isinstance(snapshot, (str, SnapshotInfo)):
            return snapshot
        if not self.driver.supports_snapshots:
            raise self.driver._unsupported()
        from vdkit.block.snapshot import find_by_id_and_name, find_id_then_name

        entries = self.driver.snapshots()
        if isinstance(snapshot, str):
            found = find_id_then_name(entries, snapshot)
        else:
            found = find_by_id_and_name(entries, snapshot.id, snapshot.name)
        if found is None:
            import errno

            from vdkit.errors import SnapshotNotFoundError

            raise SnapshotNotFoundError("Can't find the snapshot", errno=errno.ENOENT)
        return found

    def read_vmstate(self, snapshot: SnapshotRef) -> bytes:
        """The VM state saved with a snapshot (``savevm``); empty for disk-only snapshots.

        ``snapshot`` is what :meth:`snapshots` returns, a table entry, or an ID or name.
        """
        return self.driver.read_vmstate(self._snapshot_entry(snapshot))

    def snapshot_delete(self, snapshot: SnapshotRef | None = None, *, snapshot_id: str | None = None,
                        name: str | None = None) -> SnapshotRecord:
        """Delete an internal snapshot and free what only it used; returns the deleted entry.

        Name it by ``snapshot`` (what :meth:`snapshots` returns, a table entry, or an ID-or-name string
        looked up as :meth:`snapshot_revert` does), or by ``snapshot_id`` and/or ``name`` (both given:
        one snapshot must have both, as QMP's ``blockdev-snapshot-delete-internal-sync`` requires).
        A snapshot that does not exist raises :class:`~vdkit.errors.SnapshotNotFoundError` (ENOENT).
        """
        if snapshot is not None:
            if snapshot_id is not None or name is not None:
                raise TypeError("snapshot_delete() takes a snapshot or snapshot_id/name, not both")
            from vdkit.block.snapshot import id_of, name_of

            entry = self._snapshot_entry(snapshot)
            snapshot_id, name = id_of(entry), name_of(entry)
        return self.driver.snapshot_delete(snapshot_id=snapshot_id, name=name)

    @property
    def bitmaps(self) -> list[DirtyBitmap]:
        """The node's dirty bitmaps, newest first; the image's persistent ones are loaded on first use.

        Every guest write through :mod:`vdkit.block.io` marks the recording ones.  A writable qcow2
        image marks its stored bitmaps in use when they are loaded (as QEMU does when it opens one) and
        stores them back when the node closes.
        """
        drv = self.driver
        if drv.dirty_bitmaps is None:
            drv.dirty_bitmaps = drv.load_dirty_bitmaps()
        return drv.dirty_bitmaps

    def find_bitmap(self, name: str) -> DirtyBitmap | None:
        """The node's in-memory dirty bitmap called ``name`` (bitmap commands name them per node)."""
        return next((b for b in self.bitmaps if b.name == name), None)

    @property
    def dirty_bitmaps(self) -> list[str]:
        """Names of the node's bitmaps: the loaded ones, else those the image stores (QEMU loads them on open)."""
        if self.driver.dirty_bitmaps is not None:
            return [b.name for b in self.driver.dirty_bitmaps if b.name is not None]
        return [b.name for b in getattr(self.driver, "bitmaps", ())]

    def snapshot_goto_blocker(self) -> VdkitError | None:
        """Why this node cannot be reverted to a snapshot, checked before the snapshot is looked up.

        QEMU refuses while the node has dirty bitmaps: reverting would leave them describing
        changes against data that is gone, and qcow2 has no way to revert them with the data.
        """
        if self.dirty_bitmaps:
            import errno

            return VdkitError("Device has active dirty bitmaps", errno=errno.EBUSY)
        return None

    def snapshot_revert(self, snapshot: SnapshotRef) -> None:
        """Make the image's current state that of a snapshot (``qemu-img snapshot -a``).

        ``snapshot`` is what :meth:`snapshots` returns, a table entry, or a string tried as an ID and
        then as a name.  Refused while the image has dirty bitmaps (:meth:`snapshot_goto_blocker`).
        """
        blocker = self.snapshot_goto_blocker()
        if blocker is not None:
            raise blocker
        self.driver.snapshot_revert(self._snapshot_entry(snapshot))

    # -- data (the work is in vdkit.block.io; these are conveniences for API users) --------------
    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        return self.driver.virtual_size

    def _check_request(self, op: str, offset: int, length: int) -> None:
        """QEMU's request check: EIO (qemu-io: ``read failed: Input/output error``) for a negative
        offset or length or a range past the end; the hint says which, for API users.  A node a fatal
        corruption event killed has no driver left in QEMU: ENOMEDIUM comes before any range check."""
        if self.driver.dead:
            import errno

            raise VdkitError("No medium found", errno=errno.ENOMEDIUM)
        size = self.size
        if offset < 0 or length < 0 or offset > size or size - offset < length:
            import errno

            raise VdkitError(f"{op} failed: Input/output error", errno=errno.EIO,
                             hint=f"request at offset {offset}, length {length} is outside the "
                                  f"{size}-byte disk")

    def read(self, offset: int, length: int) -> bytes:
        """``length`` guest bytes at ``offset``, through the whole backing chain.

        The range must lie within the disk (see the class docstring); reading 0 bytes at the end is fine.
        """
        self._check_request("read", offset, length)
        from vdkit.block import io

        return io.read(self, offset, length)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (within the disk) to this node, the top of the chain.

        Needs a node opened with ``readonly=False``; partial clusters are completed from the backing chain.
        """
        self._check_request("write", offset, len(data))
        from vdkit.block import io

        io.write(self, offset, data)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make ``[offset, offset + length)`` read as zeros (qemu-io ``write -z``; ``unmap`` may free it)."""
        self._check_request("write", offset, length)
        from vdkit.block import io

        io.write_zeroes(self, offset, length, unmap=unmap)

    def discard(self, offset: int, length: int) -> None:
        """Tell the image the range is no longer needed (qemu-io ``discard``); it may read back as zeros
        or as the backing file's data afterwards."""
        self._check_request("discard", offset, length)
        from vdkit.block import io

        io.discard(self, offset, length)

    def flush(self) -> None:
        """Make every write so far durable (cached metadata written back, then the file synced)."""
        self.driver.flush()

    def map(self, offset: int = 0, length: int | None = None) -> Iterator[MapEntry]:
        """``qemu-img map``'s entries (merged runs with depth, zero/data flags and host offsets)."""
        from vdkit.block import io

        end = self.size if length is None else min(self.size, offset + length)
        return io.map_entries(self, offset, end)

    def close(self) -> None:
        """Flush and close this node and its backing nodes, releasing their QEMU locks."""
        for node in list(self.chain()):
            node.driver.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Node {self.filename!r} format={self.format}>"


def open_image(
    filename: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    readonly: bool = True,
    force_share: bool = False,
    backing: bool = True,
    policy: OpenPolicy | None = None,
    check_mode: bool = False,
    no_io: bool = False,
    walk: BackingWalk | None = None,
    share_writes: bool = False,
    resize: bool = False,
    on_open: Callable[[FormatDriver], None] | None = None,
    own_backing: bool = False,
) -> Node:
    """Open an image (and, with ``backing=True``, its whole backing chain).

    ``no_io`` opens for metadata only, as ``qemu-img info`` does: a data file
    that cannot be opened is then left closed instead of failing the open.
    ``walk`` continues a chain walk the caller is doing one image at a time
    (its policy, depth and loop detection then cover this image too).
    ``share_writes``: the caller lets other processes write and resize the
    files while they are open, as qemu-img's commands (but convert) do; only
    a raw image's lock then refuses nothing (formats with metadata still
    refuse).  ``resize``: the caller will resize the image (a raw image's lock
    takes the resize permission only then).  See
    :meth:`vdkit.io.file.LockMode.for_image`.  ``on_open`` is called with the
    driver as soon as the image's format has opened: where QEMU prints what
    opening printed (the probed-raw warning), before a raw file is locked.
    ``own_backing`` (with ``backing=False``): the caller opens the backing
    chain itself, layer by layer (``commit``), so what options said about the
    backing is checked as for an open that follows it, and left for the
    caller (:func:`backing_of`) instead of refused as unused.
    Errors carry qemu-img's text, prefixed with ``Could not open '<name>': ``.
    """
    name = os.fspath(filename)
    if walk is None:
        walk = BackingWalk(policy)
    try:
        return _open(name, fmt, readonly=readonly, force_share=force_share, backing=backing,
                     check_mode=check_mode, no_io=no_io, walk=walk, share_writes=share_writes, resize=resize,
                     on_open=on_open, own_backing=own_backing)
    except VdkitError as exc:
        raise exc.prefixed(f"Could not open '{name}': ") from exc


def _open(
    name: str,
    fmt: str | None,
    *,
    readonly: bool,
    force_share: bool,
    backing: bool,
    check_mode: bool,
    no_io: bool,
    walk: BackingWalk,
    share_writes: bool = False,
    resize: bool = False,
    attached: bool = False,
    on_open: Callable[[FormatDriver], None] | None = None,
    own_backing: bool = False,
) -> Node:
    if fmt is not None and not registry.is_known(fmt):
        raise OpenError(f"Unknown driver '{fmt}'")
    if name.startswith("json:"):  # a format's window (raw's offset/size: registry.window_name)
        window = registry.open_window(name, readonly, force_share)
        if window is not None:
            from vdkit.block.chain import backing_override, given_option

            return _open_on(window, name, fmt, readonly=readonly,  # type: ignore[arg-type]  # file-like
                            force_share=force_share, backing=backing and given_option(name, "backing") != "null",
                            check_mode=check_mode, no_io=no_io, walk=walk, on_open=on_open,
                            override=backing_override(name), own_backing=own_backing)
    proto = protocol_of(name)
    # a protocol as the top node (driver=nbd/rbd) opens only its own names
    required: str | None = None if fmt is None else getattr(registry.format_module(fmt), "NAME_REQUIRED", None)
    pdriver: str | None = None
    if proto is not None or required is not None:
        from vdkit.protocols.registry import driver_for_prefix

        pdriver = driver_for_prefix(proto)
        if required is not None and pdriver != fmt:
            raise OpenError(required)
    from vdkit.block.chain import backing_override

    override = backing_override(name)  # json:/--image-opts "backing" other than null
    if backing or proto is not None:
        from vdkit.block.chain import given_option

        # json:{..., "backing": null}; a file.filename given as an option is a local name, whatever it reads
        backing = backing and given_option(name, "backing") != "null"
        if proto is not None and given_option(name, "protocol") == "file":
            proto = pdriver = None
    file: ImageFile | NbdFile
    if proto == "file":
        name = name[len("file:"):]
    elif pdriver is not None:
        return _open_protocol(pdriver, name, fmt, readonly=readonly, force_share=force_share, backing=backing,
                              check_mode=check_mode, no_io=no_io, walk=walk, on_open=on_open, override=override,
                              own_backing=own_backing)
    elif proto in QEMU_PROTOCOLS:
        raise UnsupportedError(f"Protocol '{proto}' is not supported by vdkit")
    elif proto is not None:
        raise OpenError(f"Unknown protocol '{proto}'")
    if not name:
        raise OpenError("The 'file' block driver requires a file name")
    file = ImageFile(name, readonly=readonly, force_share=force_share, lock=False)  # locked once probed
    return _open_on(file, name, fmt, readonly=readonly, force_share=force_share, backing=backing,
                    check_mode=check_mode, no_io=no_io, walk=walk, share_writes=share_writes, resize=resize,
                    attached=attached, on_open=on_open, override=override, own_backing=own_backing)


def _open_on(
    file: ImageFile | NbdFile,
    name: str,
    fmt: str | None,
    *,
    readonly: bool,
    force_share: bool,
    backing: bool,
    check_mode: bool,
    no_io: bool,
    walk: BackingWalk,
    share_writes: bool = False,
    resize: bool = False,
    attached: bool = False,
    on_open: Callable[[FormatDriver], None] | None = None,
    override: BackingOverride | None = None,
    own_backing: bool = False,
) -> Node:
    """Open the format layer on an opened protocol node (a local file or an NBD export).

    A local file comes unlocked: its lock bytes depend on the format, so they are taken once the
    format is known (QEMU probes before it locks, too).  A format with metadata locks its file
    before it reads it; a raw node is locked when QEMU attaches it to its user, after it opened
    (and after ``on_open``), or, as a backing file (``attached``), by the caller (:func:`_lock_attached`).
    """
    node: Node | None = None
    try:
        if fmt is None:
            try:
                head = file.pread(0, registry.PROBE_SIZE)
            except OSError as exc:
                raise OpenError("Could not read image for determining its format: "
                                f"{os.strerror(exc.errno or 5)}", errno=exc.errno) from exc
            fmt = registry.probe_format(head, name)
        passes = fmt in registry.PASSES_PERMISSIONS
        lock = LockMode.for_image(readonly=readonly, force_share=force_share, no_io=no_io,
                                  share_writes=share_writes, resize=resize, passes_permissions=passes)
        if isinstance(file, ImageFile) and not passes:
            file.take_lock(lock)
        walk.visit(name, file.fd)  # a loop that comes back to a writable image is refused by its lock first
        ctx = OpenContext(name, readonly=readonly, force_share=force_share, check_mode=check_mode, no_io=no_io,
                          policy=walk.policy)
        driver = registry.open_driver(fmt, file, ctx)  # type: ignore[arg-type]  # NbdFile is file-like
        node = Node(name, driver, readonly=readonly)
        if on_open is not None:
            on_open(driver)
        if isinstance(file, ImageFile) and passes and not attached:
            file.take_lock(lock)
        if driver.encrypted and not no_io and not getattr(driver, "has_key", False):
            # Reading guest data needs the key: only the luks format takes one (its driver sets has_key)
            raise OpenError("Parameter 'encrypt.key-secret' is required for cipher")
        driver.open_children(ctx)
        if override is not None and _backing_refused(driver, fmt, override, backing or own_backing):
            override = None  # a "default" backing member: the image's own backing name
        if backing and (driver.backing_file is not None or override is not None):
            _open_backing(node, force_share=force_share, no_io=no_io, walk=walk, share_writes=share_writes,
                          override=override)
        return node
    except BaseException:
        if node is not None:
            node.close()
        else:
            file.close()
        raise


def _open_protocol(driver: str, name: str, fmt: str | None, *, readonly: bool, force_share: bool,
                   backing: bool, check_mode: bool, no_io: bool, walk: BackingWalk,
                   on_open: Callable[[FormatDriver], None] | None = None,
                   override: BackingOverride | None = None, own_backing: bool = False) -> Node:
    """A name of a protocol of :mod:`vdkit.protocols.registry` (NBD, HTTP(S), RBD): its ``open_file`` gives
    the file and the name the format opens it under; a file with a ``node_name`` names the node once its
    format is known (rbd: ``json:{"driver": FMT, "file": {...}}``, as QEMU names it)."""
    from vdkit.protocols.registry import protocol_module

    pfile, pname = protocol_module(driver).open_file(name, readonly=readonly, force_share=force_share, fmt=fmt)
    node = _open_on(pfile, pname, fmt, readonly=readonly, force_share=force_share, backing=backing,
                    check_mode=check_mode, no_io=no_io, walk=walk, on_open=on_open, override=override,
                    own_backing=own_backing)
    node_name = getattr(pfile, "node_name", None)
    if node_name is not None:
        node.filename = node_name(node.format)
    return node


def _backing_refused(driver: FormatDriver, fmt: str, override: BackingOverride, backing: bool) -> bool:
    """Refuse a ``backing`` member as QEMU does after the image opened (True: it changes nothing).

    A command that opens no backing (or a member ``null`` already took) leaves it unused; a driver
    without a backing child cannot take a node; a number, a boolean or an empty object only goes
    where the image has a backing file.
    """
    from vdkit.protocols.registry import is_protocol

    if not backing or override.kind == "unused" or override.kind == "default" and (
            not driver.supports_backing or driver.backing_file is None):
        if is_protocol(fmt):
            raise OpenError(f"Block protocol '{fmt}' doesn't support the option '{override.unused}'")
        raise OpenError(f"Block format '{fmt}' does not support the option '{override.unused}'")
    if not driver.supports_backing:
        raise OpenError("Driver doesn't support backing files")
    return override.kind == "default"


def _backing_name(node: Node, walk: BackingWalk, override: BackingOverride | None) -> tuple[str, str | None]:
    """(name, format) of the backing ``node`` opens: its header's, resolved through ``walk``, or what the
    options' ``backing`` object (``override``) makes of it.  Errors of the options come prefixed
    'Could not open backing file: ', the walk's (policy, depth, NBD's base directory) without."""
    stored = node.driver.backing_file
    fmt = node.driver.backing_format
    # the image's name is resolved unless the options name the file (its errors stay: NBD's base directory)
    resolved = None if stored is None or override is not None and override.explicit else \
        walk.backing_of(node.filename, stored)
    if override is not None:
        try:
            if override.kind == "ref":
                raise OpenError(f"Cannot find device='{override.ref}' nor node-name='{override.ref}'")
            assert override.open is not None
            resolved, fmt = override.open(resolved, fmt)
        except VdkitError as exc:
            raise exc.prefixed("Could not open backing file: ") from exc
    assert resolved is not None
    if resolved.startswith("json:"):
        resolved, fmt = _json_backing(resolved, fmt, walk)
    return resolved, fmt


def _json_backing(name: str, fmt: str | None, walk: BackingWalk) -> tuple[str, str | None]:
    """A header's ``json:{...}`` backing name (QEMU writes one for a backing node named so, and opens
    it): its options through the ``--image-opts`` interpreter, in the open's scope (a nested
    ``backing`` applies to the file it names); every file it names, nested ones included, is under the
    policy as a plainly named backing file is, and no protocol driver (``OpenPolicy.check`` leaves json:
    names to this: :func:`~vdkit.block.chain.check_json`)."""
    from vdkit.block import json_name
    from vdkit.block.chain import check_json
    from vdkit.block.image_opts import image_opts

    try:
        flat = json_name.parse(name)
        check_json(walk.policy, "backing file", name, flat)  # every file it names (nested ones too)
        filename, driver = image_opts(name, flat)
    except VdkitError as exc:
        raise exc.prefixed(f"Could not open backing file: Could not open '{name}': ") from exc
    walk.policy.check("backing file", name, filename)
    return filename, driver or fmt


def backing_of(node: Node, name: str, walk: BackingWalk) -> tuple[str, str | None, bool] | None:
    """The backing of a layer opened with ``own_backing`` under ``name``: ``(name, format, overridden)``,
    or None when it has none (no backing file and no ``backing`` object, or ``"backing": null``).

    ``overridden``: options gave a backing node other than the one the header names (QEMU then matches
    ``commit -b`` only against that node's file name, as given).  Errors as :func:`_backing_name`'s.
    """
    from vdkit.block.chain import backing_override, given_option

    if given_option(name, "backing") == "null":
        return None
    override = backing_override(name)
    if override is not None and override.kind == "default":
        override = None  # a scalar or empty object: the header's backing (open_image refused it otherwise)
    stored = node.driver.backing_file
    if stored is None and override is None:
        return None
    target, fmt = _backing_name(node, walk, override)
    header = None if stored is None else resolve_backing_name(node.filename, stored)
    return target, fmt, override is not None and target != header


def _open_backing(node: Node, *, force_share: bool, no_io: bool, walk: BackingWalk,
                  share_writes: bool = False, override: BackingOverride | None = None) -> None:
    resolved, fmt = _backing_name(node, walk, override)
    try:
        # Backing files are only ever read; they are opened read-only and shared as the top is (a raw
        # backing file below a qemu-img command's image refuses nothing, as in QEMU)
        node.backing = _open(
            resolved, fmt, readonly=True, force_share=force_share,
            backing=True, check_mode=False, no_io=no_io, walk=walk, share_writes=share_writes, attached=True,
        )
    except VdkitError as exc:
        raise exc.prefixed("Could not open backing file: ") from exc
    try:
        _lock_attached(node.backing, force_share=force_share, no_io=no_io, share_writes=share_writes)
    except VdkitError:
        node.backing.close()
        node.backing = None
        raise


def _lock_attached(backing: Node, *, force_share: bool, no_io: bool, share_writes: bool) -> None:
    """Lock a raw backing file's file, which :func:`_open_on` left unlocked.

    QEMU's raw node takes its parent's permissions, so its file is locked when the node is attached
    below its parent, after it opened: a refusal there is not a 'Could not open backing file' error.
    """
    file = backing.driver.file
    if isinstance(file, ImageFile) and file.lock is None:
        file.take_lock(LockMode.for_image(readonly=True, force_share=force_share, no_io=no_io,
                                          share_writes=share_writes, resize=False, passes_permissions=True))
