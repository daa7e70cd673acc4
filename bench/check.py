#!/usr/bin/env python3
"""Benchmark ``check`` against qemu-img: time, CPU and max RSS of whole processes (issue 14's figures).

Cases:
* a 1 GiB image with 320 MiB of data written by qemu-io (the issue's small case: a check that
  should cost little more than starting the interpreter);
* a 1 TiB image with 100k allocated clusters, built directly (header, L1, 2048 L2 tables,
  refcount blocks) with data clusters that are never written, so the file is sparse; guest
  clusters are spread evenly over the disk so every L2 table is used.
``qemu-img check`` runs first on each to prove the image consistent, and the outputs must be equal.
Samples of qemu-img, vdkit-img and a bare ``python -c pass`` of the same interpreter are
interleaved (``bench/harness.py``; ``--rounds`` idle and with one core kept busy).  Targets:
time <= 2x qemu-img's + one interpreter start; max RSS <= 2x qemu-img's + the bare interpreter's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness as h
import numpy as np

from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.layout import Qcow2Header, serialize_header

CLUSTER_BITS = 16
CS = 1 << CLUSTER_BITS
COPIED = 1 << 63


def build_image(path: Path, size: int = 1 << 40, nb_data: int = 100_000) -> None:
    """A consistent image: header, refcount table, L1, L2 tables, data, then refcount blocks."""
    l2_entries = CS // 8
    guest_clusters = size // CS
    l1_size = -(-guest_clusters // l2_entries)
    guest = np.linspace(0, guest_clusters - 1, nb_data, dtype=np.int64)
    tables = np.unique(guest // l2_entries)
    # host layout: 0 header, 1 refcount table, 2.. L1, then L2 tables, data, refcount blocks
    l1_clusters = -(-l1_size * 8 // CS)
    l1_cluster = 2
    l2_first = l1_cluster + l1_clusters
    data_first = l2_first + len(tables)
    used = data_first + nb_data
    per_block = CS * 8 // 16
    nb_blocks = -(-(used + 16) // per_block)
    block_first = used
    total = block_first + nb_blocks
    assert nb_blocks <= CS // 8
    refcounts = np.ones(total, dtype=">u2")
    l1 = np.zeros(l1_size, dtype=">u8")
    table_index = {int(t): i for i, t in enumerate(tables)}
    for t, i in table_index.items():
        l1[t] = ((l2_first + i) * CS) | COPIED
    l2 = np.zeros((len(tables), l2_entries), dtype=">u8")
    rows = np.searchsorted(tables, guest // l2_entries)
    l2[rows, guest % l2_entries] = ((data_first + np.arange(nb_data, dtype=np.uint64)) * CS) | np.uint64(COPIED)
    reftable = np.zeros(CS // 8, dtype=">u8")
    reftable[:nb_blocks] = (block_first + np.arange(nb_blocks)) * CS
    header = Qcow2Header(
        version=3, backing_file_offset=0, backing_file_size=0, cluster_bits=CLUSTER_BITS, size=size,
        crypt_method=0, l1_size=l1_size, l1_table_offset=l1_cluster * CS, refcount_table_offset=CS,
        refcount_table_clusters=1, nb_snapshots=0, snapshots_offset=0, header_length=L.V3_HEADER_SIZE,
    )
    with open(path, "wb") as f:
        f.write(serialize_header(header))
        f.seek(CS)
        f.write(reftable.tobytes())
        f.seek(l1_cluster * CS)
        f.write(l1.tobytes())
        f.seek(l2_first * CS)
        f.write(l2.tobytes())
        blocks = np.zeros(nb_blocks * per_block, dtype=">u2")
        blocks[:total] = refcounts
        f.seek(block_first * CS)
        f.write(blocks.tobytes())
        f.truncate(total * CS)


def build_data_image(path: Path, size_mib: int = 1024, data_mib: int = 320) -> None:
    """qemu-img's image with ``data_mib`` of data in 32 MiB runs spread over the disk (several L2 tables)."""
    subprocess.run([h.tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M"], check=True)
    step = size_mib // (data_mib // 32)
    cmds: list[str] = []
    for i in range(data_mib // 32):
        cmds += ["-c", f"write -P {i % 250 + 1} {i * step}M 32M"]
    subprocess.run([h.tool("qemu-io"), *cmds, str(path)], check=True, stdout=subprocess.DEVNULL)


def _in_process(img: Path) -> float:
    from vdkit.block.node import open_image

    with open_image(str(img), check_mode=True) as node:
        t0 = time.perf_counter()
        node.driver.check(None, lambda line: None)  # (the proof by runs first, as vdkit-img check)
        return time.perf_counter() - t0


def bench(label: str, img: Path, rounds: str, repeat: int) -> bool:
    qi, vd = h.tool("qemu-img"), h.vdkit_bin()
    q_out = subprocess.run([qi, "check", str(img)], capture_output=True).stdout
    v_run = subprocess.run([*vd, "check", str(img)], capture_output=True)
    if v_run.returncode != 0 or q_out != v_run.stdout:
        print(f"{label}: outputs differ:\n", q_out.decode(), "\n---\n", v_run.stdout.decode(), v_run.stderr.decode())
        return False
    print(f"{label}: {q_out.decode().strip().splitlines()[0]}")
    for rnd in h.rounds(rounds):
        q = h.Case("qemu-img", [qi, "check", str(img)])
        v = h.Case("vdkit", [*vd, "check", str(img)])
        bare = h.Case("python", [sys.executable, "-c", "pass"])
        h.interleave([q, v, bare], repeat)
        print(f"  [{rnd}] " + h.ratio_line("check", q, v), flush=True)
        t_q, t_v, t_b = h.med(q.samples), h.med(v.samples), h.med(bare.samples)
        r_q, r_v, r_b = (h.med(c.samples, "rss") / 1024 for c in (q, v, bare))
        print(f"  [{rnd}] bare python {t_b * 1e3:.1f} ms, {r_b:.0f} MB: time target {(2 * t_q + t_b) * 1e3:.1f} ms "
              f"({'met' if t_v <= 2 * t_q + t_b else 'NOT met'}), max RSS target {2 * r_q + r_b:.0f} MB "
              f"({'met' if r_v <= 2 * r_q + r_b else 'NOT met'})", flush=True)
    i_q = h.instructions([qi, "check", str(img)])
    i_v = h.instructions([sys.executable, *vd, "check", str(img)])
    i_b = h.instructions([sys.executable, "-c", "pass"])
    print(f"  instructions (callgrind): qemu-img {i_q / 1e6:.1f}M, vdkit {i_v / 1e6:.1f}M, bare python "
          f"{i_b / 1e6:.1f}M: target {(2 * i_q + i_b) / 1e6:.1f}M ({'met' if i_v <= 2 * i_q + i_b else 'NOT met'})",
          flush=True)
    lib = statistics.median(_in_process(img) for _ in range(repeat))
    print(f"  in-process check(): {lib * 1e3:.1f} ms (no interpreter start)")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clusters", type=int, default=100_000, help="allocated clusters of the 1 TiB image")
    h.add_common_args(ap, repeat=7)
    args = ap.parse_args()
    print(h.install_note(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small.qcow2"
        build_data_image(small)
        big = Path(tmp) / "big.qcow2"
        build_image(big, nb_data=args.clusters)
        ok = bench("1 GiB, 320 MiB data", small, args.rounds, args.repeat)
        ok = bench(f"1 TiB, {args.clusters} clusters", big, args.rounds, args.repeat) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
