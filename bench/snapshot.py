#!/usr/bin/env python3
"""Benchmark internal snapshot create/delete and check: vdkit against qemu-img, same run, as ratios.

Cases (the issue's):
* a 16 GiB image with 4 GiB of data (``--quick``: 2 GiB with 512 MiB),
* an image with 500 internal snapshots (``--snapshots``),
* ``check`` of a 1 TiB image with 100k allocated clusters (``bench/check.py``,
  run at the end; ``--no-check`` skips it).
For each snapshot case, ``snapshot -c`` followed by ``snapshot -d`` is timed
with qemu-img, with vdkit-img (whole processes) and with the vdkit library in
process; the steps alternate on the same image so every tool sees the same
state and the same machine load.  Ratios are qemu-img time / vdkit time
(above 1: vdkit faster; the target "within 2x" is a ratio of at least 0.5).

A vdkit-img process pays a fixed start-up before it touches the image: the
interpreter and numpy's import (about 0.1 s here, against qemu-img's 10-70 ms
for the whole operation).  The run measures that floor too (``python -c
"import numpy"``, alternating with the other steps) and prints the CLI time
above it, so the operation can be compared with qemu-img's separately from
the start-up.  No thresholds: this prints numbers, it does not judge them.
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vdkit.block.node import open_image  # noqa: E402


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def median_time(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def make_data_image(d: Path, size: str, data_mib: int) -> Path:
    qi, qio = shutil.which("qemu-img"), shutil.which("qemu-io")
    if qi is None or qio is None:
        sys.exit("qemu-img and qemu-io are required")
    img = d / "data.qcow2"
    run([qi, "create", "-q", "-f", "qcow2", str(img), size])
    # spread the data: 64 MiB runs every 256 MiB of guest space (several L2 tables)
    cmds: list[str] = []
    off = 0
    left = data_mib
    while left > 0:
        chunk = min(64, left)
        cmds += ["-c", f"write -P {(off // 256) % 250 + 1} {off}M {chunk}M"]
        left -= chunk
        off += 256 if off + 256 < _mib(size) else 64
    run([qio, *cmds, str(img)])
    return img


def _mib(size: str) -> int:
    mult = {"M": 1, "G": 1024}[size[-1]]
    return int(size[:-1]) * mult


def make_snapshot_image(d: Path, nsnap: int) -> Path:
    qi = shutil.which("qemu-img")
    assert qi is not None
    img = d / "snaps.qcow2"
    run([qi, "create", "-q", "-f", "qcow2", str(img), "1G"])
    run(["qemu-io", "-c", "write -P 7 0 64M", str(img)])
    for i in range(nsnap):
        run([qi, "snapshot", "-c", f"snap{i}", str(img)])
    return img


def bench_case(label: str, img: Path, repeat: int) -> None:
    qi = shutil.which("qemu-img")
    assert qi is not None
    vdkit_img = [sys.executable, "-m", "vdkit.cli.main"]

    def tool(cmd: list[str], flag: str) -> Callable[[], None]:
        return lambda: run([*cmd, "snapshot", flag, "bench", str(img)])

    def lib_create() -> None:
        with open_image(str(img), "qcow2", readonly=False) as node:
            node.snapshot_create("bench", date_sec=int(time.time()), date_nsec=0, icount=0)

    def lib_delete() -> None:
        with open_image(str(img), "qcow2", readonly=False) as node:
            node.snapshot_delete(name="bench")

    floor_cmd = [sys.executable, "-c", "import numpy"]
    results: dict[str, list[float]] = {k: [] for k in ("qc", "qd", "vc", "vd", "lc", "ld", "floor")}
    steps = [("qc", tool([qi], "-c")), ("qd", tool([qi], "-d")), ("vc", tool(vdkit_img, "-c")),
             ("vd", tool(vdkit_img, "-d")), ("lc", lib_create), ("ld", lib_delete),
             ("floor", lambda: run(floor_cmd))]
    for _ in range(repeat):
        for key, fn in steps:
            results[key].append(median_time(fn, 1))
    med = {k: statistics.median(v) for k, v in results.items()}
    floor = med["floor"]
    for op, q, v, lib in (("create", med["qc"], med["vc"], med["lc"]), ("delete", med["qd"], med["vd"], med["ld"])):
        print(f"{label:<24}{op:<8}{q * 1e3:>9.1f}{v * 1e3:>11.1f}{q / v:>7.2f}{lib * 1e3:>12.1f}{q / lib:>7.2f}"
              f"{(v - floor) * 1e3:>13.1f}")
    print(f"{'':<32}(start-up floor, python -c 'import numpy': {floor * 1e3:.1f} ms)")
    check = subprocess.run([qi, "check", str(img)], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"  WARNING: qemu-img check exit {check.returncode}: {check.stdout.strip()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 GiB image with 512 MiB of data")
    ap.add_argument("--snapshots", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-check", action="store_true", help="skip the 1 TiB check case")
    args = ap.parse_args()
    # PYTHONDONTWRITEBYTECODE may be set: compile once so no vdkit-img run recompiles the tree
    compileall.compile_dir(str(ROOT / "vdkit"), quiet=1)
    size, data = ("2G", 512) if args.quick else ("16G", 4096)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        print(f"creating a {size} image with {data} MiB of data and a {args.snapshots}-snapshot image...",
              flush=True)
        data_img = make_data_image(d, size, data)
        snap_img = make_snapshot_image(d, args.snapshots)
        print(f"\n{'case':<24}{'op':<8}{'qemu-img':>9}{'vdkit-img':>11}{'ratio':>7}{'in-process':>12}{'ratio':>7}"
              f"{'CLI - floor':>13}")
        print("(milliseconds, median; ratio = qemu-img / vdkit, target >= 0.5)")
        bench_case(f"{size}, {data} MiB data", data_img, args.repeat)
        bench_case(f"{args.snapshots} snapshots", snap_img, args.repeat)
    if not args.no_check:
        print("\ncheck, 1 TiB image with 100k allocated clusters (bench/check.py):", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("check.py"))], check=True)


if __name__ == "__main__":
    main()
