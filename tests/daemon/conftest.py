"""Machinery for daemon tests: start vdkit-daemon and real QEMU side by side.

``Monitor`` is a small synchronous QMP client over a unix socket (raw bytes,
so tests see exactly what the server sent, key order included).  The
``daemons`` fixture starts processes and kills every one of them afterwards.
Tests that need QEMU fail (not skip) when it is missing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, require_tool

QEMU_BASE = ["-machine", "q35,accel=tcg", "-S", "-display", "none", "-nodefaults"]
_ENV = dict(os.environ, TZ="UTC", PYTHONPATH=str(ROOT))


class Monitor:
    """A QMP connection: send requests, collect events, return raw response lines."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:  # bound but not yet listening
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting_line = self.read_line()

    def read_line(self) -> str:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("monitor closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("ascii")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response_line(self) -> str:
        """The next non-event line (events are stored in ``self.events``)."""
        while True:
            line = self.read_line()
            obj = json.loads(line)
            if "event" in obj:
                self.events.append(obj)
                continue
            return line

    def cmd_line(self, name: str, arguments: dict[str, Any] | None = None, **extra: Any) -> str:
        req: dict[str, Any] = {"execute": name}
        if arguments is not None:
            req["arguments"] = arguments
        req.update(extra)
        self.send_raw(json.dumps(req).encode())
        return self.response_line()

    def cmd(self, name: str, arguments: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        return json.loads(self.cmd_line(name, arguments, **extra))  # type: ignore[no-any-return]

    def negotiate(self) -> Monitor:
        assert self.cmd("qmp_capabilities") == {"return": {}}
        return self

    def hmp(self, line: str) -> str:
        r = self.cmd("human-monitor-command", {"command-line": line})
        assert "return" in r, r
        return r["return"]  # type: ignore[no-any-return]

    def close(self) -> None:
        self.sock.close()


def _wait_for(path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.02)


class Daemons:
    """Starts processes; ``cleanup`` kills every one (the fixture's finalizer)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.monitors: list[Monitor] = []
        self._n = 0

    def _sock(self) -> str:
        self._n += 1
        # short paths: unix socket names are limited to ~107 bytes
        path = os.path.join(self.tmp, f"m{self._n}.sock")
        if len(path) > 100:
            import tempfile

            path = os.path.join(tempfile.mkdtemp(prefix="vdk"), "m.sock")
        return path

    def start(self, cmd: list[str], cwd: Path, *, hmp: bool = False) -> tuple[subprocess.Popen[bytes], str, str | None]:
        qmp_path = self._sock()
        hmp_path = self._sock() if hmp else None
        args = [*cmd, "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if hmp_path:
            args += ["-monitor", f"unix:{hmp_path},server=on,wait=off"]
        proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=_ENV)
        self.procs.append(proc)
        _wait_for(qmp_path, proc)
        if hmp_path:
            _wait_for(hmp_path, proc)
        return proc, qmp_path, hmp_path

    def vdkit(self, drive_args: list[str], cwd: Path, *, hmp: bool = False, paused: bool = True,
              extra: list[str] | None = None) -> tuple[subprocess.Popen[bytes], str, str | None]:
        cmd = [sys.executable, "-m", "vdkit.daemon.main", *(["-S"] if paused else []), *drive_args, *(extra or [])]
        return self.start(cmd, cwd, hmp=hmp)

    def qemu(self, drive_args: list[str], cwd: Path, *, hmp: bool = False) -> tuple[
            subprocess.Popen[bytes], str, str | None]:
        return self.start([require_tool("qemu-system-x86_64"), *QEMU_BASE, *drive_args], cwd, hmp=hmp)

    def monitor(self, path: str) -> Monitor:
        m = Monitor(path)
        self.monitors.append(m)
        return m

    def pair(self, drive_args: list[str], setup: Callable[[Path], None]) -> tuple[Monitor, Monitor]:
        """QEMU and vdkit-daemon on identical images made by ``setup`` in two directories; (qemu, vdkit)."""
        qdir, vdir = self.tmp / "q", self.tmp / "v"
        for d in (qdir, vdir):
            d.mkdir(exist_ok=True)
        # the same qemu-img commands in both directories: a copy would change
        # the files' allocation, and "actual-size" must match
        setup(qdir)
        setup(vdir)
        _, qpath, _ = self.qemu(drive_args, qdir)
        _, vpath, _ = self.vdkit(drive_args, vdir)
        return self.monitor(qpath).negotiate(), self.monitor(vpath).negotiate()

    def cleanup(self) -> None:
        for m in self.monitors:
            m.close()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p.stderr:
                p.stderr.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.cleanup()


_NORMALISE = [
    (re.compile(r'"#block\d+"'), '"#blockN"'),
    (re.compile(r"#block\d+"), "#blockN"),
    (re.compile(r'"qdev": "[^"]*", '), ""),
    (re.compile(r'"date-sec": \d+'), '"date-sec": 0'),
    (re.compile(r'"date-nsec": \d+'), '"date-nsec": 0'),
    (re.compile(r'"vm-clock-sec": \d+'), '"vm-clock-sec": 0'),
    (re.compile(r'"vm-clock-nsec": \d+'), '"vm-clock-nsec": 0'),
    (re.compile(r'"vm-state-size": \d+'), '"vm-state-size": 0'),
    # savevm's automatic names: the two daemons may take them a second apart
    (re.compile(r'"vm-\d{14}"'), '"vm-TIME"'),
]


def normalise(line: str) -> str:
    """Blank out what legitimately differs: auto node names, qdev, snapshot times and VM state sizes."""
    for rx, rep in _NORMALISE:
        line = rx.sub(rep, line)
    return line


_HMP_DATE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d +\d\d:\d\d:\d\d\.\d{3}")
_HMP_VMSIZE = re.compile(r"^(\S+(?: +\S+)?) +(\d+(?:\.\d+)? [KMGT]?i?B)", re.M)  # ID [TAG] VM SIZE


def normalise_hmp(text: str) -> str:
    text = re.sub(r"#block\d+", "#blockN", text)
    text = re.sub(r"Attached to: +\S+", "Attached to: X", text)
    text = _HMP_DATE.sub("DATE CLOCK", text)
    text = re.sub(r"vm-\d{14}", "vm-TIME", text)
    return _HMP_VMSIZE.sub(lambda m: m.group(1) + " SIZE", text)


def same_qmp(q: Monitor, v: Monitor, name: str, args: dict[str, Any] | None = None, *,
             mask: Callable[[str], str] | None = None) -> str:
    """One QMP command sent to QEMU and to vdkit-daemon: the answers must be alike after ``normalise``
    (and ``mask``, for what varies between runs of QEMU itself); QEMU's answer."""
    ql, vl = normalise(q.cmd_line(name, args)), normalise(v.cmd_line(name, args))
    if mask is not None:
        ql, vl = mask(ql), mask(vl)
    assert vl == ql, f"{name} {args}"
    return ql


def same_hmp(q: Monitor, v: Monitor, line: str, *, mask: Callable[[str], str] | None = None) -> str:
    """One HMP command line to both: the answers alike after ``normalise_hmp`` (and ``mask``); QEMU's."""
    qo, vo = normalise_hmp(q.hmp(line)), normalise_hmp(v.hmp(line))
    if mask is not None:
        qo, vo = mask(qo), mask(vo)
    assert vo == qo, line
    return qo


_TIMESTAMP = re.compile(r'"timestamp": \{"seconds": \d+, "microseconds": \d+\}')


def exchange(m: Monitor, data: bytes, *, sep: bytes = b"") -> list[str]:
    """Send ``data``, ``sep`` and a marker request; every line before the marker's answer (times blanked)."""
    m.send_raw(data + sep + b'{"execute":"query-version","id":"marker"}')
    lines = []
    while True:
        line = m.read_line()
        if '"id": "marker"' in line:
            return lines
        lines.append(_TIMESTAMP.sub('"timestamp": T', line))
