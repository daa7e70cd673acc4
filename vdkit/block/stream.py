"""The block-stream job: copy into the active image what its backing chain above a base provides.

Ranges the active image does not allocate but some image between it and the
base does are read through the chain and written into the active image
(zeros as zero writes, as QEMU's copy-on-read does), 512 KiB at a time.
When the copy is done (finalize), the active image's header names the base
(``backing-file`` verbatim if given, else the base's filename as the daemon
knows it; no base: the backing entry is removed), and the images between are
dropped from the chain; their files stay as they were.

The order keeps the chain readable after a crash at any point: the data is
flushed into the active image before its header changes, and until then the
old chain (whose images are never written) still answers every range.
"""

from __future__ import annotations

from collections.abc import Callable

from vdkit.block.jobs import Job, JobDriver
from vdkit.errors import VdkitError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.block.node import Node

CHUNK = 512 * 1024  # QEMU's stream and commit step


class StreamJob(JobDriver):
    """``chain`` is the drive's chain, top first; ``base`` the index of the base in it (None: the whole chain).

    ``chain_changed(dropped, rewritten)`` is called (device lock held) after
    the graph change, with the nodes taken out of the chain and the node whose
    header was rewritten (closed afterwards by the
    caller's bookkeeping): the monitor fixes its node names there.
    """

    job_type = "stream"

    def __init__(self, chain: list[Node], base: int | None, backing_file: str | None,
                 chain_changed: Callable[[list[Node], Node | None], None], *,
                 reopen: Callable[[bool], None] | None = None) -> None:
        """``reopen(ro)``: the target was reopened read-write for the job (a backing node); read-only after."""
        self.reopen = reopen
        self.chain = chain
        self.base_index = base
        self.backing_file = backing_file
        self.chain_changed = chain_changed

    @property
    def top(self) -> Node:
        return self.chain[0]

    @property
    def base(self) -> Node | None:
        return None if self.base_index is None else self.chain[self.base_index]

    def nodes(self) -> list[Node]:
        end = len(self.chain) if self.base_index is None else self.base_index
        return self.chain[:end]

    def run(self, job: Job) -> None:
        from vdkit.block import io as bio
        from vdkit.block.commit import allocated_above
        from vdkit.block.mirror import is_zero

        top, base = self.top, self.base
        if top.backing is None or top.backing is base:
            return  # nothing to stream: len stays 0
        size = top.driver.virtual_size
        job.len = size
        job.writeback = top
        offset = 0
        ignored: OSError | None = None
        buf = bytearray()  # one buffer for every step: a new 2 MiB object per step costs its page faults
        below = top.backing

        def plan(offset: int, length: int) -> tuple[bool, int]:
            """Whether the run at ``offset`` is to be copied, and its length (status lookups read tables)."""
            st = bio.layer_status(top, offset, length)
            if st.flags & bio.ALLOCATED:
                return False, st.length
            return allocated_above(below, base, offset, st.length or length)

        def copy_run(offset: int, data: memoryview) -> None:
            bio.readinto(top, offset, data)  # (through the chain straight into the buffer)
            if is_zero(data):
                bio.write_zeroes(top, offset, len(data))
            else:
                bio.write(top, offset, data)  # type: ignore[arg-type]  # (a bytes-like view)

        while offset < size:
            length = min(job.step_size(CHUNK), size - offset)
            # the reads and writes of a step are I/O phases (Job.io): queries read beside them
            copy, n = job.io(plan, offset, length)
            if copy:
                if len(buf) < n:
                    buf = bytearray(n)
                data = memoryview(buf)[:n]
                while True:
                    try:
                        job.io(copy_run, offset, data)
                        break
                    except OSError as exc:
                        if not job.io_error("read", exc):
                            ignored = ignored or exc  # skipped, but the job fails at its end (QEMU's stream)
                            break
            job.advance(n, n if copy else 0)
            offset += n
            job.pause_point()
        if ignored is not None:  # a range was not copied: the chain must not change
            raise ignored
        job.sync_unlocked(top)  # the data written back without the lock, the flush is then short
        job.io(bio.flush, top)

    def prepare(self, job: Job) -> None:
        from vdkit.block import io as bio

        top, base = self.top, self.base
        if top.backing is None:
            return
        bio.flush(top)  # also with nothing streamed (base = the backing): the header is rewritten, as QEMU
        if base is None:
            top.driver.change_backing_file(None, None)
        else:
            top.driver.change_backing_file(self.backing_file or base.filename, base.format)
        dropped = self.nodes()[1:]
        top.backing = base
        self.chain_changed(dropped, top)

    def clean(self, job: Job) -> None:
        if self.reopen is not None:
            try:
                self.reopen(True)
            except (OSError, VdkitError):
                pass  # it stays writable: still correct, only the lock is wider than QEMU's
