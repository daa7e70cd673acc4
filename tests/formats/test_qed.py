"""QED: vdkit-img against qemu-img 7.2 (and vdkit-daemon against qemu-system-x86_64) on images qemu makes.

Every variant is made by qemu-img/qemu-io; the read side (info, map, check,
compare, convert), creation and convert -O qed (byte-identical: QED output is
deterministic), writes through the library (byte-identical to qemu-io's),
check/check -r on damaged images, header refusals, the daemon and a seeded
damage sweep under an address-space limit are compared.
"""

from __future__ import annotations

import json
import random
import struct
import sys
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, require_tool, vdkit_img
from tests.formats.daemon_diff import daemon_drive_roundtrip
from tests.helpers.disk import PATTERN, src_raw
from tests.helpers.limited import Sweep, run_limited
from tests.helpers.patching import damage_at, patched_copy
from tests.helpers.qemu_io import qemu_io_script

_io = partial(qemu_io_script, fmt="qed")  # _io(d, name, [commands]): qemu-io must succeed


def _make(d: Path) -> None:
    """Every variant, made by qemu-img and qemu-io in ``d``."""
    src_raw(d)
    check_ok("create", "-q", "-f", "qed", "q.qed", "4M", cwd=d)
    _io(d, "q.qed", PATTERN)
    check_ok("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", "c4k.qed", "12M", cwd=d)
    _io(d, "c4k.qed", ["write -P 1 4092k 12k", "write -P 2 8188k 8k", "write -z 100k 20k", "write -P 3 1k 2k"])
    check_ok("create", "-q", "-f", "qed", "-o", "table_size=16", "t16.qed", "5M", cwd=d)
    _io(d, "t16.qed", ["write -P 7 4M 200k", "write -P 8 0 1k"])
    check_ok("create", "-q", "-f", "qed", "odd.qed", "1000", cwd=d)
    _io(d, "odd.qed", ["write -P 9 0 512"])
    check_ok("create", "-q", "-f", "qed", "empty.qed", "0", cwd=d)
    check_ok("create", "-q", "-f", "qed", "-b", "src.raw", "-F", "raw", "ovr.qed", cwd=d)
    _io(d, "ovr.qed", ["write -P 0x66 4k 4k", "write -P 0x67 3M 100k"])
    (d / "sub").mkdir()
    check_ok("create", "-q", "-f", "qed", "-b", "../q.qed", "-F", "qed", "sub/ov2.qed", "8M", cwd=d)
    _io(d, "sub/ov2.qed", ["write -P 0x77 2M 70k", "write -z 0 64k"])
    check_ok("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    _io(d, "base.qcow2", ["write -P 0x31 0 1M"], fmt="qcow2")
    check_ok("create", "-q", "-f", "qed", "-b", "base.qcow2", "-F", "qcow2", "ovq.qed", cwd=d)
    _io(d, "ovq.qed", ["write -P 0x32 512k 1k"])
    # the need-check bit set, as a crash leaves it
    data = bytearray((d / "q.qed").read_bytes())
    struct.pack_into("<Q", data, 16, 2)
    (d / "dirty.qed").write_bytes(bytes(data))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qed")
    _make(d)
    return d


READ_SIDE = ["q.qed", "c4k.qed", "t16.qed", "odd.qed", "empty.qed", "ovr.qed", "sub/ov2.qed", "ovq.qed",
             "dirty.qed"]
BACKED = ("ovr.qed", "sub/ov2.qed", "ovq.qed")


@pytest.mark.parametrize("name", READ_SIDE)
def test_read_side(images: Path, name: str) -> None:
    """Every command on the main variant; the others get the ones their layout can change."""
    d = images
    full = name == "q.qed"
    cmds = [["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"], ["check"]]
    if full:
        cmds += [["check", "--output=json"], ["snapshot", "-l"], ["info", "-f", "qed"], ["map", "-f", "qed"]]
    if name in BACKED:
        cmds += [["info", "--backing-chain"], ["info", "--backing-chain", "--output=json"]]
    for args in cmds:
        assert_same([*args, name], d)
    if name == "dirty.qed":
        return
    ref = f"ref_{Path(name).name}.raw"
    check_ok("convert", "-O", "raw", name, ref, cwd=d)
    assert_same(["compare", ref, name], d)
    if full:
        assert_same(["compare", "-s", name, name], d)
        assert_same(["compare", "-f", "raw", "-F", "qed", "src.raw", name], d)
    for target in ("raw", "qcow2") if full or name == "sub/ov2.qed" else ("raw",):
        out = f"v_{Path(name).name}.{target}"
        v = vdkit_img("convert", "-O", target, name, out, cwd=d)
        assert v.returncode == 0, v.stderr
        r = qemu_img("compare", "-f", target, "-F", "raw", out, ref, cwd=d)
        assert (r.returncode, r.stdout) == (0, "Images are identical.\n"), r.stdout + r.stderr


def test_refusals(images: Path) -> None:
    for args in (["snapshot", "-c", "s", "q.qed"], ["snapshot", "-a", "s", "q.qed"],
                 ["snapshot", "-d", "s", "q.qed"], ["create", "-f", "qed", "-o", "help"]):
        assert_same(args, images)


# -- create and convert -O qed: byte-identical ---------------------------------------------------

CREATE = [
    ["4M"], ["1000"], ["0"], ["64T"], ["65T"], ["-o", "cluster_size=4k", "5M"],
    ["-o", "cluster_size=4k,table_size=2", "4G"], ["-o", "cluster_size=4k,table_size=2", "5G"],
    ["-o", "table_size=16", "3M"], ["-o", "table_size=1", "4M"], ["-o", "table_size=0", "4M"],
    ["-o", "table_size=32", "4M"], ["-o", "cluster_size=3k", "4M"], ["-o", "cluster_size=1k", "4M"],
    ["-o", "cluster_size=64M", "1G"], ["-o", "cluster_size=64M,table_size=16", "1M"],
    ["-o", "cluster_size=3k,table_size=3", "1M"], ["-o", "preallocation=full", "1M"],
    ["-o", "preallocation=falloc", "1M"], ["-o", "preallocation=metadata", "1M"],
    ["-o", "preallocation=bogus", "1M"], ["-b", "src.raw", "-F", "raw"], ["-b", "q.qed", "-F", "qed"],
    ["-b", "q.qed", "-F", "qed", "-o", "cluster_size=8k,table_size=8", "16M"],
    ["-b", "base.qcow2", "-F", "qcow2", "2M"], ["-b", "q.qed"], ["-u", "-b", "nowhere.qed", "-F", "qed", "1M"],
]


@pytest.mark.parametrize("args", CREATE, ids=lambda a: " ".join(a))
def test_create(images: Path, args: list[str]) -> None:
    d = images
    qname, vname = d / "cq.qed", d / "cv.qed"
    for p in (qname, vname):
        p.unlink(missing_ok=True)
    opts, size = (args[:-1], [args[-1]]) if args[-1][0].isdigit() else (args, [])
    q = qemu_img("create", "-f", "qed", *opts, "cq.qed", *size, cwd=d)
    v = vdkit_img("create", "-f", "qed", *opts, "cv.qed", *size, cwd=d)
    assert (v.returncode, v.stdout.replace("cv.qed", "cq.qed"), v.normalized_stderr().replace("cv.qed", "cq.qed")) \
        == (q.returncode, q.stdout, q.stderr)
    assert qname.exists() == vname.exists()
    if qname.exists():
        assert qname.read_bytes() == vname.read_bytes()
        if q.returncode == 0 and "table_size=1" not in opts[-1:] and "-u" not in opts:
            assert qemu_img("check", "cv.qed", cwd=d).returncode == 0


CONVERT_SOURCES = ["src.raw", "q.qed", "c4k.qed", "ovr.qed", "sub/ov2.qed", "base.qcow2"]
CONVERT_OPTS = [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=4k,table_size=2"], ["-o", "table_size=16"],
                ["-o", "cluster_size=128k,table_size=8"]]


@pytest.mark.parametrize("opts", CONVERT_OPTS, ids=lambda a: " ".join(a) or "default")
@pytest.mark.parametrize("src", CONVERT_SOURCES)
def test_convert_to_qed(images: Path, src: str, opts: list[str]) -> None:
    d = images
    q = qemu_img("convert", "-O", "qed", *opts, src, "oq.qed", cwd=d)
    v = vdkit_img("convert", "-O", "qed", *opts, src, "ov.qed", cwd=d)
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    assert (d / "oq.qed").read_bytes() == (d / "ov.qed").read_bytes()
    assert qemu_img("check", "ov.qed", cwd=d).returncode == 0
    r = qemu_img("compare", src, "ov.qed", cwd=d)
    assert r.returncode == 0, r.stdout + r.stderr


def test_convert_with_backing(images: Path) -> None:
    """-B: the target is written over a backing file (no zero init: zero runs are written)."""
    d = images
    for out, tool in (("bq.qed", qemu_img), ("bv.qed", vdkit_img)):
        r = tool("convert", "-O", "qed", "-B", "src.raw", "-F", "raw", "sub/ov2.qed", out, cwd=d)
        assert r.returncode == 0, r.stderr
    assert (d / "bq.qed").read_bytes() == (d / "bv.qed").read_bytes()


# -- writes through the library: byte-identical to qemu-io's -------------------------------------

WRITE_SCRIPTS = [
    [("w", 0, 65536, 0xaa), ("z", 1 << 20, 65536), ("w", 2052 << 10, 4096, 0x55)],
    [("w", 4096, 4096, 1), ("w", 8192, 200000, 2), ("z", 1024, 130 << 10), ("w", 3 << 20, 1 << 20, 3)],
    [("z", 0, 4 << 20), ("w", 70000, 1000, 4), ("z", 0, 65536), ("w", 65536 * 3, 65536 * 5, 5)],
]


@pytest.mark.parametrize("base", ["none", "raw", "qed"])
@pytest.mark.parametrize("script", range(len(WRITE_SCRIPTS)))
def test_library_writes(tmp_path: Path, script: int, base: str) -> None:
    import vdkit

    d = tmp_path
    src_raw(d)
    check_ok("create", "-q", "-f", "qed", "b.qed", "4M", cwd=d)
    _io(d, "b.qed", ["write -P 0x21 0 3M"])
    extra = {"none": [], "raw": ["-b", "src.raw", "-F", "raw"], "qed": ["-b", "b.qed", "-F", "qed"]}[base]
    cmds = []
    for op in WRITE_SCRIPTS[script]:
        cmds.append(f"write -P {op[3]} {op[1]} {op[2]}" if op[0] == "w" else f"write -z {op[1]} {op[2]}")
    for name in ("q.qed", "v.qed"):
        check_ok("create", "-q", "-f", "qed", *extra, "-o", "cluster_size=64k", name, "4M", cwd=d)
    _io(d, "q.qed", cmds)
    with vdkit.open(d / "v.qed", readonly=False) as node:
        for op in WRITE_SCRIPTS[script]:
            if op[0] == "w":
                node.write(op[1], bytes([op[3]]) * op[2])
            else:
                node.write_zeroes(op[1], op[2])
        assert node.read(0, 4 << 20) == node.read(0, 4 << 20)
    assert (d / "q.qed").read_bytes() == (d / "v.qed").read_bytes()
    assert_same(["map", "--output=json", "v.qed"], d)


def test_need_check_cleared_on_write_open(tmp_path: Path) -> None:
    """A read-write open of an image with need-check set checks, repairs and clears it, as qemu-io."""
    import vdkit

    d = tmp_path
    check_ok("create", "-q", "-f", "qed", "a.qed", "4M", cwd=d)
    _io(d, "a.qed", PATTERN)
    data = bytearray((d / "a.qed").read_bytes())
    struct.pack_into("<Q", data, 16, 2)
    struct.pack_into("<Q", data, 0x60000, 0xFF0000)  # a bad L2 entry, repaired by the open
    (d / "q.qed").write_bytes(bytes(data))
    (d / "v.qed").write_bytes(bytes(data))
    _io(d, "q.qed", ["read 0 4k"])
    with vdkit.open(d / "v.qed", readonly=False) as node:
        node.read(0, 4096)
    assert (d / "q.qed").read_bytes() == (d / "v.qed").read_bytes()


# -- check on damaged images ---------------------------------------------------------------------

def _patch(src: Path, dst: Path, fields: list[tuple[int, int, int]], size: int | None = None) -> None:
    """``patched_copy`` with little-endian (offset, width, value) fields."""
    patched_copy(src, dst, [(off, f"{width}s", val.to_bytes(width, "little")) for off, width, val in fields],
                 size=size)


DAMAGE = {
    "l2-past-eof": ([(0x60000, 8, 0xFF0000)], None),
    "l2-unaligned": ([(0x60000, 8, 0x50001)], None),
    "l2-in-header": ([(0x60000 + 8 * 32, 8, 0x10000)], None),
    "l1-past-eof": ([(0x10000, 8, 0xFF0000)], None),
    "l1-unaligned": ([(0x10000, 8, 0x60008)], None),
    "leak-tail": ([], 0xD0000),
    "partial-tail": ([], 0xA8000),
    "need-check": ([(16, 8, 2)], None),
    "need-check-bad": ([(16, 8, 2), (0x60000, 8, 0xFF0000)], None),
    "contiguous": ([(0x60000 + 8, 8, 0x60000)], None),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_check_damaged(images: Path, tmp_path: Path, case: str) -> None:
    fields, size = DAMAGE[case]
    d = tmp_path
    _patch(images / "q.qed", d / "x.qed", fields, size)
    for args in (["check"], ["check", "--output=json"], ["map", "--output=json"], ["info"]):
        assert_same([*args, "x.qed"], d)
    q = qemu_img("convert", "-O", "raw", "x.qed", "q.raw", cwd=d)
    v = vdkit_img("convert", "-O", "raw", "x.qed", "v.raw", cwd=d)
    assert (v.returncode, v.normalized_stderr()) == (q.returncode, q.stderr)
    for mode in ("leaks", "all"):
        for out in ("q", "v"):
            _patch(images / "q.qed", d / f"{out}.qed", fields, size)
        q = qemu_img("check", "-r", mode, "q.qed", cwd=d)
        v = vdkit_img("check", "-r", mode, "v.qed", cwd=d)
        assert (v.returncode, v.stdout.replace("v.qed", "q.qed"), v.normalized_stderr()) == \
            (q.returncode, q.stdout, q.stderr)
        assert (d / "q.qed").read_bytes() == (d / "v.qed").read_bytes()


HEADERS = {
    "cluster-small": [(4, 4, 0x800)], "cluster-big": [(4, 4, 0x8000000)], "cluster-64m": [(4, 4, 0x4000000)],
    "table-0": [(8, 4, 0)], "table-3": [(8, 4, 3)], "table-32": [(8, 4, 32)], "header-0": [(12, 4, 0)],
    "header-2": [(12, 4, 2)], "header-huge": [(12, 4, 0x10000000)], "size-odd": [(48, 8, 0x400100)],
    "size-512": [(48, 8, 0x400200)], "size-max": [(48, 8, 1 << 46)], "size-over": [(48, 8, (1 << 46) + 512)],
    "size-huge": [(48, 8, 0xFFFFFFFFFFFFFE00)], "features-unknown": [(16, 8, 0x100000000)],
    "features-8": [(16, 8, 8)], "features-raw-only": [(16, 8, 4)], "compat": [(24, 8, 0xFF)],
    "autoclear": [(32, 8, 0xFF)], "l1-moved": [(40, 8, 0x40000)], "l1-unaligned": [(40, 8, 0x10001)],
    "l1-zero": [(40, 8, 0)], "l1-past-eof": [(40, 8, 0x100000)],
    "backing-empty": [(16, 8, 1)], "backing-header": [(16, 8, 1), (60, 4, 4)],
    "backing-past-header": [(16, 8, 1), (56, 4, 0xFFF0), (60, 4, 0x11)],
    "backing-at-end": [(16, 8, 1), (56, 4, 0xFFF0), (60, 4, 0x10)],
    "backing-offset-huge": [(16, 8, 1), (56, 4, 0xFFFFFFFF), (60, 4, 2)],
    "backing-long": [(16, 8, 1), (56, 4, 0x40), (60, 4, 4096)],
    "order-features-cluster": [(16, 8, 8), (4, 4, 3)], "order-cluster-table": [(4, 4, 3), (8, 4, 3)],
    "order-table-size": [(8, 4, 3), (48, 8, 1)], "order-size-l1": [(48, 8, 1), (40, 8, 3)],
    "bad-magic": [(0, 4, 0x00444551)],
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_header_errors(images: Path, tmp_path: Path, case: str) -> None:
    _patch(images / "q.qed", tmp_path / "h.qed", HEADERS[case])
    assert_same(["info", "-f", "qed", "--output=json", "h.qed"], tmp_path)
    if case.startswith(("size", "autoclear", "features", "backing", "bad")):
        assert_same(["check", "h.qed"], tmp_path)


def test_table_size_one_cannot_open(tmp_path: Path) -> None:
    check_ok("create", "-q", "-f", "qed", "-o", "table_size=1", "t.qed", "4M", cwd=tmp_path)
    (tmp_path / "short.qed").write_bytes(b"QED\0")
    for args in (["info", "t.qed"], ["info", "short.qed"], ["map", "t.qed"]):
        assert_same(args, tmp_path)


# -- the daemon ----------------------------------------------------------------------------------

def test_daemon_drive(tmp_path: Path) -> None:
    """query-block, query-named-block-nodes and info block -v as qemu-system-x86_64; the drive exported
    over NBD reads as the image; writes over NBD to both daemons leave the same bytes once they quit."""

    def setup(d: Path) -> None:
        src_raw(d)
        check_ok("create", "-q", "-f", "qed", "-b", "src.raw", "-F", "raw", "d.qed", cwd=d)
        _io(d, "d.qed", ["write -P 0x66 4k 4k"])

    daemon_drive_roundtrip(tmp_path, "d.qed", "qed", setup,
                           writes=["write -P 0x31 0 64k", "write -P 0x32 70000 1000", "write -z 1M 128k",
                                   "write -P 0x33 3M 1M"])


# -- damage sweep --------------------------------------------------------------------------------

def _damage(base: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """Up to four changes to the header, the L1 table or the L2 table: bytes, bits, boundary u32/u64."""
    d = bytearray(base)
    desc = []
    for _ in range(rng.randint(1, 4)):
        region = rng.choice(((0, 64), (0x10000, 0x10040), (0x60000, 0x60120)))
        off = rng.randrange(*region)
        desc.append(damage_at(d, rng, off, lambda width: (
            0, 1, 2, 512, 4096, 0x10000, 0x50000, 0x60000, 0xA0000, 0xB0000, (1 << (8 * width)) - 1, 1 << (8 * width -
            1), rng.randrange(1 << (8 * width))), "little"))
    return bytes(d), desc


@pytest.mark.parametrize("chunk", range(3))
def test_damage_sweep(images: Path, tmp_path: Path, chunk: int) -> None:
    base = (images / "q.qed").read_bytes()
    sweep = Sweep(tmp_path)
    for seed in range(chunk * 10, chunk * 10 + 10):
        data, desc = _damage(base, random.Random(seed))
        sweep.label = f"seed {seed} {desc}"
        # over 64 MiB: no multi-gigabyte conversions (vdkit and qemu-img word EFBIG differently)
        sweep.read_write_case(data, ".qed", keep_if_big=3)
    sweep.done()


# -- resize, rebase, commit: same outputs and same bytes ----------------------------------------

EDITS = [
    ["resize", "o.qed", "8M"], ["resize", "o.qed", "+1000"], ["resize", "o.qed", "100T"],
    ["resize", "--shrink", "o.qed", "2M"], ["resize", "--preallocation=full", "o.qed", "10M"],
    ["resize", "s.qed", "3M"], ["resize", "s.qed", "2M"], ["rebase", "-u", "-b", "", "o.qed"],
    ["rebase", "-u", "-b", "b.qed", "-F", "raw", "o.qed"], ["rebase", "-b", "b2.qed", "-F", "qed", "s.qed"],
    ["rebase", "-u", "-b", "x" * 65473, "-F", "raw", "o.qed"],
    ["rebase", "-u", "-b", "y" * 65472, "-F", "raw", "o.qed"], ["commit", "o.qed"], ["commit", "s.qed"],
]


def test_resize_rebase_commit(tmp_path: Path) -> None:
    """The same edits in two folders (same names, so the same bytes): one by qemu-img, one by vdkit-img."""
    dirs = {"q": tmp_path / "q", "v": tmp_path / "v"}
    for d in dirs.values():
        d.mkdir()
        check_ok("create", "-q", "-f", "qed", "b.qed", "4M", cwd=d)
        _io(d, "b.qed", ["write -P 1 0 3M"])
        check_ok("create", "-q", "-f", "qed", "b2.qed", "4M", cwd=d)
        _io(d, "b2.qed", ["write -P 2 1M 2M"])
        check_ok("create", "-q", "-f", "qed", "-b", "b.qed", "-F", "qed", "o.qed", cwd=d)
        _io(d, "o.qed", ["write -P 3 0 100k"])
        check_ok("create", "-q", "-f", "qed", "-b", "b.qed", "-F", "qed", "s.qed", "2M", cwd=d)
        _io(d, "s.qed", ["write -P 4 1M 100k"])
    for args in EDITS:
        q = qemu_img(*args, cwd=dirs["q"])
        v = vdkit_img(*args, cwd=dirs["v"])
        assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr), args[:3]
        for name in ("o.qed", "s.qed", "b.qed", "b2.qed"):
            assert (dirs["q"] / name).read_bytes() == (dirs["v"] / name).read_bytes(), (args[:3], name)


def test_inspect(images: Path, tmp_path: Path) -> None:
    """vdkit-img inspect: a clean image is safe; a backing file, the need-check bit and bad entries are reasons."""
    r = vdkit_img("inspect", "--output=json", "q.qed", cwd=images)
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "safe", r.stdout + r.stderr
    r = vdkit_img("inspect", "--output=json", "ovr.qed", cwd=images)
    assert [x["kind"] for x in json.loads(r.stdout)["reasons"]] == ["backing-file"], r.stdout
    _patch(images / "q.qed", tmp_path / "x.qed", [(16, 8, 2), (0x60000, 8, 0xFF0000)])
    r = vdkit_img("inspect", "--output=json", "x.qed", cwd=tmp_path)
    out = json.loads(r.stdout)
    assert r.returncode not in (0, 1) and out["verdict"] == "unsafe"
    assert [x["kind"] for x in out["reasons"]] == ["dirty", "corrupt-metadata"]
    _patch(images / "q.qed", tmp_path / "y.qed", [(4, 4, 3)])
    r = vdkit_img("inspect", "--output=json", "y.qed", cwd=tmp_path)
    assert [x["kind"] for x in json.loads(r.stdout)["reasons"]] == ["invalid-metadata"], r.stdout


def test_big_tables(tmp_path: Path) -> None:
    """32 MiB tables (2 MiB clusters, 16-cluster tables: the addressable size wraps to 0 in 64 bits),
    in a sparse file: same outputs, vdkit under the address-space limit."""
    cs, ts = 2 << 20, 16
    tb = cs * ts
    head = struct.pack("<4sIIIQQQQQII", b"QED\0", cs, ts, 1, 0, 0, 0, cs, 0, 0, 0)
    path = tmp_path / "big.qed"
    with path.open("wb") as f:
        f.write(head)
        f.seek(cs + 8 * 3)
        f.write(struct.pack("<Q", cs + tb))  # L1[3] -> an L2 table after the L1
        f.seek(cs + tb + 8 * 5)
        f.write(struct.pack("<QQ", cs + 2 * tb, 12345))  # a data cluster past EOF, a bad entry
        f.truncate(cs + 2 * tb)
    qimg = require_tool("qemu-img")
    for args in (["info", "big.qed"], ["check", "big.qed"], ["check", "--output=json", "big.qed"],
                 ["map", "--output=json", "big.qed"]):
        q = run_limited([qimg, *args], tmp_path)
        v = run_limited([sys.executable, "-m", "vdkit.cli.main", *args], tmp_path, limit=True)
        assert (v[0], v[1], v[2].replace("vdkit-img:", "qemu-img:")) == q, args
