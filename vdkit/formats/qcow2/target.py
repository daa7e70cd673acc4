"""qcow2 as the copy engine's target (``convert -O qcow2``): the driver's ``copy_target`` slot.

Data goes through the qcow2 write engine; zero ranges are unmapped.  After
any ``-c`` conversion qemu-img aligns the file end with a final compressed
write, so this target does too (and fails silently, as qemu-img, where an
external data file makes that write impossible).

Uncompressed data is written in a writer thread while the copy goes on (the
engine's pipeline, :meth:`vdkit.formats.qcow2.io.Qcow2IO.start_pipeline`): the
copy hands each buffer back through :meth:`after_writes` once its data is
written, and a failed write is reported by the next call as :class:`WriteFailed`.
Whole new clusters whose bytes lie in a mapped source file are copied from
that file by the kernel where the file system shares extents (XFS, btrfs:
:meth:`write_from_file`), else written from the mapping.
"""

from __future__ import annotations

from vdkit.block.target import SilentFailure, Target, WriteFailed

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.node import Node
    from vdkit.formats.qcow2.driver import Qcow2Driver
    from vdkit.io.file import ImageFile


class Qcow2Target(Target):
    """A qcow2 image opened writable; data goes through the qcow2 write engine."""

    maps_sources = True

    def __init__(self, node: Node, *, has_zero_init: bool, compressed: bool, created: bool = False) -> None:
        super().__init__(node, has_zero_init=has_zero_init)
        driver: Qcow2Driver = node.driver  # type: ignore[assignment]
        self.driver = driver
        self.io = driver.io
        self.cluster_size = driver.cluster_size or 65536
        self.compressed = compressed  # qemu-img aligns the file end after any -c conversion
        self._ahead: ImageFile | None = None
        if not compressed and self.WRITERS:
            self.io.start_pipeline(self.WRITERS, self.IN_FLIGHT_BYTES)
            self.writes_behind = self.io.pipelined
            if created:
                self._allocate_ahead()

    # data writes running at once.  One: ext4 takes the inode's lock for each buffered write, so a
    # second writer into the same file only waits for it, spinning (a quarter of a 2 GiB raw -> qcow2
    # convert's CPU in one perf profile, rwsem_spin_on_owner); a streamOptimized vmdk source, medians
    # of 5 interleaved runs, ratio to qemu-img: 2.25 against 2.07
    WRITERS = 1
    IN_FLIGHT_BYTES = 8 << 20
    ALLOCATE_AHEAD = 64 << 20
    AHEAD_MIN_CLUSTER = 64 << 10

    def _allocate_ahead(self) -> None:
        """On ext4, have the image file allocate its blocks ahead of the writes that grow it
        (:meth:`ImageFile.allocate_ahead`).  A new image filled by the copy grows by whole clusters
        written in file order (data, L2 tables, refcount blocks), so no gap is allocated that
        qemu-img's file would leave a hole, and the blocks past the end are given back by
        :meth:`finish` or :meth:`abort`."""
        from vdkit.io.file import ImageFile

        f = self.driver.file
        if self.driver.header.has_data_file or type(f) is not ImageFile or f.is_device:
            return
        if self.cluster_size < self.AHEAD_MIN_CLUSTER:
            # smaller clusters (512 B-4 KiB, refcount structures growing often) leave some ranges of
            # the file allocated to the image but never written: holes in qemu-img's file that an
            # allocation ahead would fill (1 KiB clusters, 64-bit refcounts: 120 KiB more of 50 MiB)
            return
        if f.on_ext4():
            # the file's last cluster may be written in part (a new image's L1 table): its tail stays a hole
            cs = self.cluster_size
            f.allocate_ahead(self.ALLOCATE_AHEAD, -(-f.size() // cs) * cs)
            self._ahead = f

    def _end_allocate_ahead(self) -> None:
        if self._ahead is not None:
            f, self._ahead = self._ahead, None
            f.end_allocate_ahead()

    def _raise_failure(self) -> None:
        failure = self.io.write_failure()
        if failure is not None:
            raise WriteFailed(*failure)

    def write(self, offset: int, data: bytes | memoryview, *, compressed: bool = False) -> None:
        self._raise_failure()
        if compressed:
            self.compressed = True
            cs = self.cluster_size
            for pos in range(0, len(data), cs):
                self.io.write_compressed(offset + pos, data[pos : pos + cs])  # type: ignore[arg-type]  # (a view)
        else:
            self.io.write(offset, data)  # type: ignore[arg-type]  # (a view: no copy)

    def write_from_file(self, offset: int, data: memoryview, fd: int, src_offset: int) -> None:
        """Whole new clusters may share the source's extents (:meth:`Qcow2IO.write`'s ``source``, where
        the file system can: :meth:`ImageFile.write_parts`)."""
        self._raise_failure()
        self.io.write(offset, data, source=(fd, src_offset))  # type: ignore[arg-type]  # (a view: no copy)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._raise_failure()
        self.io.write_zeroes(offset, length, unmap=True)

    def after_writes(self, fn: Callable[[], None]) -> None:
        self.io.after_writes(fn)

    def wait(self) -> None:
        self.io.settle()
        self._raise_failure()

    def finish(self) -> None:
        self.wait()
        self.io.stop_pipeline()
        self.driver.flush()
        self._end_allocate_ahead()
        if self.compressed:
            if self.driver.header.has_data_file:
                # qemu-img's final "align the end" compressed write fails (ENOTSUP) without a message
                self.node.close()
                raise SilentFailure()
            self.io.align_file_end()
        self.node.close()

    def abort(self) -> None:
        try:
            self.io.stop_pipeline()  # (the writes in flight end first; the entries of failed ones are emptied)
            self._end_allocate_ahead()
        finally:
            self.node.close()
