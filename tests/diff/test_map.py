"""``vdkit-img map`` against ``qemu-img map`` on images QEMU wrote.

Every image is built by qemu-img/qemu-io (data, zero, discard and
compressed writes, backing chains, external data files), then both tools
map it in human and JSON form; stdout, stderr and the exit code must match.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok
from tests.helpers.patching import set_u64
from tests.helpers.qemu_io import qio

WRITES = [
    "write -P 0x11 0 64k",
    "write -P 0x22 192k 8k",
    "write -z 320k 128k",
    "write -P 0x33 512k 64k",
    "discard 512k 64k",
    "write -P 0x44 1M 300k",
    "write -z 1536k 4k",
    "write -c -P 0x55 2M 64k",
    "write -c -P 0x66 2112k 64k",
    "write -P 0x77 3M 1k",
]


def _both(name: str, cwd: Path, *extra: str) -> None:
    assert_same(["map", *extra, name], cwd)
    assert_same(["map", "--output=json", *extra, name], cwd)


@pytest.mark.parametrize("opts", [
    "compat=1.1",
    "compat=0.10",
    "cluster_size=512",
    "cluster_size=4096",
    "cluster_size=2M",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "compression_type=zstd",
    "refcount_bits=1",
])
def test_map_standalone(workdir: Path, opts: str) -> None:
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", "4M", cwd=workdir)
    writes = WRITES
    if "cluster_size=512" in opts:
        writes = [w for w in writes if "-c" not in w] + ["write -c -P 0x55 2M 512", "write -c -P 6 2049k 512"]
    elif "cluster_size=2M" in opts:
        writes = [w for w in writes if "-c" not in w and " 3M " not in w] + ["write -c -P 0x55 2M 2M"]
    qio("img.qcow2", writes, workdir)
    _both("img.qcow2", workdir)
    _both("img.qcow2", workdir, "--output=json", "-s", "100k", "-l", "1M")
    _both("img.qcow2", workdir, "-s", "1M", "--max-length=300k")


def test_map_empty_and_odd_ranges(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "e.qcow2", "1M", cwd=workdir)
    _both("e.qcow2", workdir)
    _both("e.qcow2", workdir, "-s", "2M")
    _both("e.qcow2", workdir, "-l", "0")
    _both("e.qcow2", workdir, "-s", "12345", "-l", "777")
    for bad in (["-s", "foo"], ["-l", "-1"], ["-s", "1Q"]):
        assert_same(["map", *bad, "e.qcow2"], workdir)
    assert_same(["map", "e.qcow2", "x"], workdir)
    assert_same(["map", "--output=yaml", "e.qcow2"], workdir)
    assert_same(["map", "missing.qcow2"], workdir)


def test_map_raw(workdir: Path) -> None:
    (workdir / "r.raw").write_bytes(b"\x01" * 1000)
    _both("r.raw", workdir)
    check_ok("create", "-q", "-f", "raw", "s.raw", "8M", cwd=workdir)
    qio("s.raw", ["write -P 1 64k 64k", "write -P 2 4M 1M", "write -P 3 8388096 512"], workdir, fmt="raw")
    _both("s.raw", workdir)
    _both("s.raw", workdir, "-f", "raw", "-s", "100k", "-l", "5M")


def test_map_chain(workdir: Path) -> None:
    """base.raw ← mid.qcow2 (v2) ← top.qcow2, the base shorter than the overlays."""
    check_ok("create", "-q", "-f", "raw", "base.raw", "2M", cwd=workdir)
    qio("base.raw", ["write -P 1 0 1M", "write -P 9 1536k 4k"], workdir, fmt="raw")
    check_ok("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw",
             "mid.qcow2", "6M", cwd=workdir)
    qio("mid.qcow2", ["write -P 2 1M 1M", "write -z 4M 64k", "write -c -P 4 5M 64k"], workdir)
    check_ok("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "8M", cwd=workdir)
    qio("top.qcow2", ["write -P 3 2M 512k", "write -z 0 4k", "write -z 5M 64k", "write -P 5 7M 64k",
                      "discard 1M 64k"], workdir)
    _both("top.qcow2", workdir)
    _both("mid.qcow2", workdir)
    _both("top.qcow2", workdir, "-s", "1M", "-l", "2M")
    # Through a relative path with a directory part: file names resolve against it.
    sub = workdir / "sub"
    sub.mkdir()
    check_ok("create", "-q", "-f", "qcow2", "-b", "../top.qcow2", "-F", "qcow2", "sub/t4.qcow2", cwd=workdir)
    qio("sub/t4.qcow2", ["write -P 6 6M 128k"], workdir)
    _both("sub/t4.qcow2", workdir)


def test_map_qcow2_base_extl2_chain(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "b.qcow2", "3M", cwd=workdir)
    qio("b.qcow2", ["write -P 1 0 3M", "write -z 128k 64k"], workdir)
    check_ok("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "b.qcow2", "-F", "qcow2",
             "o.qcow2", "4M", cwd=workdir)
    qio("o.qcow2", ["write -P 2 4k 4k", "write -z 70k 6k", "write -P 3 3M 10k", "discard 1M 64k"], workdir)
    _both("o.qcow2", workdir)


def test_map_missing_backing(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "gone.qcow2", "1M", cwd=workdir)
    check_ok("create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2", cwd=workdir)
    (workdir / "gone.qcow2").unlink()
    assert_same(["map", "orphan.qcow2"], workdir)


@pytest.mark.parametrize("raw", [False, True])
def test_map_data_file(workdir: Path, raw: bool) -> None:
    opts = "data_file=d.bin" + (",data_file_raw=on" if raw else "")
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "x.qcow2", "2M", cwd=workdir)
    qio("x.qcow2", ["write -P 1 0 64k", "write -P 2 1M 100k", "write -z 1536k 64k"], workdir)
    _both("x.qcow2", workdir)


def test_map_preallocated_metadata(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "p.qcow2", "2M", cwd=workdir)
    qio("p.qcow2", ["write -P 1 64k 64k"], workdir)
    _both("p.qcow2", workdir)


def test_map_with_snapshot(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "s.qcow2", "1M", cwd=workdir)
    qio("s.qcow2", ["write -P 1 0 256k"], workdir)
    check_ok("snapshot", "-c", "one", "s.qcow2", cwd=workdir)
    qio("s.qcow2", ["write -P 2 64k 64k", "write -z 128k 64k"], workdir)
    _both("s.qcow2", workdir)


@pytest.mark.parametrize("damage", ["data_unaligned", "l2_unaligned", "data_past_eof", "l2_past_eof",
                                    "bad_deflate", "ext_invalid_bitmap"])
def test_corrupt_images(workdir: Path, damage: str) -> None:
    """Untrusted images: map, convert and compare fail (or not) exactly like qemu-img, one line each."""
    opts = "extended_l2=on" if damage == "ext_invalid_bitmap" else "compat=1.1"
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "b.qcow2", "2M", cwd=workdir)
    qio("b.qcow2", ["write -P 1 0 64k", "write -c -P 2 64k 64k"], workdir)
    img = workdir / "b.qcow2"
    raw = img.read_bytes()
    l1 = int.from_bytes(raw[40:48], "big")
    l2 = int.from_bytes(raw[l1 : l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    entry_size = 16 if damage == "ext_invalid_bitmap" else 8
    if damage == "data_unaligned":
        set_u64(img, l2, (1 << 63) | 0x50200)
    elif damage == "l2_unaligned":
        set_u64(img, l1, (1 << 63) | (l2 + 0x200))
    elif damage == "data_past_eof":
        set_u64(img, l2, (1 << 63) | (1 << 36))
    elif damage == "l2_past_eof":
        set_u64(img, l1, (1 << 63) | (1 << 44))
    elif damage == "bad_deflate":
        entry = int.from_bytes(raw[l2 + entry_size : l2 + entry_size + 8], "big")
        coff = entry & ((1 << 54) - 1)
        data = bytearray(img.read_bytes())
        data[coff : coff + 64] = b"\xff" * 64
        img.write_bytes(bytes(data))
    else:
        set_u64(img, l2 + 8, 0x0000000100000001)  # subcluster 0 both allocated and zero
    check_ok("create", "-q", "-f", "qcow2", "ok.qcow2", "2M", cwd=workdir)
    _both("b.qcow2", workdir)
    assert_same(["convert", "-O", "raw", "b.qcow2", "out.raw"], workdir)
    assert_same(["compare", "b.qcow2", "ok.qcow2"], workdir)
