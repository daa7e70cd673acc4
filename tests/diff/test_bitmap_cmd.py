"""``vdkit-img bitmap`` against ``qemu-img bitmap``: the same commands on two identical images.

Each image gets the same history (created, a bitmap added, written through
qemu-io so the bitmap has dirty bits); then every ``bitmap`` invocation runs
on both (qemu-img on one copy, vdkit-img on the other, both with relative
names from their own folder), and after each one the outputs, exit codes and
the image files themselves must be the same, byte for byte, and qemu-img
check must find the vdkit-written image clean.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, qemu_io, vdkit_img

_NODE = re.compile(r"(?<=persistent in ')[^']*(?=')|(?<=persistent bitmaps to )\S+(?=:)")

STEPS = [
    "--add -g 4k a.qcow2 b1",
    "--add a.qcow2 b1",  # already there
    "--merge b0 a.qcow2 b1",
    "--disable a.qcow2 b0",
    "--clear --enable a.qcow2 b0",
    "--remove a.qcow2 nob",  # fails after the open: the bitmaps are stored again all the same
    "a.qcow2 b0",
    "--add a.qcow2",
    "-g 64k --remove a.qcow2 b1",
    "-F qcow2 --remove a.qcow2 b1",
    "-b x --remove a.qcow2 b1",
    "--add --disable -g 128k a.qcow2 b2",
    "--add -g 1000 a.qcow2 b3",
    "--add -g x a.qcow2 b3",
    "--merge nob a.qcow2 b2",
    "--merge b9 -b src.qcow2 a.qcow2 b2",
    "--merge s0 -b src.qcow2 -F qcow2 a.qcow2 b2",
    "--remove a.qcow2 b0",
    "--remove --remove a.qcow2 b2",
    "--add -g 512 a.qcow2 fine",
    "--add a.qcow2 " + "n" * 1024,
    "--add raw.img b0",
    "--add v2.qcow2 b0",
]


def _setup(d: Path) -> None:
    d.mkdir()
    check_ok("create", "-q", "-f", "qcow2", str(d / "a.qcow2"), "4M")
    check_ok("bitmap", "--add", str(d / "a.qcow2"), "b0")
    assert qemu_io("-c", "write 0 100k", "-c", "write 2M 64k", str(d / "a.qcow2")).returncode == 0
    check_ok("create", "-q", "-f", "qcow2", str(d / "src.qcow2"), "4M")
    check_ok("bitmap", "--add", "-g", "32k", str(d / "src.qcow2"), "s0")
    assert qemu_io("-c", "write 1M 300k", str(d / "src.qcow2")).returncode == 0
    check_ok("create", "-q", "-f", "raw", str(d / "raw.img"), "4M")
    check_ok("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(d / "v2.qcow2"), "4M")


def test_bitmap_command_sequence(tmp_path: Path) -> None:
    q, v = tmp_path / "q", tmp_path / "v"
    _setup(q)
    _setup(v)
    for step in STEPS:
        args = ["bitmap", *step.split()]
        # qemu-img names its node by an automatic, random node name ('#block123'); vdkit by the file
        assert_same(args, q, vdkit_cwd=v, mask=lambda e: _NODE.sub("NODE", e))
        for name in ("a.qcow2", "src.qcow2", "raw.img", "v2.qcow2"):
            assert (v / name).read_bytes() == (q / name).read_bytes(), f"{name} after {step}"
    r = qemu_img("check", str(v / "a.qcow2"))
    assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout
    assert qemu_img("info", str(v / "a.qcow2")).stdout.replace(str(v), "D") == \
        qemu_img("info", str(q / "a.qcow2")).stdout.replace(str(q), "D")


@pytest.mark.parametrize("flag", ["--enable", "--disable", "--clear", "--remove"])
def test_bitmap_on_image_held_by_qemu(tmp_path: Path, flag: str) -> None:
    """A running QEMU holds the write lock: both tools refuse the same way."""
    from tests.conftest import held_by_qemu_io

    img = tmp_path / "a.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "4M")
    check_ok("bitmap", "--add", str(img), "b0")
    with held_by_qemu_io(img):
        rq = qemu_img("bitmap", flag, str(img), "b0")
        rv = vdkit_img("bitmap", flag, str(img), "b0")
        assert (rv.returncode, rv.normalized_stderr()) == (rq.returncode, rq.stderr)


@pytest.mark.parametrize("size", ["8M", "--shrink 2M"])
def test_resize_with_bitmaps(tmp_path: Path, size: str) -> None:
    """qemu-img 7.2 resizes an image with persistent bitmaps (loaded and in use): they are stored again at
    the new size; the files must come out the same."""
    q, v = tmp_path / "q", tmp_path / "v"
    _setup(q)
    _setup(v)
    args = ["resize", *size.split()[:-1], "a.qcow2", size.split()[-1]]
    assert_same(args, q, vdkit_cwd=v)
    assert (v / "a.qcow2").read_bytes() == (q / "a.qcow2").read_bytes()
    r = qemu_img("check", str(v / "a.qcow2"))
    assert r.returncode == 0, r.stdout


def test_commit_marks_the_base_bitmaps(tmp_path: Path) -> None:
    """qemu-img commit writes through the base's block layer: its persistent bitmaps record the committed
    ranges and are stored again; vdkit-img commit leaves the same bytes."""
    for d in (tmp_path / "q", tmp_path / "v"):
        d.mkdir()
        check_ok("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "4M")
        check_ok("bitmap", "--add", str(d / "base.qcow2"), "b0")
        check_ok("bitmap", "--add", "-g", "4k", "--disable", str(d / "base.qcow2"), "off")
        assert qemu_io("-c", "write -P 1 0 64k", str(d / "base.qcow2")).returncode == 0
        check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
        assert qemu_io("-c", "write -P 2 1M 200k", "-c", "write -z 3M 64k", str(d / "top.qcow2")).returncode == 0
    rq = qemu_img("commit", "top.qcow2", cwd=tmp_path / "q")
    rv = vdkit_img("commit", "top.qcow2", cwd=tmp_path / "v")
    assert (rv.returncode, rv.stdout, rv.normalized_stderr()) == (rq.returncode, rq.stdout, rq.stderr)
    for name in ("base.qcow2", "top.qcow2"):
        assert (tmp_path / "v" / name).read_bytes() == (tmp_path / "q" / name).read_bytes(), name


def test_bitmap_bigger_than_qemu_allows_in_memory(tmp_path: Path) -> None:
    """A directory entry whose bitmap would take more than 512 MiB of bits (a 64 TiB disk at 512-byte
    granularity) is refused at open as QEMU refuses it, before anything is allocated for it."""
    import struct

    img = tmp_path / "a.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", str(img), "64T")
    check_ok("bitmap", "--add", "-g", "1M", str(img), "b0")
    raw = bytearray(img.read_bytes())
    off = struct.unpack_from(">I", raw, 100)[0]
    while struct.unpack_from(">I", raw, off)[0] != 0x23852875:
        off += 8 + ((struct.unpack_from(">I", raw, off + 4)[0] + 7) & ~7)
    doff = struct.unpack_from(">Q", raw, off + 24)[0]
    struct.pack_into(">I", raw, doff + 8, 8192)  # the table size that 512-byte granules need
    raw[doff + 17] = 9
    img.write_bytes(bytes(raw))
    for args in (["info", str(img)], ["bitmap", "--clear", str(img), "b0"]):
        rq, rv = qemu_img(*args), vdkit_img(*args)
        assert (rv.returncode, rv.stdout, rv.normalized_stderr()) == (rq.returncode, rq.stdout, rq.stderr), args
