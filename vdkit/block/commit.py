"""The commit engine: write the layers above a base into the base (``qemu-img commit``, later QMP's
``block-commit``).

Every range some layer above the base allocates is copied into the base
(zeros as zero writes, data as data); a base smaller than the top is grown
first.  Emptying the top afterwards (``make_empty``) is left to the caller,
which decides whether to keep it (``qemu-img commit -d``).  Opening the
chain (top and base writable, the layers between read-only) is the caller's
business too.
"""

from __future__ import annotations

from vdkit.block.jobs import Job, JobDriver
from vdkit.errors import VdkitError

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.dirty_bitmap import DirtyBitmap
    from vdkit.block.node import Node
    from vdkit.block.progress import Progress

CHUNK = 2 * 1024 * 1024


def commit(top: Node, base: Node, progress: Progress) -> None:
    """Copy what the layers from ``top`` down to (not including) ``base`` allocate into ``base``.

    Progress is reported per chunk; an I/O failure becomes QEMU's "Block job failed".
    """
    from vdkit.block import io as bio

    size = top.driver.virtual_size
    if base.driver.virtual_size < size:
        bio.truncate(base, size)
    offset = 0
    try:
        while offset < size:
            n, _copied = copy_down(top, base, offset, min(CHUNK, size - offset))
            offset += n
            progress.set(100.0 * offset / size)
        bio.flush(base)
    except (OSError, VdkitError) as exc:  # qemu-img runs the copy as a block job
        raise bio.io_error(exc, "Block job failed") from exc


def copy_down(top: Node, base: Node, offset: int, length: int, *, zero_writes: bool = True,
              buf: bytearray | None = None) -> tuple[int, bool]:
    """One step of a commit: the run at ``offset`` (at most ``length`` bytes) that some layer above
    ``base`` allocates is written into ``base`` (zeros as zero writes, unless ``zero_writes`` is false:
    QEMU's intermediate commit copies them as data); a run no layer above allocates is skipped.
    Returns the run's length and whether it was copied.  The block-commit job (:class:`CommitJob`)
    and ``qemu-img commit`` share it.  ``buf`` (at least ``length`` bytes), when given, takes the data
    on its way: a job's steps reuse one buffer instead of a new object per step."""
    from vdkit.block import io as bio

    try:
        allocated, n = allocated_above(top, base, offset, length)
        if not allocated:
            return n, False
        st = bio.above_status(top, offset, n)
        n = st.length
        data: bytes | memoryview | None = None
        if not (st.flags & bio.ZERO and zero_writes):
            if buf is not None and len(buf) >= n:
                data = memoryview(buf)[:n]
                bio.readinto(top, offset, data)
            else:
                data = bio.read(top, offset, n)
    except OSError as exc:
        raise SourceError(exc.errno, exc.strerror) from exc
    if data is None:
        bio.write_zeroes(base, offset, n)
    else:
        bio.write(base, offset, data)  # type: ignore[arg-type]  # (a bytes-like object: written before reuse)
    return n, True


class SourceError(OSError):
    """A commit step's read of the layers above the base failed: the job reports a ``read`` error
    (QEMU's commit tells the two apart for its ``BLOCK_JOB_ERROR``), anything else is the write."""


def allocated_above(top: Node, base: Node | None, offset: int, length: int) -> tuple[bool, int]:
    """Does a layer above ``base`` (None: any layer) allocate ``offset``?  And for how many bytes that
    answer holds."""
    from vdkit.block.io import ALLOCATED, layer_status

    cur: Node | None = top
    n = length
    while cur is not None and cur is not base:
        size = cur.driver.virtual_size
        if offset >= size:  # a shorter intermediate reads zeros there: that counts as allocated
            return True, n
        st = layer_status(cur, offset, n)
        if st.flags & ALLOCATED:
            return True, st.length
        n = st.length
        cur = cur.backing
    return False, n


JOB_CHUNK = 512 * 1024  # QEMU's commit step


class CommitJob(JobDriver):
    """The block-commit job on a chain (top first): ``top`` and ``base`` are indices into it.

    Intermediate commit (``top`` > 0): the layers from top down to the base
    are copied into the base; at finalize the overlay of ``top`` is made to
    name the base (``backing-file`` verbatim, else the base's filename, and
    the base's format) and the layers between drop out of the chain.  Active
    commit (``top`` == 0): after the copy the job is ready; ``complete``
    pivots (the drive continues on the base, the layers above drop out, no
    header changes), a cancel while ready leaves the chain as it was.  Guest
    writes to the active image during the job mark an anonymous dirty bitmap
    on it (the write path marks every bitmap of a node) and wake the job; the
    job copies dirty ranges after its first pass and while ready, and the
    rest at complete with the device lock held (nothing can write meanwhile).

    Crash order: data is flushed into the base before any header changes;
    until then the images above the base still answer every range they
    allocate, so the old chain reads as before.  ``chain_changed(dropped, rewritten)``
    is the monitor's bookkeeping (names, generation), called with the lock
    held after the graph change.
    """

    job_type = "commit"

    def __init__(self, chain: list[Node], top: int, base: int, backing_file: str | None,
                 chain_changed: Callable[[list[Node], Node | None], None], *, base_was_ro: bool,
                 reopen: Callable[[int, bool], None] | None = None) -> None:
        """``reopen(i, ro)`` reopens ``chain[i]`` (default: :func:`vdkit.block.jobs.reopen_node`)."""
        self.chain = chain
        self._reopen = reopen or self._reopen_node
        self.top_index = top
        self.base_index = base
        self.backing_file = backing_file
        self.chain_changed = chain_changed
        self.base_was_ro = base_was_ro
        self.soft_cancel_when_ready = self.active = top == 0
        self.pivot = False
        self._buf = bytearray()  # the data of a step on its way (one buffer for the whole job)
        self.bitmap: DirtyBitmap | None = None
        self._job: Job | None = None

    def _reopen_node(self, index: int, ro: bool) -> None:
        from vdkit.block.jobs import reopen_node

        reopen_node(self.chain[index], readonly=ro)

    @property
    def top(self) -> Node:
        return self.chain[self.top_index]

    @property
    def base(self) -> Node:
        return self.chain[self.base_index]

    def nodes(self) -> list[Node]:
        return [self.chain[0], *self.chain[self.top_index:self.base_index + 1]]

    def _copy(self, job: Job, offset: int, length: int) -> tuple[int, bool]:
        if len(self._buf) < length:
            self._buf = bytearray(length)
        while True:
            try:
                # an I/O phase (Job.io): queries read beside the step's status lookups, reads and writes
                return job.io(lambda: copy_down(self.top, self.base, offset, length, zero_writes=self.active,
                                                buf=self._buf))
            except OSError as exc:
                if not job.io_error("read" if isinstance(exc, SourceError) else "write", exc):
                    # ignored: the range is copied again later, as QEMU's commit does (the active commit's
                    # mirror marks it dirty again; the intermediate one retries it after a pause point)
                    if self.bitmap is not None:
                        self.bitmap.set_dirty(offset, length)
                        return length, False
                    return 0, False

    def _kick(self, offset: int, length: int) -> None:
        if self._job is not None:
            self._job.kick()

    def _copy_dirty(self, job: Job, bm: DirtyBitmap) -> None:
        """Copy the first dirty run (bits cleared first: a write meanwhile marks them again)."""
        first = bm.first_dirty(0)  # (the run is looked at for a step only: a whole run's end costs a scan)
        if first is None:
            return
        start, length = next(bm.dirty_runs(first, first + job.step_size(JOB_CHUNK)))
        bm.reset(start, length)
        offset = start
        while offset < start + length:
            n, copied = self._copy(job, offset, start + length - offset)
            if copied:
                job.advance(n, n)
            offset += n
        job.len = job.offset + bm.count()

    def run(self, job: Job) -> None:
        from vdkit.block import io as bio
        from vdkit.block.dirty_bitmap import DirtyBitmap

        top, base = self.top, self.base
        job.writeback = base
        size = top.driver.virtual_size
        if base.driver.virtual_size < size:
            bio.truncate(base, size)
        if not self.active:
            job.len = size
            offset = 0
            while offset < size:
                n, copied = self._copy(job, offset, min(job.step_size(JOB_CHUNK), size - offset))
                job.advance(n, n if copied else 0)
                offset += n
                job.pause_point()
            job.sync_unlocked(base)  # the data written back without the lock, the flush is then short
            job.io(bio.flush, base)
            return
        # active: QEMU's mirror-based commit copies what a dirty bitmap says, starting with everything
        # the images above the base allocate; guest writes mark it again (and wake the job)
        self._job = job
        bm = self.bitmap = DirtyBitmap(None, base.driver.cluster_size or 65536, size)
        mark_allocated_above(bm, top, base)
        top.bitmaps.insert(0, bm)  # anonymous (the newest, listed without a name): every guest write marks it
        top.before_write.append(self._kick)
        job.len = bm.count()
        while bm.count():
            self._copy_dirty(job, bm)
            job.pause_point()
        job.sync_unlocked(base)  # the data written back without the lock, the flush is then short
        job.io(bio.flush, base)
        job.set_ready()
        while not job.should_exit:
            if bm.count():
                self._copy_dirty(job, bm)
                job.pause_point()
            else:
                job.pause_point(idle=True)
        if job.completion_requested:
            job.sync_unlocked(base)
            while bm.count():  # the rest, without letting go of the lock: nothing can write meanwhile
                self._copy_dirty(job, bm)
            bio.flush(base)
            self.pivot = True

    def prepare(self, job: Job) -> None:
        if self.active:
            self._detach()
            if self.pivot:
                self.chain_changed(self.chain[:self.base_index], None)
            return
        overlay = self.chain[self.top_index - 1]
        ro = overlay.readonly
        if ro:
            self._reopen(self.top_index - 1, False)
        try:
            overlay.driver.change_backing_file(self.backing_file or self.base.filename, self.base.format)
        finally:
            if ro:
                self._reopen(self.top_index - 1, True)
        overlay.backing = self.base
        self.chain_changed(self.chain[self.top_index:self.base_index], overlay)

    def _detach(self) -> None:
        """Take the job's bitmap and write hook off the active image (before it may be closed)."""
        top = self.top
        bitmaps = top.driver.dirty_bitmaps
        if self.bitmap is not None and bitmaps is not None and self.bitmap in bitmaps:
            bitmaps.remove(self.bitmap)
        if self._kick in top.before_write:
            top.before_write.remove(self._kick)

    def clean(self, job: Job) -> None:
        self._detach()

        # an active commit leaves its base read-write however it ends, as QEMU's (observed: ro false and
        # the write lock bytes after a cancel too); an intermediate one makes it read-only again
        if self.base_was_ro and not self.active:
            try:
                self._reopen(self.base_index, True)
            except (OSError, VdkitError):
                pass  # it stays writable: still correct, only the lock is wider than QEMU's


def mark_allocated_above(bm: DirtyBitmap, top: Node, base: Node) -> None:
    """Set the bits of every range the layers from ``top`` down to (not including) ``base`` allocate."""
    size = top.driver.virtual_size
    offset = 0
    while offset < size:
        allocated, n = allocated_above(top, base, offset, size - offset)
        if allocated:
            bm.set_dirty(offset, n)
        offset += n
