"""The backup job (``drive-backup``, ``blockdev-backup``): a point-in-time copy while the disk is written.

The job keeps a *copy bitmap* of the clusters still to copy (QEMU's
block-copy bitmap): ``full`` starts with the whole disk, ``top`` with what the
top image allocates, ``bitmap``/``incremental`` with a user bitmap's bits,
``none`` with the whole disk but copies nothing by itself (the target is a
fleecing overlay with the live source as backing; the job runs until
cancelled).

**Copy-before-write.**  The job hooks the source node's ``before_write``: a
guest write to a range whose clusters are still to copy first copies the old
data of those clusters to the target (and clears their bits), then lets the
write land.  The hook runs in the writer's thread with the device lock held,
so no other write can slip in between, and the target ends as the disk was
when the job started, whatever was written meanwhile.

**User bitmaps** (``bitmap``, ``bitmap-mode``): the bitmap is frozen (busy)
for the job and a successor records the writes made meanwhile.  When the job
ends with ``on-success`` and success, or ``always``: the bitmap becomes what
the backup lacks, the ranges still to copy and the successor's writes (after
a success only the writes); otherwise the successor's bits are merged back.

The copy unit is the target's cluster size, at least 64 KiB (QEMU's
block-copy).  Zeros are written as zeroes, unmapped only when the target has
no backing file to show through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vdkit.block import io as bio
from vdkit.block.dirty_bitmap import DirtyBitmap
from vdkit.block.jobs import Job, JobDriver, JobFilter
from vdkit.block.mirror import PAUSE_EVERY, is_zero, job_io, mark_allocated

if TYPE_CHECKING:
    from vdkit.block.node import Node

MAX_CHUNK = 1024 * 1024


class CbwFilter(JobFilter):
    """QEMU's copy-before-write filter as the monitor shows it, with its two bitmaps: the ranges readers
    of the filter may access (all) and those its write hook copied ("done")."""

    def __init__(self, below: Node, *, name: str, serial: int, release: Callable[[], None] | None = None) -> None:
        super().__init__("copy-before-write", below, ro=False, name=name, serial=serial, release=release)
        self.done = DirtyBitmap(None, 65536, below.size, enabled=False)
        access = DirtyBitmap(None, 65536, below.size, enabled=False)
        access.set_dirty(0, below.size)
        self.bitmaps = [access, self.done]


class BackupJob(JobDriver):
    job_type = "backup"

    def __init__(self, source: Node, target: Node, *, sync: str, bitmap: DirtyBitmap | None, bitmap_mode: str,
                 target_has_backing: bool, compress: bool, on_source_error: str, on_target_error: str,
                 release: Callable[[], None]) -> None:
        self.source = source
        self.target = target
        self.sync = sync
        self.user_bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.unmap = not target_has_backing
        self.compress = compress
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.release = release
        self.cluster = max(65536, target.driver.cluster_size or 0)
        self.copy = DirtyBitmap(None, self.cluster, source.size, enabled=False)
        self.successor: DirtyBitmap | None = None
        self._job: Job | None = None
        self.size = source.size
        # the monitor's record of the target's node names while the job holds it (it lists them)
        self.listed_target: object | None = None

    def nodes(self) -> list[Node]:
        """The source (its root is held) and the target (not to be deleted under the job)."""
        return [self.source, self.target]

    def attach(self, job: Job) -> None:
        """The job exists: freeze the user bitmap, fill the copy bitmap, hook the source's writes.

        QEMU does this as the job is created, so ``len`` is known at once.
        """
        self._job = job
        bitmap, source = self.user_bitmap, self.source
        if bitmap is not None:
            # frozen for the job; a successor records the writes made meanwhile
            self.successor = DirtyBitmap(None, bitmap.granularity, bitmap.size, enabled=bitmap.enabled)
            bitmap.successor = self.successor
            bitmap.busy = True
            bitmap.enabled = False
            source.bitmaps.insert(0, self.successor)
        if self.sync == "bitmap":
            assert bitmap is not None
            self.copy.merge_from(bitmap)
        else:
            self.copy.set_dirty(0, self.size)
        job.len = min(self.size, self.copy.count())
        source.bitmaps.insert(0, self.copy)  # QEMU's block-copy bitmap lives on the source too (disabled)
        source.before_write.append(self._before_write)

    # -- copy-before-write (a writer's thread, device lock held) ------------------------------------------
    def _before_write(self, offset: int, length: int) -> None:
        job = self._job
        if job is None or job.status.value in ("concluded", "null", "aborting"):
            return
        end = min(self.size, -(-(offset + length) // self.cluster) * self.cluster)  # whole clusters
        for off, n in list(self.copy.dirty_runs(offset - offset % self.cluster, end)):
            self._copy_range(job, off, n, cbw=True)
            if isinstance(self.filter, CbwFilter):
                self.filter.done.set_dirty(off, n)

    # -- the work ------------------------------------------------------------------------------------
    def run(self, job: Job) -> None:
        self._job = job
        job.writeback = self.target
        if self.sync == "top":
            # only what the top image allocates is copied (the rest is in the target's backing file)
            keep = DirtyBitmap(None, self.cluster, self.size)
            mark_allocated(keep, [self.source], self.size)
            self.copy.intersect(keep)
            job.len = job.offset + self.copy.count()
        if self.sync == "none":
            while True:
                job.pause_point(idle=True)  # copy-before-write does the work until the job is cancelled
        last = time.monotonic()
        first = self.copy.first_dirty(0)  # (the run looked at for a chunk only, as mirror's)
        while first is not None:
            chunk = max(self.cluster, MAX_CHUNK // self.cluster * self.cluster)
            off, n = next(self.copy.dirty_runs(first, first + chunk))
            self._copy_range(job, off, n, cbw=False)
            first = self.copy.first_dirty(0)
            if first is None:
                break  # the last chunk: QEMU's rate limit sleeps before a chunk, never after the last
            if job.speed or time.monotonic() - last >= PAUSE_EVERY:  # see vdkit.block.mirror
                job.pause_point()
                last = time.monotonic()
                first = self.copy.first_dirty(0)  # (guest writes meanwhile copied their clusters first)
        bio.flush(self.target)

    def _copy_range(self, job: Job, off: int, n: int, *, cbw: bool) -> None:
        end = min(self.size, off + n)
        self.copy.reset(off, end - off)
        data = self._io(job, "read", lambda: bio.read(self.source, off, end - off), cbw)
        if data is None:
            self.copy.set_dirty(off, end - off)
            return
        assert isinstance(data, bytes)
        if is_zero(data):
            done = self._io(job, "write", lambda: bio.write_zeroes(self.target, off, end - off, unmap=self.unmap),
                            cbw)
        elif self.compress:
            done = self._io(job, "write", lambda: self._write_compressed(off, data), cbw)
        else:
            done = self._io(job, "write", lambda: bio.write(self.target, off, data), cbw)
        if done is None:
            self.copy.set_dirty(off, end - off)
            return
        job.advance(end - off, 0 if cbw else end - off)

    def _write_compressed(self, off: int, data: bytes) -> None:
        drv = self.target.driver
        cs = drv.cluster_size or len(data)
        # qcow2's compressed writes live in its I/O engine (the copy engine's qcow2 target uses them too)
        write_compressed = getattr(getattr(drv, "io", None), "write_compressed", None) or drv.write_compressed
        for pos in range(0, len(data), cs):
            piece = data[pos : pos + cs]
            if len(piece) == cs:
                write_compressed(off + pos, piece)
            else:
                bio.write(self.target, off + pos, piece)

    def _io(self, job: Job, op: str, fn: Callable[[], object], cbw: bool) -> object | None:
        if cbw:
            # QEMU's copy-before-write filter fails the guest write when the old data cannot be saved
            result = fn()
            return True if result is None else result
        return job_io(job, op, fn, on_source_error=self.on_source_error, on_target_error=self.on_target_error)

    # -- the end -------------------------------------------------------------------------------------
    def clean(self, job: Job) -> None:
        self.listed_target = None
        src = self.source
        if self._before_write in src.before_write:
            src.before_write.remove(self._before_write)
        bm, succ = self.user_bitmap, self.successor
        bitmaps = src.driver.dirty_bitmaps or []
        if self.copy in bitmaps:
            bitmaps.remove(self.copy)
        if bm is not None and succ is not None:
            success = job.error is None and not job.is_cancelled
            if succ in bitmaps:
                bitmaps.remove(succ)
            if self.bitmap_mode == "always" or (success and self.bitmap_mode == "on-success"):
                # the bitmap says what the backup lacks: what was left to copy, and every write since
                left = DirtyBitmap(None, bm.granularity, bm.size)
                left.merge_from(self.copy)
                left.merge_from(succ)
                bm.bits = left.bits
            else:
                bm.merge_from(succ)  # nothing taken: the writes made meanwhile are added back
            bm.enabled = succ.enabled
            bm.successor = None
            bm.busy = False
        self.release()
