"""The job engine (``vdkit.block.jobs``) on its own: states, events, pause/cancel/complete, speed, errors.

A fake job type copies nothing; what is checked is the engine's side of QEMU's job model
(``block-jobs.md`` §3.3, §3.7): the ``JOB_STATUS_CHANGE`` sequences and ``BLOCK_JOB_*`` events in order,
the verbs' refusals, and that a command holding the device lock finds the job at a pause point.  The
differential tests against QEMU (``test_jobs_diff.py``) run the real job types.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.block.jobs import DeviceLock, Job, JobDriver, JobList, Status
from vdkit.errors import VdkitError

CHUNK = 1 << 19


class FakeDriver(JobDriver):
    job_type = "commit"

    def __init__(self, chunks: int, *, ready: bool = False, fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.ready_phase = ready
        self.soft_cancel_when_ready = ready
        self.fail_at = fail_at
        self.calls: list[str] = []
        self.pivoted = False

    def run(self, job: Job) -> None:
        job.len = self.chunks * CHUNK
        for i in range(self.chunks):
            if i == self.fail_at:
                raise OSError(errno.EIO, "boom")
            job.advance(CHUNK, CHUNK)
            job.pause_point()
        if self.ready_phase:
            job.set_ready()
            while not job.should_exit:
                job.pause_point(idle=True)
            self.pivoted = job.completion_requested

    def prepare(self, job: Job) -> None:
        self.calls.append("prepare")

    def commit(self, job: Job) -> None:
        self.calls.append("commit")

    def abort(self, job: Job) -> None:
        self.calls.append("abort")

    def clean(self, job: Job) -> None:
        self.calls.append("clean")


class Rig:
    def __init__(self, lock: DeviceLock | threading.RLock | None = None) -> None:
        self.lock = DeviceLock() if lock is None else lock  # the daemon's lock (jobs hand it over when asked)
        self.events: list[tuple[str, dict[str, Any] | None]] = []
        self.changed = threading.Condition()
        self.jobs = JobList(self.lock, self._emit)

    def _emit(self, name: str, data: dict[str, Any] | None) -> None:
        with self.changed:
            self.events.append((name, data))
            self.changed.notify_all()

    def start(self, driver: JobDriver, **kw: Any) -> Job:
        with self.lock:
            job = self.jobs.create("j", driver, **kw)
            job.start()
        return job

    def wait_status(self, status: str, timeout: float = 30) -> None:
        with self.changed:
            ok = self.changed.wait_for(lambda: ("JOB_STATUS_CHANGE", {"id": "j", "status": status}) in self.events,
                                       timeout)
        assert ok, (status, self.seq())

    def seq(self) -> list[str]:
        return [d["status"] if n == "JOB_STATUS_CHANGE" and d else n for n, d in self.events]


def test_job_that_finishes_by_itself() -> None:
    rig = Rig()
    drv = FakeDriver(4)
    job = rig.start(drv)
    rig.wait_status("null")
    job.join()
    assert rig.seq() == ["created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert rig.events[4][1] == {"type": "commit", "device": "j", "len": 4 * CHUNK, "offset": 4 * CHUNK, "speed": 0}
    assert drv.calls == ["prepare", "commit", "clean"]
    assert rig.jobs.jobs == []


def test_a_failing_clean_step_is_logged_and_the_job_still_ends(caplog: pytest.LogCaptureFixture) -> None:
    """A driver's clean that raises (a bug) is reported through logging (imported only then) and the job
    still concludes: the engine's end of a job is never lost with its thread."""

    class FailingClean(FakeDriver):
        def clean(self, job: Job) -> None:
            raise RuntimeError("clean broke")

    rig = Rig()
    job = rig.start(FailingClean(2))
    rig.wait_status("null")
    job.join()
    assert rig.seq()[-2:] == ["concluded", "null"]
    assert any("block job j: clean failed" in r.getMessage() and r.exc_info for r in caplog.records), caplog.records


def test_speed_pause_cancel() -> None:
    """speed 1: one chunk, then a sleep; a pause under the lock is immediate; force cancel of a paused job."""
    rig = Rig()
    drv = FakeDriver(8)
    job = rig.start(drv, speed=1)
    deadline = time.monotonic() + 30
    while True:  # the first chunk is copied at once, then the job sleeps
        with rig.lock:
            if not job.busy and job.offset:
                break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with rig.lock:
        job.pause()
        assert job.status is Status.PAUSED and job.paused and job.offset == CHUNK  # before the command returns
        with pytest.raises(VdkitError, match="Job is already paused"):
            job.pause()
        with pytest.raises(VdkitError, match="Job 'j' in state 'paused' cannot accept command verb 'complete'"):
            job.complete()
        job.set_speed(0)
        job.resume()
        assert job.status is Status.RUNNING
        with pytest.raises(VdkitError, match="Can't resume a job that was not paused"):
            job.resume()
        job.set_speed(1)
    with rig.lock:
        job.pause()
        job.cancel(force=True)
    rig.wait_status("null")
    job.join()
    assert rig.seq() == ["created", "running", "paused", "running", "paused", "running", "aborting",
                         "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert drv.calls == ["abort", "clean"]


def test_ready_complete_and_soft_cancel() -> None:
    for verb in ("complete", "cancel"):
        rig = Rig()
        drv = FakeDriver(2, ready=True)
        job = rig.start(drv)
        rig.wait_status("ready")
        with rig.lock:
            job.pause()
            assert job.status is Status.STANDBY
            job.resume()
            if verb == "complete":
                job.complete()
            else:
                job.cancel(force=False)
        rig.wait_status("null")
        job.join()
        assert rig.seq() == ["created", "running", "ready", "BLOCK_JOB_READY", "standby", "ready", "waiting",
                             "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
        assert drv.pivoted is (verb == "complete")


def test_manual_finalize_and_dismiss() -> None:
    rig = Rig()
    drv = FakeDriver(1)
    job = rig.start(drv, auto_finalize=False, auto_dismiss=False)
    rig.wait_status("pending")
    with rig.lock:
        with pytest.raises(VdkitError, match="in state 'pending' cannot accept command verb 'dismiss'"):
            job.check_verb("dismiss")
        assert drv.calls == []
        job.check_verb("finalize")
        job.finalize()
        assert job.status is Status.CONCLUDED
        job.check_verb("dismiss")
        job.dismiss()
    assert rig.seq() == ["created", "running", "waiting", "pending", "BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED",
                         "concluded", "null"]
    assert rig.events[4][1] == {"type": "commit", "id": "j"}


def test_failure_and_id_rules() -> None:
    rig = Rig()
    job = rig.start(FakeDriver(3, fail_at=1))
    rig.wait_status("null")
    job.join()
    assert rig.seq() == ["created", "running", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert rig.events[3][1] == {"type": "commit", "device": "j", "len": 3 * CHUNK, "offset": CHUNK, "speed": 0,
                                "error": "Input/output error"}
    with rig.lock:
        for bad in ("#bad", "", "1a", "a b"):
            with pytest.raises(VdkitError, match=f"Invalid job ID '{bad}'"):
                rig.jobs.create(bad, FakeDriver(1))
        rig.events.clear()
        with pytest.raises(VdkitError, match="Parameter 'speed' expects a non-negative value"):
            rig.jobs.create("j", FakeDriver(1), speed=-1)
        assert rig.seq() == ["created", "null"]
        a = rig.jobs.create("j", FakeDriver(1))
        with pytest.raises(VdkitError, match="Job ID 'j' already in use"):
            rig.jobs.create("j", FakeDriver(1))
        a.cancel(force=True)  # never started: it ends at once
    assert rig.seq()[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


VERB_NAMES = ("pause", "resume", "cancel", "cancel-force", "complete", "speed0", "speed1", "drain", "finalize",
              "dismiss")


@settings(max_examples=60, deadline=None)
@given(ready=st.booleans(), auto_finalize=st.booleans(), auto_dismiss=st.booleans(), speed=st.sampled_from([0, 1]),
       verbs=st.lists(st.sampled_from(VERB_NAMES), max_size=12))
def test_random_verbs_keep_the_state_machine(ready: bool, auto_finalize: bool, auto_dismiss: bool, speed: int,
                                             verbs: list[str]) -> None:
    """Any sequence of user verbs: refusals are VdkitErrors, every status change follows QEMU's table,
    and a forced cancel (plus finalize/dismiss where the flags ask for them) always ends the job."""
    from vdkit.block.jobs import _NEXT

    rig = Rig()
    job = rig.start(FakeDriver(6, ready=ready), speed=speed, auto_finalize=auto_finalize,
                    auto_dismiss=auto_dismiss)
    for verb in verbs:
        with rig.lock:
            try:
                if verb == "pause":
                    job.pause()
                elif verb == "resume":
                    job.resume()
                elif verb == "cancel":
                    if job.user_paused:
                        continue
                    job.cancel(force=False)
                elif verb == "cancel-force":
                    job.cancel(force=True)
                elif verb == "complete":
                    job.complete()
                elif verb in ("speed0", "speed1"):
                    job.set_speed(0 if verb == "speed0" else 1)
                elif verb == "drain":
                    rig.jobs.drain()
                elif verb == "finalize":
                    job.check_verb("finalize")
                    job.finalize()
                else:
                    job.check_verb("dismiss")
                    job.dismiss()
            except VdkitError:
                pass
    # end it: force-cancel until gone, finalizing and dismissing where the flags leave that to us
    deadline = time.monotonic() + 30
    while job in rig.jobs.jobs:
        assert time.monotonic() < deadline, rig.seq()
        with rig.lock:
            try:
                if job.status is Status.PENDING:
                    job.finalize()
                elif job.status is Status.CONCLUDED:
                    job.dismiss()
                elif job.status not in (Status.WAITING, Status.ABORTING):
                    job.cancel(force=True)
            except VdkitError:
                pass
        time.sleep(0.005)
    job.join(30)
    statuses = [d["status"] for n, d in rig.events if n == "JOB_STATUS_CHANGE" and d]
    prev = Status.UNDEFINED
    for s in statuses:
        cur = Status(s)
        assert cur in _NEXT[prev], (prev, cur, statuses)
        prev = cur
    assert prev is Status.NULL
    finals = [n for n, _ in rig.events if n in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")]
    assert len(finals) == 1, rig.seq()


class FlakyDriver(FakeDriver):
    """Step 1 fails ``fails`` times with EIO, reported through the job's on-error policy."""

    def __init__(self, fails: int) -> None:
        super().__init__(3)
        self.fails = fails

    def run(self, job: Job) -> None:
        job.len = 3 * CHUNK
        for i in range(3):
            while i == 1 and self.fails:
                self.fails -= 1
                if not job.io_error("write", OSError(errno.EIO, "Input/output error")):
                    break  # ignore: the step is skipped
            job.advance(CHUNK, CHUNK)
            job.pause_point()


@pytest.mark.parametrize("policy", ["report", "ignore", "stop", "enospc"])
def test_on_error_policies(policy: str) -> None:
    rig = Rig()
    job = rig.start(FlakyDriver(1), on_error=policy)
    if policy == "stop":
        rig.wait_status("paused")
        with rig.lock:
            assert job.io_status == "failed" and job.user_paused
            job.resume()
    rig.wait_status("null")
    job.join()
    action = {"enospc": "report"}.get(policy, policy)  # enospc stops only on ENOSPC
    assert ("BLOCK_JOB_ERROR", {"device": "j", "operation": "write", "action": action}) in rig.events
    if action == "report":
        assert rig.seq()[-4:] == ["aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
        assert rig.events[-3][1]["error"] == "Input/output error"  # type: ignore[index]
    else:
        assert rig.seq()[-5:] == ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]
        if action == "stop":
            assert rig.seq()[2:5] == ["BLOCK_JOB_ERROR", "paused", "running"]


class FailingDriver(FakeDriver):
    """Every I/O fails (a target that cannot grow): the job never copies a byte, retrying until cancelled."""

    def __init__(self) -> None:
        super().__init__(1)
        self.errors = 0

    def run(self, job: Job) -> None:
        job.len = CHUNK
        while True:
            self.errors += 1
            job.io_error("write", OSError(errno.EFBIG, "File too large"))  # ignore: False, stop: True
            job.pause_point()


@pytest.mark.parametrize("policy", ["ignore", "stop"])
def test_a_job_whose_first_io_fails_can_be_paused(policy: str) -> None:
    """A failed I/O ends a new job's synchronous start like a copy: ``stop`` pauses at the first error (one
    BLOCK_JOB_ERROR, not a stream of them) and a job retrying ignored errors stops where it is paused."""
    rig = Rig()
    drv = FailingDriver()
    job = rig.start(drv, on_error=policy)
    if policy == "stop":
        rig.wait_status("paused")
    else:
        with rig.lock:
            job.pause()
            assert job.status is Status.PAUSED  # at a pause point after the first failed I/O
    with rig.lock:
        errors = drv.errors
    time.sleep(0.05)  # a paused job makes no more I/O (it would fail again)
    with rig.lock:
        assert drv.errors == errors
        assert job.status is Status.PAUSED
        job.cancel(force=True)
    rig.wait_status("null")
    job.join()
    errs = [e for e in rig.seq() if e == "BLOCK_JOB_ERROR"]
    assert errs == ["BLOCK_JOB_ERROR"] * errors and (policy == "ignore" or errors == 1)
    assert rig.seq()[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


def test_writeback_runs_beside_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every WRITEBACK_EVERY copied bytes the job starts writing its target's dirty pages back in a thread
    of its own and copies on (it never waits for the disk mid-copy), one write-back at a time; the job's
    end waits for it with the device lock let go (a command gets the lock meanwhile), so no flush made
    with the lock held has much to write."""
    from types import SimpleNamespace

    from vdkit.block import jobs as jobs_mod

    entered, release, copied = threading.Event(), threading.Event(), threading.Event()
    synced: list[int] = []

    def fake_fdatasync(fd: int) -> None:
        entered.set()
        assert release.wait(30)
        synced.append(fd)

    monkeypatch.setattr(jobs_mod.os, "fdatasync", fake_fdatasync)
    target = SimpleNamespace(driver=SimpleNamespace(file=SimpleNamespace(fd=12345)))

    class Copier(FakeDriver):
        def run(self, job: Job) -> None:
            job.writeback = target  # type: ignore[assignment]
            job.len = 3 * jobs_mod.WRITEBACK_EVERY
            for _ in range(3):
                job.advance(jobs_mod.WRITEBACK_EVERY, jobs_mod.WRITEBACK_EVERY)
                job.pause_point()
            copied.set()

    rig = Rig()
    job = rig.start(Copier(3))
    assert entered.wait(30)
    assert copied.wait(30)  # every step done while the first write-back still runs
    with rig.lock:  # the job waits for the write-back at its end, the lock let go
        assert job.status is Status.RUNNING and job.offset == 3 * jobs_mod.WRITEBACK_EVERY
        release.set()
    rig.wait_status("null")
    job.join()
    assert synced == [12345]  # the steps during the running write-back started no second one


@pytest.mark.parametrize("lock", ["device", "plain"])
def test_command_gets_the_lock_from_a_busy_job(lock: str) -> None:
    """A job copying without a speed limit hands the lock to a command that waits for it (the device lock
    says when one waits; a plain RLock is handed over every YIELD_INTERVAL), and to nobody otherwise."""
    from vdkit.block import jobs as jobs_mod

    stop = threading.Event()
    steps: list[int] = []

    class Busy(FakeDriver):
        def run(self, job: Job) -> None:
            job.len = 1
            while not stop.is_set():
                job.advance(0, 1)
                steps.append(1)
                job.pause_point()

    rig = Rig(None if lock == "device" else threading.RLock())
    job = rig.start(Busy(1))
    handed: list[int] = []
    real = jobs_mod.Job._unlocked

    def counting(self: Job, fn: Any, arg: Any) -> None:
        handed.append(1)
        real(self, fn, arg)

    jobs_mod.Job._unlocked = counting  # type: ignore[method-assign]
    try:
        while len(steps) < 2000:
            time.sleep(0.005)
        idle_handovers = len(handed)
        for _ in range(20):
            with rig.lock:  # a command: waits for the job's next pause point
                assert job.status is Status.RUNNING
        with rig.lock:
            stop.set()
    finally:
        jobs_mod.Job._unlocked = real  # type: ignore[method-assign]
    rig.wait_status("null")
    job.join()
    if lock == "device":
        assert idle_handovers == 0  # nobody waited: the job never let go
    assert handed  # the commands got the lock from the running job
