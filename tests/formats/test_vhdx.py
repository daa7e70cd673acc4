"""VHDX: vdkit-img against qemu-img 7.2 (and vdkit-daemon against qemu-system-x86_64) on images qemu makes.

Every variant is made by qemu-img/qemu-io.  Compared: the read side (info,
map, check, compare, convert), creation and ``convert -O vhdx`` (identical
after masking what qemu-img makes random: the headers' checksums, sequence
numbers and write GUIDs, the page 83 GUID, each log entry's checksum and log
GUID; the masked fields are checked for their structure instead), writes
through the library against qemu-io's, open errors on damaged images, the
log (read-only refusal, replay by ``check -r``), the daemon and a seeded
damage sweep under an address-space limit.
"""

from __future__ import annotations

import random
import shutil
import struct
import sys
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, data_extents, qemu_img, vdkit_img
from tests.formats.ro_diff import same_read_side
from tests.helpers.disk import PATTERN, src_raw
from tests.helpers.limited import Sweep, run_limited
from tests.helpers.patching import damage_at
from tests.helpers.qemu_io import qemu_io_script
from vdkit.formats.vhdx import layout as L

_io = partial(qemu_io_script, fmt="vhdx")  # _io(d, name, [commands]): qemu-io must succeed


# name -> (create options, size, qemu-io commands)
VARIANTS: dict[str, tuple[list[str], str, list[str]]] = {
    "d.vhdx": ([], "4M", PATTERN),
    "m1.vhdx": (["-o", "block_size=1M"], "20M", ["write -P 1 512k 3M", "write -P 2 10M 1M", "write -z 14M 8k",
                                                  "write -P 3 20476k 4k"]),
    "f.vhdx": (["-o", "subformat=fixed"], "4M", PATTERN),
    "fz.vhdx": (["-o", "subformat=fixed,block_state_zero=off,block_size=1M"], "5M", PATTERN),
    "nz.vhdx": (["-o", "block_state_zero=off,log_size=2M"], "12M", ["write -P 4 9M 100k"]),
    "odd.vhdx": ([], "1000", ["write -P 9 0 512"]),
    "empty.vhdx": ([], "3M", []),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vhdx")
    src_raw(d)
    for name, (opts, size, cmds) in VARIANTS.items():
        check_ok("create", "-q", "-f", "vhdx", *opts, name, size, cwd=d)
        if cmds:
            _io(d, name, cmds)
        check_ok("convert", "-O", "raw", name, name + ".raw", cwd=d)
    check_ok("convert", "-O", "vhdx", "src.raw", "c.vhdx", cwd=d)
    check_ok("convert", "-O", "raw", "c.vhdx", "c.vhdx.raw", cwd=d)
    return d


@pytest.mark.parametrize("name", ["d.vhdx", "m1.vhdx", "fz.vhdx", "nz.vhdx", "c.vhdx"])
def test_read_side(images: Path, name: str) -> None:
    same_read_side(images, name, "vhdx", src=name + ".raw", full=name == "d.vhdx")


def test_refusals(images: Path) -> None:
    for args in (["snapshot", "-l", "d.vhdx"], ["snapshot", "-c", "s", "d.vhdx"], ["snapshot", "-a", "s", "d.vhdx"],
                 ["snapshot", "-d", "s", "d.vhdx"], ["create", "-f", "vhdx", "-o", "help"],
                 ["create", "-f", "vhdx", "-o", "help", "x.vhdx"], ["create", "-f", "vhdx", "-b", "d.vhdx", "x.vhdx"],
                 ["map", "-f", "vhdx", "src.raw"], ["info", "-f", "vhdx", "src.raw"]):
        assert_same(args, images)


# -- created files, compared after masking the random fields --------------------------------------

def _items(data: bytes, meta_off: int) -> dict[bytes, tuple[int, int]]:
    count = struct.unpack_from("<H", data, meta_off + 10)[0]
    out = {}
    for i in range(count):
        guid, off, length = struct.unpack_from("<16sII", data, meta_off + 32 + 32 * i)
        out[guid] = (off, length)
    return out


def masked(path: Path) -> tuple[bytes, list[tuple[int, int]]]:
    """The file with qemu-img's random fields zeroed (after checking their structure), and its data extents."""
    data = bytearray(path.read_bytes())
    hdrs = []
    for off in (L.HEADER1_OFFSET, L.HEADER2_OFFSET):
        raw = bytes(data[off:off + L.HEADER_SIZE])
        assert L.crc_ok(raw), f"{path}: header at {off:#x}"
        hdrs.append(L.Header.parse(raw))
        data[off + 4:off + 48] = bytes(44)  # checksum, sequence number, file and data write GUIDs
    h1, h2 = hdrs
    assert h2.sequence == h1.sequence + 1, "header 2 is the current one, one after header 1"
    assert h1.file_write_guid == h2.file_write_guid
    assert h1.log_guid == h2.log_guid == L.ZERO_GUID
    for off in (L.REGION_TABLE_OFFSET, L.REGION_TABLE2_OFFSET):
        assert L.crc_ok(bytes(data[off:off + L.REGION_TABLE_SIZE]))
    meta_off = struct.unpack_from("<Q", data, L.REGION_TABLE_OFFSET + 16 + 32 + 16)[0]
    page83 = _items(bytes(data), meta_off)[L.PAGE83_GUID]
    data[meta_off + page83[0]:meta_off + page83[0] + 16] = bytes(16)
    for pos in range(h1.log_offset, h1.log_offset + h1.log_length, L.LOG_SECTOR):
        if data[pos:pos + 4] == b"loge":
            length = struct.unpack_from("<I", data, pos + 8)[0]
            assert L.crc_ok(bytes(data[pos:pos + length])), f"{path}: log entry at {pos:#x}"
            data[pos + 4:pos + 8] = bytes(4)
            data[pos + 32:pos + 48] = bytes(16)
    return bytes(data), data_extents(path)


def same_masked(q: Path, v: Path) -> None:
    mq, mv = masked(q), masked(v)
    assert mq[0] == mv[0], f"{q.name} and {v.name} differ beyond the random fields"
    assert mq[1] == mv[1], f"allocated ranges differ: {mq[1]} {mv[1]}"


CREATE = [
    ["1000"], ["-o", "subformat=fixed", "4609k"], ["-o", "subformat=fixed,block_state_zero=off", "20M"],
    ["-o", "subformat=fixed,block_state_zero=off,block_size=1M", "4609k"], ["-o", "block_state_zero=off", "4M"],
    ["-o", "subformat=dynamic,block_size=1M", "200G"], ["-o", "block_size=512k,log_size=100k", "4M"],
    ["-o", "block_size=512M,log_size=1536k", "9M"], ["101G"], ["64T"], ["0"],
]
CREATE_ERRORS = [
    ["65T"], ["-o", "block_size=3M", "4M"], ["-o", "log_size=0", "4M"], ["-o", "subformat=foo", "4M"],
    ["-o", "block_state_zero=maybe", "4M"], ["-o", "preallocation=foo", "4M"],
    ["-o", "block_size=3M,log_size=0", "4M"], ["-o", "log_size=0,subformat=foo", "65T"],
    ["-o", "preallocation=metadata", "4M"], ["-o", "nocow=on", "4M"], ["-o", "cluster_size=4k", "4M"],
]


@pytest.mark.parametrize("args", CREATE, ids=lambda a: " ".join(a))
def test_create(tmp_path: Path, args: list[str]) -> None:
    q = qemu_img("create", "-f", "vhdx", *args[:-1], "q.vhdx", args[-1], cwd=tmp_path)
    v = vdkit_img("create", "-f", "vhdx", *args[:-1], "v.vhdx", args[-1], cwd=tmp_path)
    assert (v.returncode, v.stdout.replace("v.vhdx", "q.vhdx"), v.normalized_stderr()) == (
        q.returncode, q.stdout, q.stderr)
    same_masked(tmp_path / "q.vhdx", tmp_path / "v.vhdx")
    if args[-1] != "0":  # qemu-img cannot open the empty disk it creates
        assert_same(["info", "v.vhdx"], tmp_path)


@pytest.mark.parametrize("args", CREATE_ERRORS, ids=lambda a: " ".join(a))
def test_create_errors(tmp_path: Path, args: list[str]) -> None:
    q = qemu_img("create", "-f", "vhdx", *args[:-1], "q.vhdx", args[-1], cwd=tmp_path)
    v = vdkit_img("create", "-f", "vhdx", *args[:-1], "v.vhdx", args[-1], cwd=tmp_path)
    assert (v.returncode, v.stdout.replace("v.vhdx", "q.vhdx"), v.normalized_stderr().replace("v.vhdx", "q.vhdx")) == (
        q.returncode, q.stdout, q.stderr)
    qf, vf = tmp_path / "q.vhdx", tmp_path / "v.vhdx"
    assert qf.exists() == vf.exists()
    if qf.exists():
        assert qf.stat().st_size == vf.stat().st_size


CONVERT = [[], ["-o", "subformat=fixed"], ["-o", "subformat=fixed,block_size=1M"],
           ["-o", "subformat=fixed,block_state_zero=off,block_size=1M"], ["-o", "block_state_zero=off"],
           ["-S", "0", "-o", "block_size=1M,log_size=2M"]]


@pytest.mark.parametrize("opts", CONVERT, ids=lambda a: " ".join(a) or "default")
def test_convert_to_vhdx(images: Path, tmp_path: Path, opts: list[str]) -> None:
    shutil.copy(images / "src.raw", tmp_path)
    check_ok("convert", "-O", "vhdx", *opts, "src.raw", "q.vhdx", cwd=tmp_path)
    v = vdkit_img("convert", "-O", "vhdx", *opts, "src.raw", "v.vhdx", cwd=tmp_path)
    assert v.returncode == 0 and not v.stdout, v.stderr
    same_masked(tmp_path / "q.vhdx", tmp_path / "v.vhdx")
    r = qemu_img("compare", "src.raw", "v.vhdx", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "Images are identical.\n")
    assert qemu_img("check", "v.vhdx", cwd=tmp_path).returncode == 0


def test_convert_many_blocks(tmp_path: Path) -> None:
    """More allocations than the 1 MiB log holds entries: the log wraps around as qemu-img's does."""
    rnd = random.Random(5)
    disk = bytearray(136 << 20)
    for blk in range(136):
        if blk % 17:
            disk[(blk << 20) + 4096:(blk << 20) + 8192] = rnd.randbytes(4096)
    (tmp_path / "big.raw").write_bytes(bytes(disk))
    check_ok("convert", "-O", "vhdx", "-o", "block_size=1M", "big.raw", "q.vhdx", cwd=tmp_path)
    v = vdkit_img("convert", "-O", "vhdx", "-o", "block_size=1M", "big.raw", "v.vhdx", cwd=tmp_path)
    assert v.returncode == 0, v.stderr
    same_masked(tmp_path / "q.vhdx", tmp_path / "v.vhdx")


@pytest.mark.parametrize("base", ["d.vhdx", "fz.vhdx", "empty.vhdx"])
def test_library_writes(images: Path, tmp_path: Path, base: str) -> None:
    """The same writes through vdkit's library and qemu-io give the same file (masked)."""
    import vdkit

    shutil.copy(images / base, tmp_path / "q.vhdx")
    shutil.copy(images / base, tmp_path / "v.vhdx")
    _io(tmp_path, "q.vhdx", ["write -P 0x21 100k 8k", "write -P 0x22 2M 1M"])
    with vdkit.open(tmp_path / "v.vhdx", readonly=False) as node:
        node.write(100 << 10, b"\x21" * 8192)
        node.write(2 << 20, b"\x22" * (1 << 20))
    same_masked(tmp_path / "q.vhdx", tmp_path / "v.vhdx")


# -- damaged images and the log ------------------------------------------------------------------

def _hdr(data: bytearray, slot: int, **fields: object) -> None:
    off = L.HEADER1_OFFSET if slot == 1 else L.HEADER2_OFFSET
    h = L.Header.parse(bytes(data[off:off + L.HEADER_SIZE]))
    for k, val in fields.items():
        setattr(h, k, val)
    data[off:off + L.HEADER_SIZE] = h.pack()


def _rt(data: bytearray, index: int, field: int, value: int, count: int | None = None) -> None:
    off = L.REGION_TABLE_OFFSET
    if count is not None:
        struct.pack_into("<I", data, off + 8, count)
    if index >= 0:
        cur = list(struct.unpack_from("<16sQII", data, off + 16 + 32 * index))
        cur[field] = value
        struct.pack_into("<16sQII", data, off + 16 + 32 * index, *cur)
    data[off:off + L.REGION_TABLE_SIZE] = L.with_crc(bytearray(data[off:off + L.REGION_TABLE_SIZE]))


def _md(data: bytearray, rel: int, fmt: str, *values: object) -> None:
    struct.pack_into(fmt, data, 0x300000 + rel, *values)


DAMAGE = {
    "both_versions": lambda d: (_hdr(d, 1, version=2), _hdr(d, 2, version=2)),
    "same_sequence": lambda d: (_hdr(d, 1, sequence=5), _hdr(d, 2, sequence=5)),
    "log_offset_unaligned": lambda d: (_hdr(d, 1, log_offset=0x100800), _hdr(d, 2, log_offset=0x100800)),
    "rt1_crc": lambda d: d.__setitem__(0x30004, d[0x30004] ^ 1),
    "file_id": lambda d: d.__setitem__(slice(0, 8), b"vhdxfilX"),
    "rt_unknown_required": lambda d: (_rt(d, 2, 0, b"x" * 16, count=3), _rt(d, 2, 3, 1)),
    "rt_duplicate": lambda d: _rt(d, 1, 0, L.BAT_GUID),
    "rt_bat_unaligned": lambda d: _rt(d, 0, 1, 0x200800),
    "rt_bat_in_log": lambda d: _rt(d, 0, 1, 0x80000),
    "rt_bat_past_eof": lambda d: _rt(d, 0, 1, 0x10000000),
    "md_count4": lambda d: _md(d, 10, "<H", 4),
    "block_size_3M": lambda d: _md(d, 0x10000, "<I", 3 << 20),
    "has_parent": lambda d: _md(d, 0x10004, "<I", 2),
    "size_0": lambda d: _md(d, 0x10008, "<Q", 0),
    "size_odd": lambda d: _md(d, 0x10008, "<Q", 1000),
    "bat_state4": lambda d: struct.pack_into("<Q", d, 0x200000, 0x800004),
    "bat_state7": lambda d: struct.pack_into("<Q", d, 0x200000, 0x800007),
    "bat_reserved_bits": lambda d: struct.pack_into("<Q", d, 0x200000, 0x800006 | 8),
    "bat_past_eof": lambda d: struct.pack_into("<Q", d, 0x200000, 0x1000006),
    "bat_on_log": lambda d: struct.pack_into("<Q", d, 0x200000, 0x100006),
    "cut_9M": lambda d: d.__delitem__(slice(9 << 20, None)),
    "parent_locator": lambda d: (_md(d, 10, "<H", 6),
                                 _md(d, 32 + 32 * 5, "<16sIIII", L.PARENT_LOCATOR_GUID, 0x10100, 256, 0, 0)),
}
_JSON_CASES = ("bat_past_eof", "cut_9M", "bat_on_log")
_DATA_CASES = ("bat_state4", "bat_state7", "bat_reserved_bits", "size_odd", "rt_bat_past_eof")


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged(images: Path, tmp_path: Path, case: str) -> None:
    data = bytearray((images / "d.vhdx").read_bytes())
    DAMAGE[case](data)
    (tmp_path / "x.vhdx").write_bytes(bytes(data))
    shutil.copy(images / "d.vhdx.raw", tmp_path)
    for args in (["info", "x.vhdx"], ["check", "-f", "vhdx", "x.vhdx"]):
        assert_same(args, tmp_path)
    if case in _DATA_CASES:
        assert_same(["compare", "-f", "vhdx", "-F", "raw", "x.vhdx", "d.vhdx.raw"], tmp_path)
    elif case in _JSON_CASES:
        assert_same(["check", "-f", "vhdx", "--output=json", "x.vhdx"], tmp_path)


def _needs_replay(images: Path, d: Path, name: str) -> None:
    """m1.vhdx with both headers naming the log GUID of its last entry: the log must be replayed."""
    data = bytearray((images / "m1.vhdx").read_bytes())
    h = L.Header.parse(bytes(data[L.HEADER1_OFFSET:L.HEADER1_OFFSET + L.HEADER_SIZE]))
    last = None
    for pos in range(h.log_offset, h.log_offset + h.log_length, L.LOG_SECTOR):
        if data[pos:pos + 4] == b"loge":
            last = pos
    assert last is not None
    guid = bytes(data[last + 32:last + 48])
    # undo the BAT change the entry carries, so that the replay is what restores it
    off = struct.unpack_from("<Q", data, last + 64 + 16)[0]
    data[off:off + L.LOG_SECTOR] = bytes(L.LOG_SECTOR)
    _hdr(data, 1, log_guid=guid)
    _hdr(data, 2, log_guid=guid)
    (d / name).write_bytes(bytes(data))


def test_log_replay(images: Path, tmp_path: Path) -> None:
    _needs_replay(images, tmp_path, "q.vhdx")
    shutil.copy(tmp_path / "q.vhdx", tmp_path / "v.vhdx")
    for args in (["info", "q.vhdx"], ["check", "q.vhdx"], ["map", "q.vhdx"], ["compare", "q.vhdx", "q.vhdx"],
                 ["convert", "-O", "raw", "q.vhdx", "o.raw"]):
        assert_same(args, tmp_path)
    q = qemu_img("check", "-r", "all", "q.vhdx", cwd=tmp_path)
    v = vdkit_img("check", "-r", "all", "v.vhdx", cwd=tmp_path)
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    qd, vd = bytearray((tmp_path / "q.vhdx").read_bytes()), bytearray((tmp_path / "v.vhdx").read_bytes())
    hq = [L.Header.parse(bytes(qd[o:o + 80])) for o in (L.HEADER1_OFFSET, L.HEADER2_OFFSET)]
    hv = [L.Header.parse(bytes(vd[o:o + 80])) for o in (L.HEADER1_OFFSET, L.HEADER2_OFFSET)]
    assert [h.sequence for h in hq] == [h.sequence for h in hv]
    assert [h.log_guid for h in hq] == [h.log_guid for h in hv] == [L.ZERO_GUID] * 2
    for b in (qd, vd):
        for o in (L.HEADER1_OFFSET, L.HEADER2_OFFSET):
            b[o + 4:o + 48] = bytes(44)
    assert qd == vd
    assert_same(["compare", "q.vhdx", "v.vhdx"], tmp_path)
    # a writable open replays too (the daemon, convert -n targets): leaves the same data
    _needs_replay(images, tmp_path, "w.vhdx")
    import vdkit

    with vdkit.open(tmp_path / "w.vhdx", readonly=False) as node:
        assert node.read(10 << 20, 4096) == b"\x02" * 4096
    assert_same(["compare", "w.vhdx", "q.vhdx"], tmp_path)


def test_log_of_other_guid_ignored(images: Path, tmp_path: Path) -> None:
    data = bytearray((images / "m1.vhdx").read_bytes())
    _hdr(data, 1, log_guid=b"z" * 16)
    _hdr(data, 2, log_guid=b"z" * 16)
    (tmp_path / "x.vhdx").write_bytes(bytes(data))
    for args in (["info", "x.vhdx"], ["check", "x.vhdx"]):
        assert_same(args, tmp_path)
    _hdr(data, 1, log_length=4096)
    _hdr(data, 2, log_length=4096)
    (tmp_path / "y.vhdx").write_bytes(bytes(data))
    assert_same(["info", "y.vhdx"], tmp_path)


# -- the daemon ----------------------------------------------------------------------------------

def test_daemon_drive(tmp_path: Path) -> None:
    from tests.daemon.conftest import Daemons, normalise

    def setup(d: Path) -> None:
        check_ok("create", "-q", "-f", "vhdx", "-o", "block_size=1M", "d.vhdx", "6M", cwd=d)
        _io(d, "d.vhdx", ["write -P 0x66 4k 4k", "write -P 0x67 3M 100k"])

    daemons = Daemons(tmp_path)
    try:
        qm, vm = daemons.pair(["-drive", "file=d.vhdx,format=vhdx,if=none,id=d0"], setup)
        for cmd in ("query-block", "query-named-block-nodes"):
            q = normalise(qm.cmd_line(cmd)).replace(str(tmp_path / "q"), "DIR")
            v = normalise(vm.cmd_line(cmd)).replace(str(tmp_path / "v"), "DIR")
            assert v == q, cmd
        assert normalise(vm.hmp("info block -v")) == normalise(qm.hmp("info block -v"))
        sock = str(tmp_path / "v" / "n.sock")
        assert vm.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
        assert vm.cmd("nbd-server-add", {"device": "d0"}) == {"return": {}}
        r = qemu_img("compare", "-f", "raw", "-F", "vhdx", "-U", f"nbd+unix:///d0?socket={sock}", "d.vhdx",
                     cwd=tmp_path / "v")
        assert (r.returncode, r.stdout) == (0, "Images are identical.\n"), r.stdout + r.stderr
    finally:
        daemons.cleanup()


# -- damage sweep --------------------------------------------------------------------------------

# (start, end) of the structures worth damaging in d.vhdx; checksummed ones get their CRC fixed half the time
_REGIONS = ((0, 16, None), (0x10000, 0x10050, 0x10000), (0x20000, 0x20050, 0x20000), (0x30000, 0x30050, 0x30000),
            (0x100000, 0x1000a0, None), (0x200000, 0x200020, None), (0x300000, 0x3000c0, None),
            (0x310000, 0x310028, None))
_CRC_LEN = {0x10000: L.HEADER_SIZE, 0x20000: L.HEADER_SIZE, 0x30000: L.REGION_TABLE_SIZE}


def _damage(base: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    d = bytearray(base)
    desc = []
    fix = set()
    for _ in range(rng.randint(1, 4)):
        start, end, crc = rng.choice(_REGIONS)
        off = rng.randrange(start, end)
        what = damage_at(d, rng, off, lambda width: (
            0, 1, 2, 6, 512, 4096, 1 << 20, 0x800006, 0x1000006, 3 << 20, (1 << (8 * width)) - 1, 1 << (8 * width - 1),
            rng.randrange(1 << (8 * width))), "little")
        if crc is not None and rng.random() < 0.7:
            fix.add(crc)
        desc.append(what)
    for crc in fix:
        d[crc:crc + _CRC_LEN[crc]] = L.with_crc(bytearray(d[crc:crc + _CRC_LEN[crc]]))
    return bytes(d), desc


@pytest.mark.parametrize("chunk", range(1))
def test_damage_sweep(images: Path, tmp_path: Path, chunk: int) -> None:
    base = (images / "d.vhdx").read_bytes()
    sweep = Sweep(tmp_path)
    for seed in range(chunk * 10, chunk * 10 + 10):
        data, desc = _damage(base, random.Random(seed))
        sweep.label = f"seed {seed} {desc}"
        (tmp_path / "s.vhdx").write_bytes(data)
        runs = [["info", "--output=json", "s.vhdx"], ["check", "-f", "vhdx", "s.vhdx"],
                ["convert", "-f", "vhdx", "-O", "raw", "s.vhdx", "OUT.raw"]]
        for args in runs:
            sweep.both(args)
        sweep.conversions_alike(extents=False)
    sweep.done()


def test_convert_into_existing(images: Path, tmp_path: Path) -> None:
    """convert -n: no zero initialisation is assumed, zeros are written as data (allocating blocks)."""
    shutil.copy(images / "src.raw", tmp_path)
    for name in ("q.vhdx", "v.vhdx"):
        check_ok("create", "-q", "-f", "vhdx", "-o", "block_size=1M", name, "8M", cwd=tmp_path)
    check_ok("convert", "-n", "-O", "vhdx", "src.raw", "q.vhdx", cwd=tmp_path)
    v = vdkit_img("convert", "-n", "-O", "vhdx", "src.raw", "v.vhdx", cwd=tmp_path)
    assert v.returncode == 0, v.stderr
    mq, mv = masked(tmp_path / "q.vhdx"), masked(tmp_path / "v.vhdx")
    assert mq[0] == mv[0]


def test_huge_bat_under_memory_limit(images: Path, tmp_path: Path) -> None:
    """A 64 TiB disk of 1 MiB blocks: a 512 MiB BAT in a sparse file.  vdkit reads it (as qemu-img does)
    within an address-space limit of 1 GiB: the scan goes 8 MiB at a time."""
    data = bytearray((images / "d.vhdx").read_bytes()[:4 << 20])
    meta = bytes(data[0x300000:0x400000])
    data[0x200000:0x400000] = bytes(0x200000)
    struct.pack_into("<Q", data, 0x300000 - 0x100000, 0)  # no block allocated
    _md_off = 0x30000000
    _rt(data, 0, 2, 0x20100000)
    _rt(data, 1, 1, _md_off)
    path = tmp_path / "h.vhdx"
    with open(path, "wb") as f:
        f.write(data)
        f.seek(_md_off)
        f.write(meta)
    with open(path, "r+b") as f:
        f.seek(_md_off + 0x10000)
        f.write(struct.pack("<II", 1 << 20, 0) + struct.pack("<Q", 64 << 40))
    for args in (["info", "h.vhdx"],):
        q = qemu_img(*args, cwd=tmp_path)
        v = run_limited([sys.executable, "-m", "vdkit.cli.main", *args], tmp_path, limit=True)
        assert (v[0], v[1], v[2].replace("vdkit-img:", "qemu-img:")) == (q.returncode, q.stdout, q.stderr)
    assert "virtual size: 64 TiB" in qemu_img("info", "h.vhdx", cwd=tmp_path).stdout


# -- damaged logs: which entries count, which damage refuses the image, what a replay checks --------

_E = 0x100000  # the first log entry of m1.vhdx (sequence number 1)
LOG_DAMAGE = {
    "data_signature": lambda d: d.__setitem__(_E + 0x1000, 0x3B),  # not checked
    "data_seq_high": lambda d: struct.pack_into("<I", d, _E + 0x1004, 5),  # refused when replaying
    "descriptor_seq": lambda d: struct.pack_into("<Q", d, _E + 64 + 24, 7),  # refused at open
    "descriptor_unaligned": lambda d: struct.pack_into("<Q", d, _E + 64 + 16, 0x200800),
    "zero_descriptor": lambda d: (d.__setitem__(slice(_E + 64, _E + 68), b"zero"),
                                  struct.pack_into("<Q", d, _E + 64 + 8, 0x1000)),
    "tail_elsewhere": lambda d: struct.pack_into("<I", d, _E + 12, 0x2000),  # accepted
    "sequence_0": lambda d: (struct.pack_into("<Q", d, _E + 16, 0), struct.pack_into("<Q", d, _E + 64 + 24, 0)),
    "flushed_past_eof": lambda d: struct.pack_into("<Q", d, _E + 48, 0x10000000),
    "short_entry": lambda d: struct.pack_into("<I", d, _E + 8, 0x1000),
    "last_past_eof": lambda d: struct.pack_into("<Q", d, _E + 56, 0x10000000),  # the file is not extended
}


@pytest.mark.parametrize("case", list(LOG_DAMAGE))
def test_damaged_log(images: Path, tmp_path: Path, case: str) -> None:
    data = bytearray((images / "m1.vhdx").read_bytes())
    guid = bytes(data[_E + 32:_E + 48])
    LOG_DAMAGE[case](data)
    data[_E:_E + 0x2000] = L.with_crc(bytearray(data[_E:_E + 0x2000]))
    data[0x200000:0x201000] = bytes(L.LOG_SECTOR)  # the replay is what restores the BAT
    _hdr(data, 1, log_guid=guid)
    _hdr(data, 2, log_guid=guid)
    for name in ("q.vhdx", "v.vhdx"):
        (tmp_path / name).write_bytes(bytes(data))
    assert_same(["info", "q.vhdx"], tmp_path)
    q = qemu_img("check", "-r", "all", "q.vhdx", cwd=tmp_path)
    v = vdkit_img("check", "-r", "all", "v.vhdx", cwd=tmp_path)
    assert (v.returncode, v.stdout, v.normalized_stderr().replace("v.vhdx", "q.vhdx")) == (
        q.returncode, q.stdout, q.stderr)
    qd, vd = (tmp_path / "q.vhdx").read_bytes(), (tmp_path / "v.vhdx").read_bytes()
    assert len(qd) == len(vd) and qd[0x200000:0x300000] == vd[0x200000:0x300000]
    for off in (L.HEADER1_OFFSET, L.HEADER2_OFFSET):  # rewritten alike, also when the replay was refused
        hq, hv = L.Header.parse(qd[off:off + 80]), L.Header.parse(vd[off:off + 80])
        assert (hq.sequence, hq.log_guid) == (hv.sequence, hv.log_guid)


def _log_damage(base: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Entries of m1.vhdx made to share the current log GUID (some chained by their tails), a few bytes of
    them changed (checksums fixed most of the time), the BAT sector they carry wiped."""
    d = bytearray(base)
    entries = [p for p in range(0x100000, 0x200000, L.LOG_SECTOR) if d[p:p + 4] == b"loge"]
    guid = bytes(d[rng.choice(entries) + 32:][:16])
    mode = rng.choice(("same", "chain", "raw"))
    if mode != "raw":
        for p in entries:
            if rng.random() < 0.7:
                d[p + 32:p + 48] = guid
                if mode == "chain":
                    struct.pack_into("<I", d, p + 12, rng.choice([0, p - 0x100000, 0x2000]))
                d[p:p + 0x2000] = L.with_crc(bytearray(d[p:p + 0x2000]))
    for _ in range(rng.randint(0, 3)):
        p = rng.choice(entries) + rng.choice([rng.randrange(0, 96), 0x1000 + rng.randrange(16),
                                              0x1FF8 + rng.randrange(8)])
        d[p] = rng.randrange(256)
        if rng.random() < 0.6:
            q = p - (p - 0x100000) % 0x2000
            d[q:q + 0x2000] = L.with_crc(bytearray(d[q:q + 0x2000]))
    d[0x200000:0x201000] = bytes(L.LOG_SECTOR)
    _hdr(d, 1, log_guid=guid)
    _hdr(d, 2, log_guid=guid)
    return bytes(d), mode


def test_log_sweep(images: Path, tmp_path: Path) -> None:
    base = (images / "m1.vhdx").read_bytes()
    diffs = []
    for seed in range(10):
        data, mode = _log_damage(base, random.Random(seed))
        for name in ("q.vhdx", "v.vhdx"):
            (tmp_path / name).write_bytes(data)
        for args in (["info"], ["check", "-r", "all"]):
            q = qemu_img(*args, "q.vhdx", cwd=tmp_path)
            v = vdkit_img(*args, "v.vhdx", cwd=tmp_path)
            if (v.returncode, v.stdout.replace("v.vhdx", "q.vhdx"),
                    v.normalized_stderr().replace("v.vhdx", "q.vhdx")) != (q.returncode, q.stdout, q.stderr):
                diffs.append(f"seed {seed} ({mode}) {args}: {q} / {v}")
        qd, vd = (tmp_path / "q.vhdx").read_bytes(), (tmp_path / "v.vhdx").read_bytes()
        if len(qd) != len(vd) or qd[0x200000:0x300000] != vd[0x200000:0x300000]:
            diffs.append(f"seed {seed} ({mode}): replayed BAT differs")
    assert not diffs, "\n".join(diffs)


# -- inspect: the safety verdict ------------------------------------------------------------------

def test_inspect(images: Path, tmp_path: Path) -> None:
    for name in ("d.vhdx", "m1.vhdx", "f.vhdx", "fz.vhdx", "nz.vhdx", "c.vhdx"):
        r = vdkit_img("inspect", name, cwd=images)
        assert r.returncode == 0 and "verdict: safe" in r.stdout, r.stdout + r.stderr
    base = (images / "m1.vhdx").read_bytes()
    cases = {
        "log-replay-needed": lambda d: (_hdr(d, 1, log_guid=bytes(d[_E + 32:_E + 48])),
                                        _hdr(d, 2, log_guid=bytes(d[_E + 32:_E + 48]))),
        "truncated": lambda d: d.__delitem__(slice(0xA80000, None)),
        "invalid-metadata": lambda d: struct.pack_into("<Q", d, 0x200000, 0x800007),
        "overlapping-metadata": lambda d: struct.pack_into("<Q", d, 0x200008, 0x800006),
    }
    for kind, damage in cases.items():
        data = bytearray(base)
        damage(data)
        (tmp_path / "x.vhdx").write_bytes(bytes(data))
        r = vdkit_img("inspect", "x.vhdx", cwd=tmp_path)
        assert r.returncode == 2 and f"  {kind}: " in r.stdout, (kind, r.stdout, r.stderr)
