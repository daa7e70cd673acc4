"""Differential tests: ``vdkit-img info`` (all output variants) against qemu-img 7.2.

Each case builds an image with the real QEMU tools, then runs ``info``,
``info --output=json``, ``info --backing-chain`` (both outputs) and
``snapshot -l`` with both programs in the same directory and demands
identical stdout, stderr (modulo the program name) and exit status.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import qemu_img_pbkdf, require_tool
from tests.data import generate as g
from tests.data.compare import INFO_VARIANTS, compare_image, run_vdkit, same, same_snapshot_json

Builder = Callable[[Path], str]


@pytest.fixture(autouse=True)
def _tools() -> None:
    for t in ("qemu-img", "qemu-io"):
        require_tool(t)


# -- create options ---------------------------------------------------------------------------

def _opts_case(size: str, *options: str, io: tuple[str, ...] = ()) -> Builder:
    def build(d: Path) -> str:
        g.create(d, "t.qcow2", size, options=options)
        if io:
            g.qemu_io(d / "t.qcow2", *io)
        return "t.qcow2"
    return build


DATA_IO = ("write -P 0xaa 0 64k", "write -P 0x55 300k 5k")

CREATE_CASES: dict[str, Builder] = {
    "v2-empty": _opts_case("1M", "compat=0.10"),
    "v2-data": _opts_case("4M", "compat=0.10", io=DATA_IO + ("write -z 1M 64k",)),
    "v3-empty": _opts_case("64M"),
    "v3-data": _opts_case("4M", "compat=1.1", io=DATA_IO),
    "cluster-512": _opts_case("1M", "cluster_size=512", io=DATA_IO),
    "cluster-1k": _opts_case("3M", "cluster_size=1k", io=DATA_IO),
    "cluster-4k": _opts_case("1M", "cluster_size=4k"),
    "cluster-2M": _opts_case("16M", "cluster_size=2M", io=("write 3M 1M",)),
    "cluster-2M-v2": _opts_case("16M", "cluster_size=2M,compat=0.10"),
    **{f"refcount-{b}": _opts_case("2M", f"refcount_bits={b}", io=("write 0 128k",)) for b in (1, 2, 4, 8, 32, 64)},
    "lazy": _opts_case("1M", "lazy_refcounts=on", io=DATA_IO),
    "zlib-compressed": _opts_case("2M", io=("write -c -P 1 0 128k", "write -c -P 0 128k 64k")),
    "zstd-compressed": _opts_case("2M", "compression_type=zstd", io=("write -c -P 7 0 192k",)),
    "extended-l2": _opts_case("4M", "extended_l2=on", io=("write 0 4k", "write -z 64k 64k", "discard 8k 4k")),
    "extended-l2-big": _opts_case("1G", "extended_l2=on,cluster_size=2M,compression_type=zstd,"
                                  "lazy_refcounts=on,refcount_bits=64", io=("write 0 4k",)),
    "prealloc-metadata": _opts_case("10M", "preallocation=metadata"),
    "prealloc-falloc": _opts_case("3M", "preallocation=falloc"),
    "zero-and-discard": _opts_case("4M", io=("write -P 1 0 1M", "write -z 64k 128k", "discard 512k 256k",
                                             "write -z -u 768k 64k")),
    "1TiB": _opts_case("1T", io=("write 1023G 64k",)),
    "odd-size": _opts_case("1000"),
    "odd-size-2": _opts_case("1234567", "cluster_size=512"),
    "odd-size-v2": _opts_case("12345", "compat=0.10"),
    "zero-size": _opts_case("0"),
    "max-size": _opts_case("2047T", "cluster_size=2M"),
}


@pytest.mark.parametrize("case", list(CREATE_CASES))
def test_create_options(case: str, tmp_path: Path) -> None:
    name = CREATE_CASES[case](tmp_path)
    compare_image(name, tmp_path, chain=case in ("v2-data", "v3-data", "extended-l2"))


# -- raw images -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 6, 511, 1000, 4096, 1 << 20])
def test_raw_sizes(size: int, tmp_path: Path) -> None:
    (tmp_path / "r.raw").write_bytes(b"x" * size)
    compare_image("r.raw", tmp_path, chain=size == 1000)
    same(["info", "-f", "raw", "r.raw"], tmp_path)


def test_raw_sparse_1T(tmp_path: Path) -> None:
    g.create(tmp_path, "big.raw", "1T", fmt="raw")
    compare_image("big.raw", tmp_path)


# -- snapshots --------------------------------------------------------------------------------

def test_snapshot_names(tmp_path: Path) -> None:
    img = g.create(tmp_path, "s.qcow2", "1M")
    names = ["snap1", "1", "10", "", "x" * 300, "héllo wörld", "emoji-😀-𝄞", "tab\there", 'quo"te\\back',
             "snap1", "a-very-long-snapshot-name-exceeding-sixteen", "2"]
    for n in names:
        g.snapshot(img, "-c", n)
    compare_image("s.qcow2", tmp_path)
    # Deleting by name removes the first match only; IDs are never reused.
    g.snapshot(img, "-d", "snap1")
    g.snapshot(img, "-d", "10")  # -d matches names only in qemu-img 7.2
    g.qemu_io(img, "write -P 3 0 64k")
    g.snapshot(img, "-c", "after")
    compare_image("s.qcow2", tmp_path)


def test_snapshot_v2_deletions(tmp_path: Path) -> None:
    img = g.create(tmp_path, "v2.qcow2", "1M", options=["compat=0.10"])
    for n in "abcde":
        g.qemu_io(img, f"write -P {ord(n)} 0 64k")
        g.snapshot(img, "-c", n)
    g.snapshot(img, "-d", "a")
    g.snapshot(img, "-d", "c")
    compare_image("v2.qcow2", tmp_path)


def test_snapshot_many(tmp_path: Path) -> None:
    img = g.create(tmp_path, "m.qcow2", "1M", options=["cluster_size=512"])
    for i in range(40):
        g.snapshot(img, "-c", f"s{i}")
    compare_image("m.qcow2", tmp_path)


@pytest.mark.parametrize("tz", ["Asia/Kolkata", "America/St_Johns", "UTC"])
def test_snapshot_date_timezone(tz: str, tmp_path: Path) -> None:
    img = g.create(tmp_path, "tz.qcow2", "1M")
    g.snapshot(img, "-c", "a")
    # A fixed, DST-affected date (2021-07-01 12:34:56 UTC) in the first entry.
    with open(img, "rb") as f:
        snap_off = int.from_bytes(f.read(72)[64:72], "big")
    g.set_u32(img, snap_off + 16, 1625142896)
    compare_image("tz.qcow2", tmp_path, env={"TZ": tz})


# -- backing chains ---------------------------------------------------------------------------

def _chain(d: Path, depth: int, *, raw_base: bool, rel: str = "", v2_mid: bool = False) -> str:
    """base <- l1 <- ... <- l<depth>; each layer names the one below as ``rel + name``."""
    sub = d / "sub"
    sub.mkdir(exist_ok=True)
    if raw_base:
        g.create(d, "base.raw", "8M", fmt="raw")
        g.qemu_io(d / "base.raw", "write -P 0x11 0 1M", fmt="raw")
        below, below_fmt = "base.raw", "raw"
    else:
        g.create(d, "base.qcow2", "8M")
        g.qemu_io(d / "base.qcow2", "write -P 0x11 0 1M")
        below, below_fmt = "base.qcow2", "qcow2"
    for i in range(1, depth + 1):
        name = f"l{i}.qcow2"
        opts = ["compat=0.10"] if v2_mid and i == 1 else []
        g.create(d, name, None, backing=rel + below, backing_fmt=below_fmt, options=opts)
        g.qemu_io(d / name, f"write -P {i} {i}M 64k")
        g.snapshot(d / name, "-c", f"snap{i}")
        below, below_fmt = name, "qcow2"
    return below


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("raw_base", [True, False])
def test_backing_chain_depth(depth: int, raw_base: bool, tmp_path: Path) -> None:
    top = _chain(tmp_path, depth, raw_base=raw_base, v2_mid=depth > 2)
    compare_image(top, tmp_path)
    if depth == 4:
        # Same chain named through a relative directory and an absolute path.
        compare_image(f"./{top}", tmp_path, snapshot_json=False)
        compare_image(f"sub/../{top}", tmp_path, snapshot_json=False)
        compare_image(str(tmp_path / top), tmp_path, snapshot_json=False)


@pytest.mark.parametrize("rel", ["./", "sub/../"])
def test_backing_relative_names(rel: str, tmp_path: Path) -> None:
    top = _chain(tmp_path, 2, raw_base=True, rel=rel)
    compare_image(top, tmp_path)
    compare_image(f"sub/../{top}", tmp_path)


def test_backing_in_subdir(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    g.create(tmp_path, "base.qcow2", "1M")
    g.create(sub, "top.qcow2", None, backing="../base.qcow2", backing_fmt="qcow2")
    compare_image("sub/top.qcow2", tmp_path)
    compare_image("top.qcow2", sub)
    compare_image(str(sub / "top.qcow2"), "/")


def test_backing_absolute(tmp_path: Path) -> None:
    g.create(tmp_path, "base.raw", "1M", fmt="raw")
    g.create(tmp_path, "top.qcow2", None, backing=str(tmp_path / "base.raw"), backing_fmt="raw")
    compare_image("top.qcow2", tmp_path)


def test_backing_missing(tmp_path: Path) -> None:
    g.create(tmp_path, "orphan.qcow2", "1M", backing="gone.qcow2", backing_fmt="qcow2", unsafe=True)
    compare_image("orphan.qcow2", tmp_path)
    # The missing file is one level down.
    g.create(tmp_path, "top.qcow2", "1M", backing="orphan.qcow2", backing_fmt="qcow2", unsafe=True)
    compare_image("top.qcow2", tmp_path)


def _drop_backing_format(path: Path) -> None:
    """Turn the backing-format extension into an unknown one (qemu-img 7.2 insists on -F)."""
    for ext_type, _, off in g.header_extensions(path):
        if ext_type == 0xE2792ACA:
            g.set_u32(path, off, 0x0BADF00D)


def _set_backing_name(path: Path, name: str) -> None:
    """Overwrite the stored backing name with one of the same length (loops qemu-img refuses to create)."""
    off, size = g.get_u64(path, g.OFF_BACKING_OFFSET), g.get_u32(path, g.OFF_BACKING_SIZE)
    assert len(name.encode()) == size
    g.patch(path, off, name.encode())


@pytest.mark.parametrize("damage", ["version-4", "bad-magic", "truncated", "bad-backing-fmt"])
def test_backing_broken_below(damage: str, tmp_path: Path) -> None:
    """The bottom of a 3-image chain is damaged: errors carry each level's prefix."""
    base = g.create(tmp_path, "base.qcow2", "1M")
    g.create(tmp_path, "mid.qcow2", None, backing="base.qcow2", backing_fmt="qcow2")
    g.create(tmp_path, "top.qcow2", None, backing="mid.qcow2", backing_fmt="qcow2")
    if damage == "version-4":
        g.set_u32(base, g.OFF_VERSION, 4)
    elif damage == "bad-magic":
        g.patch(base, 0, b"XXXX")
    elif damage == "truncated":
        g.truncate(base, 50)
    else:
        mid = g.create(tmp_path, "mid.qcow2", "1M", backing="base.qcow2", backing_fmt="raw", unsafe=True)
        off = next(o for t, _, o in g.header_extensions(mid) if t == 0xE2792ACA)
        g.patch(mid, off + 8, b"xyz")  # a format name neither tool knows
    compare_image("top.qcow2", tmp_path)


def test_backing_without_format(tmp_path: Path) -> None:
    """No backing format stored: --backing-chain and snapshot -l probe each layer."""
    g.create(tmp_path, "base.raw", "1M", fmt="raw")
    g.create(tmp_path, "mid.qcow2", "1M", backing="base.raw", backing_fmt="raw")
    g.create(tmp_path, "top.qcow2", "1M", backing="mid.qcow2", backing_fmt="qcow2")
    _drop_backing_format(tmp_path / "mid.qcow2")
    _drop_backing_format(tmp_path / "top.qcow2")
    compare_image("top.qcow2", tmp_path)


def test_backing_format_mismatch(tmp_path: Path) -> None:
    """The stored backing format wins over probing (a qcow2 read as raw)."""
    g.create(tmp_path, "base.qcow2", "1M")
    g.create(tmp_path, "top.qcow2", "1M", backing="base.qcow2", backing_fmt="raw", unsafe=True)
    compare_image("top.qcow2", tmp_path)


@pytest.mark.parametrize("loop", ["self", "pair", "pair-relative", "triple"])
def test_backing_loop(loop: str, tmp_path: Path) -> None:
    d = tmp_path
    if loop == "self":
        g.create(d, "a.qcow2", "1M", backing="x.qcow2", backing_fmt="qcow2", unsafe=True)
        _set_backing_name(d / "a.qcow2", "a.qcow2")
    elif loop == "pair":
        g.create(d, "a.qcow2", "1M", backing="b.qcow2", backing_fmt="qcow2", unsafe=True)
        g.create(d, "b.qcow2", "1M", backing="a.qcow2", backing_fmt="qcow2", unsafe=True)
    elif loop == "pair-relative":
        (d / "sub").mkdir()
        g.create(d, "a.qcow2", "1M", backing="sub/../b.qcow2", backing_fmt="qcow2", unsafe=True)
        g.create(d, "b.qcow2", "1M", backing="./a.qcow2", backing_fmt="qcow2", unsafe=True)
    else:
        g.create(d, "a.qcow2", "1M", backing="b.qcow2", backing_fmt="qcow2", unsafe=True)
        g.create(d, "b.qcow2", "1M", backing="c.qcow2", backing_fmt="qcow2", unsafe=True)
        _drop_backing_format(d / "b.qcow2")
        g.create(d, "c.qcow2", "1M", backing="b.qcow2", backing_fmt="qcow2", unsafe=True)
    # Only the info variants: qemu-img snapshot -l follows such loops until the
    # name is too long (or forever); vdkit stops at the first repeated file.
    for variant in INFO_VARIANTS:
        same([*variant, "a.qcow2"], d)
    r = run_vdkit(["snapshot", "-l", "a.qcow2"], d)
    assert r.returncode == 1 and "creates an infinite loop" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("stored", ["file:base.qcow2", "x:base.qcow2", "file:sub/../base.qcow2"])
def test_backing_with_protocol_prefix(stored: str, tmp_path: Path) -> None:
    """"file:" is stripped when opening; an unknown prefix is QEMU's "Unknown protocol"."""
    (tmp_path / "sub").mkdir()
    g.create(tmp_path, "base.qcow2", "1M")
    g.create(tmp_path, "top.qcow2", "1M", backing=stored, backing_fmt="qcow2", unsafe=True)
    compare_image("top.qcow2", tmp_path)
    compare_image("file:top.qcow2", tmp_path)


def test_backing_protocol_name(tmp_path: Path) -> None:
    g.create(tmp_path, "p.qcow2", "1M", backing="nbd://localhost:1/x", backing_fmt="raw", unsafe=True)
    for variant in (("info",), ("info", "--output=json")):
        same([*variant, "p.qcow2"], tmp_path)


# -- bitmaps, data files, flags -----------------------------------------------------------------

def test_bitmaps_qemu_img(tmp_path: Path) -> None:
    img = g.create(tmp_path, "b.qcow2", "4M")
    g.bitmap_add(img, "b0")
    g.bitmap_add(img, "disabled-one", granularity="512k", disabled=True)
    g.bitmap_add(img, "ünïcode", granularity="4k")
    compare_image("b.qcow2", tmp_path)


@pytest.mark.parametrize("raw_flag", [False, True])
def test_data_file(raw_flag: bool, tmp_path: Path) -> None:
    opts = ["data_file=d.raw"] + (["data_file_raw=on"] if raw_flag else [])
    img = g.create(tmp_path, "e.qcow2", "4M", options=opts)
    g.qemu_io(img, "write -P 9 0 1M", cwd=tmp_path)  # the data file name is relative to the cwd
    compare_image("e.qcow2", tmp_path)
    compare_image(str(img), "/")
    os.unlink(tmp_path / "d.raw")
    compare_image("e.qcow2", tmp_path)


def test_data_file_in_subdir(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    g.create(tmp_path / "sub", "e.qcow2", "1M", options=["data_file=data.bin"])
    compare_image("sub/e.qcow2", tmp_path)


@pytest.mark.parametrize("bits", [0x1, 0x2, 0x3])
def test_dirty_and_corrupt_bits(bits: int, tmp_path: Path) -> None:
    img = g.create(tmp_path, "f.qcow2", "1M", options=["lazy_refcounts=on"] if bits & 1 else [])
    g.qemu_io(img, "write 0 64k")
    g.set_u64(img, g.OFF_INCOMPAT, g.get_u64(img, g.OFF_INCOMPAT) | bits)
    compare_image("f.qcow2", tmp_path)


def test_autoclear_bitmaps_cleared(tmp_path: Path) -> None:
    """Bitmaps extension present but the autoclear bit gone: QEMU ignores the bitmaps."""
    img = g.create(tmp_path, "b.qcow2", "1M")
    g.bitmap_add(img, "b0")
    g.set_u64(img, g.OFF_AUTOCLEAR, 0)
    compare_image("b.qcow2", tmp_path)


def test_luks_encrypted(tmp_path: Path) -> None:
    """LUKS-encrypted qcow2: needs the LUKS header parser (vdkit.formats.luks)."""
    r = qemu_img_pbkdf("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                       "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "enc.qcow2", "1M",
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    compare_image("enc.qcow2", tmp_path)


# -- names that need escaping -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ä.qcow2", "sp ace.qcow2", "tab\t.qcow2", "nl\n.qcow2", "q\"uote.qcow2",
                                  "astral-𝄞.qcow2", "bad-\udcff.qcow2", "ctl-\x01\x7f.qcow2"])
def test_filename_escaping(name: str, tmp_path: Path) -> None:
    fs_name = os.fsencode(name)
    g.run(require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=tmp_path)
    os.rename(tmp_path / "base.qcow2", tmp_path / os.fsdecode(fs_name))
    g.create(tmp_path, "top.qcow2", None, backing=name, backing_fmt="qcow2")
    compare_image(name, tmp_path)
    compare_image("top.qcow2", tmp_path)


# -- command line -----------------------------------------------------------------------------

@pytest.fixture
def cli_dir(tmp_path: Path) -> Path:
    g.create(tmp_path, "q.qcow2", "1M")
    g.snapshot(tmp_path / "q.qcow2", "-c", "s")
    (tmp_path / "r.raw").write_bytes(bytes(4096))
    (tmp_path / "dir").mkdir()
    return tmp_path


CLI_CASES: list[list[str]] = [
    ["info", "-f", "qcow2", "q.qcow2"],
    ["info", "-f", "raw", "q.qcow2"],
    ["info", "-fraw", "q.qcow2"],
    ["info", "-f", "qcow2", "r.raw"],
    ["info", "-f", "nosuchfmt", "r.raw"],
    ["info", "-U", "q.qcow2"],
    ["info", "--force-share", "--output=json", "q.qcow2"],
    ["info", "--force", "q.qcow2"],
    ["info", "--output=foo", "q.qcow2"],
    ["info", "--output", "json", "q.qcow2"],
    ["info", "--output=", "q.qcow2"],
    ["info", "--out=json", "q.qcow2"],
    ["info", "--o=json", "q.qcow2"],
    ["info", "--back", "q.qcow2"],
    ["info", "--b", "q.qcow2"],
    ["info", "q.qcow2", "--output=json"],
    ["info", "q.qcow2", "-U", "--backing-chain"],
    ["info", "--", "q.qcow2"],
    ["info", "nonexist.qcow2"],
    ["info", "-f", "raw", "nonexist.raw"],
    ["info", "dir"],
    ["info", "-f", "raw", "dir"],
    ["info"],
    ["info", "q.qcow2", "r.raw"],
    ["info", "-x", "q.qcow2"],
    ["info", "--nosuch", "q.qcow2"],
    ["info", "--backing-chain=yes", "q.qcow2"],
    ["info", "-f"],
    ["info", "--output"],
    ["info", "--output=json", "--output=human", "q.qcow2"],
    ["info", "-q", "q.qcow2"],
    ["info", ""],
    ["info", "-", "q.qcow2"],
    ["info", "--image-opts", "driver=qcow2,file.filename=q.qcow2"],
    ["info", "--image-opts", "--output=json", "file.filename=q.qcow2"],
    ["info", "--image-opts", "driver=raw,file.driver=file,file.filename=q.qcow2"],
    ["info", "--image-opts", "driver=qcow2,file.filename=nonexist"],
    ["info", "--image-opts", "driver=qcow2"],
    ["info", "--image-opts", "filename=q.qcow2"],
    ["info", "--image-opts", "q.qcow2"],
    ["info", "--image-opts", "driver=qcow2,file.filename=q.qcow2,bogus=1"],
    ["info", "--image-opts", "driver=qcow2,file.filename=q.qcow2,,x"],
    ["info", "--image-opts", "-f", "qcow2", "driver=qcow2,file.filename=q.qcow2"],
    ["snapshot", "-l", "--image-opts", "driver=qcow2,file.filename=q.qcow2"],
    ["snapshot", "-l", "--image-opts", "driver=qcow2,file.filename=r.raw"],
    ["info", "x:y.qcow2"],
    ["info", "FILE:q.qcow2"],
    ["info", "file:q.qcow2"],
    ["info", "--backing-chain", "--output=json", "file:q.qcow2"],
    ["info", "file:"],
    ["info", "file:nonexist"],
    ["info", "./x:y.qcow2"],
    ["snapshot", "-l", "file:q.qcow2"],
    ["snapshot", "-l", "q.qcow2"],
    ["snapshot", "-l", "-U", "q.qcow2"],
    ["snapshot", "q.qcow2", "-l"],
    ["snapshot", "-l", "-f", "qcow2", "r.raw"],
    ["snapshot", "-l", "-f", "raw", "r.raw"],
    ["snapshot", "-l", "r.raw"],
    ["snapshot", "-l", "nonexist.qcow2"],
    ["snapshot", "-l", "dir"],
    ["snapshot", "-l"],
    ["snapshot", "-l", "q.qcow2", "r.raw"],
    ["snapshot", "-l", "-a", "x", "q.qcow2"],
    ["snapshot", "-l", "-l", "q.qcow2"],
    ["snapshot", "-l", "--force-share", "q.qcow2"],
    ["snapshot", "-z", "q.qcow2"],
]


@pytest.mark.parametrize("args", CLI_CASES, ids=[" ".join(a) or "empty" for a in CLI_CASES])
def test_cli(args: list[str], cli_dir: Path) -> None:
    same(args, cli_dir)


def test_snapshot_output_extension(cli_dir: Path) -> None:
    """``snapshot --output`` is vdkit's extension; a bad value gets info's message (qemu-img: unknown option)."""
    r = run_vdkit(["snapshot", "-l", "--output=foo", "q.qcow2"], cli_dir)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "vdkit-img: --output must be used with human or json as argument.\n"
    h = run_vdkit(["snapshot", "-l", "--output=human", "q.qcow2"], cli_dir)
    assert h.stdout == run_vdkit(["snapshot", "-l", "q.qcow2"], cli_dir).stdout != ""


def test_snapshot_list_json_empty(cli_dir: Path) -> None:
    same_snapshot_json("r.raw", cli_dir)
    g.create(cli_dir, "n.qcow2", "1M")
    same_snapshot_json("n.qcow2", cli_dir)


# -- random images ------------------------------------------------------------------------------

def _random_image(rng: random.Random, d: Path) -> str:
    compat = rng.choice(["0.10", "1.1"])
    cluster_bits = rng.randint(9, 21)
    opts = [f"compat={compat}", f"cluster_size={1 << cluster_bits}"]
    if compat == "1.1":
        opts.append(f"refcount_bits={rng.choice([1, 2, 4, 8, 16, 32, 64])}")
        if rng.random() < 0.3:
            opts.append("lazy_refcounts=on")
        if rng.random() < 0.3:
            opts.append("compression_type=zstd")
        if cluster_bits >= 14 and rng.random() < 0.3:
            opts.append("extended_l2=on")
    size = rng.choice([rng.randint(1, 1 << 24), 1 << rng.randint(9, 30)])
    img = g.create(d, "r.qcow2", size, options=opts)
    cmds = []
    for _ in range(rng.randint(0, 6)):
        off = rng.randrange(0, max(1, size - 512)) // 512 * 512
        length = min(rng.choice([512, 4096, 65536, 300 * 512]), size - off) // 512 * 512
        if length <= 0:
            continue
        kind = rng.choice(["write", "write -z", "write -c", "discard"])
        if kind == "write -c":
            # compressed writes must be cluster aligned
            cs = 1 << cluster_bits
            off = off // cs * cs
            length = cs if off + cs <= size else 0
            if length <= 0:
                continue
        cmds.append(f"{kind} {off} {length}")
    if cmds:
        g.qemu_io(img, *cmds)
    made = []
    for i in range(rng.randint(0, 3)):
        made.append(rng.choice([f"s{i}", str(i + 2), "dup", "ü" * rng.randint(0, 20)]))
        g.snapshot(img, "-c", made[-1])
        if rng.random() < 0.5:
            g.qemu_io(img, f"write -P {i} 0 512")
    if made and rng.random() < 0.4:
        g.snapshot(img, "-d", rng.choice(made))
    return "r.qcow2"


@pytest.mark.parametrize("seed", range(15))
def test_random_image(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed * 7919 + 13)
    name = _random_image(rng, tmp_path)
    compare_image(name, tmp_path)


def test_copy_keeps_output(tmp_path: Path) -> None:
    """A symlinked image is reported by the name given, not the link target."""
    g.create(tmp_path, "base.qcow2", "1M")
    (tmp_path / "link.qcow2").symlink_to("base.qcow2")
    compare_image("link.qcow2", tmp_path)
    shutil.copy(tmp_path / "base.qcow2", tmp_path / "copy.qcow2")
    compare_image("copy.qcow2", tmp_path)
