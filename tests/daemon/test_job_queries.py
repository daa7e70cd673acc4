"""Queries while a block job moves data: they read beside the job's I/O, never inside a half-done step.

A job holds the device lock for its whole step; its data reads and writes are *I/O phases*
(``DeviceLock.io_begin``/``io_end``, entered through ``Job.io``) during which a pure query
(``DeviceLock.acquire_query``: ``query-block`` and the other ``PURE_COMMANDS`` of the runtime) reads
without the lock while every other command and NBD request still waits.  Checked here:

* the lock's protocol on its own (threads and events, no timing): a reader gets in during an I/O
  phase and not outside one, the job leaves its phase only once the readers are done, a waiting
  reader takes whichever comes first (a hand-over at a pause point or the next I/O phase);
* end to end: a mirror whose source is an nbdkit export stopped by its ``pause`` filter holds its
  step (a read that does not return); ``query-block`` answers meanwhile, showing the job's dirty
  bitmap, while ``query-block-jobs`` on a second connection waits for the step; after the export
  resumes, the mirror completes and the target equals the source (``qemu-img compare``).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require_tool
from tests.daemon.conftest import Daemons
from tests.nbd.conftest import short_sock
from vdkit.block import io as bio
from vdkit.block.jobs import DeviceLock
from vdkit.daemon.main import build_registry, parse_drive
from vdkit.devices.registry import DeviceRegistry
from vdkit.info.render_json import dumps_compact, to_qobject
from vdkit.monitor import block_cmds
from vdkit.monitor.commands import CommandContext

MiB = 1 << 20


# -- the lock's protocol ----------------------------------------------------------------------------

def _in_thread(fn: object) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)  # type: ignore[operator]
    t.start()
    return t, out


def test_reader_gets_in_only_during_an_io_phase() -> None:
    lock = DeviceLock()
    lock.acquire()  # the job's hold
    try:
        t, out = _in_thread(lambda: lock.acquire_query(blocking=False))
        t.join()
        assert out == [0]  # held, no I/O phase: a query would have to wait
        lock.io_begin()
        t, out = _in_thread(lambda: lock.acquire_query(blocking=False))
        t.join()
        assert out == [DeviceLock.SHARED]
        # a command still cannot take the lock during the phase
        t, got = _in_thread(lambda: lock.acquire(blocking=False))
        t.join()
        assert got == [False]
        # the job cannot leave its phase while the reader reads
        left = threading.Event()

        def end() -> None:
            lock.io_end()
            left.set()

        ender = threading.Thread(target=end, daemon=True)
        ender.start()
        assert not left.wait(0.2)  # (time for a broken io_end to return early; a correct one never does)
        lock.end_query(DeviceLock.SHARED)
        assert left.wait(30)
        ender.join()
        t, out = _in_thread(lambda: lock.acquire_query(blocking=False))
        t.join()
        assert out == [0]  # the phase is over
    finally:
        lock.release()
    assert lock.acquire_query(blocking=False) == DeviceLock.LOCKED
    lock.end_query(DeviceLock.LOCKED)
    assert lock.acquire(blocking=False)  # released again
    lock.release()


def test_waiting_reader_takes_the_next_io_phase() -> None:
    lock = DeviceLock()
    lock.acquire()
    try:
        t, out = _in_thread(lambda: lock.acquire_query())
        while not lock.waiting:  # the query counts as a waiter (a job would hand over at its pause point)
            time.sleep(0.001)
        lock.io_begin()
        t.join(30)
        assert out == [DeviceLock.SHARED]
        assert not lock.waiting
        lock.end_query(DeviceLock.SHARED)
        lock.io_end()
    finally:
        lock.release()


def test_waiting_reader_takes_a_hand_over() -> None:
    lock = DeviceLock()
    lock.acquire()

    def query() -> int:
        how = lock.acquire_query()
        lock.end_query(how)
        return how

    t, out = _in_thread(query)
    while not lock.waiting:
        time.sleep(0.001)
    # what a job's pause point does when someone waits: let go, give the waiter the lock, take it back
    lock.expect_hand_over()
    lock.release()
    lock.hand_over(30)
    t.join(30)
    assert out == [DeviceLock.LOCKED]
    assert lock.acquire(blocking=False)
    lock.release()


# -- end to end ---------------------------------------------------------------------------------------

class PausedSource:
    """nbdkit serving ``src.raw`` through its ``pause`` filter; :meth:`pause` returns once it holds requests."""

    def __init__(self, d: Path) -> None:
        self.image = d / "src.raw"
        with open(self.image, "wb") as f:
            for i in range(8):
                f.write(bytes([0x40 + i]) * MiB)
        self.sock = short_sock("src.sock")
        self.ctl = short_sock("pause.ctl")
        self.proc = subprocess.Popen([require_tool("nbdkit"), "-f", "-U", self.sock, "--filter=pause", "file",
                                      str(self.image), f"pause-control={self.ctl}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.sock) and os.path.exists(self.ctl)):
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)

    def _control(self, c: bytes) -> None:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(self.ctl)
            s.sendall(c)
            assert s.recv(1) == c.upper()

    def pause(self) -> None:
        self._control(b"p")

    def resume(self) -> None:
        self._control(b"r")

    def stop(self) -> None:
        self.proc.kill()  # (a paused nbdkit waits for its held requests on SIGTERM)
        self.proc.wait(10)
        if self.proc.stderr:
            self.proc.stderr.close()


def test_query_block_answers_while_a_job_step_waits_for_its_source(daemons: Daemons, tmp_path: Path) -> None:
    src = PausedSource(tmp_path)
    try:
        proc, qmp, _ = daemons.vdkit(["-drive", f"file=nbd+unix:///?socket={src.sock},format=raw,if=none,id=disk0"],
                                     tmp_path)
        q = daemons.monitor(qmp).negotiate()
        other = daemons.monitor(qmp).negotiate()
        dst = tmp_path / "dst.qcow2"
        # speed 1: one step, then the job sleeps at its pause point (the source is read from the start)
        r = q.cmd("drive-mirror", {"device": "disk0", "job-id": "j", "target": str(dst), "format": "qcow2",
                                   "sync": "full", "speed": 1})
        assert r == {"return": {}}, r
        first = q.cmd("query-block-jobs")["return"]  # (the job's first step is done: QEMU's synchronous start)
        assert first[0]["offset"] > 0, first
        src.pause()
        # the job wakes and takes its next step: its source read now waits for the paused export
        assert q.cmd("block-job-set-speed", {"device": "j", "speed": 0}) == {"return": {}}
        # a command waits for the step (it needs the job at a pause point) ...
        other.send_raw(b'{"execute": "query-block-jobs"}')
        # ... a query does not: it reads beside the job's I/O (the monitor's socket timeout fails a hang)
        for _ in range(3):  # (the later ones surely meet the job inside its read)
            info = q.cmd("query-block")["return"]
        assert info[0]["device"] == "disk0"
        dirty = info[0]["inserted"]["dirty-bitmaps"]
        assert len(dirty) == 1 and "name" not in dirty[0] and dirty[0]["count"] > 0, dirty  # the job's, mid-copy
        assert q.cmd("query-named-block-nodes")["return"]
        src.resume()
        jobs = other.response_line()
        assert '"device": "j"' in jobs, jobs
        deadline = time.monotonic() + 60
        while not any(e["event"] == "BLOCK_JOB_READY" for e in q.events):
            assert time.monotonic() < deadline, q.events
            q.cmd("query-status")
            time.sleep(0.02)
        assert q.cmd("block-job-complete", {"device": "j"}) == {"return": {}}
        while not any(e["event"] == "BLOCK_JOB_COMPLETED" for e in q.events):
            assert time.monotonic() < deadline, q.events
            q.cmd("query-status")
            time.sleep(0.02)
        done = next(e for e in q.events if e["event"] == "BLOCK_JOB_COMPLETED")
        assert "error" not in done["data"], done
        assert q.cmd("quit") == {"return": {}}
        proc.wait(30)  # (its image locks go with the process)
        r2 = subprocess.run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(src.image),
                             str(dst)], capture_output=True, text=True, check=False)
        assert r2.returncode == 0, r2.stdout + r2.stderr
    finally:
        src.stop()


# -- query-block's cached entries ---------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["write", "zero", "bitmap", "clear", "command"]),
                              st.integers(0, 63), st.integers(1, 16)), min_size=1, max_size=12),
       lazy=st.booleans())
def test_cached_query_block_is_a_fresh_rendering(tmp_path_factory: pytest.TempPathFactory, ops: list[
        tuple[str, int, int]], lazy: bool) -> None:
    """After every change a guest or a job makes without a command (data writes: actual sizes, bitmap
    counts, a lazy-refcounts image's dirty flag) and after commands, ``query-block``'s cached text is
    byte for byte the rendering of a fresh model (:func:`block_cmds.query_block`)."""
    d = tmp_path_factory.mktemp("qb")
    img = require_tool("qemu-img")
    subprocess.run([img, "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "4M"], check=True)
    subprocess.run([img, "create", "-q", "-f", "qcow2", "-o", f"lazy_refcounts={'on' if lazy else 'off'}",
                    "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2")], check=True)
    machine = DeviceRegistry()
    try:
        drive = machine.add_drive(parse_drive(f"file={d}/top.qcow2,if=none,id=disk0"))
        reg = build_registry()
        ctx = CommandContext(machine, None, registry=reg)
        n = 0
        for op, at, length in ops:
            assert drive.medium is not None
            node, off, size = drive.medium.node, at * 65536, length * 4096
            if op == "write":
                bio.write(node, off, bytes([at + 1]) * size)
            elif op == "zero":
                bio.write_zeroes(node, off, size)
            elif op in ("bitmap", "clear", "command"):
                if op == "bitmap":
                    n += 1
                    reg.dispatch(ctx, "block-dirty-bitmap-add", {"node": "disk0", "name": f"b{n}"}, oob=False,
                                 negotiated=True)
                elif op == "clear" and n:
                    reg.dispatch(ctx, "block-dirty-bitmap-clear", {"node": "disk0", "name": f"b{n}"}, oob=False,
                                 negotiated=True)
                machine.generation += 1  # (what the runtime does after every command)
            cached = block_cmds.query_block_json(ctx, {})
            fresh = "[" + ", ".join(dumps_compact(to_qobject(b)) for b in block_cmds.query_block(ctx, {})) + "]"
            assert str(cached) == fresh, (op, at, length)
    finally:
        machine.close_all()
