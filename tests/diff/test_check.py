"""``vdkit-img check`` against ``qemu-img check`` on the same images.

Images are made by qemu-img/qemu-io, then damaged on purpose with the small
helpers below (which edit L1/L2 entries and refcounts directly), and both
tools must print the same summary, the same diagnostic lines and return the
same exit code, in human and JSON form.  Repairs run on separate copies of
the image for each tool; the repaired vdkit copy must then be clean for
qemu-img and hold the same guest data as before.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_img, qemu_io, require_tool, vdkit_img
from tests.helpers.patching import get_u64, patch, set_u64

# -- image surgery ---------------------------------------------------------------------------------

class Img:
    """Just enough qcow2 parsing to find and patch metadata in a test image."""

    def __init__(self, path: Path) -> None:
        self.path = path
        d = path.read_bytes()[:512]
        self.cluster_bits = struct.unpack(">I", d[20:24])[0]
        self.cs = 1 << self.cluster_bits
        self.l1_size = struct.unpack(">I", d[36:40])[0]
        self.l1_offset, self.rt_offset = struct.unpack(">QQ", d[40:56])
        version = struct.unpack(">I", d[4:8])[0]
        self.refcount_order = struct.unpack(">I", d[96:100])[0] if version >= 3 else 4
        self.rbits = 1 << self.refcount_order

    def u64(self, off: int) -> int:
        return get_u64(self.path, off)

    def put64(self, off: int, value: int) -> None:
        set_u64(self.path, off, value)

    def l1_entry_offset(self, i: int = 0) -> int:
        return self.l1_offset + 8 * i

    def l2_offset(self, i: int = 0) -> int:
        return self.u64(self.l1_entry_offset(i)) & 0x00FFFFFFFFFFFE00

    def l2_entry_offset(self, j: int = 0, i: int = 0) -> int:
        return self.l2_offset(i) + 8 * j

    def data_offset(self, j: int = 0) -> int:
        return self.u64(self.l2_entry_offset(j)) & 0x00FFFFFFFFFFFE00

    def _refcount_pos(self, cluster: int) -> tuple[int, int]:
        per_block = self.cs * 8 // self.rbits
        block = self.u64(self.rt_offset + 8 * (cluster // per_block)) & ~0x1FF
        assert block, "no refcount block for that cluster"
        bit = (cluster % per_block) * self.rbits
        return block + bit // 8, bit % 8

    def set_refcount(self, cluster: int, value: int) -> None:
        pos, shift = self._refcount_pos(cluster)
        with open(self.path, "r+b") as f:
            if self.rbits >= 8:
                f.seek(pos)
                f.write(value.to_bytes(self.rbits // 8, "big"))
            else:
                f.seek(pos)
                byte = f.read(1)[0]
                mask = ((1 << self.rbits) - 1) << shift
                f.seek(pos)
                f.write(bytes([(byte & ~mask) | (value << shift)]))

    def append_cluster(self) -> int:
        """Grow the file by one cluster (aligned); returns its index."""
        size = self.path.stat().st_size
        start = -(-size // self.cs) * self.cs
        with open(self.path, "r+b") as f:
            f.truncate(start + self.cs)
        return start // self.cs


def make(tmp: Path, name: str, *opts: str, size: str = "64M", writes: tuple[str, ...] = ("write -P 0x5a 0 64k",)
         ) -> Path:
    path = tmp / name
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    check_ok(*args, str(path), size)
    for w in writes:
        r = qemu_io("-f", "qcow2", "-c", w, str(path))
        assert r.returncode == 0, r.stderr
    return path


# -- comparing ---------------------------------------------------------------------------------------

def compare(path: Path, *args: str) -> tuple[int, str]:
    """Run both checks on the same (unmodified by them) image; everything must agree."""
    q = qemu_img("check", *args, path.name, cwd=path.parent)
    v = vdkit_img("check", *args, path.name, cwd=path.parent)
    assert v.stdout == q.stdout, f"stdout differs for check {args}:\n{q.stdout}\n---\n{v.stdout}"
    assert v.normalized_stderr() == q.stderr, f"stderr differs for check {args}:\n{q.stderr}\n---\n{v.stderr}"
    assert v.returncode == q.returncode
    return q.returncode, q.stdout


def raw_data(path: Path) -> bytes:
    out = path.with_suffix(".rawdump")
    check_ok("convert", "-U", "-O", "raw", str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def compare_repair(path: Path, mode: str, *extra: str, same_bytes: bool = True, opens: bool = True) -> None:
    """Repair two copies, one per tool: same output; the vdkit copy ends clean with the same data.

    ``opens=False``: the damaged image cannot be opened normally (no guest data to compare before).
    """
    before = raw_data(path) if mode == "leaks" and opens else None
    qcopy = path.with_name("q_" + path.name)
    vcopy = path.with_name("v_" + path.name)
    shutil.copy(path, qcopy)
    shutil.copy(path, vcopy)
    q = qemu_img("check", "-r", mode, *extra, qcopy.name, cwd=path.parent)
    v = vdkit_img("check", "-r", mode, *extra, vcopy.name, cwd=path.parent)
    assert v.stdout == q.stdout.replace(qcopy.name, vcopy.name), f"{q.stdout}\n---\n{v.stdout}"
    assert v.normalized_stderr() == q.stderr, f"{q.stderr}\n---\n{v.stderr}"
    assert v.returncode == q.returncode
    # Repairs write exactly what qemu-img writes (new refcount structures, flags, discards).
    if same_bytes:
        assert vcopy.read_bytes() == qcopy.read_bytes(), f"repaired images differ for -r {mode}"
    after = qemu_img("check", vcopy.name, cwd=path.parent)
    qafter = qemu_img("check", qcopy.name, cwd=path.parent)
    assert after.returncode == qafter.returncode
    if after.returncode == 0:
        assert raw_data(vcopy) == raw_data(qcopy)
    if before is not None:
        assert raw_data(vcopy) == before


def all_modes(path: Path) -> None:
    compare(path)
    compare(path, "--output=json")
    compare_repair(path, "leaks")
    compare_repair(path, "all")
    compare_repair(path, "all", "--output=json")


# -- clean images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    ("refcount_bits=1",), ("refcount_bits=2",), ("refcount_bits=4",), ("refcount_bits=8",),
    ("refcount_bits=32",), ("refcount_bits=64",), ("cluster_size=512",), ("cluster_size=4k",),
    ("cluster_size=2M",), ("extended_l2=on",), ("compat=0.10",), ("preallocation=metadata",),
    ("compression_type=zstd",), ("lazy_refcounts=on",),
])
def test_clean(tmp_path: Path, opts: tuple[str, ...]) -> None:
    path = make(tmp_path, "c.qcow2", *opts, size="8M",
                writes=("write -P 1 0 64k", "write -P 2 1M 8k", "write -z 2M 64k"))
    compare(path)
    compare(path, "--output=json")


def test_empty_and_quiet(tmp_path: Path) -> None:
    path = make(tmp_path, "e.qcow2", writes=())
    compare(path)
    compare(path, "-q")
    compare(path, "-q", "--output=json")


def test_compressed(tmp_path: Path) -> None:
    path = make(tmp_path, "z.qcow2", size="4M", writes=("write -c -P 3 0 64k", "write -c -P 4 64k 64k",
                                                         "write -P 5 1M 64k"))
    compare(path)
    compare(path, "--output=json")


def test_snapshots(tmp_path: Path) -> None:
    path = make(tmp_path, "s.qcow2", size="4M", writes=("write -P 1 0 128k",))
    check_ok("snapshot", "-c", "one", str(path))
    assert qemu_io("-c", "write -P 2 0 64k", str(path)).returncode == 0
    check_ok("snapshot", "-c", "two", str(path))
    compare(path)
    compare(path, "--output=json")


def test_data_file(tmp_path: Path) -> None:
    path = make(tmp_path, "d.qcow2", f"data_file={tmp_path / 'd.raw'}", size="4M")
    compare(path)


# -- leaks and corruptions -----------------------------------------------------------------------------

def test_leak(tmp_path: Path) -> None:
    path = make(tmp_path, "leak.qcow2")
    img = Img(path)
    img.set_refcount(img.append_cluster(), 1)
    all_modes(path)


@pytest.mark.parametrize("bits", [1, 4, 64])
def test_leak_narrow_and_wide(tmp_path: Path, bits: int) -> None:
    path = make(tmp_path, "leakw.qcow2", f"refcount_bits={bits}")
    img = Img(path)
    img.set_refcount(img.append_cluster(), 1)
    compare(path)
    compare_repair(path, "leaks")


def test_refcount_too_low(tmp_path: Path) -> None:
    path = make(tmp_path, "low.qcow2")
    img = Img(path)
    img.set_refcount(img.data_offset() // img.cs, 0)
    all_modes(path)


def test_refcount_too_high(tmp_path: Path) -> None:
    path = make(tmp_path, "high.qcow2")
    img = Img(path)
    img.set_refcount(img.data_offset() // img.cs, 2)
    all_modes(path)


def test_refcount_lower_but_nonzero(tmp_path: Path) -> None:
    path = make(tmp_path, "low2.qcow2", size="4M", writes=("write -c -P 7 0 64k", "write -c -P 8 64k 64k"))
    img = Img(path)
    cluster = (img.u64(img.l2_entry_offset(0)) & ((1 << 54) - 1)) // img.cs
    img.set_refcount(cluster, 1)
    all_modes(path)


def test_l2_entry_outside_file(tmp_path: Path) -> None:
    path = make(tmp_path, "out.qcow2")
    img = Img(path)
    img.put64(img.l2_entry_offset(1), (1 << 63) | (1 << 40))
    compare(path)
    compare(path, "--output=json")
    compare_repair(path, "all")


def test_overlapping_tables(tmp_path: Path) -> None:
    path = make(tmp_path, "ovl.qcow2")
    img = Img(path)
    img.put64(img.l2_entry_offset(1), (1 << 63) | img.l1_offset)
    all_modes(path)


def test_reserved_bits(tmp_path: Path) -> None:
    path = make(tmp_path, "res.qcow2")
    img = Img(path)
    img.put64(img.l2_entry_offset(0), img.u64(img.l2_entry_offset(0)) | 0x2)
    img.put64(img.l1_entry_offset(0), img.u64(img.l1_entry_offset(0)) | (1 << 57))
    compare(path)
    compare(path, "--output=json")


def test_copied_mismatch(tmp_path: Path) -> None:
    path = make(tmp_path, "cop.qcow2")
    img = Img(path)
    img.put64(img.l2_entry_offset(0), img.u64(img.l2_entry_offset(0)) & ~(1 << 63))
    img.put64(img.l1_entry_offset(0), img.u64(img.l1_entry_offset(0)) & ~(1 << 63))
    all_modes(path)


def test_unaligned_l2_offset(tmp_path: Path) -> None:
    path = make(tmp_path, "ual.qcow2")
    img = Img(path)
    img.put64(img.l1_entry_offset(0), img.u64(img.l1_entry_offset(0)) + 0x200)
    compare(path)
    compare(path, "--output=json")


def test_unaligned_preallocated_zero_cluster(tmp_path: Path) -> None:
    path = make(tmp_path, "upz.qcow2")
    img = Img(path)
    img.put64(img.l2_entry_offset(3), (img.data_offset() + 0x200) | 1)
    compare(path)
    compare_repair(path, "all")


def test_refcount_table_reserved_bits(tmp_path: Path) -> None:
    path = make(tmp_path, "rt.qcow2")
    img = Img(path)
    img.put64(img.rt_offset, img.u64(img.rt_offset) | 0x1)
    compare(path)
    compare_repair(path, "leaks")


def test_corrupt_bit_cleared_by_repair(tmp_path: Path) -> None:
    path = make(tmp_path, "cb.qcow2")
    img = Img(path)
    img.put64(72, img.u64(72) | 2)
    compare(path)
    compare_repair(path, "all")
    assert "corrupt: true" not in check_ok("info", str(path.with_name("v_" + path.name))).stdout


def test_dirty_after_killed_writer(tmp_path: Path) -> None:
    require_tool("qemu-io")
    path = make(tmp_path, "dirty.qcow2", "lazy_refcounts=on", writes=())
    r = subprocess.run(["qemu-io", "-c", "write -P 9 0 64k", "-c", "write -P 9 1M 64k", "-c", "abort",
                        str(path)], capture_output=True, timeout=60)
    assert r.returncode != 0
    assert "cleanly shut down: no" in check_ok("info", "-U", str(path)).stdout
    compare(path)
    compare(path, "--output=json")
    compare_repair(path, "all")
    info = check_ok("info", str(path.with_name("v_" + path.name))).stdout
    assert "cleanly shut down: no" not in info


# -- errors ----------------------------------------------------------------------------------------------

def test_raw_and_usage(tmp_path: Path) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    compare(raw)
    compare(raw, "-f", "raw")
    path = make(tmp_path, "u.qcow2", writes=())
    for args in (["-r", "foo"], ["--output=xml"], ["-U", "-r", "leaks"]):
        compare(path, *args)
    q = qemu_img("check", "nonexist.qcow2", cwd=tmp_path)
    v = vdkit_img("check", "nonexist.qcow2", cwd=tmp_path)
    assert (v.normalized_stderr(), v.returncode) == (q.stderr, q.returncode)


# -- more metadata damage ----------------------------------------------------------------------------

def _snapshot_table_offset(path: Path) -> int:
    return get_u64(path, 64)


@pytest.mark.parametrize("case", ["refblock_outside", "refblock_unaligned", "l2_beyond_eof", "compressed_copied",
                                  "snapshot_l1_unaligned", "snapshot_incomplete", "leak_2bit"])
def test_more_damage(tmp_path: Path, case: str) -> None:
    opts = ("refcount_bits=2",) if case == "leak_2bit" else ()
    writes = ("write -c -P 1 0 64k",) if case == "compressed_copied" else ("write -P 1 0 64k",)
    path = make(tmp_path, f"{case}.qcow2", *opts, writes=writes)
    if case.startswith("snapshot"):
        check_ok("snapshot", "-c", "s1", str(path))
    img = Img(path)
    if case == "refblock_outside":
        img.put64(img.rt_offset + 8, 100 << 20)
    elif case == "refblock_unaligned":
        img.put64(img.rt_offset, img.u64(img.rt_offset) + 0x200)
    elif case == "l2_beyond_eof":
        img.put64(img.l1_entry_offset(1), (1 << 63) | (1 << 36))
    elif case == "compressed_copied":
        img.put64(img.l2_entry_offset(0), img.u64(img.l2_entry_offset(0)) | (1 << 63))
    elif case == "snapshot_l1_unaligned":
        sn = _snapshot_table_offset(path)
        img.put64(sn, img.u64(sn) + 0x200)
    elif case == "snapshot_incomplete":
        with open(path, "r+b") as f:
            f.seek(_snapshot_table_offset(path) + 36)
            f.write(struct.pack(">I", 8))
    else:
        img.set_refcount(img.append_cluster(), 3)
    compare(path)
    compare_repair(path, "leaks")
    compare_repair(path, "all")


@pytest.mark.parametrize("case", ["overflow_1bit", "overflow_2bit", "extl2_bitmap_both", "extl2_unallocated_bitmap",
                                  "extl2_compressed_bitmap", "l1_reserved_bit"])
def test_bitmaps_and_overflow(tmp_path: Path, case: str) -> None:
    opts = {"overflow_1bit": ("refcount_bits=1",), "overflow_2bit": ("refcount_bits=2",),
            "l1_reserved_bit": ()}.get(case, ("extended_l2=on",))
    writes = ("write -c -P 1 0 64k",) if case == "extl2_compressed_bitmap" else ("write -P 1 0 64k",)
    path = make(tmp_path, f"{case}.qcow2", *opts, writes=writes)
    img = Img(path)
    if case.startswith("overflow"):
        for j in range(1, 2 if case == "overflow_1bit" else 5):
            img.put64(img.l2_entry_offset(j), img.u64(img.l2_entry_offset(0)))
    elif case == "extl2_bitmap_both":
        img.put64(img.l2_offset(0) + 8, 0xFFFFFFFFFFFFFFFF)
    elif case == "extl2_unallocated_bitmap":
        img.put64(img.l2_offset(0) + 24, 0x1)
    elif case == "extl2_compressed_bitmap":
        img.put64(img.l2_offset(0) + 8, 0x1)
    else:
        img.put64(img.l1_entry_offset(0), img.u64(img.l1_entry_offset(0)) | 0x1)
    compare(path)
    compare_repair(path, "all")


def test_persistent_bitmaps(tmp_path: Path) -> None:
    """Bitmap directory, tables and data clusters are counted as references."""
    path = make(tmp_path, "bm.qcow2", writes=("write -P 1 0 1M",))
    check_ok("bitmap", "--add", str(path), "b0")
    check_ok("bitmap", "--add", "-g", "512k", str(path), "b1")
    assert qemu_io("-c", "write -P 2 2M 1M", str(path)).returncode == 0
    compare(path)
    compare(path, "--output=json")
    img = Img(path)
    img.set_refcount(img.append_cluster(), 1)
    # qemu-img also rewrites the bitmap directory when it opens the image writable; vdkit does not
    compare_repair(path, "leaks", same_bytes=False)


# -- phase 1: the snapshot table --------------------------------------------------------------------

_SN = struct.Struct(">QIHHIIQII")


def _snapshot_entries(path: Path) -> tuple[int, list[bytes]]:
    """The header's table offset and the raw entries (header, extra data, id, name) of the table."""
    d = path.read_bytes()
    nb, off = struct.unpack(">IQ", d[60:72])
    out, p = [], off
    for _ in range(nb):
        p = (p + 7) & ~7
        f = _SN.unpack(d[p : p + 40])
        n = 40 + f[8] + f[2] + f[3]
        out.append(d[p : p + n])
        p += n
    return off, out


def _pack_entries(entries: list[bytes]) -> bytes:
    out = bytearray()
    for e in entries:
        out += bytes(((len(out) + 7) & ~7) - len(out)) + e
    return bytes(out)


def _with_extra_size(entry: bytes, size: int, *, carry: bool = True) -> bytes:
    """Change an entry's extra_data_size; ``carry`` also stores that many extra bytes (0xab filled)."""
    f = list(_SN.unpack(entry[:40]))
    old = f[8]
    f[8] = size
    extra, rest = entry[40 : 40 + old], entry[40 + old :]
    return _SN.pack(*f) + (extra[:size].ljust(size, b"\xab") if carry else extra) + rest


def _snapshot_image(tmp: Path, case: str) -> Path:
    nsnap = {"too_many": 1, "too_many_past_eof": 1, "table_cut": 3, "old_table_past_eof": 4}.get(case, 2)
    opts = ("compat=0.10",) if case in ("too_many", "table_too_big") else ()
    path = make(tmp, f"{case}.qcow2", *opts, size="4M")
    for i in range(nsnap):
        check_ok("snapshot", "-c", f"s{i}", str(path))
    off, ents = _snapshot_entries(path)
    img = Img(path)
    if case == "extra_too_big":  # 2000 bytes of extra data, stored in place (the table stays in its cluster)
        ents[1] = _with_extra_size(ents[1], 2000)
        patch(path, off, _pack_entries(ents))
    elif case == "table_cut":  # extra data claimed beyond INT_MAX: the table is cut before that entry
        ents[1] = _with_extra_size(ents[1], 0x80000000, carry=False)
        patch(path, off, _pack_entries(ents))
    elif case == "old_table_past_eof":  # 65 MiB of extra data (not there): freeing the old table fails
        ents[2] = _with_extra_size(ents[2], 65 << 20, carry=False)
        ents[1] = _with_extra_size(ents[1], 2000)
        patch(path, off, _pack_entries(ents[:3]))
    elif case == "offset_unaligned":
        set_u64(path, 64, off + 8)
    elif case == "too_many_past_eof":  # 70000 entries, all but the first past the end of the file
        patch(path, 60, struct.pack(">I", 70000))
    elif case == "table_too_big":  # 513 entries with 64 KiB ids and names (zeros): 64 MiB are reached at #511
        start = -(-path.stat().st_size // img.cs) * img.cs
        heads, pos = [], 0
        for _ in range(513):
            pos = (pos + 7) & ~7
            heads.append(pos)
            pos += 40 + 2 * 0xFFFF
        n = -(-pos // img.cs)
        with open(path, "r+b") as fh:  # sparse: only the entry headers are written
            fh.truncate(start + n * img.cs)
            for h in heads:
                fh.seek(start + h)
                fh.write(_SN.pack(0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 0))
        for c in range(start // img.cs, start // img.cs + n):
            img.set_refcount(c, 1)
        img.set_refcount(off // img.cs, 0)
        patch(path, 60, struct.pack(">IQ", 513, start))
    else:  # too_many: 70000 entries (all but the first zero) in sparse, properly allocated clusters
        start = -(-path.stat().st_size // img.cs) * img.cs
        table = _pack_entries(ents)
        n = -(-(len(table) + 40 * 69999) // img.cs)
        with open(path, "r+b") as fh:
            fh.truncate(start + n * img.cs)
        patch(path, start, table)
        for c in range(start // img.cs, start // img.cs + n):
            img.set_refcount(c, 1)
        img.set_refcount(off // img.cs, 0)
        patch(path, 60, struct.pack(">IQ", 70000, start))
    return path


@pytest.mark.parametrize("case", ["extra_too_big", "table_cut", "too_many", "offset_unaligned",
                                  "old_table_past_eof", "too_many_past_eof", "table_too_big"])
def test_snapshot_table_damage(tmp_path: Path, case: str) -> None:
    path = _snapshot_image(tmp_path, case)
    for cmd in (("info",), ("snapshot", "-l")):  # a normal open fails as qemu-img's does
        q = qemu_img(*cmd, path.name, cwd=tmp_path)
        v = vdkit_img(*cmd, path.name, cwd=tmp_path)
        assert q.returncode == 1
        assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    compare(path)
    if case.startswith("too_many") or case == "table_too_big":
        # 65536 snapshots make every qemu-img run slow, and the 64 MiB table is kept sparse: one
        # repair, byte-identical results and a clean qemu-img check of vdkit's copy.  Past EOF, the
        # table rewrite hits the old table: the image is marked corrupt and the check fails (exit 1),
        # as with qemu-img.
        copies = [path.with_name(p + path.name) for p in ("q_", "v_")]
        for c in copies:
            subprocess.run(["cp", "--sparse=always", str(path), str(c)], check=True)
        q = qemu_img("check", "-r", "all", copies[0].name, cwd=tmp_path)
        v = vdkit_img("check", "-r", "all", copies[1].name, cwd=tmp_path)
        assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout.replace("q_", "v_"),
                                                                   q.stderr)
        assert copies[0].read_bytes() == copies[1].read_bytes()
        if case != "too_many_past_eof":
            assert q.returncode == 0 and "Discarding" in q.stderr
            assert qemu_img("check", copies[1].name, cwd=tmp_path).returncode == 0
        return
    compare(path, "--output=json")
    compare_repair(path, "leaks", opens=False)
    compare_repair(path, "all", opens=False)
    compare_repair(path, "all", "--output=json", opens=False)
    vcopy = path.with_name("v_" + path.name)
    qcopy = path.with_name("q_" + path.name)
    lists = [qemu_img("snapshot", "-l", p.name, cwd=tmp_path) for p in (qcopy, vcopy)]
    assert lists[0].returncode == lists[1].returncode == (1 if case == "offset_unaligned" else 0)
    assert lists[0].stdout == lists[1].stdout
