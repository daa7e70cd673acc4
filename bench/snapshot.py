#!/usr/bin/env python3
"""Benchmark internal snapshot create + delete against qemu-img: time, CPU and max RSS (issue 14's figures).

Cases (the issue's):
* a 16 GiB image with 2 GiB of data (``--quick``: 2 GiB with 512 MiB; ``--data`` to change),
* an image with 500 internal snapshots (``--snapshots``),
* then ``bench/check.py`` (``--no-check`` skips it).
One sample is ``snapshot -c`` followed by ``snapshot -d`` of the same name, as whole processes
(``bench/harness.py``: wall time, CPU and the larger max RSS of the two); samples of qemu-img,
vdkit-img and a bare ``python -c pass`` are interleaved so every tool sees the same image state and
the same load, in an idle round and one with a core kept busy (``--rounds``).  The vdkit library in
process (no interpreter start) is timed too.  Ratio = qemu-img time / vdkit time (target >= 0.5).
Callgrind's instruction counts of both (and of a bare interpreter start) are printed as well: on a
shared machine they are the figure the load does not move.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

import harness as h

from vdkit.block.node import open_image


def make_data_image(d: Path, size_mib: int, data_mib: int) -> Path:
    img = d / "data.qcow2"
    subprocess.run([h.tool("qemu-img"), "create", "-q", "-f", "qcow2", str(img), f"{size_mib}M"], check=True)
    # spread the data: 64 MiB runs every 256 MiB of guest space (several L2 tables)
    cmds: list[str] = []
    off, left = 0, data_mib
    while left > 0:
        chunk = min(64, left)
        cmds += ["-c", f"write -P {(off // 256) % 250 + 1} {off}M {chunk}M"]
        left -= chunk
        off += 256 if off + 256 < size_mib else 64
    subprocess.run([h.tool("qemu-io"), *cmds, str(img)], check=True, stdout=subprocess.DEVNULL)
    return img


def make_snapshot_image(d: Path, nsnap: int) -> Path:
    qi = h.tool("qemu-img")
    img = d / "snaps.qcow2"
    subprocess.run([qi, "create", "-q", "-f", "qcow2", str(img), "1G"], check=True)
    subprocess.run([h.tool("qemu-io"), "-c", "write -P 7 0 64M", str(img)], check=True, stdout=subprocess.DEVNULL)
    for i in range(nsnap):
        subprocess.run([qi, "snapshot", "-c", f"snap{i}", str(img)], check=True)
    return img


def create_delete(tool: Sequence[str], img: Path) -> h.Sample:
    """``snapshot -c bench`` then ``snapshot -d bench``: times and CPU added, the larger max RSS."""
    a = h.run([*tool, "snapshot", "-c", "bench", str(img)])
    b = h.run([*tool, "snapshot", "-d", "bench", str(img)])
    return h.Sample(a.wall + b.wall, a.cpu + b.cpu, max(a.rss, b.rss))


def in_process(img: Path) -> float:
    t0 = time.perf_counter()
    with open_image(str(img), "qcow2", readonly=False) as node:
        node.snapshot_create("bench", date_sec=int(time.time()), date_nsec=0, icount=0)
    with open_image(str(img), "qcow2", readonly=False) as node:
        node.snapshot_delete(name="bench")
    return time.perf_counter() - t0


def bench_case(label: str, img: Path, rounds: str, repeat: int) -> None:
    qi, vd = h.tool("qemu-img"), h.vdkit_bin()
    for rnd in h.rounds(rounds):
        q = h.Case("qemu-img", lambda: create_delete([qi], img))
        v = h.Case("vdkit", lambda: create_delete(vd, img))
        bare = h.Case("python", [sys.executable, "-c", "pass"])
        h.interleave([q, v, bare], repeat)
        print(f"  [{rnd}] " + h.ratio_line(f"{label}: -c + -d", q, v), flush=True)
        t_v, t_b = h.med(v.samples), h.med(bare.samples)
        print(f"  [{rnd}] bare python {t_b * 1e3:.1f} ms, {h.med(bare.samples, 'rss') / 1024:.0f} MB "
              f"(two starts: {2 * t_b * 1e3:.1f} ms of vdkit's {t_v * 1e3:.1f} ms)", flush=True)
    i_q, i_v = (sum(h.instructions([*tool, "snapshot", op, "bench", str(img)]) for op in ("-c", "-d"))
                for tool in ([qi], [sys.executable, *vd]))
    i_b = h.instructions([sys.executable, "-c", "pass"])
    print(f"  instructions (callgrind) of -c + -d: qemu-img {i_q / 1e6:.1f}M, vdkit {i_v / 1e6:.1f}M, bare python "
          f"{i_b / 1e6:.1f}M each start: vdkit / (2 x qemu-img + two starts) = {i_v / (2 * i_q + 2 * i_b):.2f} "
          f"(the time target's analogue, which the load does not move)", flush=True)
    lib = statistics.median(in_process(img) for _ in range(repeat))
    print(f"  in-process create + delete: {lib * 1e3:.1f} ms (no interpreter start)")
    check = subprocess.run([qi, "check", str(img)], capture_output=True, text=True)
    if check.returncode != 0:
        print(f"  WARNING: qemu-img check exit {check.returncode}: {check.stdout.strip()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 GiB image with 512 MiB of data")
    ap.add_argument("--data", type=int, help="MiB of data in the large image (default 2048)")
    ap.add_argument("--snapshots", type=int, default=500)
    ap.add_argument("--no-check", action="store_true", help="do not run bench/check.py afterwards")
    h.add_common_args(ap, repeat=5)
    args = ap.parse_args()
    print(h.install_note(), flush=True)
    size, data = (2048, 512) if args.quick else (16384, 2048)
    data = args.data or data
    with TemporaryDirectory() as tmp:
        d = Path(tmp)
        print(f"creating a {size} MiB image with {data} MiB of data and a {args.snapshots}-snapshot image...",
              flush=True)
        data_img = make_data_image(d, size, data)
        snap_img = make_snapshot_image(d, args.snapshots)
        bench_case(f"{size // 1024} GiB, {data} MiB data", data_img, args.rounds, args.repeat)
        bench_case(f"{args.snapshots} snapshots", snap_img, args.rounds, args.repeat)
    if not args.no_check:
        print("\ncheck (bench/check.py):", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("check.py")), "--rounds", args.rounds],
                       check=True)


if __name__ == "__main__":
    main()
