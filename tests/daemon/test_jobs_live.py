"""Block jobs while the daemon keeps serving: an NBD writer during stream and commit, and SIGKILL mid-job.

The jobs run with ``speed: 1``, so each one moves one step per drain: an empty ``transaction`` (which
drains, as in QEMU) steps it forward deterministically, with batches of ``qemu-io`` writes over the
daemon's NBD export in between (each batch flushed).  A content model (the chain's initial data plus
every acknowledged write) is checked byte for byte: over NBD after the job, and from the files after
``quit`` (``qemu-img convert`` of the active chain).  The crash tests kill the daemon with SIGKILL after
a random number of steps; then ``qemu-img check`` must find no corruption in any file and the chain
opened from the active image must read the model (acknowledged, flushed writes) exactly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.daemon.conftest import Daemons, Monitor
from tests.daemon.test_jobs_diff import setup_chain
from tests.helpers.qmp_script import status_is, wait_event
from tests.nbd.conftest import short_sock

MiB = 1 << 20
SIZE = 4 * MiB


def initial_model() -> bytearray:
    """The guest view of :func:`setup_chain`'s chain."""
    m = bytearray(SIZE)
    m[0:MiB] = b"\x11" * MiB
    m[0:65536] = b"\x22" * 65536
    m[MiB:2 * MiB] = b"\x22" * MiB
    m[2 * MiB:3 * MiB] = b"\x33" * MiB
    return m


class Rig:
    def __init__(self, daemons: Daemons, d: Path) -> None:
        self.d = d
        setup_chain(d)
        self.sock = short_sock("nbd.sock")
        self.proc, qmp, _ = daemons.vdkit(["-drive", f"file={d}/top.qcow2,if=none,id=disk0"], d,
                                          extra=["-nbd", f"unix:{self.sock}"])
        self.qmp: Monitor = daemons.monitor(qmp).negotiate()
        self.seen = [0]
        self.model = initial_model()
        self.rng = random.Random(0)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk0?socket={self.sock}"

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.qmp.cmd(name, args)

    def wait(self, job: str, status: str) -> None:
        wait_event(self.qmp, self.seen, status_is(job, status))

    def has_status(self, job: str, status: str) -> bool:
        return any(status_is(job, status)(e) for e in self.qmp.events)

    def writes(self, n: int) -> None:
        """``n`` random writes (data or zeros) over NBD in one qemu-io run, then a flush; into the model."""
        cmds = []
        for _ in range(n):
            length = self.rng.choice([512, 4096, 65536, 70000, 300000])
            offset = self.rng.randrange(0, SIZE - length) & ~511
            length = (length + 511) & ~511
            if self.rng.random() < 0.2:
                cmds += ["-c", f"write -z {offset} {length}"]
                self.model[offset:offset + length] = bytes(length)
            else:
                byte = self.rng.randrange(1, 256)
                cmds += ["-c", f"write -P {byte} {offset} {length}"]
                self.model[offset:offset + length] = bytes([byte]) * length
        r = subprocess.run([require_tool("qemu-io"), "-f", "raw", *cmds, "-c", "flush", self.uri],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0 and "error" not in r.stdout.lower(), (r.stdout, r.stderr)

    def step(self) -> None:
        """One drain: a speed-1 job moves one step."""
        assert self.cmd("transaction", {"actions": []}) == {"return": {}}

    def read_all(self, source: str, fmt: str) -> bytes:
        out = self.d / "read.raw"
        r = subprocess.run([require_tool("qemu-img"), "convert", "-U", "-f", fmt, "-O", "raw", source, str(out)],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        data = out.read_bytes()
        out.unlink()
        return data

    def check_files(self) -> None:
        for name in ("top.qcow2", "mid.qcow2", "base.qcow2"):
            r = subprocess.run([require_tool("qemu-img"), "check", "--output=json", name], cwd=self.d,
                               capture_output=True, text=True, check=False)
            assert r.returncode in (0, 3), (name, r.stdout, r.stderr)  # 3: leaked clusters only
            report = json.loads(r.stdout)
            assert not report.get("corruptions") and not report.get("check-errors"), (name, report)


JOBS = {
    "stream": ("block-stream", {"device": "disk0", "job-id": "j", "speed": 1}),
    "stream-base": ("block-stream", {"device": "disk0", "job-id": "j", "speed": 1, "base": "base.qcow2"}),
    "commit": ("block-commit", {"device": "disk0", "job-id": "j", "speed": 1, "top": "mid.qcow2"}),
    "active-commit": ("block-commit", {"device": "disk0", "job-id": "j", "speed": 1}),
}


@pytest.mark.parametrize("kind", list(JOBS))
def test_nbd_writer_during_job(daemons: Daemons, tmp_path: Path, kind: str) -> None:
    rig = Rig(daemons, tmp_path)
    name, args = JOBS[kind]
    assert rig.cmd(name, args) == {"return": {}}
    for _ in range(40):
        if rig.has_status("j", "ready") or rig.has_status("j", "null"):
            break
        rig.writes(6)
        rig.step()
    if kind == "active-commit":
        rig.wait("j", "ready")
        rig.writes(6)  # written while ready: the pivot must carry them
        assert rig.cmd("block-job-complete", {"device": "j"}) == {"return": {}}
    rig.wait("j", "null")
    rig.writes(4)  # and after the job, on the new chain
    assert rig.read_all(rig.uri, "raw") == rig.model
    assert rig.cmd("quit") == {"return": {}}
    rig.proc.wait(timeout=60)
    rig.check_files()
    active = "base.qcow2" if kind == "active-commit" else "top.qcow2"
    assert rig.read_all(str(tmp_path / active), "qcow2") == rig.model


@pytest.mark.parametrize("kind,seed", [("stream", 1), ("commit", 2), ("active-commit", 3), ("stream-base", 4)])
def test_sigkill_mid_job(daemons: Daemons, tmp_path: Path, kind: str, seed: int) -> None:
    rig = Rig(daemons, tmp_path)
    rng = random.Random(seed)
    rig.rng = random.Random(seed + 100)
    name, args = JOBS[kind]
    assert rig.cmd(name, args) == {"return": {}}
    for _ in range(rng.randrange(0, 8)):
        rig.writes(3)
        rig.step()
    if kind == "active-commit" and rng.random() < 0.5 and rig.has_status("j", "ready"):
        rig.qmp.send_raw(json.dumps({"execute": "block-job-complete", "arguments": {"device": "j"}}).encode())
    os.kill(rig.proc.pid, signal.SIGKILL)
    rig.proc.wait(timeout=30)
    rig.check_files()
    # the chain from the active image reads every acknowledged write: old chain or new, never a mix
    top = rig.read_all(str(tmp_path / "top.qcow2"), "qcow2")
    assert top == rig.model
    if kind == "active-commit" and rig.has_status("j", "concluded"):
        assert rig.read_all(str(tmp_path / "base.qcow2"), "qcow2") == rig.model


@pytest.mark.parametrize("how", ["SIGTERM", "quit"])
def test_shutdown_cancels_jobs_cleanly(daemons: Daemons, tmp_path: Path, how: str) -> None:
    """quit/SIGTERM while a stream and a ready active commit... run: jobs cancelled, files clean, data kept."""
    rig = Rig(daemons, tmp_path)
    name, args = JOBS["stream" if how == "quit" else "active-commit"]
    assert rig.cmd(name, args) == {"return": {}}
    rig.writes(4)
    rig.step()
    rig.writes(4)
    if how == "quit":
        assert rig.cmd("quit") == {"return": {}}
    else:
        os.kill(rig.proc.pid, signal.SIGTERM)
    assert rig.proc.wait(timeout=60) == 0
    for name in ("top.qcow2", "mid.qcow2", "base.qcow2"):
        r = subprocess.run([require_tool("qemu-img"), "check", name], cwd=tmp_path, capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, (name, r.stdout)  # a clean close: not even leaks
    assert rig.read_all(str(tmp_path / "top.qcow2"), "qcow2") == rig.model
