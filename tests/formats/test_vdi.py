"""VDI: vdkit-img against qemu-img 7.2 (and vdkit-daemon against qemu-system-x86_64) on images qemu makes.

Static and dynamic images: the read side (info, map, check, compare, convert),
create and convert -O vdi (identical to qemu-img's files once the two random
UUIDs are masked, same allocation on disk), writes through the library
(identical to qemu-io's), check on damaged block maps, the header refusals in
QEMU's order, the daemon, and a seeded damage sweep under an address-space limit.
"""

from __future__ import annotations

import random
import struct
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, data_extents, qemu_img, vdkit_img
from tests.formats.daemon_diff import daemon_drive_roundtrip
from tests.helpers.disk import PATTERN, src_raw
from tests.helpers.limited import Sweep
from tests.helpers.patching import damage_at, patched_copy
from tests.helpers.qemu_io import qemu_io_script

UUIDS = slice(0x188, 0x1A8)  # image and last-snapshot UUID: random in qemu-img's files


_io = partial(qemu_io_script, fmt="vdi")  # _io(d, name, [commands]): qemu-io must succeed


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vdi")
    src_raw(d)
    check_ok("create", "-q", "-f", "vdi", "d.vdi", "4M", cwd=d)
    _io(d, "d.vdi", PATTERN)
    check_ok("create", "-q", "-f", "vdi", "-o", "static=on", "s.vdi", "4M", cwd=d)
    _io(d, "s.vdi", PATTERN)
    check_ok("create", "-q", "-f", "vdi", "e.vdi", "4M", cwd=d)
    check_ok("create", "-q", "-f", "vdi", "odd.vdi", "1000", cwd=d)
    _io(d, "odd.vdi", ["write -P 9 0 512"])
    check_ok("create", "-q", "-f", "vdi", "z.vdi", "0", cwd=d)
    check_ok("convert", "-O", "vdi", "src.raw", "c.vdi", cwd=d)
    return d


READ = [["info"], ["info", "--output=json"], ["info", "--backing-chain"], ["map"], ["map", "--output=json"],
        ["check"], ["check", "--output=json"], ["snapshot", "-l"]]


@pytest.mark.parametrize("name", ["d.vdi", "s.vdi", "e.vdi", "odd.vdi", "z.vdi", "c.vdi"])
def test_read_side(images: Path, name: str) -> None:
    d = images
    full = name in ("d.vdi", "s.vdi")
    for args in READ if full else [["info", "--output=json"], ["map", "--output=json"], ["check"]]:
        assert_same([*args, name], d)
        if full:
            assert_same([args[0], "-f", "vdi", *args[1:], name], d)
    if name != "odd.vdi":
        assert_same(["compare", "src.raw", name], d)
    if full:
        assert_same(["compare", "-s", name, "src.raw"], d)
    for target in ("raw", "qcow2") if full else ("raw",):
        out, q = f"v_{name}.{target}", f"q_{name}.{target}"
        v = vdkit_img("convert", "-O", target, name, out, cwd=d)
        assert v.returncode == 0, v.stderr
        check_ok("convert", "-O", target, name, q, cwd=d)
        r = qemu_img("compare", "-f", target, "-F", target, out, q, cwd=d)
        assert (r.returncode, r.stdout) == (0, "Images are identical.\n"), r.stdout + r.stderr
        if target == "raw":
            assert data_extents(d / out) == data_extents(d / q)


def test_refusals(images: Path) -> None:
    for args in (["snapshot", "-c", "s", "d.vdi"], ["snapshot", "-a", "s", "d.vdi"], ["snapshot", "-d", "s", "d.vdi"],
                 ["check", "-r", "all", "d.vdi"], ["check", "-r", "leaks", "d.vdi"], ["resize", "e.vdi", "8M"],
                 ["create", "-f", "vdi", "-b", "d.vdi", "-F", "vdi", "n.vdi"],
                 ["convert", "-c", "-O", "vdi", "src.raw", "n.vdi"]):
        assert_same(args, images)


# -- damaged headers and block maps ---------------------------------------------------------------

def _patch(d: Path, src: str, name: str, fields: list[tuple[int, str, object]]) -> str:
    patched_copy(d / src, d / name, fields)
    return name


BAD = {  # patched on d.vdi (block map [0, 1, 2, ff], 3 blocks allocated)
    "signature": [(0x40, "<I", 0xBEDA1070)],
    "version-1.2": [(0x44, "<I", 0x00010002)],
    "version-0.2": [(0x44, "<I", 2), (0x154, "<I", 0x201)],
    "header-size": [(0x48, "<I", 0x190)],
    "type-0": [(0x4C, "<I", 0)],
    "type-static": [(0x4C, "<I", 2)],
    "flags": [(0x50, "<I", 0xFFFFFFFF)],
    "text": [(0, "<I", 0)],
    "bmap-unaligned": [(0x154, "<I", 0x201)],
    "bmap-0": [(0x154, "<I", 0)],
    "bmap-far": [(0x154, "<I", 0xFFFFFE00)],
    "data-unaligned": [(0x158, "<I", 0x401), (0x168, "<I", 4096)],
    "data-0": [(0x158, "<I", 0)],
    "data-far": [(0x158, "<I", 0xFFFFFE00)],
    "data-2M": [(0x158, "<I", 0x200000)],
    "geometry": [(0x15C, "<III", (1, 2, 3))],
    "sector-4096": [(0x168, "<I", 4096)],
    "size-huge": [(0x170, "<Q", 1 << 56), (0x154, "<I", 0x201)],
    "size-max": [(0x170, "<Q", 0x1FFFFF8000000)],
    "size-max+1": [(0x170, "<Q", 0x1FFFFF8000001)],
    "size-0": [(0x170, "<Q", 0)],
    "size-odd": [(0x170, "<Q", 12345)],
    "size-odd-no-room": [(0x170, "<Q", 0xFFFFFFFF)],
    "block-2M": [(0x178, "<I", 2 << 20), (0x180, "<I", 1)],
    "block-extra": [(0x17C, "<I", 512)],
    "blocks-1": [(0x180, "<I", 1), (0x1B8, "<I", 1)],
    "blocks-5": [(0x180, "<I", 5)],
    "blocks-1M": [(0x180, "<I", 0x100000)],
    "blocks-max+1": [(0x180, "<I", 0x1FFFFF81)],
    "blocks-u32": [(0x180, "<I", 0xFFFFFFFF), (0x1A8, "<I", 1)],
    "blocks-too-many": [(0x180, "<I", 0x20000000)],
    "link": [(0x1A8, "<I", 1), (0x1B8, "<I", 1)],
    "parent": [(0x1B8, "<I", 1), (0x180, "<I", 0x20000000)],
    "allocated-9": [(0x184, "<I", 9)],
    "allocated-max": [(0x184, "<I", 0xFFFFFFFF)],
    "entry-too-large": [(0x208, "<I", 9)],
    "entry-discarded": [(0x200, "<I", 0xFFFFFFFE)],
    "entry-far": [(0x200, "<I", 0x7FFFFFFF)],
    "entries-shared": [(0x200, "<IIII", (2, 0, 0, 0xFFFFFFFF))],
    "entries-shared-3": [(0x200, "<IIII", (0xFFFFFFFF, 3, 3, 3))],
    "entries-all-1": [(0x200, "<IIII", (1, 1, 1, 2))],
}
NO_CHECK = ("blocks-1M",)  # a million map entries past EOF: a million "block 0" lines


@pytest.mark.parametrize("case", list(BAD))
def test_bad(images: Path, case: str) -> None:
    d = images
    name = _patch(d, "d.vdi", f"bad-{case}.vdi", BAD[case])
    assert_same(["info", "--output=json", name], d)
    if assert_same(["info", "-f", "vdi", name], d).returncode == 0:
        assert_same(["map", "-f", "vdi", "--output=json", name], d)
        if case not in NO_CHECK:
            assert_same(["check", "-f", "vdi", name], d)
            assert_same(["check", "-f", "vdi", "--output=json", name], d)
        assert_same(["compare", "-f", "vdi", "-F", "raw", name, "src.raw"], d)


@pytest.mark.parametrize(("src", "size"), [("d.vdi", 300), ("d.vdi", 0x100), ("d.vdi", 0x202), ("d.vdi", 2000000),
                                           ("s.vdi", 2000000), ("s.vdi", 1024), ("e.vdi", 515),
                                           ("d.vdi", 0x20A)])
def test_truncated(images: Path, src: str, size: int) -> None:
    d = images
    name = f"cut-{size}-{src}"
    (d / name).write_bytes((d / src).read_bytes()[:size])
    for args in (["info", "-f", "vdi"], ["info"]):
        assert_same([*args, name], d)
    if qemu_img("info", "-f", "vdi", name, cwd=d).returncode == 0:
        for args in (["map", "--output=json"], ["check"]):
            assert_same([args[0], "-f", "vdi", *args[1:], name], d)
        assert_same(["compare", "-f", "vdi", "-F", "raw", name, "src.raw"], d)


# -- create, convert -O vdi and writes ---------------------------------------------------------------

def _same_file(a: Path, b: Path) -> None:
    """Identical once the UUIDs are masked, with the same data extents (allocation on disk)."""
    assert a.stat().st_size == b.stat().st_size
    assert data_extents(a) == data_extents(b)
    da, db = bytearray(a.read_bytes()), bytearray(b.read_bytes())
    for data in (da, db):
        data[UUIDS] = bytes(32)
    assert da == db


@pytest.mark.parametrize("opts", ["", "static=on", "static=off,preallocation=off"])
def test_create(tmp_path: Path, opts: str) -> None:
    for size in ("0", "1000", "1M", "1536K", "4M", "100M"):
        o = ["-o", opts] if opts else []
        q = qemu_img("create", "-f", "vdi", *o, f"q{size}.vdi", size, cwd=tmp_path)
        v = vdkit_img("create", "-f", "vdi", *o, f"v{size}.vdi", size, cwd=tmp_path)
        assert (v.returncode, v.stdout.replace("'v", "'q"), v.stderr) == (q.returncode, q.stdout, q.stderr)
        _same_file(tmp_path / f"q{size}.vdi", tmp_path / f"v{size}.vdi")
    for name in ("q4M.vdi", "v4M.vdi"):
        assert_same(["info", name], tmp_path)
        assert_same(["check", name], tmp_path)


@pytest.mark.parametrize("args", [
    ["-o", "preallocation=foo"], ["-o", "preallocation=metadata"], ["-o", "static=maybe"], ["-o", "help"],
    ["-o", "cluster_size=64k"],
])
def test_create_errors(tmp_path: Path, args: list[str]) -> None:
    for name in ("q.vdi", "v.vdi"):
        (tmp_path / name).write_bytes(b"old contents")
    q = qemu_img("create", "-f", "vdi", *args, "q.vdi", "1M", cwd=tmp_path)
    v = vdkit_img("create", "-f", "vdi", *args, "v.vdi", "1M", cwd=tmp_path)
    assert (v.returncode, v.stdout.replace("'v", "'q"), v.normalized_stderr().replace("v.vdi", "q.vdi")) == (
        q.returncode, q.stdout, q.stderr)
    assert (tmp_path / "v.vdi").read_bytes() == (tmp_path / "q.vdi").read_bytes()


def test_create_too_large(tmp_path: Path) -> None:
    q = qemu_img("create", "-f", "vdi", "q.vdi", "0x1fffff8000001", cwd=tmp_path)
    v = vdkit_img("create", "-f", "vdi", "v.vdi", "0x1fffff8000001", cwd=tmp_path)
    assert (v.returncode, v.stdout.replace("'v", "'q"), v.normalized_stderr().replace("v.vdi", "q.vdi")) == (
        q.returncode, q.stdout, q.stderr)
    assert (tmp_path / "v.vdi").stat().st_size == (tmp_path / "q.vdi").stat().st_size == 0


@pytest.mark.parametrize("opts", ["", "static=on"])
@pytest.mark.parametrize("src", ["src.raw", "d.vdi", "s.vdi", "odd.vdi"])
def test_convert_to_vdi(images: Path, tmp_path: Path, opts: str, src: str) -> None:
    o = ["-o", opts] if opts else []
    q = qemu_img("convert", "-O", "vdi", *o, str(images / src), "q.vdi", cwd=tmp_path)
    v = vdkit_img("convert", "-O", "vdi", *o, str(images / src), "v.vdi", cwd=tmp_path)
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    _same_file(tmp_path / "q.vdi", tmp_path / "v.vdi")
    r = qemu_img("compare", "v.vdi", str(images / src), cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "Images are identical.\n"), r.stdout + r.stderr
    r = qemu_img("check", "v.vdi", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "No errors were found on the image.\n"), r.stdout + r.stderr


@pytest.mark.parametrize("static", ["off", "on"])
def test_library_writes(tmp_path: Path, static: str) -> None:
    """Writes through the library land as qemu-io's: whole new blocks in write order, map entry, count."""
    from vdkit.block.node import open_image

    for p in ("q", "v"):
        check_ok("create", "-q", "-f", "vdi", "-o", f"static={static}", f"{p}.vdi", "5M", cwd=tmp_path)
    _io(tmp_path, "q.vdi", ["write -P 0x31 3M 512", "write -P 0x32 1047552 2048", "write -z 4M 4096",
                            "write -P 0x33 0 512"])
    with open_image(tmp_path / "v.vdi", "vdi", readonly=False) as node:
        node.write(3 << 20, b"\x31" * 512)
        node.write(1047552, b"\x32" * 2048)
        node.write_zeroes(4 << 20, 4096)
        node.write(0, b"\x33" * 512)
    _same_file(tmp_path / "q.vdi", tmp_path / "v.vdi")


# -- the daemon ----------------------------------------------------------------------------------

@pytest.mark.parametrize("static", ["off", "on"])
def test_daemon_drive(tmp_path: Path, static: str) -> None:
    def setup(d: Path) -> None:
        check_ok("create", "-q", "-f", "vdi", "-o", f"static={static}", "d.vdi", "4M", cwd=d)
        _io(d, "d.vdi", PATTERN)

    daemon_drive_roundtrip(tmp_path, "d.vdi", "vdi", setup, same_files=_same_file)


# -- damage sweep --------------------------------------------------------------------------------

def _damage(base: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """Up to four changes to the header fields or the block map: bytes, bits, boundary u32/u64."""
    d = bytearray(base)
    desc = []
    for _ in range(rng.randint(1, 4)):
        off = rng.randrange(*rng.choice(((0x40, 0x1C8), (0x150, 0x188), (0x200, 0x210))))
        desc.append(damage_at(d, rng, off, lambda width: (
            0, 1, 2, 3, 4, 512, 0x400, 1 << 20, (1 << (8 * width)) - 1, (1 << (8 * width)) - 2, 1 << (8 * width - 1),
            rng.randrange(1 << (8 * width)), len(base)), "little"))
    return bytes(d), desc


@pytest.mark.parametrize(("base", "chunk"), [("d.vdi", 0), ("d.vdi", 1), ("s.vdi", 0)])
def test_damage_sweep(images: Path, tmp_path: Path, base: str, chunk: int) -> None:
    data0 = (images / base).read_bytes()
    sweep = Sweep(tmp_path)
    for seed in range(chunk * 12, chunk * 12 + 12):
        data, desc = _damage(data0, random.Random(seed))
        sweep.label = f"seed {seed} {desc}"
        (tmp_path / "s.vdi").write_bytes(data)
        blocks = struct.unpack_from("<I", data, 0x180)[0]
        runs = [["info", "--output=json", "s.vdi"], ["info", "-f", "vdi", "--output=json", "s.vdi"],
                ["map", "-f", "vdi", "--output=json", "s.vdi"],
                *([["check", "-f", "vdi", "s.vdi"]] if blocks <= 1 << 16 else []),
                ["convert", "-f", "vdi", "-O", "raw", "s.vdi", "OUT.raw"]]
        for args in runs:
            q = sweep.both(args)
            if args[:2] == ["info", "-f"] and q[0] != 0:
                break
        sweep.conversions_alike(extents=True, max_bytes=64 << 20)
    sweep.done()


# -- inspect ---------------------------------------------------------------------------------------

def test_inspect(images: Path) -> None:
    """Clean images are safe; what check finds, overlapping areas and a map past EOF are reasons
    (QEMU opens every one of these images)."""
    from vdkit.block.inspect import inspect_image

    d = images
    for name in ("d.vdi", "s.vdi", "e.vdi", "odd.vdi", "z.vdi", "c.vdi"):
        assert inspect_image(d / name).reasons == [], name
    cases = {
        "shared": ([(0x200, "<IIII", (1, 1, 1, 2))], {"corrupt-metadata"}),
        "too-large": ([(0x208, "<I", 9)], {"corrupt-metadata", "truncated"}),
        "bmap-on-header": ([(0x154, "<I", 0)], {"corrupt-metadata", "overlapping-metadata", "truncated"}),
        "data-on-header": ([(0x158, "<I", 0)], {"overlapping-metadata"}),
        "huge-map": ([(0x180, "<I", 0x1FFFFF80)], {"truncated", "overlapping-metadata"}),
    }
    for case, (fields, kinds) in cases.items():
        name = _patch(d, "d.vdi", f"insp-{case}.vdi", fields)
        assert qemu_img("info", name, cwd=d).returncode == 0, case
        verdict = inspect_image(d / name)
        assert {r.kind for r in verdict.reasons} == kinds, (case, verdict.reasons)
