#!/usr/bin/env python3
"""Benchmark block jobs: drive-mirror (sync full) of 1 GiB, vdkit-daemon against qemu-system-x86_64.

Both daemons get their own copy of the same qcow2 image (1 GiB virtual, 3/4 of it
allocated: random data, zeros written as data, holes; bench/harness.make_data_raw),
opened as ``-drive file=...,if=none,id=disk0`` (QEMU as
``qemu-system-x86_64 -machine q35,accel=tcg -S -display none -nodefaults``).  One
sample: start the daemon, mirror a small second drive (a warm-up: a fresh vdkit-daemon's first
job imports its modules), then ``drive-mirror`` to a new qcow2 target with ``speed`` 0,
wait for ``BLOCK_JOB_READY``, ``block-job-complete``, wait for
``BLOCK_JOB_COMPLETED``, quit.  The time is the daemon's own clock: from the
job's ``created`` event to its ``BLOCK_JOB_READY`` event (the copy) and to
``BLOCK_JOB_COMPLETED`` (with the pivot), from the events' timestamps, so process
start-up and client latency do not count.  Targets are deleted and ``sync`` runs
before every sample; samples of the two daemons alternate (bench/harness.py).

The targets are checked equal to the source (``qemu-img compare``) before any
figure is printed.  Ratios are QEMU's time / vdkit's (above 1: vdkit faster).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import harness as h

QEMU_ARGS = ["-machine", "q35,accel=tcg", "-S", "-display", "none", "-nodefaults"]
GiB = 1 << 30


class Qmp:
    """A small synchronous QMP client that keeps the events it reads."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(600)
        self.sock.connect(str(path))
        self.buf = b""
        self.events: list[dict[str, object]] = []
        self._line()
        self.cmd("qmp_capabilities")

    def _line(self) -> dict[str, object]:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("daemon closed the monitor")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def cmd(self, name: str, args: dict[str, object] | None = None) -> dict[str, object]:
        req: dict[str, object] = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode())
        while True:
            msg = self._line()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                sys.exit(f"{name}: {msg['error']}")
            return msg

    def wait(self, event: str) -> float:
        """The timestamp (seconds) of the first ``event`` (reading events as they come)."""
        while True:
            for e in self.events:
                if e["event"] == event:
                    ts = e["timestamp"]
                    assert isinstance(ts, dict)
                    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
            msg = self._line()
            if "event" in msg:
                self.events.append(msg)

    def created(self) -> float:
        for e in self.events:
            data = e.get("data")
            if e["event"] == "JOB_STATUS_CHANGE" and isinstance(data, dict) and data.get("status") == "created":
                ts = e["timestamp"]
                assert isinstance(ts, dict)
                return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
        raise AssertionError("no created event")


def mirror_once(cmd: list[str], folder: Path, image: Path, target: Path) -> tuple[h.Sample, h.Sample]:
    """One mirror on a fresh daemon: (copy time to READY, time to COMPLETED), from the job's events."""
    if target.exists():
        target.unlink()
    subprocess.run(["sync"], check=True)
    sock = folder / "qmp.sock"
    if sock.exists():
        sock.unlink()
    proc = subprocess.Popen([*cmd, "-drive", f"file={image},if=none,id=disk0",
                             "-drive", f"file={folder / 'warm.qcow2'},if=none,id=disk1", "-qmp",
                             f"unix:{sock},server=on,wait=off"], cwd=folder, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        h.wait_for_socket(sock, proc)
        q = Qmp(sock)
        # a small mirror first: a fresh daemon's first job pays one-time costs (vdkit's lazy imports)
        # that a daemon serving for days does not
        warm = folder / "warm-dst.qcow2"
        if warm.exists():
            warm.unlink()
        q.cmd("drive-mirror", {"device": "disk1", "target": str(warm), "sync": "full", "job-id": "w"})
        q.wait("BLOCK_JOB_READY")
        q.cmd("block-job-complete", {"device": "w"})
        q.wait("BLOCK_JOB_COMPLETED")
        q.events.clear()
        cpu0 = h.proc_cpu(proc.pid)
        q.cmd("drive-mirror", {"device": "disk0", "target": str(target), "sync": "full", "job-id": "m",
                               "format": "qcow2"})
        ready = q.wait("BLOCK_JOB_READY")
        q.cmd("block-job-complete", {"device": "m"})
        done = q.wait("BLOCK_JOB_COMPLETED")
        created = q.created()
        cpu = h.proc_cpu(proc.pid) - cpu0
        rss = h.peak_rss_kib(proc.pid)
        q.cmd("quit")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            h.stop(proc)
    return h.Sample(ready - created, cpu, rss), h.Sample(done - created, cpu, rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_common_args(ap, repeat=3)
    ap.add_argument("--size", type=int, default=1, help="virtual size in GiB (default 1)")
    args = ap.parse_args()
    print(h.install_note())
    qemu = [h.tool("qemu-system-x86_64"), *QEMU_ARGS]
    vdkit = h.vdkit_bin("vdkit-daemon")
    with tempfile.TemporaryDirectory(prefix="vdkit-bench-jobs-", dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        raw = h.make_data_raw(root / "data.raw", args.size * GiB)
        folders = {"qemu": root / "q", "vdkit": root / "v"}
        for f in folders.values():
            f.mkdir()
            subprocess.run([h.tool("qemu-img"), "convert", "-O", "qcow2", str(raw), str(f / "src.qcow2")], check=True)
            subprocess.run([h.tool("qemu-img"), "create", "-q", "-f", "qcow2", str(f / "warm.qcow2"), "16M"],
                           check=True)
            subprocess.run([h.tool("qemu-io"), "-c", "write -P 0x5a 0 8M", str(f / "warm.qcow2")], check=True,
                           stdout=subprocess.DEVNULL)
        raw.unlink()
        nbytes = args.size * GiB * 3 // 4
        for label in h.rounds(args.rounds):
            # samples are filled in here (each one restarts a daemon), not by Case.sample
            copy = {w: h.Case(w, []) for w in ("qemu", "vdkit")}
            total = {w: h.Case(w, []) for w in ("qemu", "vdkit")}
            for i in range(args.repeat):
                order = ["qemu", "vdkit"] if i % 2 == 0 else ["vdkit", "qemu"]
                for who in order:
                    f = folders[who]
                    a, b = mirror_once(qemu if who == "qemu" else vdkit, f, f / "src.qcow2", f / "dst.qcow2")
                    copy[who].samples.append(a)
                    total[who].samples.append(b)
            for who, f in folders.items():
                r = subprocess.run([h.tool("qemu-img"), "compare", str(f / "src.qcow2"), str(f / "dst.qcow2")],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"{who}: the mirror target differs from the source: {r.stdout}{r.stderr}")
            print(f"[{label}]")
            print(h.ratio_line(f"mirror full {args.size} GiB to ready", copy["qemu"], copy["vdkit"], nbytes=nbytes))
            print(h.ratio_line(f"mirror full {args.size} GiB completed", total["qemu"], total["vdkit"],
                               nbytes=nbytes))


if __name__ == "__main__":
    main()
