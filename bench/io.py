#!/usr/bin/env python3
"""Benchmark the data path: vdkit-img against qemu-img, in the same run, as ratios.

Cases, each in an idle round and a round with one core kept busy (``bench/harness.py``):
* ``convert`` qcow2 -> raw and raw -> qcow2 of an image with 2 GiB of data (``--quick``: 256 MiB),
  1/2 random, 1/4 zeros written as data, 1/4 holes (target: ratio >= 1.0, vdkit ahead);
* ``map --output=json`` of a 1 TiB qcow2 image with 100k allocated clusters scattered over the
  whole disk (about 2000 L2 tables).
Outputs are checked equal (``cmp`` of the converted files, identical map text) before timings are
trusted.  A ratio is qemu-img's median time / vdkit's: above 1 means vdkit is faster.  Samples
alternate between the tools, the previous output is deleted and ``sync`` runs before each one.
Run it from the venv ``make bench`` builds (an installed vdkit, not the checkout).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import harness as h


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
    subprocess.run([h.tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", str(raw), str(d / "tib.qcow2")],
                   check=True)
    raw.unlink()
    return d / "tib.qcow2"


def convert_cases(d: Path) -> list[tuple[str, h.Case, h.Case]]:
    qi, vd = h.tool("qemu-img"), h.vdkit_bin()
    out = []
    for label, args, suffix in (("convert qcow2 -> raw", ["convert", "-O", "raw", "data.qcow2"], "raw"),
                                ("convert raw -> qcow2", ["convert", "-f", "raw", "-O", "qcow2", "data.raw"], "qcow2")):
        q_out, v_out = d / f"q.{suffix}", d / f"v.{suffix}"
        out.append((label, h.Case("qemu-img", [qi, *args, q_out.name], q_out, d),
                    h.Case("vdkit", [*vd, *args, v_out.name], v_out, d)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB of data instead of 2 GiB")
    ap.add_argument("--clusters", type=int, default=100_000, help="allocated clusters in the 1 TiB map image")
    ap.add_argument("--only", choices=["convert", "map"], help="run one kind of case")
    h.add_common_args(ap, repeat=5)
    a = ap.parse_args()
    print(h.install_note(), flush=True)
    qi, vd = h.tool("qemu-img"), h.vdkit_bin()
    with tempfile.TemporaryDirectory(prefix="vdkit-bench-io-") as tmp:
        d = Path(tmp)
        size = (256 if a.quick else 2048) << 20
        if a.only != "map":
            h.make_data_raw(d / "data.raw", size)
            subprocess.run([qi, "convert", "-f", "raw", "-O", "qcow2", "data.raw", "data.qcow2"], cwd=d, check=True)
            print(f"convert: {size >> 20} MiB image, {size >> 21} MiB random data", flush=True)
        if a.only != "convert":
            tib = make_sparse_tib(d, a.clusters)
            map_args = ["map", "--output=json", tib.name]
            same_map = (subprocess.run([qi, *map_args], cwd=d, capture_output=True, check=True).stdout
                        == subprocess.run([*vd, *map_args], cwd=d, capture_output=True, check=True).stdout)
        for rnd in h.rounds(a.rounds):
            if a.only != "map":
                for label, q, v in convert_cases(d):
                    h.interleave([q, v], a.repeat)
                    assert q.out is not None and v.out is not None
                    same = h.same_file(q.out, v.out)
                    print(f"[{rnd}] " + h.ratio_line(label, q, v, nbytes=size) + f"  identical: {same}", flush=True)
                    q.out.unlink()
                    v.out.unlink()
            if a.only != "convert":
                q, v = h.Case("qemu-img", [qi, *map_args], cwd=d), h.Case("vdkit", [*vd, *map_args], cwd=d)
                h.interleave([q, v], a.repeat)
                print(f"[{rnd}] " + h.ratio_line(f"map 1 TiB, {a.clusters} clusters", q, v)
                      + f"  identical: {same_map}", flush=True)


if __name__ == "__main__":
    main()
