#!/usr/bin/env python3
"""Benchmark the monitor: ``query-block`` against real QEMU, same client, same run.

Two configurations: 1 drive and 16 drives (each qcow2 with internal
snapshots; every other drive on a 2-deep backing chain).  QEMU is
``qemu-system-x86_64 -machine q35,accel=tcg -S -display none -nodefaults``
with the same ``-drive ...,if=none`` options on identical images (made by the
same qemu-img commands in separate directories, since both hold image locks).

For each server it measures, with one synchronous socket client:

* round-trip latency of ``query-block`` (median and p95 over N requests,
  one request in flight);
* throughput: queries/second with a window of 16 pipelined requests.

vdkit renders each drive's ``query-block`` entry (and each node's
``query-named-block-nodes`` entry) once and reuses the text until a command
may have changed state or a file of the chain changed, so repeated polls are
cheap; a query that finds no command running is answered on the event loop
without a worker-thread hand-off.

Ratios printed are QEMU time / vdkit time for latency and vdkit rate /
QEMU rate for throughput, so above 1 means vdkit is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QEMU_ARGS = ["-machine", "q35,accel=tcg", "-S", "-display", "none", "-nodefaults"]


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = b""
        self.line()
        self.request(b'{"execute":"qmp_capabilities"}')

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError
            self.buf += data
        out, self.buf = self.buf.split(b"\r\n", 1)
        return out

    def request(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        return self.line()

    def close(self) -> None:
        self.sock.close()


QUERY = b'{"execute":"query-block"}'
NODES = b'{"execute":"query-named-block-nodes"}'


def latency(c: Client, n: int, query: bytes = QUERY) -> tuple[float, float]:
    c.request(query)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.request(query)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95) - 1]


def throughput(c: Client, n: int, window: int = 16) -> float:
    t0 = time.perf_counter()
    sent = received = 0
    while received < n:
        while sent < n and sent - received < window:
            c.sock.sendall(QUERY)
            sent += 1
        c.line()
        received += 1
    return n / (time.perf_counter() - t0)


def make_images(d: Path, ndrives: int, nsnap: int) -> list[str]:
    qi = shutil.which("qemu-img")
    assert qi is not None
    args: list[str] = []

    def run(*a: str) -> None:
        subprocess.run([qi, *a], check=True, stdout=subprocess.DEVNULL, cwd=d)

    for i in range(ndrives):
        name = f"disk{i}.qcow2"
        if i % 2:
            run("create", "-q", "-f", "qcow2", f"base{i}.qcow2", "64M")
            run("snapshot", "-c", "base-snap", f"base{i}.qcow2")
            run("create", "-q", "-f", "qcow2", "-b", f"base{i}.qcow2", "-F", "qcow2", f"mid{i}.qcow2")
            run("create", "-q", "-f", "qcow2", "-b", f"mid{i}.qcow2", "-F", "qcow2", name)
        else:
            run("create", "-q", "-f", "qcow2", name, "64M")
        for s in range(nsnap):
            run("snapshot", "-c", f"snap{s}", name)
        args += ["-drive", f"file={name},if=none,id=drive{i}"]
    return args


def start(cmd: list[str], cwd: Path, sock: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*cmd, "-qmp", f"unix:{sock},server=on,wait=off"], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def bench_config(tmp: Path, ndrives: int, nsnap: int, n: int) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        sys.exit("qemu-system-x86_64 is required")
    results: dict[str, tuple[float, float, float, float]] = {}
    for who in ("qemu", "vdkit"):
        d = tmp / f"{who}-{ndrives}"
        d.mkdir()
        drive_args = make_images(d, ndrives, nsnap)
        sock = str(d / "qmp.sock")
        cmd = ([qemu, *QEMU_ARGS] if who == "qemu" else [sys.executable, "-m", "vdkit.daemon.main", "-S"])
        proc = start([*cmd, *drive_args], d, sock)
        try:
            c = Client(sock)
            answer = json.loads(c.request(QUERY))
            assert len(answer["return"]) == ndrives, answer
            med, p95 = latency(c, n)
            rate = throughput(c, n)
            nodes_med, _ = latency(c, max(20, n // 5), NODES)
            c.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        results[who] = (med, p95, rate, nodes_med)
        print(f"  {who:6s} {ndrives:2d} drive(s): latency median {med * 1e3:8.3f} ms  p95 {p95 * 1e3:8.3f} ms  "
              f"throughput {rate:9.1f} q/s   query-named-block-nodes median {nodes_med * 1e3:8.3f} ms")
    q, v = results["qemu"], results["vdkit"]
    print(f"  ratio  {ndrives:2d} drive(s): latency qemu/vdkit {q[0] / v[0]:.2f}x (p95 {q[1] / v[1]:.2f}x), "
          f"throughput vdkit/qemu {v[2] / q[2]:.2f}x, query-named-block-nodes qemu/vdkit {q[3] / v[3]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=300, help="requests per measurement")
    ap.add_argument("--snapshots", type=int, default=3, help="internal snapshots per drive")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vdkit-bench-monitor-") as tmp:
        print(f"query-block, {args.n} requests per measurement, {args.snapshots} snapshots per drive")
        for ndrives in (1, 16):
            bench_config(Path(tmp), ndrives, args.snapshots, args.n)


if __name__ == "__main__":
    main()
