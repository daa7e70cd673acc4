#!/usr/bin/env python3
"""Benchmark image info: vdkit against qemu-img, in the same run, as ratios.

Cases: a plain image, an image with 500 internal snapshots, a 4-deep chain.
Measures
* ``vdkit-img info`` vs ``qemu-img info`` (whole processes), and the CLI start
  against a bare ``python3 -c pass`` (target: within 1.5x);
* start-up per format (issues 11 and 14): ``vdkit-img info`` of a small image of every format
  against a bare ``python3 -c pass`` of the same venv, wall-time medians of interleaved runs
  (``--startup-repeat``, 21) and instructions counted by callgrind, which the load of a shared
  machine does not move (target: within 1.5x);
* in-process ``vdkit.open(path).info()`` vs what Python programs do today,
  ``subprocess.run(["qemu-img", "info", "--output=json", ...])`` + ``json.loads``
  (target: at least 10x faster).
Ratios above 1 mean vdkit is faster, except the start-up ratio (vdkit/python).  Samples of
qemu-img, vdkit-img and the bare interpreter are interleaved, in an idle round and a round with
one core kept busy (``bench/harness.py``); vdkit is the one installed in the running venv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness as h

import vdkit


def timeit(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds per call (median resists the noise of a shared machine)."""
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_images(d: Path, nsnap: int) -> dict[str, Path]:
    qi = h.tool("qemu-img")
    plain = d / "plain.qcow2"
    run([qi, "create", "-q", "-f", "qcow2", str(plain), "1G"])
    snaps = d / "snaps.qcow2"
    run([qi, "create", "-q", "-f", "qcow2", str(snaps), "1G"])
    for i in range(nsnap):
        run([qi, "snapshot", "-c", f"snap{i}", str(snaps)])
    run([qi, "create", "-q", "-f", "raw", str(d / "c0.raw"), "1G"])
    prev, prev_fmt = "c0.raw", "raw"
    for i in range(1, 4):
        cur = f"c{i}.qcow2"
        run([qi, "create", "-q", "-f", "qcow2", "-b", prev, "-F", prev_fmt, str(d / cur)])
        prev, prev_fmt = cur, "qcow2"
    return {"plain": plain, f"{nsnap} snapshots": snaps, "4-deep chain": d / prev}


STARTUP_FORMATS = [("qcow2", []), ("raw", []), ("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized"]),
                   ("vhdx", []), ("vpc", []), ("vdi", []), ("qed", []), ("parallels", [])]


def startup(d: Path, repeat: int) -> None:
    """``vdkit-img info`` of each format as a multiple of a bare interpreter start."""
    qi = h.tool("qemu-img")
    vd = h.vdkit_bin()
    names = []
    for fmt, opts in STARTUP_FORMATS:
        name = fmt + ("-" + opts[-1].split("=")[-1] if opts else "")
        run([qi, "create", "-q", "-f", fmt, *opts, str(d / f"{name}.img"), "64M"])
        names.append(name)
    bare = h.Case("python", [sys.executable, "-c", "pass"])
    cases = [h.Case(n, [*vd, "info", f"{n}.img"], cwd=d) for n in names]
    h.interleave([bare, *cases], repeat)
    # the installed script is run by its interpreter (valgrind does not follow the #! line)
    i_bare = h.instructions([sys.executable, "-c", "pass"], d)
    t_bare = h.med(bare.samples)
    c_bare = h.med(bare.samples, "cpu")
    print(f"{'start-up':<28}{'wall':>9}{'vs python':>11}{'CPU':>9}{'vs python':>11}{'instructions':>14}"
          f"{'vs python':>11}   (python -c pass: {t_bare * 1e3:.1f} ms, {c_bare * 1e3:.1f} ms CPU, "
          f"{i_bare / 1e6:.1f}M)", flush=True)
    for case in cases:
        t = h.med(case.samples)
        n = h.instructions([sys.executable, *vd, "info", f"{case.name}.img"], d)
        c = h.med(case.samples, "cpu")
        print(f"info {case.name:<23}{t * 1e3:>7.1f}ms{t / t_bare:>10.2f}x{c * 1e3:>7.1f}ms{c / c_bare:>10.2f}x"
              f"{n / 1e6:>13.1f}M{n / i_bare:>10.2f}x", flush=True)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; target: within 1.5x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshots", type=int, default=500)
    ap.add_argument("--startup-repeat", type=int, default=21, help="interleaved samples per format (default 21)")
    ap.add_argument("--only-startup", action="store_true", help="only the per-format start-up figures")
    h.add_common_args(ap, repeat=15)
    args = ap.parse_args()
    print(h.install_note(), flush=True)
    qi, vd = h.tool("qemu-img"), h.vdkit_bin()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        startup(d, args.startup_repeat)
        if args.only_startup:
            return
        print(f"creating images ({args.snapshots} snapshots takes a moment)...", flush=True)
        images = make_images(d, args.snapshots)
        for rnd in h.rounds(args.rounds):
            hdr = f"[{rnd}] {'case':<16}{'qemu-img':>10}{'vdkit-img':>11}{'ratio':>8}{'python':>9}{'vs python':>11}"
            hdr += f"{'max RSS q/v':>13}{'subproc+json':>14}{'in-process':>12}{'ratio':>8}"
            print(hdr, flush=True)
            for name, path in images.items():
                chain = ["--backing-chain"] if "chain" in name else []
                q = h.Case("qemu-img", [qi, "info", *chain, str(path)])
                v = h.Case("vdkit", [*vd, "info", *chain, str(path)])
                bare = h.Case("python", [sys.executable, "-c", "pass"])
                h.interleave([q, v, bare], args.repeat)
                t_q, t_v, t_bare = h.med(q.samples), h.med(v.samples), h.med(bare.samples)

                def sub(p: Path = path) -> object:
                    out = subprocess.run([qi, "info", "--output=json", str(p)], capture_output=True, check=True)
                    return json.loads(out.stdout)

                def inproc(p: Path = path) -> object:
                    with vdkit.open(p) as node:
                        return vdkit.image_info(node, nested=True)

                t_s = timeit(sub, args.repeat)
                t_i = timeit(inproc, args.repeat * 4)
                rss = f"{h.med(q.samples, 'rss') / 1024:.0f}/{h.med(v.samples, 'rss') / 1024:.0f} MB"
                print(
                    f"[{rnd}] {name:<16}{t_q * 1e3:>8.1f}ms{t_v * 1e3:>9.1f}ms{t_q / t_v:>7.2f}x{t_bare * 1e3:>7.1f}ms"
                    f"{t_v / t_bare:>10.2f}x{rss:>13}{t_s * 1e3:>12.1f}ms{t_i * 1e3:>10.2f}ms{t_s / t_i:>7.1f}x",
                    flush=True,
                )
        print("\ntargets: in-process >= 10x the subprocess route; CLI start within 1.5x of bare python")


if __name__ == "__main__":
    main()
