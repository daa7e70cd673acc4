"""Data writes in flight: a few threads issue positional writes while the caller goes on.

Why: a format writer (the qcow2 engine under ``convert``) spends most of its
time in ``pwritev`` system calls, one after another; qemu-img keeps several
requests in flight (coroutines on a thread pool), so the kernel's copy into
the page cache of one request overlaps the next one's.  The system calls drop
the GIL, so two or three Python threads give the same overlap.

What the caller keeps: metadata is never touched here.  A job is only
``write(offset, buffers)`` on a file the caller chose; the caller decides what
may depend on its completion and calls :meth:`InFlight.wait` first (the qcow2
engine: before any L2 table that names the data goes to disk).  The caller's
buffers must stay unchanged until their job has completed; :meth:`after` runs
a function once every job submitted so far is done, which is how a copy loop
gets its buffers back.  The bytes in flight are bounded (:attr:`max_bytes`):
:meth:`submit` waits for the oldest jobs when the bound would be passed.

A failed job keeps its exception and ``token`` (what the caller needs to undo
its bookkeeping); :meth:`wait` hands the failures back, oldest first.
"""

from __future__ import annotations

import threading

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from vdkit.io.file import FileBytes

    Buffer = bytes | bytearray | memoryview | FileBytes  # (only their lengths are looked at here)


class Job:
    """One write: ``write(offset, buffers)``; ``error`` is set when it failed."""

    __slots__ = ("seq", "write", "offset", "buffers", "nbytes", "token", "done", "error")

    def __init__(self, seq: int, write: Callable[[int, list[Buffer]], None], offset: int, buffers: list[Buffer],
                 nbytes: int, token: object) -> None:
        self.seq = seq  # submission order
        self.write = write
        self.offset = offset
        self.buffers: list[Buffer] | None = buffers
        self.nbytes = nbytes
        self.token = token
        self.done = False
        self.error: BaseException | None = None


class InFlight:
    """Up to ``threads`` writes running at once, at most ``max_bytes`` submitted and not done."""

    def __init__(self, threads: int = 3, max_bytes: int = 8 << 20) -> None:
        self.threads = max(1, threads)
        self.max_bytes = max_bytes
        lock = threading.Lock()
        # two conditions on one lock: idle workers wait on _jobs and a new job wakes one of them; callers
        # waiting for completions wait on _done.  With one condition every completion woke the idle
        # workers too and every job woke them all, only for all but one to sleep again: a GIL hand-off
        # and futex calls each time (35.9k futex calls in a 2 GiB convert, 19.6k with one worker)
        self._jobs = threading.Condition(lock)
        self._done = threading.Condition(lock)
        # submission order: jobs not yet done (or done behind an older running one) and the
        # functions waiting for them (see after())
        self._order: list[Job | Callable[[], None]] = []
        self._head = 0  # index of the oldest entry in _order still pending
        self._todo: list[Job] = []  # jobs no thread has taken yet
        self._bytes = 0  # of jobs submitted and not done
        self._running = 0  # jobs submitted and not done
        self._failed: list[Job] = []
        self._workers: list[threading.Thread] = []
        self._idle = 0  # workers waiting for a job
        self._woken = 0  # of those, notified and not yet running
        self._closing = False
        self._seq = 0

    @property
    def busy(self) -> bool:
        """Whether some job is submitted and not done (a cheap test before :meth:`wait`)."""
        return self._running > 0

    @property
    def failed(self) -> bool:
        """Whether some job failed since the last :meth:`wait` (it may not have been waited for)."""
        return bool(self._failed)

    def submit(self, write: Callable[[int, list[Buffer]], None], offset: int, buffers: Sequence[Buffer],
               token: object = None) -> None:
        """Start ``write(offset, buffers)`` in a worker (waiting first while too many bytes are in flight)."""
        nbytes = sum(len(b) for b in buffers)
        with self._done:
            while self._running and self._bytes + nbytes > self.max_bytes:
                self._done.wait()
            self._seq += 1
            job = Job(self._seq, write, offset, list(buffers), nbytes, token)
            self._order.append(job)
            self._bytes += nbytes
            self._running += 1
            self._todo.append(job)
            if self._idle > self._woken:
                self._woken += 1  # (a worker woken and not yet running is not woken again)
                self._jobs.notify()
            elif len(self._workers) < self.threads:
                t = threading.Thread(target=self._work, name="vdkit-write", daemon=True)
                self._workers.append(t)
                t.start()

    def after(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once every job submitted so far is done (now, when none is pending); it may run in a
        worker thread, so it must only do thread-safe things (put into a queue)."""
        with self._done:
            if self._head < len(self._order):
                self._order.append(fn)
                return
        fn()

    def wait_for(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Wait until no pending job writes into any ``[lo, hi)`` of ``ranges`` (same file: the caller's
        concern); failures stay for :meth:`wait`."""
        with self._done:
            while any(not job.done and job.offset < hi and lo < job.offset + job.nbytes
                      for job in self._order[self._head :] if isinstance(job, Job) for lo, hi in ranges):
                self._done.wait()

    def wait(self) -> list[Job]:
        """Wait until no job is pending; the jobs that failed since the last call, oldest first."""
        with self._done:
            while self._running:
                self._done.wait()
            failed, self._failed = self._failed, []
        failed.sort(key=lambda j: j.seq)
        return failed

    def close(self) -> list[Job]:
        """:meth:`wait`, then end the worker threads; the failures as :meth:`wait` gives them."""
        failed = self.wait()
        with self._jobs:
            self._closing = True
            self._jobs.notify_all()
        for t in self._workers:
            t.join()
        self._workers.clear()
        return failed

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            with jobs:
                while not self._todo and not self._closing:
                    self._idle += 1
                    jobs.wait()
                    self._idle -= 1
                    if self._woken:
                        self._woken -= 1
                if not self._todo:
                    return
                job = self._todo.pop(0)
            assert job.buffers is not None
            try:
                job.write(job.offset, job.buffers)
            except BaseException as exc:  # kept for the caller's wait(); the worker goes on
                job.error = exc
            job.buffers = None  # the caller's buffers are free once after() says so: hold no view of them
            ready: list[Callable[[], None]] = []
            with self._done:
                job.done = True
                self._bytes -= job.nbytes
                self._running -= 1
                if job.error is not None:
                    self._failed.append(job)
                order = self._order
                i = self._head
                while i < len(order):
                    item = order[i]
                    if isinstance(item, Job):
                        if not item.done:
                            break
                    else:
                        ready.append(item)
                    i += 1
                if i > 64 or i == len(order):  # drop the finished prefix now and then, not on every job
                    del order[:i]
                    i = 0
                self._head = i
                self._done.notify_all()
            for fn in ready:
                fn()
