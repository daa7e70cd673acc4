#!/usr/bin/env python3
"""Benchmark the NBD export: vdkit-daemon against qemu-storage-daemon, same image, same client.

Both daemons export a copy of the same fully allocated qcow2 image (default
64 MiB) over a unix socket; one Python NBD client (structured replies,
``--depth`` requests in flight) runs sequential and random reads and writes of
4 KiB and 1 MiB against each.  Read data is checked against the image content
before timings are trusted.  Printed per case: MiB/s of both and the ratio
vdkit / QEMU (target: at least 0.5).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.nbd.client import NbdClient  # noqa: E402
from vdkit.nbd import wire as w  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"{name} is required (make system-deps)")
    return path


def wait_for(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"daemon did not start: {proc.args}")
        time.sleep(0.02)


def offsets(kind: str, size: int, block: int, count: int, seed: int) -> Iterator[int]:
    rnd = random.Random(seed)
    for i in range(count):
        yield (i * block) % size if kind == "seq" else rnd.randrange(size // block) * block


def run_case(c: NbdClient, op: str, kind: str, block: int, count: int, depth: int,
             size: int, content: bytes | None) -> float:
    """Seconds for ``count`` requests with ``depth`` in flight; reads verified against ``content``."""
    payload = bytes([0x5A]) * block
    inflight: dict[int, int] = {}
    t0 = time.perf_counter()
    for off in offsets(kind, size, block, count, seed=block):
        while len(inflight) >= depth:
            h, r = c.receive()
            assert r.error == 0, r
            o = inflight.pop(h)
            if content is not None and op == "read":
                assert r.data == content[o:o + block]
        if op == "read":
            inflight[c.send(w.CMD_READ, off, block)] = off
        else:
            inflight[c.send(w.CMD_WRITE, off, block, payload)] = off
    while inflight:
        h, r = c.receive()
        assert r.error == 0, r
        o = inflight.pop(h)
        if content is not None and op == "read":
            assert r.data == content[o:o + block]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--ops-4k", type=int, default=4096)
    ap.add_argument("--ops-1m", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    size = args.size_mib << 20
    tmp = Path(tempfile.mkdtemp(prefix="vdnbdbench"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        content = random.Random(1).randbytes(size)
        (tmp / "src.raw").write_bytes(content)
        for name in ("v.qcow2", "q.qcow2"):
            subprocess.run([tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(tmp / "src.raw"),
                            str(tmp / name)], check=True)
        vsock, qsock = tmp / "v.sock", tmp / "q.sock"
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "vdkit.daemon.main", "-drive", f"file={tmp / 'v.qcow2'},if=none,id=drive0",
             "-nbd", f"unix:{vsock}"], env=ENV, stdin=subprocess.DEVNULL))
        procs.append(subprocess.Popen(
            [tool("qemu-storage-daemon"),
             "--blockdev", f"driver=file,filename={tmp / 'q.qcow2'},node-name=f",
             "--blockdev", "driver=qcow2,file=f,node-name=disk",
             "--nbd-server", f"addr.type=unix,addr.path={qsock}",
             "--export", "type=nbd,id=e,node-name=disk,name=drive0,writable=on"], stdin=subprocess.DEVNULL))
        wait_for(vsock, procs[0])
        wait_for(qsock, procs[1])
        for sock in (vsock, qsock):  # warm-up, and a full check of what both export
            c = NbdClient(str(sock), "drive0")
            run_case(c, "read", "seq", 1 << 20, size >> 20, args.depth, size, content)
            c.close()
        print(f"image {args.size_mib} MiB qcow2, depth {args.depth}, best of {args.repeat}")
        print(f"{'case':<18}{'vdkit MiB/s':>12}{'qemu MiB/s':>12}{'ratio':>8}")
        ratios = []
        for op in ("read", "write"):
            for kind in ("seq", "rand"):
                for block, count in ((4096, args.ops_4k), (1 << 20, args.ops_1m)):
                    rates = [0.0, 0.0]
                    for _ in range(args.repeat):  # interleaved, best of N: the machine is shared
                        for i, sock in enumerate((vsock, qsock)):
                            c = NbdClient(str(sock), "drive0")
                            secs = run_case(c, op, kind, block, count, args.depth, size,
                                            content if op == "read" else None)
                            c.close()
                            rates[i] = max(rates[i], block * count / secs / (1 << 20))
                    ratio = rates[0] / rates[1]
                    ratios.append(ratio)
                    label = f"{op} {kind} {'4K' if block == 4096 else '1M'}"
                    print(f"{label:<18}{rates[0]:>12.1f}{rates[1]:>12.1f}{ratio:>8.2f}")
        print(f"lowest ratio {min(ratios):.2f} (target >= 0.5)")
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
