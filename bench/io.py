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

Timing is fair to both tools on a shared machine: samples alternate between
qemu-img and vdkit (the order flips every round), the previous output is
deleted and ``sync`` runs before every sample, so neither tool pays for the
other's dirty page-cache writeback; medians are reported, with the spread.
"""

from __future__ import annotations

import argparse
import compileall
import os
import random
import resource
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


def _sample(cmd: list[str], cwd: Path, out: Path | None) -> float:
    """Wall time of one whole process, started with its output gone and no dirty pages pending."""
    if out is not None:
        out.unlink(missing_ok=True)
    os.sync()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[id(cmd)] = CPU.get(id(cmd), []) + [r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime]
    return wall


CPU: dict[int, list[float]] = {}  # CPU seconds (user + system) of each sample, by command


def timed_pair(q_cmd: list[str], v_cmd: list[str], repeat: int, cwd: Path,
               q_out: Path | None = None, v_out: Path | None = None) -> tuple[list[float], list[float]]:
    """Interleaved samples of both commands (qemu-img first in even rounds, vdkit first in odd ones)."""
    qs: list[float] = []
    vs: list[float] = []
    CPU.pop(id(q_cmd), None)
    CPU.pop(id(v_cmd), None)
    for i in range(repeat):
        if i % 2 == 0:
            qs.append(_sample(q_cmd, cwd, q_out))
            vs.append(_sample(v_cmd, cwd, v_out))
        else:
            vs.append(_sample(v_cmd, cwd, v_out))
            qs.append(_sample(q_cmd, cwd, q_out))
    return qs, vs


def _report(label: str, qs: list[float], vs: list[float], q_cpu: list[float], v_cpu: list[float]) -> str:
    q, v = statistics.median(qs), statistics.median(vs)
    ratios = sorted(a / b for a, b in zip(qs, vs, strict=True))
    return (f"{label} qemu-img {q:7.3f}s  vdkit {v:7.3f}s  ratio {q / v:5.2f}  "
            f"(per-round ratios {ratios[0]:.2f}..{ratios[-1]:.2f}, n={len(qs)}; CPU s qemu-img "
            f"{statistics.median(q_cpu):.3f} vdkit {statistics.median(v_cpu):.3f})")


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


def bench_convert(d: Path, src: Path, repeat: int, only: str | None = None) -> None:
    qi = qemu_img()
    cases = [
        ("qcow2 -> raw", ["convert", "-O", "raw", src.name], "out.raw"),
        ("raw -> qcow2", ["convert", "-f", "raw", "-O", "qcow2", "data.raw"], "out.qcow2"),
    ]
    for label, args, out in cases:
        if only and only not in label:
            continue
        q_out, v_out = d / ("q-" + out), d / ("v-" + out)
        q_cmd, v_cmd = [qi, *args, q_out.name], [*VDKIT, *args, v_out.name]
        qs, vs = timed_pair(q_cmd, v_cmd, repeat, d, q_out, v_out)
        same = _same_file(q_out, v_out)
        size_mib = src.stat().st_size / (1 << 20)
        print(_report(f"convert {label:14}", qs, vs, CPU[id(q_cmd)], CPU[id(v_cmd)]) +
              f"  identical output: {same}  (source file {size_mib:.0f} MiB)", flush=True)


def _same_file(a: Path, b: Path) -> bool:
    """Byte comparison in 16 MiB pieces (the outputs are gigabytes)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def bench_map(d: Path, img: Path, repeat: int) -> None:
    qi = qemu_img()
    args = ["map", "--output=json", img.name]
    q_out = subprocess.run([qi, *args], cwd=d, capture_output=True, check=True).stdout
    v_out = subprocess.run([*VDKIT, *args], cwd=d, capture_output=True, check=True, env=ENV).stdout
    q_cmd, v_cmd = [qi, *args], [*VDKIT, *args]
    qs, vs = timed_pair(q_cmd, v_cmd, repeat, d)
    print(_report(f"map 1 TiB, {q_out.count(b'{') // 2} data entries ", qs, vs, CPU[id(q_cmd)], CPU[id(v_cmd)]) +
          f"  identical output: {q_out == v_out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="2 GiB convert image (default 64 MiB)")
    ap.add_argument("--clusters", type=int, default=100_000, help="allocated clusters in the 1 TiB map image")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["convert", "qcow2 -> raw", "raw -> qcow2", "map"],
                    help="run one case (or the two convert cases)")
    ap.add_argument("--workdir", type=Path,
                    help="keep the images in this directory and reuse them in later runs (default: a temp dir)")
    a = ap.parse_args()
    # An installed package has its bytecode compiled by pip; an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every changed module at every start.
    compileall.compile_dir(str(ROOT / "vdkit"), quiet=1)
    with tempfile.TemporaryDirectory(prefix="vdkit-bench-io-") as tmp:
        d = Path(tmp)
        if a.workdir is not None:
            d = a.workdir.resolve()
            d.mkdir(parents=True, exist_ok=True)
        size = (2 << 30) if a.full else (64 << 20)
        if a.only != "map":
            src = d / "data.qcow2"
            marker = d / f"data.{size}"
            if a.workdir is None or not marker.exists() or not src.exists():
                src = make_data_image(d, size)
                for old in d.glob("data.[0-9]*"):
                    old.unlink()
                marker.touch()
            bench_convert(d, src, a.repeat, None if a.only in (None, "convert") else a.only)
        if a.only in (None, "map"):
            tib = d / "tib.qcow2"
            if a.workdir is None or not tib.exists():
                tib = make_sparse_tib(d, a.clusters)
            bench_map(d, tib, a.repeat)


if __name__ == "__main__":
    main()
