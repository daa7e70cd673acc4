"""The block job engine: background jobs (commit, stream, mirror, backup) with QEMU's job model.

A job is one :class:`Job` (state machine, progress, rate limit, events)
driving one :class:`JobDriver` (the work of its type).  The job's work runs
in a thread of its own; it holds the *device lock* (the lock every monitor
command and NBD request takes, ``DeviceRegistry.lock``) while it works and
lets go of it only at **pause points**: between chunks, while it sleeps for
its speed limit, while it is paused, while a ready job waits to be
completed, and while it writes back the dirty pages of the node it copies
into (``Job.writeback``, every ``WRITEBACK_EVERY`` bytes, and before its
flushes: :meth:`Job.sync_unlocked`).  So a query never sees a half-copied chunk or a half-switched
chain, and a command that holds the lock always finds every job at a pause
point, which is what lets ``block-job-pause`` and drains change a sleeping
job's state at once, before the command answers, as QEMU does.  A step's data
reads and writes are *I/O phases* (:meth:`Job.io`): the job keeps the lock,
but pure queries (``query-block``, ...) read beside it meanwhile instead of
waiting for the disk (:class:`DeviceLock`); the job leaves the phase only
once they are done.

No asyncio here, and no monitor code: events leave through the ``emit``
callable the job was created with (the daemon's thread-safe event sink), in
the order they happen.

How a job type plugs in
-----------------------
Subclass :class:`JobDriver`, set ``job_type`` (the QAPI ``type`` string) and
implement :meth:`JobDriver.run`; create the job with :meth:`JobList.create`
(which checks the job-id, emits ``created``) and then :meth:`Job.start`
(``running``, thread started).  Inside ``run`` (called with the device lock
held, in the job's thread):

* ``job.len`` / ``job.offset`` are the progress counters (``len`` is the
  total, may grow; ``job.advance(done, copied)`` adds ``done`` to ``offset``
  and charges ``copied`` bytes to the speed limit);
* do the chunk's reads and writes (and status lookups) through ``job.io(fn, *args)``, and nothing
  else there: no bitmap, progress, chain or event changes (queries read meanwhile);
* call ``job.pause_point()`` after each chunk, not before the first (the
  lock is handed over at most every few milliseconds: other threads get
  their turn; pause and cancel take effect here; after a chunk that was
  charged to the speed limit it also sleeps); ``job.step_size(q)`` is the
  chunk to use where QEMU's step is ``q`` (``q`` under a speed limit, where
  the offsets of a held job are compared with QEMU's; larger without);
* a new job owes its steps up to its first I/O, a resumed or kicked one its
  next step: a command that pauses, drains, cancels or queries lets the job
  take it first (QEMU runs a job at once up to its next I/O), so the first
  copy must call ``advance`` with ``copied`` > 0; a failed I/O
  (``io_error``), ``set_ready`` and an idle pause point end the start too,
  and a step that does none of these may only skip a range (a job looping
  without I/O would not stop while paused);
* a ready phase (mirror, active commit): ``job.set_ready()`` once in sync,
  then keep calling ``job.pause_point()`` (with ``idle=True`` when there is
  nothing to copy: it waits until woken) until ``job.should_exit`` is true:
  ``job.completion_requested`` then says whether to pivot
  (``block-job-complete``) or not (a soft ``block-job-cancel`` of a ready
  job, which still ends as COMPLETED);
* a cancel raises :class:`JobCancelled` out of ``pause_point`` (force cancel
  or a cancel before ready); let it propagate;
* I/O errors: call ``job.io_error(operation, exc)`` (emits
  ``BLOCK_JOB_ERROR`` per the job's on-error policy: ``report`` re-raises,
  ``ignore`` returns False so the chunk is skipped, ``stop`` pauses the job
  and returns True after a resume so the chunk is retried); any exception
  out of ``run`` fails the job (``BLOCK_JOB_COMPLETED`` with ``error``).

After ``run`` returns, the engine moves the job through QEMU's states and
calls, all with the device lock held: ``prepare`` (graph changes that may
still fail; a failure aborts the job), then ``commit`` on success or
``abort`` on failure/cancel, then ``clean`` always.  ``prepare``/``commit``
run at finalize time: at once with ``auto-finalize`` (default), else on
``job-finalize``.  The graph checks of the monitor (``Node 'x' is busy:
...``) use :meth:`JobList.job_on` with the nodes a driver lists in
``JobDriver.nodes``; ``JobDriver.filter`` (a :class:`JobFilter`, set by the
monitor) is the implicit filter node the queries list while the job lives.
Write wake-ups (a mirror's source written) go through :meth:`Job.kick`.

States, verbs and transitions are QEMU 7.2's (``block-jobs.md`` §3.3, §3.7).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

from vdkit.errors import VdkitError
from vdkit.opts import id_wellformed

if TYPE_CHECKING:
    from vdkit.block.node import Node


Emit = Callable[[str, "dict[str, Any] | None"], None]
_T = TypeVar("_T")


class Status(Enum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


S = Status
# the states each state may move to (QEMU's job state table)
_NEXT: dict[Status, frozenset[Status]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}
_LIVE = frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY})
# the states in which each user verb is accepted
VERBS: dict[str, frozenset[Status]] = {
    "cancel": frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.WAITING, S.PENDING, S.ABORTING}),
    "pause": _LIVE,
    "resume": _LIVE,
    "set-speed": _LIVE,
    "complete": frozenset({S.READY, S.STANDBY}),
    "finalize": frozenset({S.PENDING}),
    "dismiss": frozenset({S.CONCLUDED}),
}

SLICE_NS = 100_000_000  # the speed limit is enforced per 100 ms slice
YIELD_INTERVAL = 0.002  # a job running without a speed limit lets other threads in this often
UNLIMITED_STEPS = 4  # without a speed limit a step is this many of QEMU's (offsets are not comparable then)
ON_ERROR = ("report", "ignore", "stop", "enospc")
WRITEBACK_EVERY = 64 * 1024 * 1024  # copied bytes between write-backs of the job's target without the lock
HANDOVER_WAIT = 0.005  # longest a job waits at a pause point for a waiting command to take the lock


class JobCancelled(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised out of :meth:`Job.pause_point` when the job is to stop (cancel)."""


def check_job_id(job_id: str) -> None:
    """QEMU's id rule (:func:`vdkit.opts.id_wellformed`) with the job error."""
    if not id_wellformed(job_id):
        raise VdkitError(f"Invalid job ID '{job_id}'")


class RateLimit:
    """QEMU's job speed limit: a quota of ``speed`` x 100 ms per slice; a slice overdrawn delays the next."""

    def __init__(self) -> None:
        self.quota = 0.0
        self.slice_start = 0
        self.slice_end = 0
        self.dispatched = 0

    def set_speed(self, speed: int) -> None:
        self.quota = max(speed * SLICE_NS / 1e9, 1.0) if speed else 0.0

    def delay_ns(self, n: int) -> int:
        """Charge ``n`` bytes; how long to wait before the next chunk (0: go on)."""
        if not self.quota:
            return 0
        now = time.monotonic_ns()
        if self.slice_end < now:
            self.slice_start, self.slice_end, self.dispatched = now, now + SLICE_NS, 0
        self.dispatched += n
        if self.dispatched < self.quota:
            return 0
        self.slice_end = self.slice_start + int(self.dispatched / self.quota * SLICE_NS)
        return max(self.slice_end - now, 0)


class JobFilter:
    """The implicit filter node QEMU puts above the node a job works on (``commit_top``, ``copy-on-read``,
    ``mirror_top``): no I/O goes through it here, but monitors list it while the job lives
    (``block-jobs.md`` §1.2).  ``below`` is the node it sits on."""

    def __init__(self, driver: str, below: Node, *, ro: bool, name: str, serial: int,
                 release: Callable[[], None] | None = None) -> None:
        self.driver = driver
        self.below = below
        self.ro = ro
        self.name = name
        self.serial = serial
        self.release = release  # gives the node name back once the job concludes (the filter goes)
        self.filename: str | None = None  # its own filename where QEMU gives it one (else its child's)


class JobDriver:
    """One job type's work.  Subclasses set ``job_type`` and implement :meth:`run` (see the module doc)."""

    job_type = ""
    # a ready phase exists (mirror, active commit): a cancel without force while ready ends as COMPLETED
    soft_cancel_when_ready = False
    # set by the monitor when the job is created: the implicit filter node it shows
    filter: JobFilter | None = None
    # set by the monitor: (node, name) the job holds writable through a backend of its own (a commit's
    # base); QEMU's VM snapshots include them while the job lives
    held_writable: list[tuple[Node, str]] = []

    def nodes(self) -> list[Node]:
        """The nodes this job works on (other commands meet them as busy while the job lives)."""
        return []

    def run(self, job: Job) -> None:
        raise NotImplementedError

    def prepare(self, job: Job) -> None:
        """Finalize, first step: changes that may still fail (a failure aborts the job)."""

    def commit(self, job: Job) -> None:
        """Finalize after success: the graph change that cannot fail."""

    def abort(self, job: Job) -> None:
        """After a failure or cancel: undo what the job set up."""

    def clean(self, job: Job) -> None:
        """Always last: release what the job held."""


class Job:
    """One block job: QEMU's state machine, progress counters, speed limit, pause/cancel, events."""

    def __init__(self, jobs: JobList, job_id: str, driver: JobDriver, *, speed: int = 0,
                 auto_finalize: bool = True, auto_dismiss: bool = True, on_error: str = "report") -> None:
        self.jobs = jobs
        self.id = job_id
        self.driver = driver
        self.type = driver.job_type
        self.status = Status.UNDEFINED
        self.speed = speed
        self.limit = RateLimit()
        self.limit.set_speed(speed)
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.on_error = on_error
        self.len = 0
        self.offset = 0
        self.busy = False
        self.pause_count = 0
        self.user_paused = False
        self.io_status = "ok"
        self.cancel_requested = False
        self.force_cancel = False
        self.completion_requested = False
        self.error: str | None = None  # strerror text of a failure
        self._delay_ns = 0
        self._kicked = False
        # QEMU runs a new job synchronously until its first I/O: a pause asked for before that takes
        # effect at the first pause point after it.  The start is over at the first copy, the first
        # failed I/O (io_error: whatever its policy, the job did I/O) or the first wait (idle, ready);
        # every step of a job does one of these or skips a range, so a job that never copies (a backup
        # waiting for writes, a job whose I/O keeps failing) cannot run on while paused
        self._started = False
        # a resumed job owes a step: QEMU runs it at once up to its next I/O, so the next command that
        # pauses, drains or cancels it finds it one step further; such commands wait for that step
        self._kick_pending = False
        self._settlers = 0
        self._last_yield = 0.0
        # the node a driver copies into (``writeback``): every WRITEBACK_EVERY copied bytes its dirty pages
        # are written back at a pause point with the lock let go, so no sync made with the lock held
        # (a flush, the qcow2 writer's when it allocates tables) has much to write
        self.writeback: Node | None = None
        self._unsynced = 0
        self._syncer: threading.Thread | None = None  # the write-back running beside the job
        self._thread: threading.Thread | None = None
        self.cond = threading.Condition(jobs.lock)  # type: ignore[arg-type]  # (DeviceLock has what Condition uses)

    # -- state ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.status in (S.READY, S.STANDBY)

    @property
    def paused(self) -> bool:
        """QEMU's ``paused`` member: pauses are asked for (a job waiting to be finalized counts, as in QEMU)."""
        return self.pause_count > 0 or self.status in (S.WAITING, S.PENDING)

    @property
    def should_exit(self) -> bool:
        """A ready job's loop ends: completion or a (soft) cancel was asked for."""
        return self.completion_requested or self.cancel_requested

    @property
    def is_cancelled(self) -> bool:
        """Cancelled for real (aborting, BLOCK_JOB_CANCELLED), not a soft cancel of a ready job."""
        return self.cancel_requested and self.force_cancel

    def _transition(self, new: Status) -> None:
        assert new in _NEXT[self.status], f"job {self.id}: {self.status.value} -> {new.value}"
        self.status = new
        self.jobs.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new.value})

    def check_verb(self, verb: str) -> None:
        if self.status not in VERBS[verb]:
            raise VdkitError(f"Job '{self.id}' in state '{self.status.value}' cannot accept command verb '{verb}'")

    def _block_event(self, name: str, *, error: str | None = None) -> None:
        data: dict[str, Any] = {"type": self.type, "device": self.id, "len": self.len, "offset": self.offset,
                                "speed": self.speed}
        if error is not None:
            data["error"] = error
        self.jobs.emit(name, data)

    # -- lifecycle (called with the device lock held) ----------------------------------------------
    def start(self) -> None:
        """``running``, and the job's thread starts (it waits for the lock the caller holds)."""
        self._transition(S.RUNNING)
        self.busy = True
        # QEMU runs a new job at once up to its first I/O: the next command that pauses, drains or
        # cancels it waits for its first step
        self._kick_pending = True
        self._thread = threading.Thread(target=self._main, name=f"job-{self.id}", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        with self.jobs.lock:
            failure: BaseException | None = None
            try:
                self.driver.run(self)
            except JobCancelled:
                pass
            except Exception as exc:  # noqa: BLE001 - any failure of the work fails the job
                failure = exc
            if self._syncer is not None and self._kick_pending:  # its file may close when the job ends
                self._join_background()  # (a command waits for the job's step: it keeps the lock)
            elif self._syncer is not None:
                self._unlocked(lambda _: self._join_background(), None)
            self.busy = False
            self._completed(failure)
            self._kick_pending = False
            self.cond.notify_all()

    def _completed(self, failure: BaseException | None) -> None:
        if failure is not None:
            self.error = strerror_of(failure)
            self._abort()
        elif self.is_cancelled:
            self._abort()
        else:
            self._transition(S.WAITING)
            self._transition(S.PENDING)
            if self.auto_finalize:
                self.finalize()
            else:
                self.jobs.emit("BLOCK_JOB_PENDING", {"type": self.type, "id": self.id})

    def finalize(self) -> None:
        """``pending`` → prepare, commit, clean, BLOCK_JOB_COMPLETED, ``concluded`` (and dismissed)."""
        try:
            self.driver.prepare(self)
        except Exception as exc:  # noqa: BLE001 - a failed graph change aborts the job
            self.error = strerror_of(exc)
            self._abort()
            return
        self._guarded(self.driver.commit)
        self._guarded(self.driver.clean)
        self._block_event("BLOCK_JOB_COMPLETED")
        self._conclude()

    def _guarded(self, step: Callable[[Job], None]) -> None:
        """A driver's commit/abort/clean: they must not fail; if one does (a bug), the job still ends."""
        try:
            step(self)
        except Exception:  # noqa: BLE001 - the job's end must not be lost with its thread
            import logging  # (only for this bug report: logging pulls in re, traceback, ... ~13 ms of start-up)

            logging.getLogger(__name__).exception("block job %s: %s failed", self.id,
                                                  getattr(step, "__name__", "step"))

    def _abort(self) -> None:
        self._transition(S.ABORTING)
        self._guarded(self.driver.abort)
        self._guarded(self.driver.clean)
        if self.error is None and self.is_cancelled:
            self._block_event("BLOCK_JOB_CANCELLED")
            self.error = os.strerror(errno.ECANCELED)  # what the queries show for a cancelled job
        else:
            self._block_event("BLOCK_JOB_COMPLETED", error=self.error or os.strerror(errno.ECANCELED))
        self._conclude()

    def _conclude(self) -> None:
        f = self.driver.filter
        if f is not None and f.release is not None:
            f.release()
            f.release = None
        self._transition(S.CONCLUDED)
        if self.auto_dismiss:
            self.dismiss()

    def dismiss(self) -> None:
        self._transition(S.NULL)
        self.jobs.remove(self)

    # -- user verbs (called with the device lock held) --------------------------------------------
    def pause(self) -> None:
        self.check_verb("pause")
        if self.user_paused:
            raise VdkitError("Job is already paused")
        self._settle()
        self.user_paused = True
        self._pause()

    def _pause(self) -> None:
        self.pause_count += 1
        if self.pause_count == 1 and not self.busy and self._started and self.status in (S.RUNNING, S.READY):
            # the job sleeps at a pause point: it is paused now (QEMU enters it and it stops there)
            self._transition(S.STANDBY if self.status is S.READY else S.PAUSED)
        self.cond.notify_all()

    def resume(self) -> None:
        if not self.user_paused or self.pause_count <= 0:
            raise VdkitError("Can't resume a job that was not paused")
        self.check_verb("resume")
        self.user_paused = False
        self.io_status = "ok"
        self._resume()

    def _resume(self) -> None:
        self.pause_count -= 1
        if self.pause_count == 0:
            if self.status in (S.PAUSED, S.STANDBY):
                self._transition(S.READY if self.status is S.STANDBY else S.RUNNING)
            self._wake()

    def _wake(self) -> None:
        """End the job's current wait; a job sleeping at a pause point then owes a step (see _settle)."""
        self._kicked = True
        if (not self.busy and self._started and not self.pause_count and self._thread is not None
                and self._thread.is_alive()):
            self._kick_pending = True
        self.cond.notify_all()

    def _settle(self) -> None:
        """Let a job that owes a step (resumed, kicked) take it before this command acts on it.

        Called by commands (device lock held): the job thread runs up to its
        next pause point, where it hands the lock back.
        """
        thread = self._thread
        if not self._kick_pending or thread is None or threading.current_thread() is thread:
            return
        self._settlers += 1
        try:
            deadline = time.monotonic() + 30
            while self._kick_pending and thread.is_alive() and not (self.pause_count and self._started):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
        finally:
            self._settlers -= 1
            self.cond.notify_all()

    def set_speed(self, speed: int) -> None:
        if speed < 0:
            raise VdkitError("Parameter 'speed' expects a non-negative value")
        self.check_verb("set-speed")
        old = self.speed
        self.speed = speed
        self.limit.set_speed(speed)
        if speed == 0 or speed > old:  # a faster limit ends the current sleep
            self._wake()

    def complete(self) -> None:
        self.check_verb("complete")
        if self.cancel_requested:
            raise VdkitError(f"The active block job '{self.id}' cannot be completed")
        self.completion_requested = True
        self._kicked = True
        self.cond.notify_all()

    def cancel(self, *, force: bool) -> None:
        """QEMU's cancel: a concluded job is dismissed; a ready job with a ready phase may end softly."""
        self.check_verb("cancel")
        self._settle()
        if self.status is S.CONCLUDED:
            self.dismiss()
            return
        if self.driver.soft_cancel_when_ready and self.ready and not force:
            soft = True
        else:
            soft = False
        if self.status is S.CREATED:
            self.cancel_requested = self.force_cancel = True
            self._abort()
            return
        if self.status in (S.WAITING, S.PENDING, S.ABORTING):
            if self.status is S.PENDING and not self.auto_finalize:
                self.cancel_requested = self.force_cancel = True
                self._abort()
            return
        self.cancel_requested = True
        self.force_cancel = self.force_cancel or not soft
        if self.user_paused:
            # a cancelled job is resumed to run to its end
            self.user_paused = False
            self._resume()
        self._kicked = True
        self.cond.notify_all()

    def drain(self) -> None:
        """A drain (graph change, snapshot, ...): a job at a pause point is paused and resumed at once."""
        self._settle()
        if self.status not in (S.RUNNING, S.READY) or self.pause_count:
            return
        self._pause()
        self._resume()

    # -- for JobDriver.run (job thread, device lock held) ----------------------------------------
    def step_size(self, qemu_step: int) -> int:
        """How much to do before the next pause point: QEMU's step under a speed limit (where the offsets
        a paused job shows are compared), a larger one without (Python's per-step cost is high)."""
        return qemu_step if self.speed else qemu_step * UNLIMITED_STEPS

    def advance(self, done: int, copied: int = 0) -> None:
        """``done`` more bytes of progress; ``copied`` of them count against the speed limit."""
        self.offset += done
        if copied:
            self._started = True
            self._unsynced += copied
            self._delay_ns += self.limit.delay_ns(copied)

    def io(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)``, the job's data I/O (reads and writes, no other state change), as an I/O phase of
        the device lock: pure queries read beside it instead of waiting for it (:class:`DeviceLock`).

        Only the job's own thread: a copy made by another thread's write hook
        (a backup's copy-before-write) runs inside that thread's request, whose
        state is not the job's to vouch for.  Errors are the caller's, after
        the phase (the error policy may pause the job)."""
        lock = self.jobs.lock
        if not isinstance(lock, DeviceLock) or threading.current_thread() is not self._thread:
            return fn(*args)
        lock.io_begin()
        try:
            return fn(*args)
        finally:
            lock.io_end()

    def set_ready(self) -> None:
        """In sync (mirror, active commit): ``ready`` and BLOCK_JOB_READY."""
        self._started = True
        if self.status is S.RUNNING:
            self._transition(S.READY)
            self._block_event("BLOCK_JOB_READY")

    def pause_point(self, *, idle: bool = False) -> None:
        """Let other threads in, sleep for the speed limit, honour pause and cancel.

        ``idle``: nothing to do until something changes (a ready job in sync):
        wait until woken (complete, cancel, pause, speed change, a write).
        """
        self._check_cancel()
        self._kicked = False
        self.busy = False
        if idle:
            self._started = True  # waiting for work: the job's synchronous start is over, it owes nothing
        if self._kick_pending and self._started:  # the step owed is done: a waiting command may act now
            self._kick_pending = False  # (a new job owes everything up to its first copy)
            self.cond.notify_all()
        if self.writeback is not None and self._unsynced >= WRITEBACK_EVERY:
            self._unsynced = 0
            self._background_sync(self.writeback)
        try:
            while self._settlers and not self._kick_pending:
                self.cond.wait()  # a command waits for this job to reach a pause point: let it act
            delay, self._delay_ns = self._delay_ns, 0
            if delay or idle:
                deadline = time.monotonic() + delay / 1e9
                while not self._kicked and not self.cancel_requested and not self.pause_count:
                    left = deadline - time.monotonic() if delay else None
                    if left is not None and left <= 0:
                        break
                    self.cond.wait(left)
            else:
                self._yield_lock()
            while self.pause_count and not self.is_cancelled and self._started:
                if self.status in (S.RUNNING, S.READY):
                    self._transition(S.STANDBY if self.status is S.READY else S.PAUSED)
                self.cond.wait()
                if not self.pause_count and self.status in (S.PAUSED, S.STANDBY):
                    self._transition(S.READY if self.status is S.STANDBY else S.RUNNING)
        finally:
            self.busy = True
        self._check_cancel()

    def kick(self) -> None:
        """Wake an idle job (new work arrived: a write to a mirrored range)."""
        self._kicked = True
        self.cond.notify_all()

    def _yield_lock(self) -> None:
        """Release the device lock and take it again, giving waiting threads (queries, NBD) their turn.

        Only when a thread waits (:class:`DeviceLock`): handing the lock over
        costs a scheduler round trip, which per step would cost more than the
        step.  A plain lock cannot tell: then at most every ``YIELD_INTERVAL``
        seconds (a waiting command waits at most that long plus one step).
        """
        lock = self.jobs.lock
        if isinstance(lock, DeviceLock):
            if lock.waiting:
                lock.expect_hand_over()
                self._unlocked(lock.hand_over, HANDOVER_WAIT)
            return
        now = time.monotonic()
        if now - self._last_yield < YIELD_INTERVAL:
            return
        self._last_yield = now
        self._unlocked(time.sleep, 0)

    def _unlocked(self, fn: Callable[[Any], object], arg: Any) -> None:
        """``fn(arg)`` with the device lock let go (the RLock may be held recursively: released fully)."""
        lock = self.jobs.lock
        depth = 0
        while True:
            try:
                lock.release()
            except RuntimeError:
                break
            depth += 1
        try:
            fn(arg)
        finally:
            for _ in range(depth):
                lock.acquire()

    def sync_unlocked(self, node: Node) -> None:
        """Write back the dirty pages of ``node``'s file with the device lock let go, before a flush.

        The flush that follows (with the lock held: it writes the format's
        cached metadata and syncs) then finds little left to write, so the
        fdatasync of a whole copy no longer keeps queries and NBD clients
        waiting for hundreds of milliseconds (QEMU's flush does not block its
        monitor either).  Nothing changes for the job meanwhile: its nodes
        stay open while it runs, and what others do in between (writes that
        dirty the source, a pause) is seen at its next step.  A failure is
        left to the flush that follows, which reports it.  A job that owes a
        command its step (resumed, see ``_settle``) keeps the lock: the command
        finds the step done, as before.
        """
        fd = _fd_of(node)
        if fd is None or self._kick_pending:
            return
        self._unlocked(self._sync_fd, fd)

    def _sync_fd(self, fd: int) -> None:
        """fdatasync, after any background one still running (without the lock: see the callers)."""
        self._join_background()
        try:
            os.fdatasync(fd)
        except OSError:
            pass  # left to the flush that follows, which reports it

    def _background_sync(self, node: Node) -> None:
        """Start writing back ``node``'s dirty pages in a thread of its own while the job copies on.

        The periodic write-back only exists so that the syncs made with the lock
        held find little to write; waiting for it made the job wait for the disk
        every 64 MiB (QEMU's jobs never do), so it runs beside the job (the
        syscall lets go of the GIL), one at a time, and whatever waits for a
        sync of its own (:meth:`sync_unlocked`, the end of the job) waits for it
        first.  An extra sync never changes what is durable in which order.
        """
        fd = _fd_of(node)
        if fd is None or (self._syncer is not None and self._syncer.is_alive()):
            return

        def sync() -> None:
            try:
                os.fdatasync(fd)
            except OSError:
                pass

        self._syncer = threading.Thread(target=sync, name=f"job-{self.id}-writeback", daemon=True)
        self._syncer.start()

    def _join_background(self) -> None:
        syncer, self._syncer = self._syncer, None
        if syncer is not None:
            syncer.join()

    def _check_cancel(self) -> None:
        if self.cancel_requested and (self.force_cancel or not self.ready):
            self.force_cancel = True
            raise JobCancelled

    def io_error(self, operation: str, exc: BaseException) -> bool:
        """An I/O error of the job's work, handled by its on-error policy (see the module doc)."""
        self._started = True  # the job did I/O: a pause (``stop``'s own included) now takes effect
        action = self.on_error
        if action == "enospc":
            action = "stop" if getattr(exc, "errno", None) == errno.ENOSPC else "report"
        self.jobs.emit("BLOCK_JOB_ERROR", {"device": self.id, "operation": operation, "action": action})
        if action == "report":
            raise exc
        if action == "ignore":
            return False
        self.io_status = "nospace" if getattr(exc, "errno", None) == errno.ENOSPC else "failed"
        self.user_paused = True
        self._pause()
        self.pause_point()
        return True

    # -- waiting (monitor side) -----------------------------------------------------------------------
    def join(self, timeout: float | None = None) -> None:
        """Wait for the job's thread to end (the caller must not hold the device lock)."""
        if self._thread is not None:
            self._thread.join(timeout)


def strerror_of(exc: BaseException) -> str:
    """The text QEMU puts in BLOCK_JOB_COMPLETED's ``error``: strerror of the failure's errno."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    if isinstance(exc, VdkitError):
        return exc.message
    return os.strerror(errno.EIO)


class DeviceLock:
    """The device lock: a re-entrant lock that knows whether another thread is waiting for it.

    A job holds the lock while it copies and lets it go at pause points.  Handing
    it over costs a scheduler round trip (on a busy machine, a time slice given
    to another process), so a job should only let go when someone waits; a
    plain ``RLock`` cannot tell, and jobs used to let go every 2 ms just in
    case (a fifth of a commit's time on a loaded machine), and a waiting query
    still waited up to that interval.  The waiters are the threads blocked in
    :meth:`acquire` (or re-acquiring after a condition wait), kept in a set
    without a second lock: ``set.add``/``discard`` are single steps under the
    GIL (a counter's ``+=`` is not, and one lost decrement would leave the job
    handing over for nothing, one lost increment keep a query waiting for the
    whole job), and a waiter seen a moment late only waits one more step.

    **Queries during a job's data I/O.**  A job's step reads and writes up to
    a few MiB with the lock held; a query waiting for the step's end waited
    for the disk.  What a pure query reads (the graph, headers, file sizes,
    bitmap counts) does not change while a job moves data, so the job marks
    its data I/O as an *I/O phase* (:meth:`io_begin`/:meth:`io_end`, through
    :meth:`Job.io`) and a pure query (:meth:`acquire_query`) reads then
    without the lock, beside the job, as a shared reader.  The job keeps the
    lock meanwhile, so nothing else (a command, an NBD request) runs, and it
    waits at :meth:`io_end` until the readers are done before it changes any
    state again: a query never sees a half-done step or a half-switched chain.
    """

    LOCKED = 1  # acquire_query: the lock is held (release it)
    SHARED = 2  # acquire_query: reading beside a job's data I/O (end with end_query)
    QUERY_POLL = 0.002  # a waiting query looks at the lock this often (a command's end is not signalled)

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._waiters: set[int] = set()
        self._handed = threading.Event()  # set when a waiting thread got the lock (see hand_over)
        # the I/O phase and its shared readers (see the class doc); _gate orders them with the job
        self._gate = threading.Condition(threading.Lock())
        self._io_phase = False
        self._readers = 0
        # what threading.Condition uses when its lock has them (a full release of a recursive hold)
        self._is_owned = self._lock._is_owned  # type: ignore[attr-defined]
        self._release_save = self._lock._release_save  # type: ignore[attr-defined]
        self.release = self._lock.release

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        me = threading.get_ident()
        self._waiters.add(me)
        try:
            got = self._lock.acquire(True, timeout)
            if got:
                self._handed.set()
            return got
        finally:
            self._waiters.discard(me)

    @property
    def waiting(self) -> bool:
        """Whether another thread waits for the lock."""
        return bool(self._waiters)

    def _acquire_restore(self, state: object) -> None:
        me = threading.get_ident()
        self._waiters.add(me)
        try:
            self._lock._acquire_restore(state)  # type: ignore[attr-defined]
            self._handed.set()
        finally:
            self._waiters.discard(me)

    def expect_hand_over(self) -> None:
        """Call while holding the lock, before letting go of it for :meth:`hand_over`."""
        self._handed.clear()

    def hand_over(self, wait: float) -> None:
        """With the lock let go: give a waiting thread up to ``wait`` seconds to take it.

        Releasing only wakes the waiter; a thread that took the lock straight back
        would usually win the race (the waiter still has to be scheduled and get
        the GIL), and a query then waited for the next pause point, or the next.
        """
        if self._waiters:
            with self._gate:  # a query waiting in acquire_query takes the lock now (see there)
                self._gate.notify_all()
            self._handed.wait(wait)

    # -- shared reads during a job's data I/O ------------------------------------------------------
    def io_begin(self) -> None:
        """The holder (a job) starts data I/O: pure queries may read beside it until :meth:`io_end`."""
        with self._gate:
            self._io_phase = True
            self._gate.notify_all()

    def io_end(self) -> None:
        """The data I/O is over: wait for the queries reading beside it (the job changes state next)."""
        with self._gate:
            self._io_phase = False
            while self._readers:
                self._gate.wait()

    def acquire_query(self, blocking: bool = True) -> int:
        """For a pure query: the lock (:attr:`LOCKED`), or a shared read beside a job's data I/O
        (:attr:`SHARED`, ended by :meth:`end_query`), whichever comes first; 0 if not ``blocking`` and
        neither is to be had now.

        A waiting query counts as a waiter, so a job hands the lock over at its
        next pause point (:meth:`hand_over` wakes the query), unless its next
        I/O phase comes first.  The lock is tried with the gate held, so a
        hand-over cannot slip between the try and the wait."""
        if self._lock.acquire(False):
            return self.LOCKED
        with self._gate:
            if self._io_phase:
                self._readers += 1
                return self.SHARED
        if not blocking:
            return 0
        me = threading.get_ident()
        self._waiters.add(me)
        try:
            with self._gate:
                while True:
                    if self._lock.acquire(False):
                        self._handed.set()
                        return self.LOCKED
                    if self._io_phase:
                        self._readers += 1
                        return self.SHARED
                    self._gate.wait(self.QUERY_POLL)
        finally:
            self._waiters.discard(me)

    def end_query(self, how: int) -> None:
        """End what :meth:`acquire_query` returned."""
        if how == self.LOCKED:
            self._lock.release()
        elif how == self.SHARED:
            with self._gate:
                self._readers -= 1
                if not self._readers:
                    self._gate.notify_all()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _fd_of(node: Node) -> int | None:
    """The descriptor of a node's image file (None: not a local file)."""
    fd = getattr(getattr(node.driver, "file", None), "fd", None)
    return fd if isinstance(fd, int) else None


class JobList:
    """Every job of one daemon, in creation order, with the device lock and the event sink they share."""

    def __init__(self, lock: DeviceLock | threading.RLock, emit: Emit | None = None) -> None:
        self.lock = lock
        self.jobs: list[Job] = []
        self._emit = emit

    def set_emit(self, emit: Emit | None) -> None:
        self._emit = emit

    def emit(self, name: str, data: dict[str, Any] | None) -> None:
        if self._emit is not None:
            self._emit(name, data)

    def find(self, job_id: str) -> Job | None:
        for j in self.jobs:
            if j.id == job_id:
                return j
        return None

    def create(self, job_id: str, driver: JobDriver, *, speed: int = 0, auto_finalize: bool = True,
               auto_dismiss: bool = True, on_error: str = "report") -> Job:
        """A new job in state ``created`` (the caller then calls ``start``); checks the id first.

        A negative speed is refused after the job was created, as QEMU does
        (``created`` and ``null`` are emitted before the error).
        """
        check_job_id(job_id)
        if self.find(job_id) is not None:
            raise VdkitError(f"Job ID '{job_id}' already in use")
        job = Job(self, job_id, driver, speed=max(speed, 0), auto_finalize=auto_finalize,
                  auto_dismiss=auto_dismiss, on_error=on_error)
        self.jobs.append(job)
        job._transition(S.CREATED)
        if speed < 0:
            job.speed = 0
            self.discard(job)
            raise VdkitError("Parameter 'speed' expects a non-negative value")
        return job

    def discard(self, job: Job) -> None:
        """A job that failed to be set up after ``created``: ``null`` at once (QEMU's early failure)."""
        job._transition(S.NULL)
        self.remove(job)

    def remove(self, job: Job) -> None:
        if job in self.jobs:
            self.jobs.remove(job)

    def filters(self) -> list[JobFilter]:
        """The implicit filter nodes of the jobs that still hold their nodes (not yet concluded)."""
        return [j.driver.filter for j in self.jobs
                if j.driver.filter is not None and j.status not in (S.CONCLUDED, S.NULL)]

    def job_on(self, node: Node) -> Job | None:
        """The live job working on ``node`` (any of its driver's nodes), if one does."""
        for j in self.jobs:
            if j.status is not S.NULL and any(n is node for n in j.driver.nodes()):
                return j
        return None

    def settle(self) -> None:
        """Let every job take the step it owes (a query then sees what QEMU's would: QEMU runs a resumed
        job at once up to its next I/O)."""
        for j in list(self.jobs):
            j._settle()

    def drain(self) -> None:
        """QEMU's drain as the monitor sees it: every running job pauses and resumes (events)."""
        for j in list(self.jobs):
            j.drain()

    def cancel_all(self, timeout: float = 10.0) -> None:
        """Quit: force-cancel every job and wait for their threads (called WITHOUT the device lock).

        As QEMU on its way out: every running job is paused (a drain), then
        cancelled while still drained, so it resumes only to end (``paused``,
        ``running``, ``aborting``, ...) without taking another step.
        """
        with self.lock:
            live = list(self.jobs)
            drained = []
            for j in live:
                j._settle()
                if j.status in (S.RUNNING, S.READY) and not j.pause_count:
                    j._pause()
                    drained.append(j)
            for j in live:
                if j in drained:
                    j._resume()
                    j._kick_pending = False  # the cancel comes before the job could step again
                if j.status in (S.CONCLUDED, S.NULL):
                    continue
                try:
                    j.cancel(force=True)
                except VdkitError:
                    pass
        for j in live:
            j.join(timeout)


def reopen_node(node: Node, *, readonly: bool) -> None:
    """Reopen ``node``'s format layer read-write (or read-only again) in place: the Node object stays.

    QEMU reopens a commit base read-write for the job and read-only after it;
    a backing node here holds a read-only descriptor, so the format driver is
    closed (flushed, its lock released) and opened again on the same file in
    the new mode.  The file must still be the same one (device and inode);
    if the new mode cannot be had (another process holds a lock), the node is
    opened in its old mode again and the error raised.
    """
    from vdkit.block.driver import OpenContext
    from vdkit.formats import registry
    from vdkit.io.file import ImageFile

    if node.readonly == readonly:
        return
    old = node.driver
    path = old.file.filename
    st = os.fstat(old.file.fd)
    fmt = node.format
    hook = old.corruption_hook

    def open_as(ro: bool) -> None:
        f = ImageFile(path, readonly=ro)
        try:
            nst = os.fstat(f.fd)
            if (nst.st_dev, nst.st_ino) != (st.st_dev, st.st_ino):
                raise VdkitError(f"Could not reopen '{path}': the file was replaced")
            ctx = OpenContext(path, readonly=ro)
            drv = registry.open_driver(fmt, f, ctx)
        except BaseException:
            f.close()
            raise
        try:
            drv.open_children(ctx)
        except BaseException:
            drv.close()
            raise
        drv.corruption_hook = hook
        node.driver = drv
        node.readonly = ro

    old.close()
    try:
        open_as(readonly)
    except BaseException:
        open_as(node.readonly)
        raise
