#!/usr/bin/env python3
"""Benchmark the other formats (issue 11): vdkit-img against qemu-img in the same run, as ratios.

Cases (sources made by qemu-img from one raw file with 1 GiB of data; ``--quick``: 128 MiB),
in an idle round and a round with one core kept busy (``bench/harness.py``):
* ``convert`` vmdk (streamOptimized) -> qcow2, vmdk (monolithicSparse) -> raw, vhdx -> raw,
  vpc -> qcow2 (target: ratio >= 0.7, i.e. at least 0.7x qemu-img's throughput);
* ``info`` of an image of each format (and qcow2, raw), against a bare interpreter start of the
  same venv's Python (target: within 1.5x of ``python -c pass``).
Outputs are compared (the converted files with ``qemu-img compare``) before timings are trusted.
A ratio is qemu-img's median time / vdkit's; samples alternate between the tools, ``sync`` runs
before each one and the previous output is deleted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import harness as h

SOURCES = {
    "vmdk-stream": ("vmdk", ["-o", "subformat=streamOptimized"]),
    "vmdk-sparse": ("vmdk", ["-o", "subformat=monolithicSparse"]),
    "vhdx": ("vhdx", []),
    "vpc": ("vpc", []),
    "qcow2": ("qcow2", []),
    "vdi": ("vdi", []),
    "qed": ("qed", []),
    "parallels": ("parallels", []),
}
CONVERTS = [("vmdk-stream", "qcow2"), ("vmdk-sparse", "raw"), ("vhdx", "raw"), ("vpc", "qcow2")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB of data instead of 1 GiB")
    ap.add_argument("--only", choices=["convert", "info"], help="run one kind of case")
    h.add_common_args(ap, repeat=5)
    a = ap.parse_args()
    print(h.install_note(), flush=True)
    size = (128 if a.quick else 1024) << 20
    qi, vd = h.tool("qemu-img"), h.vdkit_bin()
    with tempfile.TemporaryDirectory(prefix="vdbench-fmt") as tmp:
        d = Path(tmp)
        h.make_data_raw(d / "data.raw", size)
        for name, (fmt, opts) in SOURCES.items():
            subprocess.run([qi, "convert", "-f", "raw", "-O", fmt, *opts, "data.raw", f"{name}.{fmt}"], cwd=d,
                           check=True)
        print(f"data: {size >> 20} MiB (1/2 random, 1/4 zeros written, 1/4 holes)", flush=True)
        for rnd in h.rounds(a.rounds):
            if a.only != "info":
                for name, out_fmt in CONVERTS:
                    fmt = SOURCES[name][0]
                    q_out, v_out = d / f"q.{out_fmt}", d / f"v.{out_fmt}"
                    args = ["convert", "-O", out_fmt, f"{name}.{fmt}"]
                    q = h.Case("qemu-img", [qi, *args, q_out.name], q_out, d)
                    v = h.Case("vdkit", [*vd, *args, v_out.name], v_out, d)
                    h.interleave([q, v], a.repeat)
                    same = subprocess.run([qi, "compare", "-q", q_out.name, v_out.name], cwd=d).returncode == 0
                    print(f"[{rnd}] " + h.ratio_line(f"convert {name} -> {out_fmt}", q, v, nbytes=size)
                          + f"  same data: {same}", flush=True)
            if a.only != "convert":
                bare = h.Case("python -c pass", [sys.executable, "-c", "pass"], cwd=d)
                for name, (fmt, _) in [*SOURCES.items(), ("raw", ("raw", []))]:
                    img = "data.raw" if name == "raw" else f"{name}.{fmt}"
                    v = h.Case("vdkit", [*vd, "info", img], cwd=d)
                    h.interleave([bare, v], max(a.repeat, 15))
                    b, t = h.med(bare.samples), h.med(v.samples)
                    print(f"[{rnd}] info {name:12} vdkit-img {t * 1e3:6.1f} ms  bare interpreter {b * 1e3:6.1f} ms  "
                          f"ratio {t / b:4.2f} (target <= 1.5)  max RSS {h.med(v.samples, 'rss') / 1024:.0f} MB",
                          flush=True)


if __name__ == "__main__":
    main()
