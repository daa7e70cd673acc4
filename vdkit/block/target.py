"""Targets of the copy engine (:mod:`vdkit.block.copy`): where ``convert`` writes.

A target offers ``write``, ``write_zeroes``, ``backing_sectors``, ``finish``
and ``abort``; the copier does not know the format.  Which target an open node
gets is its driver's ``copy_target`` slot (:class:`vdkit.block.driver.FormatDriver`):
raw gives a plain file target (zero ranges punched out, the file stays
sparse), qcow2 its own (:mod:`vdkit.formats.qcow2.target`: its I/O engine,
the file end aligned after compressed writes, as qemu-img does), any other
format :class:`DriverTarget`, through its driver's write slots.  Creating or
opening the target image is the front end's business (``cli/convert.py``):
:func:`target_for` only wraps an open, writable node.

This module needs nothing above the driver table, so the formats may subclass
:class:`Target` (tests/unit/test_layering.py places it with ``block.driver``).
"""

from __future__ import annotations

from vdkit.errors import UnsupportedError, VdkitError

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.node import Node


class SilentFailure(Exception):
    """The conversion failed in a way qemu-img reports only through the exit status."""


class WriteFailed(Exception):
    """A write that was in flight failed: its error and the guest offset it was written at.

    A target that returns from :meth:`Target.write` before the data is written reports the
    failure from a later call (the copy names the failed write's offset, as qemu-img's request
    that failed does).
    """

    def __init__(self, exc: BaseException, offset: int) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.offset = offset


class Target:
    """What the copy engine writes to (one open, writable node)."""

    cluster_size = 512
    has_zero_init = False
    compressed_only = False  # the format takes compressed writes only (vmdk streamOptimized)
    # data may come as views of mapped source files (block.copy.Mapped): writes must not keep them
    maps_sources = False
    # the data writes run in a thread of their own (write returns before the data is written, and
    # after_writes says when): the copy then reads in the caller's thread (block.copy.ReadAhead)
    writes_behind = False

    def __init__(self, node: Node, *, has_zero_init: bool) -> None:
        self.node = node
        self.has_zero_init = has_zero_init
        # the image's recording dirty bitmaps (an existing target, -n): every write marks them, as
        # QEMU's block layer does for any write to a node (a new image has none)
        self.recording = [b for b in node.bitmaps if b.enabled and not b.inconsistent and not b.readonly]

    def written(self, offset: int, length: int) -> None:
        """``[offset, offset+length)`` was written (data or zeros): the recording bitmaps mark it."""
        if self.recording:
            from vdkit.block.dirty_bitmap import mark_write

            mark_write(self.recording, offset, length)

    def write(self, offset: int, data: bytes | memoryview, *, compressed: bool = False) -> None:
        raise NotImplementedError

    def write_zeroes(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def write_from_file(self, offset: int, data: memoryview, fd: int, src_offset: int) -> None:
        """Write ``data``, which are also the bytes at ``src_offset`` of the file open as ``fd``."""
        self.write(offset, data)

    def after_writes(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the writes made so far have used their buffers (the copy's buffers come back
        to it this way).  Targets that write before :meth:`write` returns call it at once; others may
        call it later from another thread, so ``fn`` must be thread-safe."""
        fn()

    def wait(self) -> None:
        """Wait for the writes in flight; raise :class:`WriteFailed` if one failed."""

    def backing_sectors(self) -> int:
        """Sectors of the target's backing file (-1 without one): zeros past its end need no write."""
        below = self.node.backing
        return -1 if below is None else (below.driver.virtual_size + 511) // 512

    def finish(self) -> None:
        self.node.driver.flush()
        self.node.close()

    def abort(self) -> None:
        self.node.close()


_ALLOCATE_MIN = 128 << 10  # smaller writes save less than the extra system call costs


class RawTarget(Target):
    """A raw file.  On ext4 the blocks of each data write of 128 KiB or more are allocated first
    (``fallocate`` keeping the size: the range is written whole right after, so the file ends with
    the same bytes and the same allocation): a buffered write into allocated (unwritten) blocks
    skips ext4's per-block delayed-allocation bookkeeping, which was about a quarter of the
    copy's system time.  1 GiB in 1 MiB ``copy_file_range`` pieces into a new file (load 7-8): system
    time median 0.38 -> 0.27 s, with the ``fsync`` that writes it out 1.60 -> 1.35 s.  Elsewhere
    (XFS and btrfs reflink through ``copy_file_range``) nothing is allocated ahead."""

    maps_sources = True

    def __init__(self, node: Node, *, has_zero_init: bool) -> None:
        from vdkit.io.file import ImageFile

        super().__init__(node, has_zero_init=has_zero_init)
        self.file = node.driver.file
        # a plain local file: bytes already in another file go through write_parts, blocks may be allocated
        self._local = type(self.file) is ImageFile and not self.file.is_device
        self._allocate: bool | None = None if self._local else False  # None: not known yet

    def _allocate_for(self, offset: int, length: int) -> None:
        if self._allocate is False or length < _ALLOCATE_MIN:
            return
        if self._allocate is None:  # (asked at the first big write: small copies never import ctypes)
            self._allocate = self.file.on_ext4()
        if self._allocate and not self.file.allocate(offset, length):
            self._allocate = False  # refused (no space, no extents: ext3): the write says what it must

    def write(self, offset: int, data: bytes | memoryview, *, compressed: bool = False) -> None:
        self._allocate_for(offset, len(data))
        self.file.pwrite(offset, data)

    def write_from_file(self, offset: int, data: memoryview, fd: int, src_offset: int) -> None:
        """Through :meth:`ImageFile.write_parts`: a shared extent where the file system can (else a
        write from the mapped view)."""
        self._allocate_for(offset, len(data))
        if self._local:
            from vdkit.io.file import FileBytes

            self.file.write_parts(offset, [FileBytes(data, fd, src_offset)])
        else:
            self.file.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.file.punch_hole(offset, length)

    def finish(self) -> None:
        self.file.flush()
        self.node.close()


class DriverTarget(Target):
    """Any other format: data goes through the format driver's own write slots."""

    def __init__(self, node: Node, *, has_zero_init: bool) -> None:
        super().__init__(node, has_zero_init=has_zero_init)
        self.cluster_size = node.driver.cluster_size or 512
        # as qemu-img: a target that only takes compressed writes (streamOptimized)
        self.compressed_only = bool(getattr(node.driver, "needs_compressed_writes", False))

    def write(self, offset: int, data: bytes | memoryview, *, compressed: bool = False) -> None:
        if compressed:
            self.node.driver.write_compressed(offset, data)  # type: ignore[arg-type]  # (a view: no copy)
        else:
            self.node.write(offset, data)  # type: ignore[arg-type]

    def write_zeroes(self, offset: int, length: int) -> None:
        self.node.write_zeroes(offset, length, unmap=True)


def target_for(node: Node, size: int, *, created: bool, target_is_zero: bool, has_backing: bool,
               compressed: bool) -> Target:
    """Wrap the open target ``node`` for a copy of ``size`` bytes (closing it on refusal).

    ``created``: vdkit just created the image (not ``-n``), so it reads as
    zeros unless it is a device or has a backing file; ``target_is_zero`` is
    the user's promise (``--target-is-zero``).
    """
    if not created and node.driver.virtual_size < size:
        node.close()
        raise VdkitError("output file is smaller than input file")
    return node.driver.copy_target(node, created=created, target_is_zero=target_is_zero, has_backing=has_backing,
                                   compressed=compressed)


def zero_init(node: Node, *, created: bool, target_is_zero: bool, has_backing: bool) -> bool:
    """Whether a format target reads as zeros where nothing is written (closing it on refusal).

    A created image does, unless a backing file shows through or it is
    encrypted (sectors never written decrypt to noise); ``--target-is-zero``
    is the user's promise, never kept with a backing file.
    """
    zero = target_is_zero or created
    if node.driver.encrypted and not getattr(node.driver, "has_key", False):
        node.close()
        raise UnsupportedError("Writing encrypted qcow2 images is not supported by vdkit")
    if node.driver.encrypted:
        # opened with its key (luks): sectors never written decrypt to noise, not zeros, so zeros are written
        zero = target_is_zero
    if not zero or has_backing:
        zero = target_is_zero and not has_backing
    return zero
