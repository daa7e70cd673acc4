"""The format driver protocol: the operations table every format fills in.

Generic code (nodes, chains, info collection, the CLI and the monitor) only
calls through this class.  An operation a format does not provide raises the
standard "not supported" error here, in one place, like an empty slot in
QEMU's ``BlockDriver`` table.
"""

from __future__ import annotations

import errno

from vdkit.errors import UnsupportedError
from vdkit.record import record

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import ClassVar

    from vdkit.formats.qcow2.snapshot import SnapshotEntry
    from vdkit.io.file import ImageFile


# Block status flags (the subset of QEMU's BDRV_BLOCK_* that qemu-img shows).
DATA = 1
ZERO = 2
OFFSET_VALID = 4
ALLOCATED = 8
EOF = 16


@record(frozen=True, slots=True)
class BlockStatus:
    """Status of one run of a single layer, starting at the queried offset.

    ``offset`` is where the bytes can be read raw in ``file`` (a file name),
    valid only with ``OFFSET_VALID``.  (Defined here, with the operations
    table, because formats return it; :mod:`vdkit.block.io` composes it.)
    """

    flags: int
    length: int
    offset: int = 0
    file: str | None = None

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


class FormatDriver:
    """One format opened on one file.  Subclasses override what they support."""

    format_name: ClassVar[str] = ""
    supports_backing: ClassVar[bool] = False

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
    def dirty(self) -> bool:
        return False

    @property
    def backing_file(self) -> str | None:
        """The backing file name as stored in the image (unresolved)."""
        return None

    @property
    def backing_format(self) -> str | None:
        return None

    def extra_files(self) -> list[ImageFile]:
        """Other files this node owns (an external data file), for disk usage."""
        return []

    def allocated_size(self) -> int:
        return self.file.allocated_size() + sum(f.allocated_size() for f in self.extra_files())

    # -- snapshots ------------------------------------------------------------
    def snapshots(self) -> list[SnapshotEntry]:
        """Internal snapshots; formats without them have none."""
        return []

    def _unsupported(self) -> UnsupportedError:
        return UnsupportedError("Block driver does not support snapshots", errno=errno.ENOTSUP)

    supports_snapshots: ClassVar[bool] = False

    def snapshot_create(self, name: str, *, date_sec: int, date_nsec: int, vm_clock_nsec: int = 0,
                        vm_state_size: int = 0, icount: int | None = None,
                        vm_state: bytes | None = None) -> SnapshotEntry:
        raise self._unsupported()

    def read_vmstate(self, entry: SnapshotEntry) -> bytes:
        raise self._unsupported()

    def snapshot_delete(self, *, snapshot_id: str | None = None, name: str | None = None) -> SnapshotEntry:
        raise self._unsupported()

    def snapshot_revert(self, entry: SnapshotEntry) -> None:
        raise self._unsupported()

    def flush(self) -> None:
        """Make everything written so far durable (nothing cached by default)."""

    # -- data -----------------------------------------------------------------
    def read(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None) -> bytes:
        """Guest bytes of this layer; ranges it does not allocate come from ``backing`` (or zeros)."""
        raise UnsupportedError(f"Driver '{self.format_name}' does not support reading")

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """Status of the run at ``offset`` in this layer only (see :mod:`vdkit.block.io`)."""
        raise UnsupportedError(f"Driver '{self.format_name}' does not support block status")

    def write(self, offset: int, data: bytes, backing: Callable[[int, int], bytes] | None = None) -> None:
        """Guest write; ``backing`` supplies the data a partial copy-on-write needs."""
        raise UnsupportedError(f"Driver '{self.format_name}' does not support writing")

    def write_zeroes(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None, *,
                     unmap: bool = False) -> None:
        self.write(offset, bytes(length), backing)

    def discard(self, offset: int, length: int, *, has_backing: bool = False) -> None:
        """Drop data the guest no longer needs (a hint: doing nothing is correct)."""

    def close(self) -> None:
        for f in self.extra_files():
            f.close()
        self.file.close()
