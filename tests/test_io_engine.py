"""The qcow2 I/O engine against an in-memory model of the guest disk.

Hypothesis drives random sequences of writes, zero writes (with and without
unmap), discards and compressed writes over random geometries (cluster size,
v2/v3, extended L2), with and without a backing file (qcow2 or raw, possibly
shorter than the overlay) and with an internal snapshot taken by qemu-img
first (so copy-on-write of shared clusters and L2 tables is exercised).
Afterwards: vdkit reads equal the model, ``qemu-img check`` is clean,
``qemu-img convert -O raw`` equals the model, and the snapshot still reads
as it did when it was taken.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import check_ok, qemu_img, qemu_io
from tests.data.faults import run_cut
from vdkit.block import io as bio
from vdkit.block.node import open_image
from vdkit.errors import VdkitError


@dataclass(frozen=True)
class Geometry:
    cluster_size: int
    compat: str
    extended_l2: bool
    backing: str | None  # None, "qcow2", "raw"
    backing_size: int
    size: int
    snapshot: bool
    zstd: bool = False
    data_file: bool = False
    data_file_raw: bool = False


geometries = st.builds(
    Geometry,
    cluster_size=st.sampled_from([512, 4096, 16384, 65536]),
    compat=st.sampled_from(["0.10", "1.1"]),
    extended_l2=st.booleans(),
    backing=st.sampled_from([None, "qcow2", "raw"]),
    backing_size=st.sampled_from([256 * 1024, 768 * 1024, 1024 * 1024]),
    size=st.sampled_from([1024 * 1024, 1024 * 1024 + 7 * 512]),
    snapshot=st.booleans(),
    zstd=st.booleans(),
    data_file=st.booleans(),
    data_file_raw=st.booleans(),
).filter(lambda g: (not g.extended_l2 or (g.compat == "1.1" and g.cluster_size >= 16384))
         and not (g.zstd and g.compat == "0.10")
         and not (g.data_file and (g.compat == "0.10" or g.snapshot))
         and not (g.data_file_raw and (not g.data_file or g.backing is not None)))

op = st.tuples(
    st.sampled_from(["write", "write", "write", "zero", "zero_unmap", "discard", "compressed"]),
    st.integers(0, 1024 * 1024 + 7 * 512 - 1),
    st.integers(1, 300 * 1024),
    st.integers(1, 255),
)


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _setup(d: Path, g: Geometry) -> bytearray:
    """Create the images with QEMU; return the model of the overlay's guest content."""
    model = bytearray(g.size)
    opts = f"compat={g.compat},cluster_size={g.cluster_size}" + (",extended_l2=on" if g.extended_l2 else "")
    opts += ",compression_type=zstd" if g.zstd else ""
    opts += f",data_file={d / 'top.data'}" if g.data_file else ""
    opts += ",data_file_raw=on" if g.data_file_raw else ""
    back: list[str] = []
    if g.backing is not None:
        bname = f"base.{g.backing}"
        check_ok("create", "-q", "-f", g.backing, bname, str(g.backing_size), cwd=d)
        r = qemu_io("-f", g.backing, "-c", f"write -P 0x5a 0 {g.backing_size // 2}",
                    "-c", f"write -P 0xa5 {g.backing_size // 2 + 4096} 8192", bname, cwd=d)
        assert r.returncode == 0, r.stderr
        model[: g.backing_size // 2] = b"\x5a" * (g.backing_size // 2)
        model[g.backing_size // 2 + 4096 : g.backing_size // 2 + 4096 + 8192] = b"\xa5" * 8192
        back = ["-b", bname, "-F", g.backing]
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, *back, "top.qcow2", str(g.size), cwd=d)
    first = f"write -c -P 0x44 0 {g.cluster_size}" if g.cluster_size >= 4096 and not g.data_file \
        else "write -P 0x44 0 512"
    r = qemu_io("-c", first, "-c", "write -P 0x33 4096 70000", "top.qcow2", cwd=d)
    assert r.returncode == 0, r.stdout + r.stderr
    n0 = g.cluster_size if g.cluster_size >= 4096 and not g.data_file else 512
    model[0:n0] = b"\x44" * n0
    model[4096 : 4096 + 70000] = b"\x33" * 70000
    if g.snapshot:
        check_ok("snapshot", "-c", "snap", "top.qcow2", cwd=d)
    return model


def _apply_model(model: bytearray, g: Geometry, kind: str, off: int, n: int, seed: int,
                 allocated_before: bool) -> None:
    cs = g.cluster_size
    if kind == "write":
        model[off : off + n] = _pattern(seed, n)
    elif kind in ("zero", "zero_unmap"):
        model[off : off + n] = bytes(n)
    elif kind == "discard":
        end = off + n
        lo, hi = off + (-off) % cs, end - end % cs
        if end == g.size and off % cs == 0:
            hi = end
        if hi > lo:
            if g.compat == "0.10" and not g.extended_l2:
                # v2 has no zero flag: a discarded cluster falls through to the backing file
                base = _backing_view(g)
                model[lo:hi] = base[lo:hi]
            else:
                model[lo:hi] = bytes(hi - lo)
    elif kind == "compressed" and not allocated_before:
        data = _pattern(seed, min(cs, g.size - off))
        model[off : off + len(data)] = data


_BACKING_VIEW: dict[Geometry, bytes] = {}


def _backing_view(g: Geometry) -> bytes:
    view = bytearray(g.size)
    if g.backing is not None:
        h = g.backing_size // 2
        view[:h] = b"\x5a" * h
        view[h + 4096 : h + 4096 + 8192] = b"\xa5" * 8192
    return bytes(view)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=geometries, ops=st.lists(op, min_size=1, max_size=12))
def test_random_io_against_model(g: Geometry, ops: list[tuple[str, int, int, int]]) -> None:
    d = Path(tempfile.mkdtemp(prefix="vdkit-io-"))
    try:
        model = _setup(d, g)
        snap_before = bytes(model) if g.snapshot else b""
        node = open_image(str(d / "top.qcow2"), readonly=False)
        try:
            for kind, off, n, seed in ops:
                off %= g.size
                n = min(n, g.size - off)
                if kind == "write":
                    bio.write(node, off, _pattern(seed, n))
                    _apply_model(model, g, kind, off, n, seed, False)
                elif kind in ("zero", "zero_unmap"):
                    bio.write_zeroes(node, off, n, unmap=kind == "zero_unmap")
                    _apply_model(model, g, kind, off, n, seed, False)
                elif kind == "discard":
                    bio.discard(node, off, n)
                    _apply_model(model, g, kind, off, n, seed, False)
                else:
                    cs = g.cluster_size
                    coff = off - off % cs
                    kind_at = node.driver.io.run_at(coff, 1).kind.name
                    free = kind_at in ("UNALLOCATED", "ZERO") and not _allocated_zero(node, coff) \
                        and not g.data_file
                    if free:
                        node.driver.io.write_compressed(coff, _pattern(seed, min(cs, g.size - coff)))
                    _apply_model(model, g, kind, coff, cs, seed, not free)
                _cached_runs_are_fresh(node)
                assert bio.read(node, 0, g.size) == bytes(model), f"read-back differs after {kind} {off} {n}"
                _cached_runs_are_fresh(node)
            bio.flush(node)
        finally:
            node.close()
        r = qemu_img("check", "top.qcow2", cwd=d)
        assert r.returncode == 0, r.stdout + r.stderr
        check_ok("convert", "-O", "raw", "top.qcow2", "out.raw", cwd=d)
        assert (d / "out.raw").read_bytes() == bytes(model)
        if g.data_file_raw:  # the external data file is itself a raw image of the disk
            assert (d / "top.data").read_bytes().ljust(g.size, b"\0")[: g.size] == bytes(model)
        if g.snapshot:
            check_ok("convert", "-l", "snap", "-O", "raw", "top.qcow2", "snap.raw", cwd=d)
            assert (d / "snap.raw").read_bytes() == snap_before
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _cached_runs_are_fresh(node) -> None:  # type: ignore[no-untyped-def]
    """Every table's cached runs (patched where writes changed entries) equal the runs decoded anew."""
    io = node.driver.io
    l1 = node.driver.clusters.l1
    for (i1, l1e), (runs, starts) in list(io._table_runs.items()):
        assert l1e == int(l1[i1]), "runs cached for an L2 table the L1 no longer names"
        fresh = io._compute_table_runs(i1, l1e)
        assert runs == fresh, (i1, runs, fresh)
        assert starts == [r.guest for r in fresh]


def _allocated_zero(node, offset: int) -> bool:  # type: ignore[no-untyped-def]
    """A zero cluster that still owns a host cluster counts as allocated for compressed writes."""
    r = node.driver.io.run_at(offset, 1)
    return r.host is not None


# -- crash safety by fault injection ------------------------------------------------------------

def _faulty_run(path: Path, op, cut_after: int | None) -> int:  # type: ignore[no-untyped-def]
    """Run ``op(node)``; with ``cut_after``, every image-file write from that one on fails."""
    return run_cut(path, op, cut_after, errors=(OSError, VdkitError), close_errors=(OSError, VdkitError), flush=True)


_FAULT_OPS = [
    lambda n: bio.write(n, 0, b"\x11" * (3 * 4096 + 100)),  # in place + COW of shared clusters (snapshot)
    lambda n: bio.write(n, 40 * 4096 + 10, b"\x22" * 100),  # new L2 table (L1 index 1), partial-cluster COW
    lambda n: bio.write_zeroes(n, 8 * 4096, 4 * 4096, unmap=True),  # zero clusters, frees
    lambda n: bio.discard(n, 16 * 4096, 2 * 4096),  # discard of compressed clusters
    lambda n: bio.write(n, 17 * 4096 + 5, b"\x33" * 10),  # write over a zero cluster
]


def _fault_ops(node, upto: int = len(_FAULT_OPS)) -> None:  # type: ignore[no-untyped-def]
    for op in _FAULT_OPS[:upto]:
        op(node)


def test_guest_writes_survive_every_cut(tmp_path: Path) -> None:
    """After a crash at any write, qemu-img check finds no corruption, every cluster shows the
    content of some state between two operations, and the snapshot is untouched."""
    base = tmp_path / "base.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(base), "1M")
    r = qemu_io("-c", "write -c -P 0x44 64k 4k", "-c", "write -P 0x55 0 64k", "-c", "write -c -P 6 68k 4k",
                str(base))
    assert r.returncode == 0, r.stdout
    check_ok("snapshot", "-c", "s", str(base))
    old = tmp_path / "old.raw"
    check_ok("convert", "-O", "raw", str(base), str(old))
    states = []
    total = 0
    for k in range(len(_FAULT_OPS) + 1):
        done = tmp_path / "done.qcow2"
        shutil.copy(base, done)
        total = _faulty_run(done, lambda n, k=k: _fault_ops(n, k), None)
        out = tmp_path / "state.raw"
        check_ok("convert", "-O", "raw", str(done), str(out))
        states.append(out.read_bytes())
    old_b = old.read_bytes()
    assert total > 5
    for cut in range(total):
        img = tmp_path / f"cut{cut}.qcow2"
        shutil.copy(base, img)
        _faulty_run(img, _fault_ops, cut)
        r = qemu_img("check", str(img))
        assert r.returncode in (0, 3), f"cut {cut}: {r.stdout}{r.stderr}"
        out = tmp_path / "cut.raw"
        check_ok("convert", "-O", "raw", str(img), str(out))
        got = out.read_bytes()
        for c in range(0, len(got), 4096):
            assert any(got[c : c + 4096] == st[c : c + 4096] for st in states), f"cut {cut}: cluster {c // 4096}"
        check_ok("convert", "-l", "s", "-O", "raw", str(img), str(out))
        assert out.read_bytes() == old_b, f"cut {cut}: snapshot changed"
        img.unlink()


def test_zero_cluster_kept_allocated_is_written_in_place_like_qemu(tmp_path: Path) -> None:
    """A zero cluster that keeps its allocation (``write -z`` without unmap, COPIED) is written in
    place by QEMU: the rest of the cluster zeroed, the zero flag cleared, no new cluster.  The same
    writes through vdkit leave a file byte-identical to qemu-io's (a damaged entry's offset past any
    file then fails the write as QEMU's does, seed 215 of tests/diff/test_write_hostile.py)."""
    writes = [(4096, 4096, 2), (70 * 1024, 60 * 1024, 3), (200 * 1024, 64 * 1024, 4)]
    files = {}
    for who in ("qemu", "vdkit"):
        img = tmp_path / f"{who}.qcow2"
        check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(img), "1M")
        r = qemu_io("-f", "qcow2", "-c", "write -P 1 0 320k", "-c", "write -z 0 320k", str(img))
        assert r.returncode == 0, r.stdout
        if who == "qemu":
            r = qemu_io("-f", "qcow2", *[a for off, n, p in writes for a in ("-c", f"write -P {p} {off} {n}")],
                        str(img))
            assert r.returncode == 0, r.stdout
        else:
            node = open_image(str(img), readonly=False)
            try:
                for off, n, p in writes:
                    bio.write(node, off, bytes([p]) * n)
            finally:
                node.close()
        files[who] = img.read_bytes()
    assert files["vdkit"] == files["qemu"]
    assert qemu_img("check", str(tmp_path / "vdkit.qcow2")).returncode == 0


def test_new_l2_table_is_ordered_with_one_sync_before_its_l1_entry(tmp_path: Path) -> None:
    """A write that needs a new L2 table: its refcount and the table are both written, then one sync,
    then the L1 entry (and its sync); nothing names the table before both are durable, and the
    count's own sync before the table's write is not needed for that order."""
    img = tmp_path / "t.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "64M")
    node = open_image(str(img), readonly=False)
    try:
        drv = node.driver
        f = drv.file
        log: list[tuple[str, int, int]] = []
        real_pwrite, real_flush = f.pwrite, f.flush
        f.pwrite = lambda off, data: (log.append(("w", off, len(data))), real_pwrite(off, data))[1]
        f.flush = lambda: (log.append(("sync", 0, 0)), real_flush())[1]
        span = drv.geometry.l1_span
        bio.write(node, 3 * span + 8192, b"\x42" * 4096)  # L1 index 3: a new table
        l1_entry = drv.clusters.l1_offset + 3 * 8
        table = int(drv.clusters.l1[3]) & ((1 << 56) - 512)
        i_l1 = log.index(("w", l1_entry, 8))
        i_table = log.index(("w", table, 4096))
        counts = [i for i, (k, off, n) in enumerate(log[:i_table]) if k == "w" and n == 4096]
        assert counts, log  # the refcount block with the table's count went out before the table
        syncs = [i for i, (k, _, _) in enumerate(log) if k == "sync"]
        assert [i for i in syncs if counts[0] < i < i_l1] == [i_table + 1], log  # one sync, after both
        assert any(i > i_l1 for i in syncs), log  # and the L1 entry is synced
    finally:
        node.close()
    r = qemu_img("check", str(img))
    assert r.returncode == 0, r.stdout + r.stderr
