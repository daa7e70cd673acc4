#!/usr/bin/env python3
"""Benchmark the other formats (issue 11): vdkit-img against qemu-img in the same run, as ratios.

Cases (sources made by qemu-img from one raw file with ``--size`` of data, default 1 GiB;
``--quick``: 128 MiB):
* ``convert`` vmdk (streamOptimized) -> qcow2, vmdk (monolithicSparse) -> raw, vhdx -> raw,
  vpc -> qcow2 (target: ratio >= 0.7, i.e. at least 0.7x qemu-img's throughput);
* ``info`` of an image of each format, against a bare interpreter start of the same Python
  (target: within 1.5x of ``python -c pass``).
Outputs are compared (the converted files with ``qemu-img compare``) before timings are trusted.
A ratio is qemu-img time / vdkit time; samples alternate between the tools, ``sync`` runs before
each one and the previous output is deleted (``bench/io.py``'s harness).
"""

from __future__ import annotations

import argparse
import compileall
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _bench_io():  # type: ignore[no-untyped-def]
    """bench/io.py's harness (its module name shadows the standard library's io, so load it by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_io", Path(__file__).resolve().parent / "io.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_io = _bench_io()
CPU, ENV, ROOT, VDKIT = _io.CPU, _io.ENV, _io.ROOT, _io.VDKIT
_report, make_data_image, qemu_img, timed_pair = _io._report, _io.make_data_image, _io.qemu_img, _io.timed_pair

SOURCES = {
    "vmdk-stream": ("vmdk", ["-o", "subformat=streamOptimized"]),
    "vmdk-sparse": ("vmdk", ["-o", "subformat=monolithicSparse"]),
    "vhdx": ("vhdx", []),
    "vpc": ("vpc", []),
}
CONVERTS = [("vmdk-stream", "qcow2"), ("vmdk-sparse", "raw"), ("vhdx", "raw"), ("vpc", "qcow2")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 MiB of data instead of 1 GiB")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    compileall.compile_dir(str(ROOT / "vdkit"), quiet=1)
    size = (128 if a.quick else 1024) << 20
    qi = qemu_img()
    with tempfile.TemporaryDirectory(prefix="vdbench-fmt") as tmp:
        d = Path(tmp)
        src = make_data_image(d, size)  # data.raw + data.qcow2
        for name, (fmt, opts) in SOURCES.items():
            subprocess.run([qi, "convert", "-f", "raw", "-O", fmt, *opts, "data.raw", f"{name}.{fmt}"], cwd=d,
                           check=True)
        print(f"data: {size >> 20} MiB (1/2 random, 1/4 zeros written, 1/4 holes); source {src.name}", flush=True)
        for name, out_fmt in CONVERTS:
            fmt = SOURCES[name][0]
            q_out, v_out = d / f"q.{out_fmt}", d / f"v.{out_fmt}"
            args = ["convert", "-O", out_fmt, f"{name}.{fmt}"]
            q_cmd, v_cmd = [qi, *args, q_out.name], [*VDKIT, *args, v_out.name]
            qs, vs = timed_pair(q_cmd, v_cmd, a.repeat, d, q_out, v_out)
            same = subprocess.run([qi, "compare", "-q", q_out.name, v_out.name], cwd=d).returncode == 0
            print(_report(f"convert {name:12} -> {out_fmt:5}", qs, vs, CPU[id(q_cmd)], CPU[id(v_cmd)])
                  + f"  same data: {same}", flush=True)
        bare = [sys.executable, "-c", "pass"]
        for name, (fmt, _) in SOURCES.items():
            v_cmd = [*VDKIT, "info", f"{name}.{fmt}"]
            bs, vs = [], []
            for _ in range(max(a.repeat, 15)):
                for cmd, acc in ((bare, bs), (v_cmd, vs)):
                    t0 = time.perf_counter()
                    subprocess.run(cmd, cwd=d, env=ENV, check=True, stdout=subprocess.DEVNULL)
                    acc.append(time.perf_counter() - t0)
            b, v = statistics.median(bs), statistics.median(vs)
            print(f"info {name:12} vdkit {v * 1000:6.1f} ms  bare interpreter {b * 1000:6.1f} ms  "
                  f"ratio {v / b:4.2f} (target <= 1.5)", flush=True)


if __name__ == "__main__":
    main()
