#!/usr/bin/env python3
"""Benchmark ``check`` on a 1 TiB qcow2 image with 100k allocated clusters, against qemu-img.

The image is built directly (header, L1, 2048 L2 tables, refcount blocks)
with data clusters that are never written, so the file is sparse and takes
a few hundred MiB of real disk at most; ``qemu-img check`` is run first to
prove the image is consistent.  Guest clusters are spread evenly over the
whole disk so every L2 table is used.  Both tools run as whole processes,
alternately, and the median times and their ratio are printed (target:
vdkit within 2x of qemu-img, i.e. ratio <= 2).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vdkit.formats.qcow2 import layout as L  # noqa: E402
from vdkit.formats.qcow2.header import Qcow2Header, serialize_header  # noqa: E402

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


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True)
    return time.perf_counter() - t0, p


def _in_process(img: Path) -> float:
    from vdkit.block.node import open_image
    from vdkit.formats.qcow2.check import check

    with open_image(str(img), check_mode=True) as node:
        t0 = time.perf_counter()
        check(node.driver, None, lambda line: None)  # type: ignore[arg-type]
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clusters", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "big.qcow2"
        build_image(img, nb_data=args.clusters)
        q_times, v_times = [], []
        q_out = v_out = b""
        for _ in range(args.repeat):
            t, p = timed(["qemu-img", "check", str(img)])
            q_times.append(t)
            q_out = p.stdout
            t, p = timed([sys.executable, "-m", "vdkit.cli.main", "check", str(img)])
            v_times.append(t)
            v_out = p.stdout
        if p.returncode != 0 or q_out != v_out:
            print("outputs differ:\n", q_out.decode(), "\n---\n", v_out.decode(), p.stderr.decode())
            return 1
        q, v = statistics.median(q_times), statistics.median(v_times)
        lib = statistics.median(_in_process(img) for _ in range(args.repeat))
        print(q_out.decode().rstrip())
        print(f"qemu-img check: {q * 1000:.0f} ms   vdkit-img check: {v * 1000:.0f} ms   "
              f"ratio vdkit/qemu = {v / q:.2f} (target <= 2)")
        print(f"in-process vdkit check(): {lib * 1000:.0f} ms   ratio to qemu-img = {lib / q:.2f} "
              "(the CLI adds interpreter and numpy start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
