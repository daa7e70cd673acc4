"""The format driver protocol: the operations table every format fills in.

Generic code (nodes, chains, info collection, the CLI and the monitor) only
calls through this class.  An operation a format does not provide raises the
standard "not supported" error here, in one place, like an empty slot in
QEMU's ``BlockDriver`` table.
"""

from __future__ import annotations

import errno

from vdkit.errors import CorruptImageError, UnsupportedError

# Block status lives at the bottom (the file protocol answers it too); re-exported for formats.
from vdkit.io import ALLOCATED as ALLOCATED
from vdkit.io import DATA as DATA
from vdkit.io import EOF as EOF
from vdkit.io import OFFSET_VALID as OFFSET_VALID
from vdkit.io import ZERO as ZERO
from vdkit.io import BlockStatus as BlockStatus
from vdkit.record import record

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import ClassVar

    from vdkit.block.chain import OpenPolicy
    from vdkit.block.dirty_bitmap import DirtyBitmap
    from vdkit.block.node import Node
    from vdkit.block.snapshot import SnapshotRecord
    from vdkit.block.target import Target
    from vdkit.info.model import ImageInfoSpecific
    from vdkit.io.file import ImageFile

    CheckReport = Callable[[str], None]


@record(frozen=True)
class CorruptionReport:
    """One corruption event of a driver, as QEMU signals it (``BLOCK_IMAGE_CORRUPTED``'s data).

    ``driver`` is the format that signalled it (the prefix of QEMU's stderr line);
    ``offset``/``size`` are -1 when the event is not about a host range (QMP then
    leaves them out).  ``fatal`` events happen on writable images only: the image
    was marked corrupt and the node is dead.
    """

    message: str
    offset: int
    size: int
    fatal: bool
    driver: str

    @property
    def text(self) -> str:
        """The stderr line QEMU prints (without the newline)."""
        if self.fatal:
            return (f"{self.driver}: Marking image as corrupt: {self.message}; further corruption events will "
                    "be suppressed")
        return (f"{self.driver}: Image is corrupt: {self.message}; further non-fatal corruption events will be "
                "suppressed")


class CorruptionEvent(CorruptImageError):
    """A request failed on metadata its driver calls corrupt (the event was signalled, the request saw EIO).

    ``report`` is the event still to be printed when no :attr:`FormatDriver.corruption_hook`
    took it (front ends print ``report.text`` before the error), else None.
    """

    report: CorruptionReport | None = None


@record
class CheckResult:
    """QEMU's ``BdrvCheckResult``; ``error`` is the negative errno of a check that could not finish."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    error: int = 0


@record
class OpenContext:
    """How a node is being opened: what a driver needs to open the files its image names.

    A format whose metadata names other files (VMDK extents, an external data
    file) opens them through :meth:`open_child`, which applies the caller's
    :class:`~vdkit.block.chain.OpenPolicy`, so no driver follows a reference
    the caller did not allow.
    """

    filename: str
    readonly: bool = True
    force_share: bool = False
    check_mode: bool = False
    no_io: bool = False
    policy: OpenPolicy | None = None

    def open_child(self, kind: str, stored: str, resolved: str, *, readonly: bool | None = None) -> ImageFile:
        """Open a file the image refers to (``kind`` names it in errors: "extent file", "data file")."""
        from vdkit.block.chain import default_policy
        from vdkit.io.file import ImageFile

        (self.policy or default_policy()).check(kind, stored, resolved)
        return ImageFile(resolved, readonly=self.readonly if readonly is None else readonly,
                         force_share=self.force_share)


class FormatDriver:
    """One format opened on one file.  Subclasses override what they support.

    The slots mirror QEMU's ``BlockDriver`` table; each has the behaviour of an
    empty slot (QEMU's "not supported" error, or nothing for pure hints) so a
    format implements only what it has.  Module-level entry points of a format
    (probe, open, create) are described in :mod:`vdkit.formats.registry`.
    """

    format_name: ClassVar[str] = ""
    supports_backing: ClassVar[bool] = False
    # Zeros written without unmapping cost as much as data (QEMU: no BDRV_REQ_NO_FALLBACK support),
    # so a request that wants them fast or not at all (NBD's FAST_ZERO with NO_HOLE) is refused.
    slow_allocated_zeroes: ClassVar[bool] = False
    # Data runs that block status reports with OFFSET_VALID hold the guest bytes as they are at that
    # host offset of the named file (QEMU's map shows them so; reads there are plain reads), unless
    # the image is encrypted: the copy engine and the NBD export may map or read that file directly.
    plain_data: ClassVar[bool] = False
    # Where corruption events go (the daemon's event emitter); formats that signal them call it.
    corruption_hook: Callable[[CorruptionReport], None] | None = None
    # A fatal corruption event killed the node: every request fails (QEMU: no driver left).
    dead: bool = False
    # The node's dirty bitmaps, newest first (QEMU lists them so); None until first asked for
    # (``Node.bitmaps`` loads the persistent ones then: read-only users never pay for them).
    dirty_bitmaps: list[DirtyBitmap] | None = None

    def __init__(self, file: ImageFile) -> None:
        self.file = file

    # -- geometry and state ---------------------------------------------------
    @property
    def virtual_size(self) -> int:
        raise NotImplementedError

    @property
    def cluster_size(self) -> int | None:
        return None

    @property
    def encrypted(self) -> bool:
        return False

    @property
    def dirty(self) -> bool | None:
        """The dirty flag; None for a format QEMU reports none for (no ``dirty-flag`` key in info)."""
        return False

    @property
    def backing_file(self) -> str | None:
        """The backing file name as stored in the image (unresolved)."""
        return None

    @property
    def backing_format(self) -> str | None:
        return None

    def open_children(self, ctx: OpenContext) -> None:
        """Open the files the image names besides its backing file (data file, extents), via ``ctx``."""

    def probed_open_warning(self, name: str) -> str | None:
        """What opening this format writable prints when probing guessed it (``name``: the name the
        user gave); None: nothing (QEMU's raw driver is the one that warns)."""
        return None

    def specific_info(self) -> ImageInfoSpecific | None:
        """``Format specific information`` of ``qemu-img info`` (QAPI ``ImageInfoSpecific``), if any."""
        return None

    def check(self, repair: str | None, report: CheckReport) -> CheckResult:
        """``qemu-img check``: ``repair`` is None, "leaks" or "all"; problems go to ``report`` as found."""
        raise UnsupportedError("This image format does not support checks", errno=errno.ENOTSUP)

    # -- image-level operations (qemu-img resize, commit, rebase) ---------------
    def truncate(self, size: int, prealloc: str = "off", *, backing: Callable[[int, int], bytes] | None = None,
                 backing_size: int = 0) -> None:
        """Grow or shrink the virtual disk to ``size``; ``backing`` reads the chain below (for
        the copy-on-write of a partly new cluster), ``backing_size`` is its length (QEMU zeroes a
        grown area a longer backing file would otherwise show through)."""
        raise UnsupportedError("Image format driver does not support resize", errno=errno.ENOTSUP)

    def make_empty(self) -> None:
        """Drop all guest data of this layer so the backing file shows through (after commit).

        Formats that cannot do it keep their data, which still reads the same after a commit."""

    def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Rewrite the backing file reference stored in the image (``rebase``); None removes it."""
        raise UnsupportedError("Operation not supported", errno=errno.ENOTSUP)

    # -- untrusted-image inspection (vdkit-img inspect) --------------------------
    def references(self) -> list[tuple[str, str]]:
        """Every file the image names, as ``(kind, name as stored)``: "backing-file", "data-file",
        "extent"...  Read from metadata only; nothing is opened."""
        stored = self.backing_file
        return [] if stored is None else [("backing-file", stored)]

    def inspect_issues(self) -> list[tuple[str, str]]:
        """Problems in the image's own metadata that QEMU would trip over or that hide data
        (tables past the end of the file, overlapping metadata, unknown feature bits), as
        ``(kind, detail)``.  The file was opened read-only in check mode."""
        return []

    def extra_files(self) -> list[ImageFile]:
        """Other files this node owns (an external data file), for disk usage."""
        return []

    def allocated_size(self) -> int:
        return self.file.allocated_size() + sum(f.allocated_size() for f in self.extra_files())

    # -- snapshots ------------------------------------------------------------
    def snapshots(self) -> Sequence[SnapshotRecord]:
        """Internal snapshots; formats without them have none."""
        return []

    def _unsupported(self) -> UnsupportedError:
        return UnsupportedError("Block driver does not support snapshots", errno=errno.ENOTSUP)

    supports_snapshots: ClassVar[bool] = False
    # The snapshots are the file's, passed down by a format without a revert of its own (raw over rbd):
    # QEMU's revert then closes the node, reverts the file and opens the node again (its open warnings too).
    snapshot_revert_reopens: ClassVar[bool] = False

    def snapshot_unsupported_reason(self) -> str | None:
        """Why this image cannot take snapshots although its format can (qcow2: an external data file)."""
        return None

    def snapshot_create(self, name: str, *, date_sec: int, date_nsec: int, vm_clock_nsec: int = 0,
                        vm_state_size: int = 0, icount: int | None = None,
                        vm_state: bytes | None = None) -> SnapshotRecord:
        raise self._unsupported()

    def read_vmstate(self, entry: SnapshotRecord) -> bytes:
        """The VM state saved with snapshot ``entry`` (``loadvm``); empty for disk-only snapshots."""
        raise self._unsupported()

    def save_vmstate(self, data: bytes) -> None:
        """Write ``data`` into the active layer's VM-state area (``savevm``, before the snapshot
        that captures it; QEMU's ``bdrv_save_vmstate``)."""
        raise UnsupportedError("Operation not supported", errno=errno.ENOTSUP)

    def snapshot_delete(self, *, snapshot_id: str | None = None, name: str | None = None) -> SnapshotRecord:
        raise self._unsupported()

    def snapshot_revert(self, entry: SnapshotRecord) -> None:
        raise self._unsupported()

    def forget_snapshot(self, entry: SnapshotRecord) -> None:
        """Drop ``entry`` from this open node's snapshot list only, the file unchanged (QEMU's failed
        delete on a read-only image: the entry left its in-memory table before the write failed)."""

    def snapshot_load_tmp(self, snapshot_id: str | None, name: str | None, *, fallback_name: bool = False) -> None:
        """Make this read-only image show an internal snapshot until it is closed (``convert -l``).

        Nothing is written.  ``snapshot_id``/``name`` must both match when both
        are given; ``fallback_name`` looks ``snapshot_id`` up as an ID first and
        then as a name (the rule for a plain ``-l NAME``).
        """
        raise UnsupportedError(f"Block format '{self.format_name}' used by device '' does not support "
                               "temporarily loading internal snapshots")

    def flush(self) -> None:
        """Make everything written so far durable (nothing cached by default)."""

    # -- data -----------------------------------------------------------------
    def read(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None) -> bytes:
        """Guest bytes of this layer; ranges it does not allocate come from ``backing`` (or zeros)."""
        raise UnsupportedError(f"Driver '{self.format_name}' does not support reading")

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """Status of the run at ``offset`` in this layer only (see :mod:`vdkit.block.io`)."""
        raise UnsupportedError(f"Driver '{self.format_name}' does not support block status")

    def data_location(self, offset: int, length: int) -> tuple[str, int, int] | None:
        """Where this layer's guest bytes at ``offset`` lie as they are in its file, when
        :meth:`block_status` names no offset because QEMU 7.2's driver reports none (so ``map``
        must not either): ``(file name, host offset, how many of the ``length`` bytes follow each
        other there)``, or None.  The copy engine maps data runs by it (``block.copy.Copier``)."""
        return None

    def status_runs(self, offset: int, end: int) -> Iterator[BlockStatus]:
        """This layer's statuses covering ``[offset, end)`` in order: :meth:`block_status` asked at
        each run's start (at most 1 GiB a query, as qemu-img map asks); a format whose runs are at
        hand overrides it, so that a walk over a large image (``map``) costs one object per run."""
        end = min(end, self.virtual_size)
        while offset < end:
            st = self.block_status(offset, min(1 << 30, end - offset))
            if st.length <= 0:
                return
            yield st
            offset += st.length

    def readinto(self, offset: int, view: memoryview, backing: Callable[[int, int], bytes] | None = None) -> None:
        """:meth:`read` into the caller's buffer (convert's bulk path); a format overrides it to skip
        the intermediate bytes object."""
        view[:] = self.read(offset, len(view), backing)

    def readinto_filled(self, offset: int, view: memoryview,
                        fill: Callable[[int, memoryview], None] | None) -> None:
        """:meth:`readinto` with the backing chain given as a filler (it writes the chain's bytes
        into a view), as the chain's bulk read calls it; a format whose engine takes a filler
        overrides it and never builds bytes for the backing data."""
        backing = None
        if fill is not None:
            def backing(pos: int, length: int) -> bytes:
                buf = bytearray(length)
                fill(pos, memoryview(buf))
                return bytes(buf)
        self.readinto(offset, view, backing)

    def write(self, offset: int, data: bytes, backing: Callable[[int, int], bytes] | None = None) -> None:
        """Guest write; ``backing`` supplies the data a partial copy-on-write needs."""
        raise UnsupportedError(f"Driver '{self.format_name}' does not support writing")

    def write_zeroes(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None, *,
                     unmap: bool = False) -> None:
        """Zeros written as data, as QEMU does for formats without a zero-write operation (they
        allocate), in pieces of at most 1 MiB so that a large request never becomes one large buffer."""
        step = 1 << 20
        zeros = bytes(min(step, length))
        for pos in range(offset, offset + length, step):
            self.write(pos, zeros[: min(step, offset + length - pos)], backing)

    def write_compressed(self, offset: int, data: bytes) -> None:
        """``convert -c``: write whole clusters compressed (formats that set SUPPORTS_COMPRESSION)."""
        raise UnsupportedError("Compression not supported for this file format", errno=errno.ENOTSUP)

    def discard(self, offset: int, length: int, *, has_backing: bool = False) -> None:
        """Drop data the guest no longer needs (a hint: doing nothing is correct)."""

    def copy_target(self, node: Node, *, created: bool, target_is_zero: bool, has_backing: bool,
                    compressed: bool) -> Target:
        """What the copy engine writes to when this open node is ``convert``'s target (``node`` holds
        this driver; closed on refusal): by default the driver's own write slots.  ``created``: vdkit
        just created the image; ``target_is_zero``: the user's promise; ``compressed``: ``-c``."""
        from vdkit.block.target import DriverTarget, zero_init

        return DriverTarget(node, has_zero_init=zero_init(node, created=created, target_is_zero=target_is_zero,
                                                          has_backing=has_backing))

    # -- persistent dirty bitmaps (vdkit.block.dirty_bitmap) ------------------------------------
    # the image can store bitmaps (``qemu-img convert --bitmaps`` asks the source and the target)
    supports_persistent_bitmaps = False

    def load_dirty_bitmaps(self) -> list[DirtyBitmap]:
        """The bitmaps the image stores, newest first (a writable open marks them in use on disk)."""
        return []

    def can_store_bitmap(self, name: str, granularity: int, label: str) -> None:
        """Refuse a new persistent bitmap the image cannot hold (``label``: the device or node name)."""
        raise UnsupportedError(f"Can't store persistent bitmaps to {label}: Operation not supported",
                               errno=errno.ENOTSUP)

    def remove_persistent_bitmap(self, name: str) -> None:
        """Drop a stored bitmap from the image now (``block-dirty-bitmap-remove``); absent is fine."""

    def store_dirty_bitmaps(self) -> None:
        """Write the persistent bitmaps into the image (called when a writable node closes)."""

    def reopen_bitmaps(self, *, readonly: bool) -> None:
        """The node is reopened read-only (store the persistent bitmaps, make them read-only) or back
        read-write (they record again).  Formats that store none only flip the flag."""
        for bm in self.dirty_bitmaps or []:
            if bm.persistent:
                bm.readonly = readonly

    def close(self) -> None:
        for f in self.extra_files():
            f.close()
        self.file.close()
