#!/usr/bin/env python3
"""Benchmark the data path: vdkit-img against qemu-img, in the same run, as ratios.

Cases
* ``convert`` qcow2 → raw and raw → qcow2 of an image holding data (default
  64 MiB with a mix of data, zeros and holes; ``--full``: 2 GiB);
* ``map --output=json`` of a 1 TiB qcow2 image with 100k allocated clusters
  scattered over the whole disk (one per ~11 MB, so about 2000 L2 tables).
Outputs are checked for equality (``cmp`` of the converted files, identical
map text) before timings are trusted.  A ratio is qemu-img time / vdkit time:
above 1 means vdkit is faster.  The NBD part of issue 5 comes later.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VDKIT = [sys.executable, "-m", "vdkit.cli.main"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        sys.exit("qemu-img is required (make system-deps)")
    return path


def timed(cmd: list[str], repeat: int, cwd: Path) -> float:
    """Median wall time of a whole process (median resists a shared machine's noise)."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def make_data_image(d: Path, size: int) -> Path:
    """A raw file with 1/2 random data, 1/4 zeros written as data and 1/4 holes, in 1 MiB stripes."""
    raw = d / "data.raw"
    rnd = random.Random(5)
    mib = 1 << 20
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in range(size // mib):
            kind = i % 4
            if kind in (0, 2):
                f.seek(i * mib)
                f.write(rnd.randbytes(mib))
            elif kind == 1:
                f.seek(i * mib)
                f.write(bytes(mib))
    subprocess.run([qemu_img(), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(d / "data.qcow2")], check=True)
    return d / "data.qcow2"


def make_sparse_tib(d: Path, clusters: int) -> Path:
    """1 TiB qcow2 with ``clusters`` allocated 64 KiB clusters (via a sparse raw file and qemu-img)."""
    raw = d / "tib.raw"
    size = 1 << 40
    stride = size // clusters // 65536 * 65536
    with open(raw, "wb") as f:
        f.truncate(size)
        for i in range(clusters):
            f.seek(i * stride)
            f.write(b"\x01" * 4096)
    subprocess.run([qemu_img(), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(d / "tib.qcow2")], check=True)
    raw.unlink()
    return d / "tib.qcow2"


def bench_convert(d: Path, src: Path, repeat: int) -> None:
    qi = qemu_img()
    cases = [
        ("qcow2 -> raw", ["convert", "-O", "raw", src.name], "out.raw"),
        ("raw -> qcow2", ["convert", "-f", "raw", "-O", "qcow2", "data.raw"], "out.qcow2"),
    ]
    for label, args, out in cases:
        q = timed([qi, *args, "q-" + out], repeat, d)
        v = timed([*VDKIT, *args, "v-" + out], repeat, d)
        same = (d / ("q-" + out)).read_bytes() == (d / ("v-" + out)).read_bytes()
        size_mib = src.stat().st_size / (1 << 20)
        print(f"convert {label:14} qemu-img {q:7.3f}s  vdkit {v:7.3f}s  ratio {q / v:5.2f}  "
              f"identical output: {same}  (source file {size_mib:.0f} MiB)")


def bench_map(d: Path, img: Path, repeat: int) -> None:
    qi = qemu_img()
    args = ["map", "--output=json", img.name]
    q_out = subprocess.run([qi, *args], cwd=d, capture_output=True, check=True).stdout
    v_out = subprocess.run([*VDKIT, *args], cwd=d, capture_output=True, check=True, env=ENV).stdout
    q = timed([qi, *args], repeat, d)
    v = timed([*VDKIT, *args], repeat, d)
    print(f"map 1 TiB, {q_out.count(b'{') // 2} data entries  qemu-img {q:7.3f}s  vdkit {v:7.3f}s  "
          f"ratio {q / v:5.2f}  identical output: {q_out == v_out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="2 GiB convert image (default 64 MiB)")
    ap.add_argument("--clusters", type=int, default=100_000, help="allocated clusters in the 1 TiB map image")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vdkit-bench-io-") as tmp:
        d = Path(tmp)
        src = make_data_image(d, (2 << 30) if a.full else (64 << 20))
        bench_convert(d, src, a.repeat)
        bench_map(d, make_sparse_tib(d, a.clusters), a.repeat)


if __name__ == "__main__":
    main()
