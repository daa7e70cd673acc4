#!/usr/bin/env python3
"""Benchmark internal snapshot create/delete: vdkit against qemu-img, same run, as ratios.

Cases:
* a large image with data (default 2 GiB virtual, 512 MiB data; ``--full``:
  16 GiB virtual with 4 GiB of data),
* an image with 500 internal snapshots (``--snapshots``).
For each case, ``snapshot -c`` followed by ``snapshot -d`` is timed with
qemu-img, with vdkit-img (whole processes) and with the vdkit library in
process; the operations alternate on the same image so every tool sees the
same state.  Ratios are qemu-img time / vdkit time (above 1: vdkit faster).
No thresholds: this prints numbers, it does not judge them.
"""

from __future__ import annotations

import argparse
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

    results: dict[str, list[float]] = {k: [] for k in ("qc", "qd", "vc", "vd", "lc", "ld")}
    steps = [("qc", tool([qi], "-c")), ("qd", tool([qi], "-d")), ("vc", tool(vdkit_img, "-c")),
             ("vd", tool(vdkit_img, "-d")), ("lc", lib_create), ("ld", lib_delete)]
    for _ in range(repeat):
        for key, fn in steps:
            results[key].append(median_time(fn, 1))
    med = {k: statistics.median(v) for k, v in results.items()}
    for op, q, v, lib in (("create", med["qc"], med["vc"], med["lc"]), ("delete", med["qd"], med["vd"], med["ld"])):
        print(f"{label:<28}{op:<8}{q * 1e3:>10.1f}{v * 1e3:>11.1f}{q / v:>8.2f}{lib * 1e3:>12.1f}{q / lib:>8.2f}")
    check = subprocess.run([qi, "check", str(img)], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"  WARNING: qemu-img check exit {check.returncode}: {check.stdout.strip()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="16 GiB image with 4 GiB of data")
    ap.add_argument("--snapshots", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    size, data = ("16G", 4096) if args.full else ("2G", 512)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        print(f"creating a {size} image with {data} MiB of data and a {args.snapshots}-snapshot image...",
              flush=True)
        data_img = make_data_image(d, size, data)
        snap_img = make_snapshot_image(d, args.snapshots)
        print(f"\n{'case':<28}{'op':<8}{'qemu-img':>10}{'vdkit-img':>11}{'ratio':>8}{'in-process':>12}{'ratio':>8}")
        print("(milliseconds, median; ratio = qemu-img / vdkit)")
        bench_case(f"{size}, {data} MiB data", data_img, args.repeat)
        bench_case(f"{args.snapshots} snapshots", snap_img, args.repeat)


if __name__ == "__main__":
    main()
