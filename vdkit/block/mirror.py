"""The mirror job (``drive-mirror``, ``blockdev-mirror``): copy a disk to a target while it is written.

An anonymous dirty bitmap on the source node says what still has to be
copied.  It starts with what ``sync`` asks for (``full``: every range
allocated anywhere in the chain; ``top``: what the top image allocates;
``none``: nothing) and every guest write to the source marks it again (the
write path of :mod:`vdkit.block.io` marks all of a node's bitmaps, and the
job's ``before_write`` hook wakes the job).  The job copies dirty chunks,
clearing their bits first, until nothing is dirty: then it is *ready*
(``BLOCK_JOB_READY``) and keeps copying whatever new writes dirty.

``block-job-complete`` ends it with a *pivot*: the remaining dirty ranges are
copied while the job holds the device lock (no write can slip in), then the
monitor's ``pivot`` callback puts the target in the source's place.  A cancel
of a ready job without ``force`` does the same final copy but no pivot (the
target is a consistent copy of the disk at that moment, and the job ends as
COMPLETED, as in QEMU); a forced cancel stops at once.

Chunks are whole granules of the bitmap, widened to whole clusters of the
target: the target has no backing file while the job runs, so a partial
cluster written there would otherwise hide the backing data it shows after
the pivot.  Ranges the source reads as zeros are written as zeroes (without
unmapping while the target is to get a backing file).

The work runs in the job's thread with the device lock held (see
:mod:`vdkit.block.jobs`), letting go at the pause point after each chunk.

``copy-mode: write-blocking`` (QEMU's active mirroring): the job's bitmap
stops recording, and every write to the source is copied to the target
before it completes (the source's ``after_write`` hook, run by the writer
with the device lock held): the target clusters it touches are copied whole
from the source and become clean, so the job converges however fast the
source is written.  The write's bytes count as done (``offset`` and ``len``
grow by them, as QEMU's).  A failed target write leaves its range dirty for
the background copy, which meets it under the job's error policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from vdkit.block import io as bio
from vdkit.block.dirty_bitmap import DirtyBitmap
from vdkit.block.jobs import Job, JobDriver
from vdkit.errors import VdkitError

if TYPE_CHECKING:
    from vdkit.block.node import Node

DEFAULT_BUF_SIZE = 16 * 1024 * 1024  # QEMU's default buf-size
MAX_CHUNK = 1024 * 1024  # bytes copied per I/O
PAUSE_EVERY = 0.02  # seconds of copying between pause points (the device lock is held meanwhile)


_ZEROS = bytes(MAX_CHUNK)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """All zero bytes: one memcmp against a zero buffer (``bytes.count`` is ten times slower, comparing a
    memoryview with ``==`` fifty, and a new zero buffer per call costs its page faults)."""
    global _ZEROS
    if len(data) > len(_ZEROS):
        _ZEROS = bytes(len(data))
    return _ZEROS.startswith(data)


def job_io(job: Job, op: str, fn: Callable[[], object], *, on_source_error: str,
           on_target_error: str) -> object | None:
    """One I/O of a copying job (mirror, backup): its result (True for None), or None when an error was
    ignored; errors go through ``on-source-error`` (reads) or ``on-target-error`` (writes), and a
    stopped job retries the I/O once resumed.  The I/O is an I/O phase of the job (:meth:`Job.io`:
    queries read meanwhile)."""
    while True:
        try:
            result = job.io(fn)
            return True if result is None else result
        except OSError as exc:
            err: BaseException = exc
        except Exception as exc:  # noqa: BLE001 - VdkitError carries the errno the policy needs
            if not hasattr(exc, "errno"):
                raise
            err = exc
        job.on_error = on_source_error if op == "read" else on_target_error
        if not job.io_error(op, err):
            return None  # ignore: skip this chunk


def mark_allocated(bm: DirtyBitmap, layers: list[Node], size: int) -> None:
    """Set the bits of every range any of ``layers`` allocates itself (data or zeros)."""
    for layer in layers:
        end = min(size, layer.size)
        off = 0
        while off < end:
            st = bio.layer_status(layer, off, end - off)
            if st.length <= 0:
                break
            if st.flags & bio.ALLOCATED:
                bm.set_dirty(off, st.length)
            off += st.length


class MirrorJob(JobDriver):
    """One mirror: ``source`` (a chain's top node) copied to ``target`` (opened without backing)."""

    job_type = "mirror"
    soft_cancel_when_ready = True

    def __init__(self, source: Node, target: Node, *, sync: str, granularity: int, buf_size: int,
                 zero_target: bool, unmap: bool, keeps_backing: bool, on_source_error: str,
                 target_unmaps: bool = False,
                 on_target_error: str, pivot: Callable[[], None] | None, release: Callable[[bool], None],
                 write_blocking: bool = False) -> None:
        self.source = source
        self.target = target
        self.sync = sync
        self.granularity = granularity
        self.chunk = max(granularity, min(buf_size, MAX_CHUNK) // granularity * granularity)
        self.zero_target = zero_target
        self.target_unmaps = target_unmaps  # the target node was opened with discard=unmap
        # zeros may be unmapped only where nothing shows through afterwards (no backing after the pivot)
        self.unmap = unmap and not keeps_backing
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.pivot_fn = pivot
        self.release = release
        self.write_blocking = write_blocking
        self.bitmap = DirtyBitmap(None, granularity, source.size)
        self.cluster = max(granularity, target.driver.cluster_size or 0)
        self.cursor = 0
        self.pivoted = False
        self._job: Job | None = None
        # the monitor's record of the target's node names while the job holds it (it lists them)
        self.listed_target: object | None = None

    def nodes(self) -> list[Node]:
        """The source (its root is held) and the target (not to be deleted under the job)."""
        return [self.source, self.target]

    # -- the work --------------------------------------------------------------------------------
    def _kick(self, offset: int, length: int) -> None:
        if self._job is not None:
            self._job.kick()

    def run(self, job: Job) -> None:
        self._job = job
        job.writeback = self.target
        src = self.source
        src.bitmaps.insert(0, self.bitmap)  # anonymous (listed without a name), fed by every source write
        src.before_write.append(self._kick)
        if self.write_blocking:  # writes go to the target themselves: the bitmap no longer records them
            self.bitmap.enabled = False
            src.after_write.append(self._active_write)
        size = src.size
        if self.zero_target and not self.target_unmaps:
            # a target that cannot unmap zeroes is not known to read as zeros: everything is copied
            self.bitmap.set_dirty(0, size)
        else:
            if self.zero_target:
                self._io(job, "write", lambda: bio.write_zeroes(self.target, 0, size, unmap=True))
            if self.sync == "full":
                mark_allocated(self.bitmap, list(src.chain()), size)
            elif self.sync == "top":
                mark_allocated(self.bitmap, [src], size)
        job.len = job.offset + self.bitmap.count()
        while True:
            last = time.monotonic()
            while self.bitmap.count():
                self._copy_next(job)
                left = self.bitmap.count()
                job.len = job.offset + left
                # letting go of the lock costs a scheduler round trip: without a speed limit it is done
                # every PAUSE_EVERY seconds, so queries and NBD requests still wait at most that long
                if job.speed or left == 0 or time.monotonic() - last >= PAUSE_EVERY:
                    job.pause_point()
                    last = time.monotonic()
            if not job.ready:
                # in sync: the target is made durable first (a cancel from now on leaves a consistent copy);
                # its data is written back with the lock let go, the flush then holds it briefly
                job.sync_unlocked(self.target)
                self._io(job, "write", lambda: bio.flush(self.target))
                job.set_ready()
            if job.should_exit:
                # completion or a soft cancel: copy what is still dirty without letting go of the lock
                # (after writing back what is copied so far without it: the flush below is then short)
                job.sync_unlocked(self.target)
                while self.bitmap.count():
                    self._copy_next(job)
                job.len = job.offset
                job.io(bio.flush, self.target)
                return
            job.pause_point(idle=True)

    def _copy_next(self, job: Job) -> None:
        bm = self.bitmap
        run = self._next_run(bm)
        if run is None:
            return
        start, length = run
        size = self.source.size
        lo = start - start % self.cluster
        hi = min(size, -(-(start + length) // self.cluster) * self.cluster)
        bm.reset(lo, hi - lo)
        self.cursor = hi if hi < size else 0
        # read straight into a new buffer and written from it (bio.read made a second copy as bytes); one
        # buffer kept for every chunk measured more system time on this machine (preadv 137 vs 72 us per
        # MiB under strace, 300 more minor faults per 512 MiB; cause not found): a new one is freed heap
        data = memoryview(bytearray(hi - lo))
        if self._io(job, "read", lambda: bio.readinto(self.source, lo, data)) is None:
            bm.set_dirty(lo, hi - lo)  # an ignored read error: still to copy (QEMU marks it dirty again)
            return
        for a, b, zero in self._zero_runs(data):
            if zero:
                done = self._io(job, "write", partial(bio.write_zeroes, self.target, lo + a, b - a, unmap=self.unmap))
            else:
                done = self._io(job, "write", partial(bio.write, self.target, lo + a, data[a:b]))  # type: ignore[arg-type]
            if done is None:
                bm.set_dirty(lo, hi - lo)  # not copied: still to do
                return
        job.advance(hi - lo, hi - lo)

    def _zero_runs(self, data: memoryview) -> list[tuple[int, int, bool]]:
        """``data`` as maximal runs ``(start, end, all zeros)`` of whole target clusters (granules).

        The zero runs are written as zeroes (a hole in a raw file, zero clusters in qcow2), as QEMU's
        mirror does, so a chunk holding some data does not fill the target's sparse parts with zeros."""
        n = len(data)
        if is_zero(data):
            return [(0, n, True)]
        step = self.cluster
        runs: list[tuple[int, int, bool]] = []
        for a in range(0, n, step):
            b = min(n, a + step)
            zero = is_zero(data[a:b])
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], b, zero)
            else:
                runs.append((a, b, zero))
        return runs

    def _next_run(self, bm: DirtyBitmap) -> tuple[int, int] | None:
        """The first dirty run from the cursor on (wrapping to 0), at most a chunk long.

        Its start is found first and the run looked at for a chunk only: the
        whole run's end (a fully dirty disk is one run) cost a scan of the
        bitmap for every chunk, a sixth of a full mirror's time."""
        start = bm.first_dirty(self.cursor)
        if start is None:
            start = bm.first_dirty(0)
            if start is None:
                return None
        return bm.run_at(start, start + self.chunk)

    def _io(self, job: Job, op: str, fn: Callable[[], object]) -> object | None:
        return job_io(job, op, fn, on_source_error=self.on_source_error, on_target_error=self.on_target_error)

    def _active_write(self, offset: int, length: int) -> None:
        """A source write landed (write-blocking mode; the writer holds the device lock): copy the target
        clusters it touches from the source before the write completes; they are clean then."""
        job = self._job
        if job is None or job.cancel_requested or length <= 0:
            return
        size = self.source.size
        lo = offset - offset % self.cluster
        hi = min(size, -(-(offset + length) // self.cluster) * self.cluster)
        try:
            data = bio.read(self.source, lo, hi - lo)
            if is_zero(data):
                bio.write_zeroes(self.target, lo, hi - lo, unmap=self.unmap)
            else:
                bio.write(self.target, lo, data)
        except (OSError, VdkitError):
            # the guest's write stands (QEMU's too): the background copy takes the range, and its error
            # policy the failure
            self.bitmap.set_dirty(lo, hi - lo)
            job.kick()
            return
        self.bitmap.reset(lo, hi - lo)
        job.offset += length  # QEMU counts an active write's bytes as done (and as to do)
        job.len += length

    # -- the end -------------------------------------------------------------------------------
    def prepare(self, job: Job) -> None:
        if job.completion_requested and not job.cancel_requested and self.pivot_fn is not None:
            self.pivot_fn()
            self.pivoted = True

    def clean(self, job: Job) -> None:
        self.listed_target = None
        src = self.source
        bitmaps = src.driver.dirty_bitmaps or []
        if self.bitmap in bitmaps:
            bitmaps.remove(self.bitmap)
        if self._kick in src.before_write:
            src.before_write.remove(self._kick)
        if self._active_write in src.after_write:
            src.after_write.remove(self._active_write)
        self.release(self.pivoted)
