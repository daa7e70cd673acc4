"""``vdkit-img check`` on hostile and randomly damaged images, against ``qemu-img check``.

Three kinds of cases:

* named regressions (empty extended-L2 images, refcount blocks far past the end of the file,
  refcount blocks on top of other metadata, overflow order, repairs that QEMU's metadata overlap
  check refuses);
* a resource-limited run: vdkit-img must never allocate memory in proportion to an offset an image
  claims (``RLIMIT_AS`` in the child, so a regression fails instead of eating the machine);
* a seeded random-corruption sweep (:func:`damaged_image`): small images with 1/2/16-bit refcounts
  and 512/4096/65536-byte clusters, random damage to header fields, L1/L2 entries, refcount tables
  and blocks and snapshot tables; ``check``, ``check --output=json``, ``check -r leaks`` and
  ``check -r all`` (on copies) must agree with qemu-img in stdout, stderr, exit code and the bytes
  of the repaired image.  ``python -m tests.diff.test_check_hostile FIRST COUNT`` runs a longer
  sweep by hand.
"""

from __future__ import annotations

import random
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _ENV, check_ok, data_extents, qemu_img, qemu_io, require_tool
from tests.diff.test_check import Img, compare, compare_repair, make
from tests.helpers.patching import get_u64, set_u64, u64_of

# -- named cases -----------------------------------------------------------------------------------------


def _all_modes(path: Path, *, json: bool = True) -> None:
    compare(path)
    if json:
        compare(path, "--output=json")
    compare_repair(path, "leaks", opens=False)
    compare_repair(path, "all", opens=False)


@pytest.mark.parametrize("size", ["1M", "0"])
@pytest.mark.parametrize("snapshot", [False, True])
def test_empty_extended_l2(tmp_path: Path, size: str, snapshot: bool) -> None:
    """No L2 table at all (and an empty snapshot L1): nothing to reshape, nothing found."""
    path = make(tmp_path, "e.qcow2", "extended_l2=on", size=size, writes=())
    if snapshot:
        check_ok("snapshot", "-c", "s1", str(path))
    _all_modes(path)
    compare_repair(path, "all", "--output=json", opens=False)


def test_empty_l1_and_snapshot_with_empty_l1(tmp_path: Path) -> None:
    path = make(tmp_path, "z.qcow2", "cluster_size=512", size="0", writes=())
    check_ok("snapshot", "-c", "s1", str(path))
    _all_modes(path)


def test_refblock_past_file_size_limit(tmp_path: Path) -> None:
    """-r all cannot grow the file to a refcount block at 2^51: reported, then the refcounts are rebuilt."""
    path = make(tmp_path, "far.qcow2", size="4M")
    img = Img(path)
    set_u64(path, img.rt_offset + 8, 1 << 51)
    _all_modes(path)


def test_refblock_on_refcount_table_1bit(tmp_path: Path) -> None:
    """A refcount block entry pointing at the table itself: one overflow (counted saturating), one error."""
    path = make(tmp_path, "ov.qcow2", "cluster_size=512", "refcount_bits=1", size="4M", writes=("write 0 4k",))
    img = Img(path)
    set_u64(path, img.rt_offset + 16, img.rt_offset)
    _all_modes(path)


def test_overflow_reported_in_walk_order(tmp_path: Path) -> None:
    """Overflow lines come where the reference is counted, before a later entry's reserved-bit error."""
    path = make(tmp_path, "order.qcow2", "refcount_bits=1", size="4M", writes=("write 0 192k",))
    img = Img(path)
    set_u64(path, img.l2_entry_offset(1), img.u64(img.l2_entry_offset(0)))
    set_u64(path, img.l2_entry_offset(2), img.u64(img.l2_entry_offset(2)) | 0x100)
    _all_modes(path)


def test_copied_repair_refused_by_overlap_check(tmp_path: Path) -> None:
    """An L1 entry naming an unaligned L2 table inside the header cluster: the COPIED fix would write the
    header, QEMU's overlap check refuses it (corruption event, check fails); the rebuild before it and the
    refcount fixes that were never written back end up as qemu-img leaves them."""
    path = make(tmp_path, "ovl.qcow2", size="4M")
    img = Img(path)
    set_u64(path, img.l1_offset, 0x800000000000C632)
    _all_modes(path)


def test_unaligned_refblock_then_rebuild(tmp_path: Path) -> None:
    """A corruption event (unaligned refcount block) early in -r all: the rebuild still runs, the
    double check finds no driver left (ENOMEDIUM) and the leak fix made after the rebuild is dropped."""
    path = make(tmp_path, "ur.qcow2", size="4M")
    img = Img(path)
    set_u64(path, img.rt_offset, 0x54B0)
    _all_modes(path)


def test_rebuilt_refblock_hits_old_refblock(tmp_path: Path) -> None:
    """The rebuild wants a cluster an old refcount table entry (with reserved bits, so not counted) still
    names: the overlap check refuses the refblock write (ERROR writing refblock, check fails)."""
    path = make(tmp_path, "rb.qcow2", "cluster_size=512", size="4M", writes=("write 0 4k",))
    img = Img(path)
    set_u64(path, img.rt_offset + 8, path.stat().st_size | 1)
    _all_modes(path)


def test_refblock_with_reserved_bits_and_garbage(tmp_path: Path) -> None:
    path = make(tmp_path, "rg.qcow2", "cluster_size=512", size="4M", writes=("write 0 4k",))
    img = Img(path)
    set_u64(path, img.rt_offset, (img.u64(img.rt_offset) + 0x1000) | 0x100)
    _all_modes(path)


def test_overlap_order_inactive_l1_before_refcount_block(tmp_path: Path) -> None:
    """The rebuilt refblock's cluster is both a snapshot's (unaligned, so uncounted) L1 table and an old
    refcount table entry's (reserved bits, uncounted) block: QEMU names the inactive L1 table."""
    path = make(tmp_path, "oo.qcow2", "cluster_size=512", size="4M", writes=("write 0 4k",))
    check_ok("snapshot", "-c", "s1", str(path))
    img = Img(path)
    sn = get_u64(path, 64)
    l1 = img.u64(sn)
    set_u64(path, sn, l1 + 0x10)
    set_u64(path, img.rt_offset + 8, l1 | 1)
    _all_modes(path)


def test_preallocated_fix_refused_by_overlap_check(tmp_path: Path) -> None:
    """An L1 entry naming the L1 table as an L2 table, holding an unaligned preallocated zero cluster:
    the L2 entry fix would write into the active L1 table ('ERROR: Overlap check failed')."""
    path = make(tmp_path, "pz.qcow2", size="4G")
    img = Img(path)
    set_u64(path, img.l1_entry_offset(1), img.l1_offset | 1 << 63)
    set_u64(path, img.l1_entry_offset(3), (img.data_offset() + 0x200) | 1)
    _all_modes(path)


def _limit_memory() -> None:
    limit = 1536 << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def same_file(a: Path, b: Path) -> bool:
    """Byte equality for files that repairs may have grown to terabytes (sparse): only data ranges are read."""
    import os

    if a.stat().st_size != b.stat().st_size:
        return False
    ranges = sorted(data_extents(a) + data_extents(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in ranges:
            for off in range(start, end, 64 << 20):
                n = min(64 << 20, end - off)
                if os.pread(fa.fileno(), n, off) != os.pread(fb.fileno(), n, off):
                    return False
    return True


def test_far_refblock_memory_bounded(tmp_path: Path) -> None:
    """A refcount block at 512 GiB in a 512-byte-cluster, 1-bit image: -r all grows the (sparse) file there.

    QEMU needs a bit per cluster of the grown file; vdkit must not allocate in proportion to the
    offset either: it runs under a 1.5 GiB address-space limit, and must still do what qemu-img does.
    """
    path = make(tmp_path, "mem.qcow2", "cluster_size=512", "refcount_bits=1", size="4M", writes=("write 0 64k",))
    img = Img(path)
    set_u64(path, img.rt_offset, 0x8000000400)
    compare(path)
    qc, vc = tmp_path / "q_mem.qcow2", tmp_path / "v_mem.qcow2"
    for c in (qc, vc):
        subprocess.run(["cp", "--sparse=always", str(path), str(c)], check=True)
    q = qemu_img("check", "-r", "all", qc.name, cwd=tmp_path)
    v = subprocess.run([sys.executable, "-m", "vdkit.cli.main", "check", "-r", "all", vc.name], cwd=tmp_path,
                       capture_output=True, text=True, env=_ENV, preexec_fn=_limit_memory, timeout=300)
    assert "MemoryError" not in v.stderr and "internal error" not in v.stderr, v.stderr[-2000:]
    assert (v.returncode, v.stdout.replace("v_", "q_"), v.stderr.replace("vdkit-img:", "qemu-img:")) == (
        q.returncode, q.stdout, q.stderr)
    assert q.returncode == 0
    assert same_file(qc, vc)


# -- random damage -------------------------------------------------------------------------------------


def damaged_image(tmp: Path, seed: int) -> tuple[Path, list[str]]:
    """A small qcow2 image built by qemu-img/qemu-io and damaged at random (deterministic per seed)."""
    rnd = random.Random(seed)
    cs = rnd.choice([512, 4096, 65536])
    bits = rnd.choice([1, 2, 16])
    opts = [f"cluster_size={cs}", f"refcount_bits={bits}"]
    if cs == 65536 and rnd.random() < 0.2:
        opts.append("extended_l2=on")
    path = tmp / f"f{seed}.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", ",".join(opts), str(path), "4M")
    cmds: list[str] = []
    for _ in range(rnd.randint(1, 5)):
        off = rnd.randrange(0, 4 << 20, 512)
        ln = min(rnd.choice([512, 4096, 65536, 200000]), (4 << 20) - off)
        if rnd.random() < 0.2 and off % cs == 0 and ln >= cs and "extended_l2=on" not in opts:
            cmds += ["-c", f"write -c -P {rnd.randint(1, 255)} {off} {ln - ln % cs}"]
        else:
            cmds += ["-c", f"write -P {rnd.randint(1, 255)} {off} {ln}"]
    qemu_io("-f", "qcow2", *cmds, str(path))  # (a 1-bit image refuses some writes: what is there is used)
    # (2-bit refcounts can overflow with a snapshot of compressed clusters: then there is no snapshot)
    if bits >= 2 and rnd.random() < 0.4 and qemu_img("snapshot", "-c", "s1", str(path)).returncode == 0:
        qemu_io("-f", "qcow2", "-c", f"write -P 9 0 {cs}", str(path))
    d = bytearray(path.read_bytes())
    l1off, rtoff = u64_of(d, 40), u64_of(d, 48)
    snoff = u64_of(d, 64)
    rb0 = u64_of(d, rtoff) & ~0x1FF
    l2_0 = u64_of(d, l1off) & 0x00FFFFFFFFFFFE00
    targets = [("reftable", rtoff), ("l1", l1off)]
    if rb0:
        targets.append(("refblock", rb0))
    if l2_0:
        targets += [("l2", l2_0)] * 2
    if int.from_bytes(d[60:64], "big"):  # snapshots
        targets.append(("snapshot table", snoff))
    desc: list[str] = []
    for _ in range(rnd.randint(1, 3)):
        kind, base = rnd.choice(targets)
        if rnd.random() < 0.05:  # a header field
            field = rnd.choice([36, 40, 48, 56, 60, 64])
            width = 4 if field in (36, 56, 60) else 8
            old = int.from_bytes(d[field : field + width], "big")
            new = rnd.choice([0, 1, old + 1, old ^ (1 << rnd.randrange(width * 8)), cs, len(d)])
            d[field : field + width] = (new & ((1 << (width * 8)) - 1)).to_bytes(width, "big")
            desc.append(f"header@{field}={new:#x}")
            continue
        off = base + 8 * rnd.randrange(0, 6)
        if off + 8 > len(d):
            continue
        v = u64_of(d, off)
        r = rnd.random()
        if kind == "refblock" and r < 0.4:
            bo = base + rnd.randrange(0, 16)
            d[bo] ^= 1 << rnd.randrange(8)
            desc.append(f"byte@{bo:#x}")
            continue
        if r < 0.3:
            v ^= 1 << rnd.randrange(0, 64)
        elif r < 0.6:
            v = rnd.choice([0, 1, cs, len(d), len(d) + cs * rnd.randint(0, 5), l1off, rtoff, rb0, l2_0,
                            1 << 62, v + cs, v - cs if v > cs else v, v | 1 << 63, v + 0x200])
        else:
            v = (v & 0xFFFFFFFF00000000) | rnd.getrandbits(16)
        v &= (1 << 64) - 1
        d[off : off + 8] = struct.pack(">Q", v)
        desc.append(f"{kind}@{off:#x}={v:#x}")
    path.write_bytes(bytes(d))
    return path, desc


def _run(cmd: list[str], cwd: Path) -> tuple[int, str, str]:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=120, env=_ENV)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def sweep_case(tmp: Path, seed: int) -> list[str]:
    """Differences between the tools on one random image (empty: none)."""
    path, desc = damaged_image(tmp, seed)
    qimg = require_tool("qemu-img")
    vimg = [sys.executable, "-m", "vdkit.cli.main"]
    out: list[str] = []

    def same(what: str, q: tuple[int, str, str], v: tuple[int, str, str]) -> bool:
        v = (v[0], v[1].replace("v_", "q_"), v[2].replace("vdkit-img:", "qemu-img:").replace("v_", "q_"))
        if q != v:
            out.append(f"seed {seed} {desc} {what}:\n  qemu: {q}\n  vdkit: {v}")
            return False
        return True

    for args in ([], ["--output=json"]):
        same(f"check {args}", _run([qimg, "check", *args, path.name], tmp),
             _run([*vimg, "check", *args, path.name], tmp))
    for mode in ("leaks", "all"):
        qc, vc = tmp / f"q_{path.name}", tmp / f"v_{path.name}"
        shutil.copy(path, qc)
        shutil.copy(path, vc)
        if same(f"-r {mode}", _run([qimg, "check", "-r", mode, qc.name], tmp),
                _run([*vimg, "check", "-r", mode, vc.name], tmp)) and not same_file(qc, vc):
            out.append(f"seed {seed} {desc} -r {mode}: repaired images differ")
    return out


# A fixed subset of the sweep, kept fast; the seeds are simply the first ones.
@pytest.mark.parametrize("seed", range(40))
def test_random_damage(tmp_path: Path, seed: int) -> None:
    diffs = sweep_case(tmp_path, seed)
    assert not diffs, "\n".join(diffs)


if __name__ == "__main__":
    from tests.helpers.limited import sweep_seeds

    sweep_seeds(sweep_case, int(sys.argv[1]), int(sys.argv[2]))
