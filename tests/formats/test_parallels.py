"""Parallels: vdkit-img against qemu-img 7.2 (and vdkit-daemon against qemu-system-x86_64) on images qemu makes.

Variants are made by qemu-img/qemu-io (the old ``WithoutFreeSpace`` format by patching the magic); the
read side, creation and convert -O parallels (byte-identical: the output is deterministic), writes
through the library (byte-identical to qemu-io's), check/check -r on damaged images, header refusals,
the daemon and a seeded damage sweep under an address-space limit are compared.
"""

from __future__ import annotations

import json
import random
import struct
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, qemu_io, vdkit_img
from tests.formats.daemon_diff import daemon_drive_roundtrip
from tests.helpers.disk import PATTERN, src_raw
from tests.helpers.limited import Sweep
from tests.helpers.patching import damage_at, patched_copy
from tests.helpers.qemu_io import qemu_io_script

_io = partial(qemu_io_script, fmt="parallels")  # _io(d, name, [commands]): qemu-io must succeed


def _patch(src: Path, dst: Path, fields: list[tuple[int, int, int]], size: int | None = None) -> None:
    """``patched_copy`` with little-endian (offset, width, value) fields."""
    patched_copy(src, dst, [(off, f"{width}s", val.to_bytes(width, "little")) for off, width, val in fields],
                 size=size)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("parallels")
    src_raw(d)
    check_ok("create", "-q", "-f", "parallels", "p.hds", "4M", cwd=d)
    _io(d, "p.hds", PATTERN)
    check_ok("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", "c64.hds", "8M", cwd=d)
    _io(d, "c64.hds", ["write -P 1 3M 4k", "write -P 2 1k 512", "write -P 3 1M 3M", "write -z 7M 1M"])
    check_ok("create", "-q", "-f", "parallels", "-o", "cluster_size=3k", "c3k.hds", "1M", cwd=d)
    _io(d, "c3k.hds", ["write -P 4 1000 5000", "write -P 5 600k 10k"])
    check_ok("create", "-q", "-f", "parallels", "odd.hds", "1000", cwd=d)
    _io(d, "odd.hds", ["write -P 9 0 512"])
    check_ok("create", "-q", "-f", "parallels", "empty.hds", "0", cwd=d)
    check_ok("create", "-q", "-f", "parallels", "-o", "cluster_size=512", "c512.hds", "2M", cwd=d)
    _io(d, "c512.hds", ["write -P 6 0 1536", "write -P 7 1M 100k"])
    data = bytearray((d / "p.hds").read_bytes())
    data[0:16] = b"WithoutFreeSpace"
    struct.pack_into("<III", data, 64, 2048 + 128, 2048 + 2048 * 2, 2048 + 2048 * 3)  # BAT in sectors
    (d / "old.hds").write_bytes(bytes(data))
    _patch(d / "p.hds", d / "dirty.hds", [(44, 4, 0x746F6E59)])
    return d


READ_SIDE = ["p.hds", "c64.hds", "c3k.hds", "odd.hds", "empty.hds", "c512.hds", "old.hds", "dirty.hds"]


@pytest.mark.parametrize("name", READ_SIDE)
def test_read_side(images: Path, name: str) -> None:
    d = images
    full = name == "p.hds"
    cmds = [["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"], ["check"]]
    if full:
        cmds += [["check", "--output=json"], ["snapshot", "-l"], ["info", "-f", "parallels"],
                 ["info", "--backing-chain"]]
    for args in cmds:
        assert_same([*args, name], d)
    ref = f"ref_{name}.raw"
    check_ok("convert", "-O", "raw", name, ref, cwd=d)
    assert_same(["compare", ref, name], d)
    if full:
        assert_same(["compare", "src.raw", name], d)
        assert_same(["compare", "-f", "raw", "-F", "parallels", "src.raw", name], d)
    for target in ("raw", "qcow2") if full else ("raw",):
        out = f"v_{name}.{target}"
        v = vdkit_img("convert", "-O", target, name, out, cwd=d)
        assert v.returncode == 0, v.stderr
        r = qemu_img("compare", "-f", target, "-F", "raw", out, ref, cwd=d)
        assert (r.returncode, r.stdout) == (0, "Images are identical.\n"), r.stdout + r.stderr


def test_refusals(images: Path) -> None:
    for args in (["snapshot", "-c", "s", "p.hds"], ["snapshot", "-a", "s", "p.hds"],
                 ["snapshot", "-d", "s", "p.hds"], ["create", "-f", "parallels", "-o", "help"],
                 ["create", "-f", "parallels", "-b", "p.hds", "-F", "parallels", "x.hds"]):
        assert_same(args, images)


CREATE = [
    ["4M"], ["1000"], ["0"], ["1G"], ["100G"], ["-o", "cluster_size=4k", "1M"], ["-o", "cluster_size=512", "1M"],
    ["-o", "cluster_size=1000", "1M"], ["-o", "cluster_size=3k", "1M"], ["-o", "cluster_size=256", "1M"],
    ["-o", "cluster_size=2G", "1M"], ["-o", "cluster_size=0", "1M"], ["-o", "cluster_size=64k", "20G"],
    ["-o", "cluster_size=512", "2T"], ["-o", "cluster_size=512", "3T"], ["-o", "preallocation=bogus", "1M"],
    ["-o", "preallocation=metadata", "1M"], ["-o", "preallocation=full", "1M"],
]


@pytest.mark.parametrize("args", CREATE, ids=lambda a: " ".join(a))
def test_create(images: Path, args: list[str]) -> None:
    d = images
    qname, vname = d / "cq.hds", d / "cv.hds"
    for p in (qname, vname):
        p.unlink(missing_ok=True)
    q = qemu_img("create", "-f", "parallels", *args[:-1], "cq.hds", args[-1], cwd=d)
    v = vdkit_img("create", "-f", "parallels", *args[:-1], "cv.hds", args[-1], cwd=d)
    assert (v.returncode, v.stdout.replace("cv.hds", "cq.hds"), v.normalized_stderr().replace("cv.hds", "cq.hds")) \
        == (q.returncode, q.stdout, q.stderr)
    assert qname.exists() == vname.exists()
    if qname.exists():
        assert qname.read_bytes() == vname.read_bytes()
        assert qname.stat().st_blocks == vname.stat().st_blocks  # the header area is written, not sparse
        if q.returncode == 0:  # (qemu-img's check finds leaks in its own images whose BAT outgrows a cluster)
            assert_same(["check", "cv.hds"], d)
    for p in (qname, vname):
        p.unlink(missing_ok=True)


CONVERT_SOURCES = ["src.raw", "p.hds", "c64.hds", "old.hds"]
CONVERT_OPTS = [[], ["-o", "cluster_size=64k"], ["-o", "cluster_size=3k"], ["-o", "cluster_size=512"]]


@pytest.mark.parametrize("opts", CONVERT_OPTS, ids=lambda a: " ".join(a) or "default")
@pytest.mark.parametrize("src", CONVERT_SOURCES)
def test_convert_to_parallels(images: Path, src: str, opts: list[str]) -> None:
    d = images
    q = qemu_img("convert", "-O", "parallels", *opts, src, "oq.hds", cwd=d)
    v = vdkit_img("convert", "-O", "parallels", *opts, src, "ov.hds", cwd=d)
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    assert (d / "oq.hds").read_bytes() == (d / "ov.hds").read_bytes()
    assert qemu_img("check", "ov.hds", cwd=d).returncode == 0
    r = qemu_img("compare", src, "ov.hds", cwd=d)
    assert r.returncode == 0, r.stdout + r.stderr


WRITE_SCRIPTS = [
    [("w", 0, 65536, 0xaa), ("z", 1 << 20, 65536), ("w", 2052 << 10, 4096, 0x55)],
    [("w", 3 << 20, 4096, 1), ("w", 1024, 512, 2), ("w", 1 << 20, 3 << 20, 3), ("z", 7 << 20, 1 << 20)],
    [("w", 70000, 1000, 4), ("z", 0, 65536), ("w", 65536 * 3, 65536 * 5, 5), ("w", 5 << 20, 3 << 20, 6)],
]


@pytest.mark.parametrize("cluster", ["1M", "64k", "3k"])
@pytest.mark.parametrize("script", range(len(WRITE_SCRIPTS)))
def test_library_writes(tmp_path: Path, script: int, cluster: str) -> None:
    import vdkit

    d = tmp_path
    cmds = []
    for op in WRITE_SCRIPTS[script]:
        cmds.append(f"write -P {op[3]} {op[1]} {op[2]}" if op[0] == "w" else f"write -z {op[1]} {op[2]}")
    for name in ("q.hds", "v.hds"):
        check_ok("create", "-q", "-f", "parallels", "-o", f"cluster_size={cluster}", name, "8M", cwd=d)
    _io(d, "q.hds", cmds)
    with vdkit.open(d / "v.hds", readonly=False) as node:
        for op in WRITE_SCRIPTS[script]:
            if op[0] == "w":
                node.write(op[1], bytes([op[3]]) * op[2])
            else:
                node.write_zeroes(op[1], op[2])
    assert (d / "q.hds").read_bytes() == (d / "v.hds").read_bytes()
    assert_same(["map", "--output=json", "v.hds"], d)
    assert_same(["check", "v.hds"], d)


DAMAGE = {
    "outside": ([(64, 4, 0x40)], None),
    "outside-huge": ([(64, 4, 0xFFFFFFFF)], None),
    "inuse": ([(44, 4, 0x746F6E59)], None),
    "leak": ([(72, 4, 0)], None),
    "duplicate": ([(68, 4, 1)], None),
    "all-three": ([(64, 4, 0x40), (44, 4, 0x746F6E59), (72, 4, 0)], None),
    "short-file": ([], 2097153),
    "cut-in-cluster": ([], 3145217),
    "cut-before-cluster": ([], 3145216),
    "longer-file": ([], 6 << 20),
    "gap": ([(64, 16, 0x0000000200000000_0000000300000001)], None),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_check_damaged(images: Path, tmp_path: Path, case: str) -> None:
    fields, size = DAMAGE[case]
    d = tmp_path
    _patch(images / "p.hds", d / "x.hds", fields, size)
    for args in (["check"], ["check", "--output=json"], ["map", "--output=json"], ["info"]):
        assert_same([*args, "x.hds"], d)
    for mode in ("leaks", "all"):
        for out in ("q", "v"):
            _patch(images / "p.hds", d / f"{out}.hds", fields, size)
        q = qemu_img("check", "-r", mode, "q.hds", cwd=d)
        v = vdkit_img("check", "-r", mode, "v.hds", cwd=d)
        assert (v.returncode, v.stdout.replace("v.hds", "q.hds"), v.normalized_stderr()) == \
            (q.returncode, q.stdout, q.stderr)
        assert (d / "q.hds").read_bytes() == (d / "v.hds").read_bytes()


def test_unclean_write_open(images: Path, tmp_path: Path) -> None:
    """An image not closed correctly cannot be opened read-write (outside check), with QEMU's text."""
    import vdkit
    from vdkit.errors import VdkitError

    _patch(images / "p.hds", tmp_path / "u.hds", [(44, 4, 0x746F6E59)])
    r = qemu_io("-f", "parallels", "-c", "read 0 512", "u.hds", cwd=tmp_path)
    assert "Image was not closed correctly; cannot be opened read/write" in r.stderr
    with pytest.raises(VdkitError, match="parallels: Image was not closed correctly; cannot be opened read/write"):
        vdkit.open(tmp_path / "u.hds", readonly=False)


HEADERS = {
    "tracks-0": [(28, 4, 0)], "tracks-big": [(28, 4, 4186128)], "tracks-max": [(28, 4, 4186127)],
    "tracks-3": [(28, 4, 3)], "tracks-1": [(28, 4, 1)], "bat-too-large": [(32, 4, 536870912)],
    "bat-eio": [(32, 4, 536870769)], "bat-max": [(32, 4, 536870768)], "bat-1": [(32, 4, 1)],
    "bat-100": [(32, 4, 100)], "bat-big": [(32, 4, 262000)], "sectors-0": [(36, 8, 0)],
    "sectors-more": [(36, 8, 0x10000)], "sectors-odd": [(36, 8, 0x2001)],
    "sectors-max": [(36, 8, 0x3FFFFFFFE00000)], "sectors-over": [(36, 8, 0x3FFFFFFFE00001)],
    "data-off-0": [(48, 4, 0)], "data-off-huge": [(48, 4, 0xFFFFFFFF)], "version-3": [(16, 4, 3)],
    "flags": [(52, 4, 1)], "ext-bad-magic": [(56, 8, 2)], "heads-0": [(20, 4, 0)], "bad-magic": [(0, 1, 0x58)],
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_header_errors(images: Path, tmp_path: Path, case: str) -> None:
    _patch(images / "p.hds", tmp_path / "h.hds", HEADERS[case])
    assert_same(["info", "h.hds"], tmp_path)
    assert_same(["info", "-f", "parallels", "--output=json", "h.hds"], tmp_path)
    if not case.startswith(("sectors-max", "sectors-more", "bat-max", "bat-eio")):
        assert_same(["check", "h.hds"], tmp_path)


def test_daemon_drive(tmp_path: Path) -> None:
    """query-block, query-named-block-nodes and info block -v as qemu-system-x86_64; the drive exported
    over NBD reads as the image; writes over NBD to both daemons leave the same bytes once they quit."""

    def setup(d: Path) -> None:
        check_ok("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", "d.hds", "4M", cwd=d)
        _io(d, "d.hds", PATTERN)

    daemon_drive_roundtrip(tmp_path, "d.hds", "parallels", setup,
                           writes=["write -P 0x31 0 64k", "write -P 0x32 70000 1000", "write -z 1M 128k",
                                   "write -P 0x33 3M 1M"])


def _damage(base: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """Up to four changes to the header or the BAT: bytes, bits, boundary u32/u64 values."""
    d = bytearray(base)
    desc = []
    for _ in range(rng.randint(1, 4)):
        off = rng.randrange(16, 96)
        desc.append(damage_at(d, rng, off, lambda width: (
            0, 1, 2, 3, 4, 5, 0x40, 0x800, 0x746F6E59, (1 << (8 * width)) - 1, 1 << (8 * width - 1), rng.randrange(1 <<
            (8 * width))), "little"))
    return bytes(d), desc


@pytest.mark.parametrize("chunk", range(3))
def test_damage_sweep(images: Path, tmp_path: Path, chunk: int) -> None:
    base = (images / "p.hds").read_bytes()
    sweep = Sweep(tmp_path)
    for seed in range(chunk * 10, chunk * 10 + 10):
        data, desc = _damage(base, random.Random(seed))
        sweep.label = f"seed {seed} {desc}"
        # over 64 MiB: no huge maps or conversions (qemu-img asserts on some of them)
        sweep.read_write_case(data, ".hds", keep_if_big=1)
    sweep.done()


def _extension(entries: bytes, *, checksum_ok: bool = True) -> bytes:
    import hashlib

    body = entries + bytes((1 << 20) - 24 - len(entries))
    digest = hashlib.md5(body).digest() if checksum_ok else bytes(16)
    return struct.pack("<Q", 0xAB234CEF23DCEA87) + digest + body


EXTENSIONS = {
    "empty": _extension(b""),
    "bad-checksum": _extension(b"", checksum_ok=False),
    "unknown-feature": _extension(struct.pack("<QII", 0x1234, 0, 0)),
    "feature-flags": _extension(struct.pack("<QII", 0x1234, 1, 0)),
    "zero-magic": bytes(64),
}


@pytest.mark.parametrize("case", list(EXTENSIONS))
def test_format_extension(images: Path, tmp_path: Path, case: str) -> None:
    """The format extension cluster (here at sector 8, inside the header cluster): magic, MD5, features."""
    data = bytearray((images / "p.hds").read_bytes())
    struct.pack_into("<Q", data, 56, 8)
    ext = EXTENSIONS[case]
    data[8 * 512:8 * 512 + len(ext)] = ext
    (tmp_path / "e.hds").write_bytes(bytes(data[:max(len(data), 8 * 512 + len(ext))]))
    for args in (["info", "e.hds"], ["check", "e.hds"], ["map", "--output=json", "e.hds"]):
        assert_same(args, tmp_path)


def test_inspect(images: Path, tmp_path: Path) -> None:
    """vdkit-img inspect: a clean image is safe; the in-use flag and clusters past the file are reasons."""
    r = vdkit_img("inspect", "--output=json", "p.hds", cwd=images)
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "safe", r.stdout + r.stderr
    _patch(images / "p.hds", tmp_path / "x.hds", [(44, 4, 0x746F6E59), (64, 4, 0x40), (36, 8, 0x10000)])
    r = vdkit_img("inspect", "--output=json", "x.hds", cwd=tmp_path)
    out = json.loads(r.stdout)
    assert r.returncode not in (0, 1) and out["verdict"] == "unsafe"
    assert [x["kind"] for x in out["reasons"]] == ["dirty", "invalid-metadata", "corrupt-metadata"]


def test_write_past_bat(images: Path, tmp_path: Path) -> None:
    """A header claiming more sectors than the BAT maps: reads there are zeros, writes fail cleanly
    (QEMU 7.2 aborts on an assertion)."""
    import vdkit

    _patch(images / "p.hds", tmp_path / "b.hds", [(36, 8, 0x10000)])
    with vdkit.open(tmp_path / "b.hds", readonly=False) as node:
        assert node.read(5 << 20, 4096) == bytes(4096)
        with pytest.raises(OSError):
            node.write(5 << 20, b"x" * 4096)
