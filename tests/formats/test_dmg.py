"""dmg (Apple UDIF, read-only): vdkit-img against qemu-img 7.2 on images built here.

Debian's qemu-img lacks its dmg-bz2/dmg-lzfse modules: it prints two
"module not found" lines on every dmg open (filtered out, they are not
QEMU's), and reads no bzip2 chunk.  vdkit reads bzip2 chunks (stdlib
``bz2``), so those are checked against the source data instead.
"""

from __future__ import annotations

import base64
import zlib
from pathlib import Path

import pytest

from tests.conftest import qemu_img, vdkit_img
from tests.formats.images import (
    BZ2,
    COMMENT,
    IGNORE,
    RAW,
    TERM,
    ZERO,
    ZLIB,
    dmg_image,
    koly,
    mish_block,
    plist,
)
from tests.formats.ro_diff import _clean, assert_same, run_sweep, same_read_side, same_refusals
from tests.formats.test_bochs import pattern

VARIANTS = {
    "mixed": {},
    "raw": {"kinds": (RAW,)},
    "zlib-1m": {"kinds": (ZLIB,), "chunk_sectors": 2048, "parts": 1},
    "plain": {"parts": 1, "comment": False, "kinds": (ZLIB, ZERO)},
    "small-chunks": {"chunk_sectors": 1, "kinds": (ZLIB, RAW, IGNORE), "parts": 3},
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dmg")
    disk = pattern(1 << 20)
    (d / "src.raw").write_bytes(disk)
    for name, kw in VARIANTS.items():
        dmg_image(d / f"{name}.dmg", disk if name != "small-chunks" else disk[:64 << 10], **kw)
    (d / "small.raw").write_bytes(disk[:64 << 10])
    return d


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_read_side(images: Path, variant: str) -> None:
    src = "small.raw" if variant == "small-chunks" else "src.raw"
    same_read_side(images, f"{variant}.dmg", "dmg", src, full=variant == "mixed")


def test_refusals(images: Path) -> None:
    same_refusals(images, "mixed.dmg", "dmg")


def test_bzip2_chunks(images: Path) -> None:
    """bzip2 chunks read as QEMU with its dmg-bz2 module does (this qemu-img cannot: I/O errors)."""
    dmg_image(images / "bz.dmg", (images / "src.raw").read_bytes(), kinds=(BZ2, RAW, ZERO))
    r = vdkit_img("compare", "src.raw", "bz.dmg", cwd=images)
    assert (r.returncode, r.stdout, r.stderr) == (0, "Images are identical.\n", "")


def test_probing(images: Path) -> None:
    """By name: x.dmg is dmg, the same bytes under another name are raw; an empty .dmg is raw."""
    (images / "copy.img").write_bytes((images / "mixed.dmg").read_bytes())
    (images / "empty.dmg").write_bytes(b"")
    (images / "zeros.dmg").write_bytes(bytes(5000))
    (images / "tiny.dmg").write_bytes(bytes(300))
    for args in (["info", "copy.img"], ["info", "-f", "dmg", "copy.img"], ["info", "empty.dmg"],
                 ["info", "zeros.dmg"], ["info", "tiny.dmg"], ["info", "-f", "dmg", "src.raw"]):
        assert_same(args, images)


# -- hand-made tables -------------------------------------------------------------------------------

A, B, C = (zlib.compress(bytes([ch]) * 4096) for ch in b"ABC")
DATA = A + B + C


def za(s: int) -> tuple[int, int, int, int, int]:
    return (ZLIB, s, 8, 0, len(A))


def zb(s: int) -> tuple[int, int, int, int, int]:
    return (ZLIB, s, 8, len(A), len(B))


def zc(s: int) -> tuple[int, int, int, int, int]:
    return (ZLIB, s, 8, len(A) + len(B), len(C))


def build(path: Path, tables: list[tuple[int, int, int, list]], *, sectors: int = 24, data: bytes = DATA,
          xml: bytes | None = None, tail: bytes = b"", koly_patch: dict[int, tuple[int, int]] | None = None) -> None:
    """``tables``: (first sector, sector count, data offset, chunks) per mish block."""
    x = plist([mish_block(*t) for t in tables]) if xml is None else xml
    k = bytearray(koly(len(data), len(data), len(x), sectors))
    for off, (width, val) in (koly_patch or {}).items():
        k[off:off + width] = val.to_bytes(width, "big")
    path.write_bytes(data + x + bytes(k) + tail)


T = (TERM, 0, 0, 0, 0)
TABLES: dict[str, dict] = {
    # bisection in table order (the chunk read last is tried first)
    "sorted": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16), T])]},
    "unsorted-1": {"tables": [(0, 24, 0, [zb(8), za(0), zc(16)])]},
    "unsorted-2": {"tables": [(0, 24, 0, [zc(16), za(0), zb(8)])]},
    "unsorted-3": {"tables": [(0, 24, 0, [zc(16), zb(8), za(0)])]},
    "duplicates": {"tables": [(0, 24, 0, [za(0), za(0), zb(8), zc(16)])]},
    "overlap-zero": {"tables": [(0, 24, 0, [(ZERO, 0, 4, 0, 0), za(0), zb(8), zc(16)])]},
    "overlap-zero-2": {"tables": [(0, 24, 0, [za(0), (ZERO, 6, 18, 0, 0), zb(8), zc(16)])]},
    "gap": {"tables": [(0, 24, 0, [za(0), zc(16)])]},
    "two-tables": {"tables": [(0, 8, 0, [za(0), T]), (8, 16, len(A), [(ZLIB, 0, 8, 0, len(B)), zc(8 - 8 + 8)])]},
    "after-terminator": {"tables": [(0, 24, 0, [za(0), T, zb(8), zc(16)])]},
    "first-sector-offset": {"tables": [(4, 24, 0, [za(0), zb(8), zc(16)])]},
    "koly-sectors-small": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "sectors": 2},
    "koly-sectors-big": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "sectors": 100},
    "koly-sectors-0": {"tables": [(0, 24, 0, [za(0)])], "sectors": 0},
    # chunk types
    "zero-ignore": {"tables": [(0, 24, 0, [(ZERO, 0, 8, 0, 0), (IGNORE, 8, 8, 0, 0), zc(16)])]},
    "raw-short": {"tables": [(0, 24, 0, [za(0), (RAW, 8, 8, 0, 600), zc(16)])]},
    "raw-long": {"tables": [(0, 24, 0, [(RAW, 0, 8, 0, 5000), zb(8), zc(16)])]},
    "raw-empty": {"tables": [(0, 24, 0, [za(0), (RAW, 8, 8, 0, 0), zc(16)])]},
    "zlib-too-short": {"tables": [(0, 24, 0, [(ZLIB, 0, 16, 0, len(A)), zc(16)])]},
    "zlib-too-long": {"tables": [(0, 24, 0, [(ZLIB, 0, 4, 0, len(A)), zb(8), zc(16)])]},
    "zlib-truncated": {"tables": [(0, 24, 0, [(ZLIB, 0, 8, 0, len(A) - 4), zb(8), zc(16)])]},
    "zlib-trailing": {"tables": [(0, 24, 0, [(ZLIB, 0, 8, 0, len(A) + 10), zb(8), zc(16)])]},
    "unknown-type": {"tables": [(0, 24, 0, [(5, 0, 4, 0, 1), za(0), zb(8), zc(16)])]},
    "unknown-types": {"tables": [(0, 24, 0, [(5, 0, 4, 0, 1), (6, 0, 4, 0, 1), za(0), zb(8)])]},
    "adc": {"tables": [(0, 24, 0, [za(0), (0x80000004, 8, 8, 0, 10), zc(16)])]},
    "lzfse": {"tables": [(0, 24, 0, [za(0), (0x80000007, 8, 8, 0, 10), zc(16)])]},
    "lzfse-and-unknown": {"tables": [(0, 24, 0, [(5, 4, 2, 0, 1), (0x80000007, 0, 4, 0, 1), za(0), zb(8), zc(16)])]},
    "unknown-huge": {"tables": [(0, 24, 0, [(5, 0, 1 << 40, 0, 1 << 40), za(0), zb(8), zc(16)])]},
    # open-time limits
    # a raw chunk shorter than its sectors: the rest is QEMU's uninitialised buffer (not comparable)
    "sectors-131072": {"tables": [(0, 24, 0, [(RAW, 0, 131072, 0, 512)])], "read": False},
    "sectors-131073": {"tables": [(0, 24, 0, [(RAW, 0, 131073, 0, 512)])]},
    "zlib-sectors-huge": {"tables": [(0, 24, 0, [(ZLIB, 0, 1 << 40, 0, 10)])]},
    "zero-sectors-huge": {"tables": [(0, 24, 0, [(ZERO, 0, (1 << 25) + 1, 0, 0)])]},
    "ignore-sectors-huge": {"tables": [(0, 24, 0, [(IGNORE, 0, 1 << 40, 0, 0)])]},
    "length-64M": {"tables": [(0, 24, 0, [(ZLIB, 0, 8, 0, 64 << 20), zb(8), zc(16)])]},
    "length-64M+1": {"tables": [(0, 24, 0, [(ZLIB, 0, 8, 0, (64 << 20) + 1)])]},
    "zero-length-huge": {"tables": [(0, 24, 0, [(ZERO, 0, 8, 0, 1 << 40)])]},
    "ignore-length-huge": {"tables": [(0, 24, 0, [(IGNORE, 0, 8, 0, 1 << 40)])]},
    "both-limits": {"tables": [(0, 24, 0, [(RAW, 0, 1 << 20, 0, 1 << 30)])]},
    "index-after-comment": {"tables": [(0, 24, 0, [(COMMENT, 0, 0, 0, 0), za(0), (RAW, 8, 1 << 20, 0, 1)])]},
    "index-after-terminator": {"tables": [(0, 24, 0, [za(0), T, (RAW, 0, 1 << 20, 0, 512)])]},
    "index-second-table": {"tables": [(0, 8, 0, [za(0), T]), (8, 8, 0, [(RAW, 0, 1 << 20, 0, 512)])]},
    "index-after-unknown": {"tables": [(0, 24, 0, [(5, 0, 8, 0, 1), (RAW, 0, 1 << 20, 0, 512)])]},
    "comment-huge": {"tables": [(0, 24, 0, [(COMMENT, 0, 1 << 40, 0, 1 << 40), za(0), zb(8), zc(16)])]},
    # koly fields
    "data-fork-offset": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "koly_patch": {24: (8, 10)}},
    "running-data-fork": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "koly_patch": {16: (8, 10)}},
    "rsrc-fork": {"tables": [(0, 24, 0, [za(0)])], "koly_patch": {48: (8, 5)}},
    "rsrc-offset-only": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "koly_patch": {40: (8, 5)}},
    "xml-len-0": {"tables": [(0, 24, 0, [za(0)])], "koly_patch": {224: (8, 0)}},
    "xml-off-far": {"tables": [(0, 24, 0, [za(0)])], "koly_patch": {216: (8, 1 << 63)}},
    "xml-into-koly": {"tables": [(0, 24, 0, [za(0)])], "koly_patch": {224: (8, 100000)}},
    "xml-off-0": {"tables": [(0, 24, 0, [za(0)])], "koly_patch": {216: (8, 0), 224: (8, len(DATA) + 5)}},
    "version-5": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "koly_patch": {4: (4, 5)}},
    "sectors-2^53": {"tables": [(0, 24, 0, [za(0)])], "koly_patch": {492: (8, 1 << 53)}},
    "sectors-2^54-1": {"tables": [(0, 24, 0, [za(0)])], "koly_patch": {492: (8, (1 << 54) - 1)}},
    "sectors-2^63": {"tables": [(0, 24, 0, [za(0)])], "koly_patch": {492: (8, 1 << 63)}},
    "sectors-2^55+2^54": {"tables": [(0, 24, 0, [za(0)])], "koly_patch": {492: (8, (1 << 55) + (1 << 54))}},
    "sectors-2^55": {"tables": [(0, 24, 0, [za(0)])], "koly_patch": {492: (8, 1 << 55)}},
    # trailer position: the 1 KiB ending at the size rounded up to 512
    "tail-100": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "tail": bytes(100)},
    "tail-511": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "tail": bytes(511)},
    "tail-512": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "tail": bytes(512)},
    "tail-koly-sig": {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "tail": bytes(20) + b"koly" + bytes(40)},
}
for _t in range(0, 520, 173):
    TABLES[f"tail-{_t}-x"] = {"tables": [(0, 24, 0, [za(0), zb(8), zc(16)])], "tail": b"x" * _t}


@pytest.mark.parametrize("case", list(TABLES))
def test_tables(images: Path, case: str) -> None:
    name = f"t-{case}.dmg"
    kw = dict(TABLES[case])
    read = kw.pop("read", True)
    build(images / name, **kw)
    _same_open_and_read(images, name, read=read)


def _same_open_and_read(d: Path, name: str, *, read: bool = True) -> None:
    """info alike; then a full read (convert -O raw) alike, data included, and compare against it.

    Where qemu-img crashes (a table with no chunk at all: SIGSEGV in 7.2) there is no answer to
    compare with; vdkit must then fail cleanly.
    """
    q = assert_same(["info", "--output=json", name], d)
    if not read or q.returncode != 0 or int(q.stdout.split('"virtual-size": ')[1].split(",")[0]) > 1 << 20:
        return
    qc = qemu_img("convert", "-O", "raw", name, f"{name}.q.raw", cwd=d)
    vc = vdkit_img("convert", "-O", "raw", name, f"{name}.v.raw", cwd=d)
    assert "Traceback" not in vc.stderr
    if qc.returncode < 0:
        assert vc.returncode == 1, vc.stderr
        return
    assert (vc.returncode, vc.stdout, vc.normalized_stderr().replace(".v.raw", ".q.raw")) == (
        qc.returncode, qc.stdout, _clean(qc.stderr))
    if qc.returncode == 0:
        assert (d / f"{name}.v.raw").read_bytes() == (d / f"{name}.q.raw").read_bytes()


def _xml_with(datas: list[bytes]) -> bytes:
    return plist([]).replace(b"\t\t</array>", b"".join(b"<data>" + x + b"</data>" for x in datas) + b"\t\t</array>")


MISH = mish_block(0, 24, 0, [za(0), zb(8), zc(16), T])
B64 = base64.b64encode(MISH)
XMLS = {
    "not-mish-first": _xml_with([base64.b64encode(b"blah" + MISH[4:]), B64]),
    "mish-twice": _xml_with([B64, B64]),
    "whitespace-in-base64": _xml_with([B64[:10] + b"\n\t  " + B64[10:]]),
    "junk-in-base64": _xml_with([B64[:10] + b"!!" + B64[10:]]),
    "mish-version-2": _xml_with([base64.b64encode(MISH[:4] + b"\0\0\0\2" + MISH[8:])]),
    "chunk-count-1": _xml_with([base64.b64encode(MISH[:200] + b"\0\0\0\1" + MISH[204:])]),
    "chunk-count-huge": _xml_with([base64.b64encode(MISH[:200] + b"\xff\xff\xff\xff" + MISH[204:])]),
    "mish-partial-chunk": _xml_with([base64.b64encode(MISH[:204 + 40 * 2 + 20])]),
    "unclosed": _xml_with([B64]).replace(b"</data>", b""),
    "nul-before-data": _xml_with([B64]).replace(b"<plist", b"\0<plist"),
    "short-mish-only": _xml_with([base64.b64encode(MISH[:100])]),
}


@pytest.mark.parametrize("case", list(XMLS))
def test_plist(images: Path, case: str) -> None:
    name = f"x-{case}.dmg"
    build(images / name, [], xml=XMLS[case])
    q = qemu_img("info", name, cwd=images)
    assert q.returncode == 0 or case == "unclosed"
    _same_open_and_read(images, name)


def test_damage_sweep(images: Path) -> None:
    """Damage in the chunk data, the plist and the trailer (the regions QEMU reads)."""
    base = images / "sweep.dmg"
    build(base, [(0, 16, 0, [za(0), (RAW, 8, 4, 0, 2048), (ZERO, 12, 4, 0, 0), T])], sectors=24)
    data = bytearray(base.read_bytes())
    # move the region the sweep damages to the plist's first base64 line and the trailer
    run_sweep(images, base, "dmg", range(10), len(data))
