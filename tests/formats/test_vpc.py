"""vpc (VHD): vdkit-img against qemu-img 7.2 (and vdkit-daemon against qemu-system-x86_64) on images qemu makes.

Covers fixed (probed as raw unless ``-f vpc``) and dynamic images, ``force_size``,
the CHS size rounding and the creator rule of the virtual size, info/map/
compare/convert on every variant, ``create``/``convert -O vpc`` identical to
qemu-img's files once the time stamp, checksum and UUID of each footer copy
are masked, the open errors of damaged headers, the daemon, and a seeded damage
sweep under an address-space limit.
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
from tests.helpers.patching import damage_at, pack_fields
from tests.helpers.qemu_io import qemu_io_script

_io = partial(qemu_io_script, fmt="vpc")  # _io(d, name, [commands]): qemu-io must succeed


# name -> (create options, qemu-io pattern?)
IMAGES = {
    "d.vpc": ("", True),
    "f.vpc": ("subformat=fixed", True),
    "fs.vpc": ("force_size=on", True),
    "ffs.vpc": ("subformat=fixed,force_size=on", True),
    "e.vpc": ("", False),
}
FIXED = ("f.vpc", "ffs.vpc")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vpc")
    src_raw(d)
    for name, (opts, pattern) in IMAGES.items():
        check_ok("create", "-q", "-f", "vpc", *(["-o", opts] if opts else []), name, "4M", cwd=d)
        if pattern:
            _io(d, name, PATTERN)
    check_ok("create", "-q", "-f", "vpc", "z.vpc", "0", cwd=d)
    check_ok("convert", "-O", "vpc", "src.raw", "c.vpc", cwd=d)
    check_ok("convert", "-O", "vpc", "-o", "force_size=on", "src.raw", "cfs.vpc", cwd=d)
    return d


READ = [["info"], ["info", "--output=json"], ["info", "--backing-chain"], ["map"], ["map", "--output=json"],
        ["check"], ["check", "--output=json"], ["snapshot", "-l"]]


@pytest.mark.parametrize("name", [*IMAGES, "z.vpc", "c.vpc", "cfs.vpc"])
def test_read_side(images: Path, name: str) -> None:
    """Every read-side command on d.vpc and f.vpc (fixed: probed as raw without ``-f``, in both tools);
    info, map, compare and convert to raw on the other variants."""
    d = images
    full = name in ("d.vpc", "f.vpc")
    for args in READ if full else [["info", "--output=json"], ["map", "--output=json"]]:
        if full:
            assert_same([*args, name], d)
        assert_same([args[0], "-f", "vpc", *args[1:], name], d)
    fmt = ["-F", "vpc"]
    assert_same(["compare", "-f", "raw", *fmt, "src.raw", name], d)
    if full:
        assert_same(["compare", "-f", "vpc", *fmt, name, name], d)
        assert_same(["compare", "-s", "-f", "raw", *fmt, "src.raw", name], d)
        assert_same(["compare", "src.raw", name], d)
    for target in ("raw", "qcow2") if full else ("raw",):
        out = f"v_{name}.{target}"
        v = vdkit_img("convert", "-f", "vpc", "-O", target, name, out, cwd=d)
        assert v.returncode == 0, v.stderr
        q = f"q_{name}.{target}"
        check_ok("convert", "-f", "vpc", "-O", target, name, q, cwd=d)
        r = qemu_img("compare", "-f", target, "-F", target, out, q, cwd=d)
        assert (r.returncode, r.stdout) == (0, "Images are identical.\n"), r.stdout + r.stderr
        if target == "raw":  # same zero detection: same sparse layout
            assert data_extents(d / out) == data_extents(d / q)


def test_refusals(images: Path) -> None:
    for args in (["snapshot", "-c", "s", "d.vpc"], ["snapshot", "-a", "s", "d.vpc"], ["snapshot", "-d", "s", "d.vpc"],
                 ["check", "-r", "all", "d.vpc"], ["check", "-r", "leaks", "-f", "vpc", "f.vpc"],
                 ["create", "-f", "vpc", "-b", "d.vpc", "-F", "vpc", "n.vpc"], ["convert", "-c", "-O", "vpc",
                                                                                  "src.raw", "n.vpc"]):
        assert_same(args, images)


# -- the size rule on open: creators and the maximum geometry -------------------------------------

def _checksum(block: bytearray, at: int) -> None:
    struct.pack_into(">I", block, at, 0)
    struct.pack_into(">I", block, at, ~sum(block) & 0xFFFFFFFF)


def _patch(d: Path, src: str, name: str, fields: list[tuple[int, str, object]], *, footer: int | None = 0) -> str:
    """Copy ``src`` with fields patched; the footer at ``footer`` (None: the last 512 bytes) gets a fresh checksum."""
    data = pack_fields(bytearray((d / src).read_bytes()), fields)
    at = len(data) - 512 if footer is None else footer
    if at >= 0 and footer != -1:
        block = data[at:at + 512]
        _checksum(block, 64)
        data[at:at + 512] = block
    (d / name).write_bytes(bytes(data))
    return name


def _same_open(d: Path, name: str, *, probe: bool = False) -> None:
    """info (human: the error text) with ``-f vpc`` (and probed), then map and a full read when it opens."""
    if probe:
        assert_same(["info", "--output=json", name], d)
    if assert_same(["info", "-f", "vpc", name], d).returncode == 0:
        assert_same(["map", "-f", "vpc", "--output=json", name], d)
        assert_same(["compare", "-f", "vpc", "-F", "raw", name, "src.raw"], d)


SIZE_RULE = {  # patched on fs.vpc (current size 4 MiB, CHS 65535/16/255, creator qem2)
    "chs-qemu": [(56, ">HBB", (121, 4, 17)), (28, "4s", b"qemu")],
    "chs-win": [(56, ">HBB", (121, 4, 17)), (28, "4s", b"win ")],
    "chs-d2v": [(56, ">HBB", (121, 4, 17)), (28, "4s", b"d2v ")],
    "chs-vpc": [(56, ">HBB", (121, 4, 17)), (28, "4s", b"vpc ")],
    "chs-tap": [(56, ">HBB", (121, 4, 17)), (28, "4s", b"tap\0")],
    "chs-ctxs": [(56, ">HBB", (121, 4, 17)), (28, "4s", b"CTXS")],
    "chs-small-qemu": [(56, ">HBB", (30, 4, 17)), (28, "4s", b"qemu")],
    "odd-size-win": [(48, ">Q", 12345), (28, "4s", b"win ")],
    "size-zero": [(48, ">Q", 0)],
    "chs-zero": [(56, ">HBB", (0, 0, 0)), (28, "4s", b"abcd")],
    "max-sectors": [(48, ">Q", 0xFF000000 * 512)],
    "too-large": [(48, ">Q", 0xFF000000 * 512 + 512)],
    "too-large-odd": [(48, ">Q", 0xFF000000 * 512 + 511)],
    "huge": [(48, ">Q", 1 << 62)],
}


@pytest.mark.parametrize("case", list(SIZE_RULE))
def test_size_rule(images: Path, case: str) -> None:
    name = _patch(images, "fs.vpc", f"sr-{case}.vpc", SIZE_RULE[case])
    _same_open(images, name)


# -- damaged headers -------------------------------------------------------------------------------

DYN = 512
BAD_DYNAMIC = {  # patched on d.vpc: (fields, footer to re-checksum: 0, or -1 for none)
    "footer-checksum": ([(64, ">I", 0)], -1),
    "footer-byte": ([(100, "B", 1)], -1),
    "dyn-magic": ([(DYN, "8s", b"cxsparsE")], -1),
    "dyn-checksum": ([(DYN + 36, ">I", 0)], -1),
    "data-offset-0": ([(16, ">Q", 0)], 0),
    "data-offset-far": ([(16, ">Q", 1 << 50)], 0),
    "data-offset-max": ([(16, ">Q", (1 << 64) - 1)], 0),
    "type-fixed": ([(60, ">I", 2)], 0),
    "type-fixed-bad-dyn": ([(60, ">I", 2), (DYN + 32, ">I", 3 << 20)], 0),
    "type-4": ([(60, ">I", 4)], 0),
    "type-7": ([(60, ">I", 7)], 0),
    "block-0": ([(DYN + 32, ">I", 0)], -1),
    "block-256": ([(DYN + 32, ">I", 256)], -1),
    "block-512": ([(DYN + 32, ">I", 512)], -1),
    "block-1M": ([(DYN + 32, ">I", 1 << 20)], -1),
    "block-1M-5": ([(DYN + 32, ">I", 1 << 20), (DYN + 28, ">I", 5)], -1),
    "block-3M": ([(DYN + 32, ">I", 3 << 20)], -1),
    "block-2G": ([(DYN + 32, ">I", 1 << 31)], -1),
    "entries-0": ([(DYN + 28, ">I", 0)], -1),
    "entries-4": ([(DYN + 28, ">I", 4)], -1),
    "entries-ffffff": ([(DYN + 28, ">I", 0xFFFFFF)], -1),
    "entries-1fffffff": ([(DYN + 28, ">I", 0x1FFFFFFF)], -1),
    "entries-20000000": ([(DYN + 28, ">I", 0x20000000)], -1),
    "entries-max": ([(DYN + 28, ">I", 0xFFFFFFFF)], -1),
    "entries-sign": ([(DYN + 28, ">I", 0x80000000)], -1),
    "bat-far": ([(DYN + 16, ">Q", 1 << 40)], -1),
    "bat-max": ([(DYN + 16, ">Q", (1 << 64) - 1)], -1),
    "bat-odd": ([(DYN + 16, ">Q", 1537)], -1),
    "bat-0": ([(DYN + 16, ">Q", 0)], -1),
    "entry-far": ([(1536, ">I", 0x7FFFFFFF)], -1),
    "entry-1": ([(1536, ">I", 1)], -1),
    "entry-0": ([(1536, ">I", 0)], -1),
    "entry-shared": ([(1540, ">I", 4)], -1),
    "entry-sign": ([(1536, ">I", 0x80000000)], -1),
    "entry-fffffffe": ([(1536, ">I", 0xFFFFFFFE)], -1),
    "magic-only": ([(8, "8s", b"\0" * 8)], -1),
}


@pytest.mark.parametrize("case", list(BAD_DYNAMIC))
def test_bad_dynamic(images: Path, case: str) -> None:
    fields, footer = BAD_DYNAMIC[case]
    name = _patch(images, "d.vpc", f"bad-{case}.vpc", fields, footer=footer)
    _same_open(images, name, probe=True)


def _truncated(d: Path, src: str, size: int) -> str:
    name = f"cut-{src}-{size}"
    data = (d / src).read_bytes()
    (d / name).write_bytes(data[:size] if size <= len(data) else data + bytes(size - len(data)))
    return name


@pytest.mark.parametrize(("src", "size"), [
    ("d.vpc", 0), ("d.vpc", 100), ("d.vpc", 511), ("d.vpc", 1000), ("d.vpc", 1536), ("d.vpc", 2047),
    ("d.vpc", 3000), ("d.vpc", 4196864), ("d.vpc", 4196865), ("d.vpc", 4197375), ("d.vpc", 4197376),
    ("d.vpc", 4197887), ("d.vpc", 4197889), ("e.vpc", 2048), ("e.vpc", 2047), ("e.vpc", 1536),
    ("f.vpc", 4213247), ("f.vpc", 4213249), ("f.vpc", 4096), ("f.vpc", 512), ("f.vpc", 0),
])
def test_truncated(images: Path, src: str, size: int) -> None:
    name = _truncated(images, src, size)
    _same_open(images, name)


BAD_FIXED = {  # patched on f.vpc's footer (the last 512 bytes)
    "checksum": ([(-512 + 64, ">I", 0)], -1),
    "type-3": ([(-512 + 60, ">I", 3)], None),
    "type-4": ([(-512 + 60, ">I", 4)], None),
    "type-0": ([(-512 + 60, ">I", 0)], None),
    "cookie": ([(-512, "8s", b"conectiX")], None),
    "chs-bigger-than-file": ([(-512 + 56, ">HBB", (1000, 16, 63))], None),
    "creator-win-size": ([(-512 + 28, "4s", b"win "), (-512 + 48, ">Q", 1 << 20)], None),
    "too-large": ([(-512 + 56, ">HBB", (65535, 16, 255)), (-512 + 48, ">Q", 1 << 62)], None),
}


@pytest.mark.parametrize("case", list(BAD_FIXED))
def test_bad_fixed(images: Path, case: str) -> None:
    fields, footer = BAD_FIXED[case]
    name = _patch(images, "f.vpc", f"badf-{case}.vpc", fields, footer=footer)
    _same_open(images, name)


def test_fixed_footer_at_start(tmp_path: Path) -> None:
    """A fixed footer found at offset 0 (a 512-byte file) sends QEMU to the dynamic header."""
    check_ok("create", "-q", "-f", "vpc", "-o", "subformat=fixed", "z.vpc", "0", cwd=tmp_path)
    check_ok("create", "-q", "-f", "vpc", "-o", "subformat=fixed", "one.vpc", "512", cwd=tmp_path)
    for args in (["info", "-f", "vpc", "z.vpc"], ["info", "z.vpc"], ["info", "-f", "vpc", "one.vpc"]):
        assert_same(args, tmp_path)


# -- create and convert -O vpc -----------------------------------------------------------------------

def _mask(data: bytearray) -> bytearray:
    """Zero the time stamp, checksum and UUID of every footer copy (512-aligned ``conectix`` blocks)."""
    for at in range(0, len(data) - 511, 512):
        if data[at:at + 8] == b"conectix":
            data[at + 0x18:at + 0x1C] = bytes(4)
            data[at + 0x40:at + 0x54] = bytes(20)
    return data


def _masked(path: Path) -> tuple[int, list[tuple[int, int]], bytes, bytes]:
    """Size, data extents and the file's first 2 KiB and last sector, masked."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(2048)
        f.seek(max(0, size - 512))
        tail = f.read(512)
    return size, data_extents(path), bytes(_mask(bytearray(head))), bytes(_mask(bytearray(tail)))


def _same_file(a: Path, b: Path) -> None:
    """Identical after masking (qemu-img's files differ between runs only there)."""
    assert _masked(a) == _masked(b)
    if a.stat().st_size <= 64 << 20:  # larger: everything between is a hole in both (same extents)
        assert _mask(bytearray(a.read_bytes())) == _mask(bytearray(b.read_bytes()))


CREATE_OPTS = ["", "subformat=dynamic", "subformat=fixed", "force_size=on", "subformat=fixed,force_size=on",
               "subformat=fixed,preallocation=full"]
SIZES = ["0", "1000", "4M", "1G", "127G", "200G", "2040G"]


@pytest.mark.parametrize("opts", CREATE_OPTS)
def test_create(tmp_path: Path, opts: str) -> None:
    for size in SIZES:
        if "fixed" in opts and size in ("127G", "200G", "2040G") and "full" in opts:
            continue
        o = ["-o", opts] if opts else []
        q = qemu_img("create", "-f", "vpc", *o, f"q{size}.vpc", size, cwd=tmp_path)
        v = vdkit_img("create", "-f", "vpc", *o, f"v{size}.vpc", size, cwd=tmp_path)
        assert (v.returncode, v.stdout.replace("'v", "'q"), v.normalized_stderr().replace(" v", " q")) == (
            q.returncode, q.stdout, q.stderr)
        _same_file(tmp_path / f"q{size}.vpc", tmp_path / f"v{size}.vpc")
        if size in ("0", "1000", "4M", "1G"):
            for name in (f"q{size}.vpc", f"v{size}.vpc"):
                assert_same(["info", "-f", "vpc", name], tmp_path)
            if qemu_img("info", "-f", "vpc", f"q{size}.vpc", cwd=tmp_path).returncode:
                continue  # a fixed empty disk: its footer at offset 0 makes QEMU look for a dynamic header
            r = qemu_img("compare", "-f", "vpc", "-F", "vpc", f"q{size}.vpc", f"v{size}.vpc", cwd=tmp_path)
            assert r.returncode == 0, r.stdout + r.stderr
        (tmp_path / f"q{size}.vpc").unlink()
        (tmp_path / f"v{size}.vpc").unlink()


def test_geometry_random_sizes(tmp_path: Path) -> None:
    """The CHS rounding for sizes the reference does not list: qemu-img's footers against disk_geometry."""
    from vdkit.formats.vpc.create import disk_geometry

    rng = random.Random(11)
    sizes = [rng.randrange(1, 2040 << 30) for _ in range(15)] + [rng.randrange(1, 1 << 30) for _ in range(15)]
    sizes += [65535 * 16 * 63 * 512 - 512, 65535 * 16 * 63 * 512, 65535 * 16 * 255 * 512 - 512,
              65535 * 16 * 255 * 512 + 512, 1024 * 4 * 17 * 512, 1024 * 16 * 31 * 512 - 1]
    for size in sizes:
        check_ok("create", "-q", "-f", "vpc", "q.vpc", str(size), cwd=tmp_path)
        footer = (tmp_path / "q.vpc").read_bytes()[:512]
        stored = (struct.unpack_from(">Q", footer, 48)[0] // 512, struct.unpack_from(">HBB", footer, 56))
        assert disk_geometry(size, False) == stored, size
    v = vdkit_img("create", "-q", "-f", "vpc", "v.vpc", str(sizes[0]), cwd=tmp_path)
    assert v.returncode == 0, v.stderr
    check_ok("create", "-q", "-f", "vpc", "q.vpc", str(sizes[0]), cwd=tmp_path)
    _same_file(tmp_path / "q.vpc", tmp_path / "v.vpc")


@pytest.mark.parametrize("args", [
    ["-o", "subformat=foo"], ["-o", "preallocation=foo"], ["-o", "preallocation=metadata"], ["-o", "force_size=maybe"],
    ["-o", "cluster_size=64k"], ["-o", "help"], ["-o", "?"],
])
def test_create_errors(tmp_path: Path, args: list[str]) -> None:
    for name in ("q.vpc", "v.vpc"):
        (tmp_path / name).write_bytes(b"old contents")
    q = qemu_img("create", "-f", "vpc", *args, "q.vpc", "1M", cwd=tmp_path)
    v = vdkit_img("create", "-f", "vpc", *args, "v.vpc", "1M", cwd=tmp_path)
    assert (v.returncode, v.stdout.replace("'v", "'q"), v.normalized_stderr().replace("v.vpc", "q.vpc")) == (
        q.returncode, q.stdout, q.stderr)
    assert (tmp_path / "v.vpc").read_bytes() == (tmp_path / "q.vpc").read_bytes()
    assert_same(["create", "-f", "vpc", "-o", "help"], tmp_path)
    assert_same(["create", "-f", "vpc", "-o", "help", "x.vpc"], tmp_path)


def test_create_too_large(tmp_path: Path) -> None:
    for opts in ("", "subformat=fixed", "force_size=on"):
        o = ["-o", opts] if opts else []
        q = qemu_img("create", "-f", "vpc", *o, "q.vpc", "2041G", cwd=tmp_path)
        v = vdkit_img("create", "-f", "vpc", *o, "v.vpc", "2041G", cwd=tmp_path)
        assert (v.returncode, v.stdout.replace("'v", "'q"), v.normalized_stderr().replace("v.vpc", "q.vpc")) == (
            q.returncode, q.stdout, q.stderr)
        assert (tmp_path / "v.vpc").stat().st_size == (tmp_path / "q.vpc").stat().st_size == 0


@pytest.mark.parametrize("opts", ["", "subformat=fixed", "force_size=on", "subformat=fixed,force_size=on"])
@pytest.mark.parametrize("src", ["src.raw", "d.vpc", "f.vpc", "e.vpc"])
def test_convert_to_vpc(images: Path, tmp_path: Path, opts: str, src: str) -> None:
    fmt = ["-f", "raw" if src.endswith(".raw") else "vpc"]
    o = ["-o", opts] if opts else []
    q = qemu_img("convert", *fmt, "-O", "vpc", *o, str(images / src), "q.vpc", cwd=tmp_path)
    v = vdkit_img("convert", *fmt, "-O", "vpc", *o, str(images / src), "v.vpc", cwd=tmp_path)
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    _same_file(tmp_path / "q.vpc", tmp_path / "v.vpc")
    r = qemu_img("compare", "-f", "vpc", "-F", fmt[1], "v.vpc", str(images / src), cwd=tmp_path)
    assert r.stdout.endswith("Images are identical.\n"), r.stdout + r.stderr
    assert_same(["info", "-f", "vpc", "v.vpc"], tmp_path)


def test_convert_chain_of_writes(tmp_path: Path) -> None:
    """Data written by vdkit into an existing dynamic image (convert -n) lands as qemu-img's does."""
    src_raw(tmp_path)
    for p in ("q", "v"):
        check_ok("create", "-q", "-f", "vpc", f"{p}.vpc", "4M", cwd=tmp_path)
    check_ok("convert", "-n", "-O", "vpc", "src.raw", "q.vpc", cwd=tmp_path)
    v = vdkit_img("convert", "-n", "-O", "vpc", "src.raw", "v.vpc", cwd=tmp_path)
    assert v.returncode == 0, v.stderr
    r = qemu_img("compare", "-f", "vpc", "-F", "vpc", "q.vpc", "v.vpc", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, "Images are identical.\n"), r.stdout + r.stderr
    assert_same(["map", "--output=json", "v.vpc"], tmp_path)
    qm = qemu_img("map", "--output=json", "q.vpc", cwd=tmp_path).stdout
    assert vdkit_img("map", "--output=json", "v.vpc", cwd=tmp_path).stdout == qm


# -- the daemon ----------------------------------------------------------------------------------

def _same_masked_bytes(q: Path, v: Path) -> None:
    assert _mask(bytearray(v.read_bytes())) == _mask(bytearray(q.read_bytes()))


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_daemon_drive(tmp_path: Path, kind: str) -> None:
    def setup(d: Path) -> None:
        check_ok("create", "-q", "-f", "vpc", "-o", f"subformat={kind}", "d.vpc", "4M", cwd=d)
        _io(d, "d.vpc", PATTERN)

    daemon_drive_roundtrip(tmp_path, "d.vpc", "vpc", setup,
                           same_files=_same_masked_bytes)


# -- damage sweep --------------------------------------------------------------------------------

def _damage(base: bytes, rng: random.Random, regions: list[tuple[int, int]],
            footers: list[int]) -> tuple[bytes, list[str]]:
    """Up to four changes in ``regions`` (bytes, bits, boundary u32/u64 big-endian); then, half of the
    time, the footer copies get valid checksums so that the damage reaches the later checks."""
    d = bytearray(base)
    desc = []
    for _ in range(rng.randint(1, 4)):
        off = rng.randrange(*rng.choice(regions))
        desc.append(damage_at(d, rng, off, lambda width: (
            0, 1, 2, 3, 4, 512, 1536, 4096, 0x1005, 0x200000, (1 << (8 * width)) - 1, 1 << (8 * width - 1),
            rng.randrange(1 << (8 * width)), len(base), len(base) // 512), "big"))
    if rng.random() < 0.5:
        for at in footers:
            block = d[at:at + 512]
            _checksum(block, 64)
            d[at:at + 512] = block
        desc.append("checksums")
    return bytes(d), desc


@pytest.mark.parametrize(("base", "chunk"), [("d.vpc", 0), ("d.vpc", 1), ("f.vpc", 0)])
def test_damage_sweep(images: Path, tmp_path: Path, base: str, chunk: int) -> None:
    data0 = (images / base).read_bytes()
    size = len(data0)
    if base == "d.vpc":
        regions = [(0, 100), (512, 512 + 40), (1536, 1548), (size - 512, size - 412)]
        footers = [0, size - 512]
    else:
        regions = [(size - 512, size - 412)]
        footers = [size - 512]
    sweep = Sweep(tmp_path)
    for seed in range(chunk * 12, chunk * 12 + 12):
        data, desc = _damage(data0, random.Random(seed), regions, footers)
        sweep.label = f"seed {seed} {desc}"
        (tmp_path / "s.vpc").write_bytes(data)
        runs = [["info", "--output=json", "s.vpc"], ["info", "-f", "vpc", "--output=json", "s.vpc"],
                ["map", "-f", "vpc", "--output=json", "s.vpc"],
                ["convert", "-f", "vpc", "-O", "raw", "s.vpc", "OUT.raw"]]
        for args in runs:
            q = sweep.both(args)
            if args[0] == "info" and q[0] != 0:
                break
        sweep.conversions_alike(extents=True, max_bytes=64 << 20)
    sweep.done()


# -- inspect ---------------------------------------------------------------------------------------

def test_inspect(images: Path) -> None:
    """Clean images are safe; shared or misplaced blocks, differencing disks (with their parent's name)
    and odd footers are reasons, each of which qemu-img itself does not notice."""
    from vdkit.block.inspect import inspect_image

    d = images
    for name in ("d.vpc", "e.vpc", "c.vpc", "cfs.vpc", "z.vpc"):
        assert inspect_image(d / name).reasons == [], name
    assert inspect_image(d / "f.vpc").reasons == []  # probed as raw: a plain disk
    parent = "C:\\base.vhd".encode("utf-16-be")
    cases = {
        "shared": ([(1540, ">I", 4)], -1, {"overlapping-metadata"}),
        "on-header": ([(1536, ">I", 1)], -1, {"overlapping-metadata"}),
        "differencing": ([(60, ">I", 4), (-512 + 60, ">I", 4), (DYN + 64, f"{len(parent)}s", parent)], 0,
                         {"differencing", "backing-file", "footer-mismatch"}),
        "fixed-at-start": ([(60, ">I", 2)], 0, {"invalid-metadata", "footer-mismatch"}),
    }
    for case, (fields, footer, kinds) in cases.items():
        name = _patch(d, "d.vpc", f"insp-{case}.vpc", fields, footer=footer)
        assert qemu_img("info", name, cwd=d).returncode == 0, case  # QEMU opens every one of them
        verdict = inspect_image(d / name)
        assert {r.kind for r in verdict.reasons} == kinds, (case, verdict.reasons)
    verdict = inspect_image(d / "insp-differencing.vpc")
    assert any(r.detail == "backing file 'C:\\base.vhd'" for r in verdict.reasons), verdict.reasons
    cut = _truncated(d, "f.vpc", 3 << 20)
    (d / cut).write_bytes((d / cut).read_bytes() + (d / "f.vpc").read_bytes()[-512:])
    assert {r.kind for r in inspect_image(d / cut, fmt="vpc").reasons} >= {"truncated"}


# -- large sparse tables -------------------------------------------------------------------------------


def test_bat_run_helpers_match_a_walk() -> None:
    """The chunked BAT scans (16384 entries compared at once) find what an entry-by-entry walk finds,
    on array and list tables, with allocated entries holding 0xff bytes next to unallocated ones."""
    from array import array

    from vdkit.formats.vpc.driver import UNALLOCATED, _max_allocated, _next_allocated

    rnd = random.Random(5)
    for trial in range(40):
        n = rnd.choice([1, 7, 16384, 16385, 70000])
        bat = [UNALLOCATED] * n
        for _ in range(rnd.randrange(4)):
            bat[rnd.randrange(n)] = rnd.choice([0, 9, 0xFFFFFF00, 0x00FFFFFF, 0xFFFFFFFE, rnd.randrange(1 << 32)])
        for table in (bat, array("I", bat)):
            used = [e for e in bat if e != UNALLOCATED]
            assert _max_allocated(table) == (max(used) if used else None), trial
            for _ in range(5):
                idx = rnd.randrange(n)
                last = rnd.randrange(idx, n + 1)
                want = next((i for i in range(idx, last) if bat[i] != UNALLOCATED), last)
                assert _next_allocated(table, idx, last) == want, (trial, idx, last)


def test_large_sparse_disk(tmp_path: Path) -> None:
    """A 300 GiB dynamic disk (an array BAT of 153600 entries) with a few blocks written far apart:
    map, info and convert to qcow2 as qemu-img's."""
    d = tmp_path
    check_ok("create", "-q", "-f", "vpc", "big.vpc", "300G", cwd=d)
    _io(d, "big.vpc", ["write -P 1 0 64k", "write -P 2 100G 1M", "write -P 3 299G 3M", "write -P 4 200G 512"])
    assert_same(["map", "--output=json", "big.vpc"], cwd=d)
    assert_same(["map", "big.vpc"], cwd=d)
    assert_same(["info", "big.vpc"], cwd=d)
    q = check_ok("convert", "-O", "qcow2", "big.vpc", "q.qcow2", cwd=d)
    v = vdkit_img("convert", "-O", "qcow2", "big.vpc", "v.qcow2", cwd=d)
    assert v.returncode == 0, v.stderr
    assert q.stdout == v.stdout
    assert (d / "q.qcow2").read_bytes() == (d / "v.qcow2").read_bytes()
