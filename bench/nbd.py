#!/usr/bin/env python3
"""Benchmark the NBD export: vdkit-daemon against qemu-storage-daemon, with real NBD clients.

Both daemons export their own copy of the same image (512 MiB of random data; ``--quick``: 128 MiB)
over a unix socket, as qcow2 and as raw.  The clients are the tools users run:
* ``nbdcopy EXPORT null:`` — the whole export read (target: ratio >= 0.8);
* ``qemu-img bench`` 64 KiB reads, 16 in flight, twice over the export (target: >= 0.9);
* ``qemu-img bench -w`` 64 KiB writes, 16 in flight (no target; reported).
What each export serves is checked first (``nbdcopy`` into a file, compared with the source).
Every case runs in an idle round and in a round with one core kept busy by another process;
samples alternate between the daemons (``bench/harness.py``); the ratio is qemu-storage-daemon's
median time / vdkit's (above 1: vdkit is faster).  The daemons' CPU time per run (all threads,
from /proc: steadier than wall time on a loaded machine) and peak RSS are printed too.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import tempfile
from pathlib import Path

import harness as h


def start_daemons(d: Path, img: Path, fmt: str) -> tuple[subprocess.Popen[bytes], Path, subprocess.Popen[bytes], Path]:
    """vdkit-daemon and qemu-storage-daemon, each exporting its own copy of ``img`` as ``drive0``."""
    vimg, qimg = d / f"v.{fmt}", d / f"q.{fmt}"
    for copy in (vimg, qimg):
        subprocess.run(["cp", "--sparse=always", str(img), str(copy)], check=True)
    vsock, qsock = d / f"v-{fmt}.sock", d / f"q-{fmt}.sock"
    vproc = subprocess.Popen(
        [*h.vdkit_bin("vdkit-daemon"), "-drive", f"file={vimg},format={fmt},if=none,id=drive0",
         "-nbd", f"unix:{vsock}"], stdin=subprocess.DEVNULL)
    qproc = subprocess.Popen(
        [h.tool("qemu-storage-daemon"),
         "--blockdev", f"driver=file,filename={qimg},node-name=f",
         "--blockdev", f"driver={fmt},file=f,node-name=disk",
         "--nbd-server", f"addr.type=unix,addr.path={qsock}",
         "--export", "type=nbd,id=e,node-name=disk,name=drive0,writable=on"], stdin=subprocess.DEVNULL)
    h.wait_for_socket(vsock, vproc)
    h.wait_for_socket(qsock, qproc)
    return vproc, vsock, qproc, qsock


def uri(sock: Path) -> str:
    return f"nbd+unix:///drive0?socket={sock}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB image instead of 512 MiB")
    ap.add_argument("--formats", default="qcow2,raw", help="exported formats (default qcow2,raw)")
    h.add_common_args(ap, repeat=5)
    a = ap.parse_args()
    print(h.install_note(), flush=True)
    size = (128 if a.quick else 512) << 20
    qi, nbdcopy = h.tool("qemu-img"), h.tool("nbdcopy")
    count = 2 * size // 65536
    with tempfile.TemporaryDirectory(prefix="vdkit-bench-nbd-") as tmp:
        d = Path(tmp)
        src = d / "src.raw"
        rng = random.Random(1)
        with open(src, "wb") as f:
            for _ in range(size >> 24):
                f.write(rng.randbytes(16 << 20))
        for fmt in a.formats.split(","):
            img = d / f"img.{fmt}"
            subprocess.run([qi, "convert", "-f", "raw", "-O", fmt, str(src), str(img)], check=True)
            vproc, vsock, qproc, qsock = start_daemons(d, img, fmt)
            try:
                for name, sock in (("vdkit-daemon", vsock), ("qemu-storage-daemon", qsock)):
                    out = d / "check.raw"
                    subprocess.run([nbdcopy, uri(sock), str(out)], check=True)
                    if not h.same_file(out, src):
                        raise SystemExit(f"{name}'s {fmt} export does not serve the image's bytes")
                    out.unlink()
                print(f"{fmt}: {size >> 20} MiB of random data, exports checked equal to the source", flush=True)
                cases = [
                    ("nbdcopy whole export -> null:", lambda s: [nbdcopy, uri(s), "null:"], size),
                    ("qemu-img bench 64k x16 read", lambda s: [qi, "bench", "-f", "raw", "-c", str(count), "-d", "16",
                                                                "-s", "64k", uri(s)], count * 65536),
                    ("qemu-img bench 64k x16 write", lambda s: [qi, "bench", "-w", "-f", "raw", "-c", str(count // 2),
                                                                 "-d", "16", "-s", "64k", uri(s)], count * 32768),
                ]
                for rnd in h.rounds(a.rounds):
                    for label, cmd, nbytes in cases:
                        q = h.Case("qemu-storage-daemon", cmd(qsock), server_pid=qproc.pid)
                        v = h.Case("vdkit-daemon", cmd(vsock), server_pid=vproc.pid)
                        h.interleave([q, v], a.repeat)
                        print(f"[{rnd}] {fmt:5} " + h.ratio_line(label, q, v, nbytes=nbytes), flush=True)
                    print(f"[{rnd}] {fmt:5} daemon peak RSS: qemu-storage-daemon "
                          f"{h.peak_rss_kib(qproc.pid) / 1024:.0f} MB, vdkit-daemon "
                          f"{h.peak_rss_kib(vproc.pid) / 1024:.0f} MB", flush=True)
            finally:
                h.stop(vproc)
                h.stop(qproc)


if __name__ == "__main__":
    main()
