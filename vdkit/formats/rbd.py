"""Raw data on an RBD image, and ``driver=rbd`` at the top of a node tree (``file format: rbd``).

QEMU's rbd driver is a protocol driver whose snapshots are the image's
internal snapshots: a raw node above it passes ``snapshot -l/-c/-d/-a`` down
to it, and reports its object size as ``cluster_size``
(``shared/reference/ceph-rbd.md`` §2.2-2.3).  :class:`RbdRawDriver` is the raw
driver on an :class:`~vdkit.protocols.rbd.RbdFile` with those slots;
:class:`RbdDriver` is the same without a format layer, under the name ``rbd``
(an empty format-specific block, as QEMU shows).  Never probed.
"""

from __future__ import annotations

import errno

from vdkit.block.driver import FormatDriver
from vdkit.errors import OpenError, VdkitError
from vdkit.formats.raw import RawDriver

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import OpenContext
    from vdkit.block.snapshot import SnapshotRecord
    from vdkit.info.model import ImageInfoSpecific
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc
    from vdkit.protocols.rbd import RbdFile, RbdSnapshot

FORMAT_NAME = "rbd"
NOT_RBD = "File name must start with 'rbd:'"
NAME_REQUIRED = NOT_RBD  # block.node refuses other names before opening them


def probe(head: bytes, filename: str) -> int:
    """A protocol is never found by probing."""
    return 0


def open_driver(file: ImageFile, ctx: OpenContext) -> RbdDriver:
    if getattr(file, "protocol", None) != "rbd":  # a local file or another protocol
        raise OpenError(NOT_RBD)
    return RbdDriver(file)


def raw_driver(file: ImageFile) -> RbdRawDriver:
    """Raw over a bare rbd node (the protocol registry's ``NODE_FORMAT`` names this module): the image's
    snapshots pass through the raw format."""
    return RbdRawDriver(file)


def create_options() -> list[OptDesc]:
    from vdkit.opts import OptDesc

    return [OptDesc("size", "size", None, "Virtual disk size")]


def create_image(filename: str, opts: CreateOpts) -> None:
    """``create -f rbd`` on a name that is not an rbd name (rbd names: cli/create.py)."""
    raise VdkitError(NOT_RBD)


def _report(message: str) -> None:
    """A line on stderr as the rbd driver's error_report prints it (``qemu-img: failed to create snap: ...``)."""
    import sys

    prog = "vdkit-daemon" if "vdkit.daemon.runtime" in sys.modules else "vdkit-img"
    sys.stdout.flush()
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()


class RbdRawDriver(RawDriver):
    """Raw on RBD: the image is the disk, its RBD snapshots are the internal snapshots."""

    file: RbdFile  # type: ignore[assignment]
    supports_snapshots = True
    snapshot_revert_reopens = True  # raw passes the RBD snapshots down
    stores_vmstate = False  # savevm/loadvm refuse up front (QEMU deletes/rolls back first, then fails)

    @property
    def cluster_size(self) -> int | None:
        """The RBD object size (QEMU's rbd answers bdrv_get_info with it; raw passes it up)."""
        return self.file.cluster_size

    @property
    def virtual_size(self) -> int:
        return (self.file.size() + 511) // 512 * 512

    def snapshots(self) -> list[RbdSnapshot]:
        return self.file.snapshots()

    def snapshot_create(self, name: str, *, date_sec: int, date_nsec: int, vm_clock_nsec: int = 0,
                        vm_state_size: int = 0, icount: int | None = None,
                        vm_state: bytes | None = None) -> SnapshotRecord:
        """An RBD snapshot called ``name`` (it has no date, clock or VM state; QEMU passes none on)."""
        import os

        if not name:
            raise VdkitError("rbd snapshots need a name", errno=errno.EINVAL)
        if vm_state:
            raise VdkitError("Operation not supported", errno=errno.ENOTSUP)
        r = self.file.snap_call("rbd_snap_create", name)
        if r < 0:
            _report(f"failed to create snap: {os.strerror(-r)}")
            raise VdkitError(f"failed to create snap: {os.strerror(-r)}", errno=-r)
        from vdkit.protocols.rbd import RbdSnapshot

        return RbdSnapshot(name, self.file.size())

    def snapshot_delete(self, *, snapshot_id: str | None = None, name: str | None = None) -> SnapshotRecord:
        """Remove the RBD snapshot ``name``; an ID other than the name is refused (IDs are names)."""
        import os

        if name is None:
            raise VdkitError("rbd need a valid snapshot name", errno=errno.EINVAL)
        if snapshot_id is not None and snapshot_id != name:
            raise VdkitError("rbd do not support snapshot id", errno=errno.EINVAL)
        entry = next((s for s in self.file.snapshots() if s.name == name), None)
        r = self.file.snap_call("rbd_snap_remove", name)
        if r < 0:
            raise VdkitError(f"Failed to remove the snapshot: {os.strerror(-r)}", errno=-r)
        if entry is None:
            from vdkit.protocols.rbd import RbdSnapshot

            entry = RbdSnapshot(name, 0)
        return entry

    def snapshot_revert(self, entry: SnapshotRecord) -> None:
        """Roll the image back to the snapshot (librbd's rollback; the size comes back too)."""
        import os

        r = self.file.snap_call("rbd_snap_rollback", entry.name)
        if r < 0:
            raise VdkitError(os.strerror(-r), errno=-r)
        self.file.refresh_size()

    def snapshot_unsupported_reason(self) -> str | None:
        return None

    def truncate(self, size: int, prealloc: str = "off", *, backing: object = None, backing_size: int = 0) -> None:
        """librbd's resize; no preallocation (QEMU's text)."""
        if prealloc != "off":
            raise VdkitError(f"Unsupported preallocation mode '{prealloc}'", errno=errno.ENOTSUP)
        self.file.truncate(size)

    def discard(self, offset: int, length: int, *, has_backing: bool = False) -> None:
        self.file.punch_hole(offset, length)


class RbdDriver(RbdRawDriver):
    """``driver=rbd``: the RBD image itself as the disk, no format layer (``file format: rbd``)."""

    format_name = "rbd"
    slow_allocated_zeroes = False  # the cluster zeroes
    # the top node without a format layer: a copy goes through the driver, not into the file as raw's
    copy_target = FormatDriver.copy_target
    snapshot_revert_reopens = False  # the RBD image's own revert

    @property
    def virtual_size(self) -> int:
        return self.file.size()

    def specific_info(self) -> ImageInfoSpecific | None:
        """QEMU's rbd reports an empty ``{"type": "rbd", "data": {}}`` block."""
        from vdkit.info.model import ImageInfoSpecific

        return ImageInfoSpecific("rbd", {})  # type: ignore[arg-type]
