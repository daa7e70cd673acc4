#!/usr/bin/env python3
"""Benchmark image info: vdkit against qemu-img, in the same run, as ratios.

Cases: a plain image, an image with 500 internal snapshots, a 4-deep chain.
Measures
* ``vdkit-img info`` vs ``qemu-img info`` (whole processes), and the CLI start
  against a bare ``python3 -c pass`` (target: within 1.5x);
* in-process ``vdkit.open(path).info()`` vs what Python programs do today,
  ``subprocess.run(["qemu-img", "info", "--output=json", ...])`` + ``json.loads``
  (target: at least 10x faster).
Ratios above 1 mean vdkit is faster, except the start-up ratio (vdkit/python).
"""

from __future__ import annotations

import argparse
import compileall
import json
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

import vdkit  # noqa: E402


def timeit(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds per call (median resists the noise of a shared machine)."""
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def timeit_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median seconds of two commands sampled alternately, so both see the same machine load."""
    fn_a()
    fn_b()
    a, b = [], []
    for _ in range(repeat):
        for fn, out in ((fn_a, a), (fn_b, b)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_images(d: Path, nsnap: int) -> dict[str, Path]:
    qi = shutil.which("qemu-img")
    if qi is None:
        sys.exit("qemu-img is required (make system-deps)")
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--snapshots", type=int, default=500)
    args = ap.parse_args()
    vdkit_img = [sys.executable, "-m", "vdkit.cli.main"]
    # An installed package has its bytecode compiled by pip; an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 would otherwise recompile every module at every start.
    compileall.compile_dir(str(ROOT / "vdkit"), quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        print(f"creating images ({args.snapshots} snapshots takes a moment)...", flush=True)
        images = make_images(d, args.snapshots)
        bare = [sys.executable, "-c", "pass"]
        t_py = timeit(lambda: run(bare), args.repeat)
        print(f"\nbare python start: {t_py * 1e3:.1f} ms ('vs python' samples it alternately with each case)")
        hdr = f"{'case':<16}{'qemu-img':>10}{'vdkit-img':>11}{'ratio':>8}{'vs python':>11}"
        hdr += f"{'subproc+json':>14}{'in-process':>12}{'ratio':>8}"
        print(hdr)
        for name, path in images.items():
            chain = ["--backing-chain"] if "chain" in name else []
            t_q = timeit(lambda p=path, c=chain: run(["qemu-img", "info", *c, str(p)]), args.repeat)
            def cli(p: Path = path, c: list[str] = chain) -> None:
                run([*vdkit_img, "info", *c, str(p)])

            t_v = timeit(cli, args.repeat)
            t_bare, t_cli = timeit_pair(lambda: run(bare), cli, args.repeat)

            def sub(p: Path = path) -> object:
                out = subprocess.run(["qemu-img", "info", "--output=json", str(p)], capture_output=True, check=True)
                return json.loads(out.stdout)

            def inproc(p: Path = path) -> object:
                with vdkit.open(p) as node:
                    return node.info(nested=True)

            t_s = timeit(sub, args.repeat)
            t_i = timeit(inproc, args.repeat * 4)
            print(
                f"{name:<16}{t_q * 1e3:>8.1f}ms{t_v * 1e3:>9.1f}ms{t_q / t_v:>7.2f}x{t_cli / t_bare:>10.2f}x"
                f"{t_s * 1e3:>12.1f}ms{t_i * 1e3:>10.2f}ms{t_s / t_i:>7.1f}x"
            )
        print("\ntargets: in-process >= 10x the subprocess route; CLI start within 1.5x of bare python")


if __name__ == "__main__":
    main()
