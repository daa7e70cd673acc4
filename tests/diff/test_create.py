"""``vdkit-img create`` against ``qemu-img create``: same output, same bytes.

For every combination below both tools create the image (and external data
file) with identical arguments in two sibling folders; stdout, stderr, exit
code and the resulting files must be identical (``cmp``).  The matrix covers
where QEMU's allocator makes layout non-obvious: refcount blocks that
describe themselves, refcount-table growth with small clusters and wide
refcounts, metadata preallocation crossing refcount blocks, partial last
clusters, and images too large for the L1 limit.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import assert_same, check_ok, data_extents, held_by_qemu_io, qemu_img, require_tool, vdkit_img

BASE_SIZE = "3M"


def run_both(tmp: Path, args: list[str]) -> None:
    """Create with both tools in ``tmp/q`` and ``tmp/v``; compare output and every file made."""
    require_tool("qemu-img")
    for side in ("q", "v"):
        d = tmp / side
        d.mkdir(exist_ok=True)
        for f in d.iterdir():
            f.unlink()
        check_ok("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), BASE_SIZE)
        (d / "base.raw").write_bytes(bytes(70000))
    assert_same(["create", *args], tmp / "q", vdkit_cwd=tmp / "v")
    qfiles = sorted(os.listdir(tmp / "q"))
    assert sorted(os.listdir(tmp / "v")) == qfiles, args
    for name in qfiles:
        assert filecmp.cmp(tmp / "q" / name, tmp / "v" / name, shallow=False), f"{name} differs for {args}"
    shutil.rmtree(tmp / "q")
    shutil.rmtree(tmp / "v")


QCOW2_MATRIX = [
    # (options, size)
    ("", "64M"), ("", "0"), ("", "1000"), ("", "1T"), ("", "4T"), ("", "1.5G"),
    ("compat=0.10", "64M"), ("compat=v3", "100000"),
    ("cluster_size=512", "1M"), ("cluster_size=512", "1T"), ("cluster_size=512,refcount_bits=64", "10G"),
    ("cluster_size=512,refcount_bits=1", "6G"), ("cluster_size=1k,refcount_bits=32", "16G"),
    ("cluster_size=4k,refcount_bits=64", "1T"), ("cluster_size=2M", "4T"), ("cluster_size=2M,refcount_bits=1", "1T"),
    ("refcount_bits=1", "64M"), ("refcount_bits=2", "64M"), ("refcount_bits=4", "64M"), ("refcount_bits=8", "64M"),
    ("refcount_bits=32", "64M"), ("refcount_bits=64", "4T"),
    ("extended_l2=on", "1G"), ("extended_l2=on,cluster_size=16k", "100000"),
    ("compression_type=zstd", "64M"), ("lazy_refcounts=on", "64M"),
    ("extended_l2=on,lazy_refcounts=on,refcount_bits=64,cluster_size=128k,compression_type=zstd", "1G"),
    ("preallocation=metadata", "10M"), ("preallocation=metadata", "100000"),
    ("preallocation=metadata,cluster_size=4k", "20M"),
    ("preallocation=metadata,cluster_size=512,refcount_bits=64", "2M"),
    ("preallocation=metadata,cluster_size=512,refcount_bits=8", "5M"),
    ("preallocation=metadata,cluster_size=1k,lazy_refcounts=on", "3M"),
    ("preallocation=metadata,extended_l2=on,cluster_size=16k", "100000"),
    ("preallocation=metadata,extended_l2=on", "1000"),
    ("data_file=d.raw", "1M"), ("data_file=d.raw", "100000"), ("data_file=d.raw,preallocation=metadata", "100000"),
    ("data_file=d.raw,data_file_raw=on", "1M"), ("data_file=d.raw,data_file_raw=on,extended_l2=on", "1000"),
    ("backing_file=base.qcow2,backing_fmt=qcow2", "1M"), ("backing_file=a,,b.qcow2,backing_fmt=qcow2", "1M"),
    ("backing_file=base.qcow2,backing_fmt=qcow2,extended_l2=on,preallocation=metadata", "1M"),
    ("cluster_size=8k,backing_file=base.qcow2,backing_fmt=qcow2", "1M"),
    ("cluster_size=64k,cluster_size=4k", "1M"), ("size=5M", None), ("nocow=on,extent_size_hint=1M", "1M"),
]


@pytest.mark.parametrize(("opts", "size"), QCOW2_MATRIX)
def test_qcow2_bytes(tmp_path: Path, opts: str, size: str | None) -> None:
    args = ["-f", "qcow2"] + (["-o", opts] if opts else []) + ["img.qcow2"] + ([size] if size else [])
    if "backing_file" in opts:
        args.insert(0, "-u")
    run_both(tmp_path, args)


@pytest.mark.parametrize("args", [
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
    ["-f", "qcow2", "-b", "base.raw", "-F", "raw", "img.qcow2"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "extended_l2=on,preallocation=metadata", "img.qcow2"],
    ["-f", "qcow2", "-q", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2", "5M"],
    ["-f", "raw", "img.raw", "1001"], ["img.raw", "64M"], ["-f", "raw", "-o", "preallocation=off", "img.raw", "1M"],
    ["-f", "qcow2", "-o", "help", "img.qcow2"], ["-f", "raw", "-o", "help", "img.raw"], ["-o", "help"],
    ["-f", "qcow2", "-o", "?"],
])
def test_misc_bytes(tmp_path: Path, args: list[str]) -> None:
    run_both(tmp_path, args)


@pytest.mark.parametrize("size", [
    "0x10", "1.5k", "0.1M", "1.1G", "2.675k", "5.k", "+5", " 5", "0.999999999999999999k", "7.9999999E",
    "1e3", "5 ", "1.5b", "1k5", ".5k", "1,5k", "-0", "-1", "1kk", "1KiB", "0x1.8k", "1.5", "8E", "1000P", "abc",
])
def test_size_syntax(tmp_path: Path, size: str) -> None:
    run_both(tmp_path, ["-f", "qcow2", "img.qcow2", "--", size])


@pytest.mark.parametrize("args", [
    ["-f", "qcow2", "-o", o, "img.qcow2", "1M"] for o in (
        "cluster_size=1000", "cluster_size=4M", "refcount_bits=3", "refcount_bits=128", "compat=foo",
        "lazy_refcounts=maybe", "preallocation=foo", "compression_type=lz4", "foo=bar", "data_file_raw=on",
        "cluster_size=abc", "refcount_bits=abc", "compat=0.10,lazy_refcounts=on", "compat=0.10,extended_l2=on",
        "extended_l2=on,cluster_size=4k", "compat=0.10,refcount_bits=8", "compat=0.10,compression_type=zstd",
        "backing_fmt=qcow2", "size=5M", "compat=0.10,data_file=d.raw", ",foo", "a=b,", "",
        "preallocation=metadata,backing_file=base.qcow2,backing_fmt=qcow2",
        "data_file=d.raw,data_file_raw=on,backing_file=base.qcow2,backing_fmt=qcow2",
        "cluster_size=1000,extended_l2=on", "cluster_size=99999999999999999999",
    )
] + [
    ["-f", "qcow2", "img.qcow2"], ["-f", "foo", "img.qcow2", "1M"], ["-f", "qcow2"],
    ["-f", "qcow2", "img.qcow2", "1M", "extra"], ["-f", "qcow2", "-b", "base.qcow2", "img.qcow2"],
    ["-f", "qcow2", "-u", "-b", "base.qcow2", "img.qcow2", "1M"], ["-f", "qcow2", "-u", "-b", "base.qcow2",
                                                                   "-F", "qcow2", "img.qcow2"],
    ["-f", "qcow2", "-b", "nonexist.qcow2", "-F", "qcow2", "img.qcow2"],
    ["-f", "qcow2", "-b", "img.qcow2", "-F", "qcow2", "img.qcow2"], ["-f", "qcow2", "-b", "", "-F", "qcow2",
                                                                     "img.qcow2", "1M"],
    ["-f", "qcow2", "-b", "base.qcow2", "-F", "foo", "img.qcow2"], ["-f", "raw", "-b", "base.qcow2", "img.raw"],
    ["-f", "raw", "-o", "preallocation=metadata", "img.raw", "1M"], ["-f", "raw", "-o", "cluster_size=4k",
                                                                     "img.raw", "1M"],
    ["-f", "qcow2", "-o", "cluster_size=512", "img.qcow2", "1000P"], ["-f", "qcow2", "/nonexist/a.qcow2", "1M"],
])
def test_errors(tmp_path: Path, args: list[str]) -> None:
    run_both(tmp_path, args)


@pytest.mark.parametrize("name", [
    "file:img.qcow2", "json:{}", "foo:img.qcow2", "http:img", "https://h/img", "fat:img", "null-co://",
    "blkdebug:img", "./a:b.qcow2", "a:b/c.qcow2",
])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_protocol_names(tmp_path: Path, name: str, fmt: str) -> None:
    """``file:`` is a local file; unknown prefixes and protocols without creation fail before Formatting."""
    run_both(tmp_path, ["-f", fmt, name, "1M"])


def test_creatable_protocols_are_refused_after_formatting(tmp_path: Path) -> None:
    """ssh/iscsi... images are created by opening them; vdkit opens none (QEMU's error names the address).

    NBD is opened as QEMU does (tests/protocols/test_nbd_write.py): its error equals qemu-img's."""
    q = qemu_img("create", "-f", "qcow2", "nbd:foo", "1M", cwd=tmp_path)
    v = vdkit_img("create", "-f", "qcow2", "nbd:foo", "1M", cwd=tmp_path)
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    for name in ("ssh://h/x", "iscsi://h/iqn/0"):
        q = qemu_img("create", "-f", "qcow2", name, "1M", cwd=tmp_path)
        v = vdkit_img("create", "-f", "qcow2", name, "1M", cwd=tmp_path)
        assert (v.returncode, v.stdout) == (q.returncode, q.stdout) == (1, v.stdout)
        assert v.stdout.startswith(f"Formatting '{name}', fmt=qcow2 ")
        proto = name.split(":")[0]
        assert v.stderr == f"vdkit-img: {name}: Protocol '{proto}' is not supported by vdkit\n"
    assert os.listdir(tmp_path) == []


def test_failed_create_removes_existing_image(tmp_path: Path) -> None:
    """qemu-img deletes the target when qcow2 creation fails after it began; so does vdkit."""
    target = tmp_path / "x.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(target), "1M")
    r = vdkit_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=1000", str(target), "1M")
    assert r.returncode == 1 and not target.exists()


FALLOC_MATRIX = [
    ("", "0"), ("", "512"), ("", "100000"), ("", "5M"), ("cluster_size=512", "3M"),
    ("cluster_size=4k,refcount_bits=1", "20M"), ("cluster_size=2M", "5M"), ("compat=0.10", "1M"),
    ("extended_l2=on,cluster_size=16k", "100000"), ("cluster_size=1k,refcount_bits=64", "2M"),
    ("cluster_size=512,refcount_bits=8", "1M"), ("lazy_refcounts=on,compression_type=zstd", "1M"),
    ("backing_file=base.qcow2,backing_fmt=qcow2,extended_l2=on", "1M"),
]


@pytest.mark.parametrize("mode", ["falloc", "full"])
@pytest.mark.parametrize(("opts", "size"), FALLOC_MATRIX)
def test_falloc_full_bytes(tmp_path: Path, mode: str, opts: str, size: str) -> None:
    """falloc/full are byte-identical to qemu-img's (refcount table moved to the end, data run after it)
    and allocate the same ranges of the file; the image is clean and reads as zeros."""
    args = ["-f", "qcow2", "-o", f"preallocation={mode}" + (f",{opts}" if opts else ""), "img.qcow2", size]
    if "backing_file" in opts:
        args.insert(0, "-u")
    for side, tool in (("q", qemu_img), ("v", vdkit_img)):
        (tmp_path / side).mkdir()
        check_ok("create", "-q", "-f", "qcow2", str(tmp_path / side / "base.qcow2"), BASE_SIZE)
        r = tool("create", "-q", *args, cwd=tmp_path / side)
        assert r.returncode == 0, r.stderr
    q, v = tmp_path / "q" / "img.qcow2", tmp_path / "v" / "img.qcow2"
    assert filecmp.cmp(q, v, shallow=False), f"{args}: files differ"
    assert data_extents(v) == data_extents(q)
    assert qemu_img("check", str(v)).returncode == 0
    raw = tmp_path / "v.raw"
    check_ok("convert", "-U", "-O", "raw", str(v), str(raw))
    assert not raw.read_bytes().strip(b"\0")


@pytest.mark.parametrize("mode", ["falloc", "full"])
def test_raw_full_preallocation(tmp_path: Path, mode: str) -> None:
    r = vdkit_img("create", "-q", "-f", "raw", "-o", f"preallocation={mode}", str(tmp_path / "r.raw"), "1M")
    assert r.returncode == 0 and (tmp_path / "r.raw").stat().st_blocks * 512 >= 1 << 20


def test_locked_target_is_left_alone(tmp_path: Path) -> None:
    """An image another process has open is neither emptied nor removed; the lock error is qemu-img's."""
    target = tmp_path / "busy.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(target), "1M")
    before = target.read_bytes()
    with held_by_qemu_io(target):
        for fmt in ("qcow2", "raw"):
            q = qemu_img("create", "-q", "-f", fmt, target.name, "1M", cwd=tmp_path)
            v = vdkit_img("create", "-q", "-f", fmt, target.name, "1M", cwd=tmp_path)
            assert (v.normalized_stderr(), v.returncode) == (q.stderr, q.returncode)
            assert q.returncode == 1 and target.read_bytes() == before


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cluster_bits=st.integers(9, 17),
    refcount_order=st.integers(0, 6),
    size=st.one_of(st.integers(0, 1 << 26), st.integers(1 << 26, 1 << 36)),
    prealloc=st.booleans(),
    extl2=st.booleans(),
)
def test_layout_property(tmp_path: Path, cluster_bits: int, refcount_order: int, size: int, prealloc: bool,
                         extl2: bool) -> None:
    """Random geometry and size: the allocator replay lands every structure where QEMU's does."""
    if prealloc:
        size = min(size, 24 << 20)
    opts = f"cluster_size={1 << cluster_bits},refcount_bits={1 << refcount_order}"
    if prealloc:
        opts += ",preallocation=metadata"
    if extl2 and cluster_bits >= 14:
        opts += ",extended_l2=on"
    run_both(tmp_path, ["-q", "-f", "qcow2", "-o", opts, "img.qcow2", str(size)])


@pytest.mark.parametrize(
    ("args", "files"),
    [
        (["-f", "raw", "img.raw", "1M"], ["img.raw"]),
        (["-f", "raw", "img.raw", "1000"], ["img.raw"]),
        (["-f", "raw", "-o", "preallocation=falloc", "img.raw", "1M"], ["img.raw"]),
        (["-f", "qcow2", "-o", "data_file=d.raw", "img.qcow2", "1M"], ["d.raw"]),
        (["-f", "qcow2", "-o", "data_file=d.raw,preallocation=metadata", "img.qcow2", "1M"], ["d.raw"]),
        (["-f", "qcow2", "-o", "data_file=d.raw,preallocation=falloc", "img.qcow2", "1M"], ["d.raw"]),
        (["-f", "qcow2", "-o", "data_file=d.raw", "img.qcow2", "0"], ["d.raw"]),
    ],
)
def test_new_raw_files_map_like_qemu(tmp_path: Path, args: list[str], files: list[str]) -> None:
    """Equal bytes are not enough for raw files: qemu-img allocates the first block, and map shows it."""
    for side, tool in (("q", qemu_img), ("v", vdkit_img)):
        (tmp_path / side).mkdir()
        assert tool("create", "-q", *args, cwd=tmp_path / side).returncode == 0
    for name in files:
        assert filecmp.cmp(tmp_path / "q" / name, tmp_path / "v" / name, shallow=False)
        q = qemu_img("map", "--output=json", "-f", "raw", str(tmp_path / "q" / name))
        v = qemu_img("map", "--output=json", "-f", "raw", str(tmp_path / "v" / name))
        assert q.returncode == 0
        assert v.stdout == q.stdout
