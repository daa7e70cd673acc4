"""qcow2 header parsing: agrees with what qemu-img wrote and reports, and never fails uncleanly.

The fuzz properties mutate real headers byte by byte and demand that opening
either works or raises a :class:`VdkitError` (the CLI's one-line error) --
never another exception, and never an allocation driven by a claimed size.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require_tool
from tests.data import generate as g
from tests.data.compare import run_qemu
from vdkit.block.node import open_image
from vdkit.errors import VdkitError
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.layout import parse_header, serialize_header
from vdkit.formats.qcow2.snapshot import parse_snapshot_table
from vdkit.info.collect import image_info

OPTION_SETS = [
    ["compat=0.10"],
    ["compat=1.1"],
    ["cluster_size=512", "refcount_bits=1"],
    ["cluster_size=2M", "refcount_bits=64", "lazy_refcounts=on"],
    ["extended_l2=on", "compression_type=zstd"],
    ["data_file=x.raw", "data_file_raw=on"],
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    require_tool("qemu-img")
    d = tmp_path_factory.mktemp("hdr")
    out = []
    for i, opts in enumerate(OPTION_SETS):
        out.append(g.create(d, f"i{i}.qcow2", "5M", options=opts))
    g.create(d, "base.qcow2", "5M")
    out.append(g.create(d, "b.qcow2", None, backing="base.qcow2", backing_fmt="qcow2"))
    g.snapshot(out[-1], "-c", "snap")
    g.bitmap_add(out[-1], "bm")
    return out


def _cluster0(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(L.V3_MIN_HEADER_SIZE)
        f.seek(0)
        return f.read(1 << int.from_bytes(head[20:24], "big"))


def test_fields_match_qemu_img(images: list[Path]) -> None:
    for img in images:
        h = parse_header(_cluster0(img))
        info = json.loads(run_qemu(["info", "--output=json", "-U", img.name], img.parent).stdout)
        data = info["format-specific"]["data"]
        assert h.size == info["virtual-size"]
        assert h.cluster_size == info["cluster-size"]
        assert ("0.10" if h.version == 2 else "1.1") == data["compat"]
        assert h.refcount_bits == data["refcount-bits"]
        assert L.COMPRESSION_NAMES[h.compression_type] == data["compression-type"]
        if h.version == 3:
            assert (h.lazy_refcounts, h.extended_l2, h.corrupt) == (
                data["lazy-refcounts"], data["extended-l2"], data["corrupt"])
        assert h.data_file == data.get("data-file")
        assert h.backing_file == info.get("backing-filename")
        assert h.backing_format == info.get("backing-filename-format")
        assert h.nb_snapshots == len(info.get("snapshots", []))
        assert (h.bitmaps is not None) == ("bitmaps" in data)


def test_serialize_round_trip(images: list[Path]) -> None:
    """Re-serialising a parsed header reproduces qemu-img's bytes up to the end of the backing name."""
    for img in images:
        raw = _cluster0(img)
        out = serialize_header(parse_header(raw))
        assert out == raw[: len(out)], img.name


def test_snapshot_table_matches_qemu_img(images: list[Path]) -> None:
    img = images[-1]
    h = parse_header(_cluster0(img))
    with open(img, "rb") as f:
        f.seek(h.snapshots_offset)
        buf = f.read(65536)
    entries, size = parse_snapshot_table(buf, h.nb_snapshots, disk_size=h.size)
    assert [e.name for e in entries] == ["snap"] and [e.id_str for e in entries] == ["1"]
    assert entries[0].extra_data_size == L.SNAPSHOT_EXTRA_SIZE and entries[0].icount == 0
    assert size == 40 + 24 + 1 + 4


@pytest.mark.parametrize("length", [0, 4, 71])
def test_short_buffer(length: int) -> None:
    with pytest.raises(VdkitError):
        parse_header(b"QFI\xfb" + bytes(max(0, length - 4)))


# -- fuzzing ---------------------------------------------------------------------------------------

_INTERESTING = [0, 1, 2, 3, 7, 8, 9, 16, 21, 22, 30, 63, 64, 72, 104, 112, 511, 512, 4096, 65535, 65536,
                0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


@st.composite
def _mutations(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        off = draw(st.sampled_from([4, 8, 16, 20, 24, 32, 36, 40, 48, 56, 60, 64, 72, 80, 88, 96, 100, 104,
                                    112, 116, 120, 128, 136, 144, 152, 160, 176, 200, 256, 300]))
        width = draw(st.sampled_from([1, 4, 8]))
        val = draw(st.one_of(st.sampled_from(_INTERESTING), st.integers(0, 2 ** (8 * width) - 1)))
        out.append((off, (val % 2 ** (8 * width)).to_bytes(width, "big")))
    return out


@given(which=st.integers(0, len(OPTION_SETS)), muts=_mutations())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzz_open(images: list[Path], tmp_path: Path, which: int, muts: list[tuple[int, bytes]]) -> None:
    src = images[which]
    img = tmp_path / "fuzz.qcow2"
    shutil.copy(src, img)
    if src.name == "b.qcow2":
        shutil.copy(src.parent / "base.qcow2", tmp_path / "base.qcow2")
    for off, data in muts:
        g.patch(img, off, data)
    try:
        with open_image(img, readonly=True, backing=False, no_io=True) as node:
            image_info(node)
            node.snapshots()
    except VdkitError as exc:
        assert exc.message and "\n" not in exc.message


@given(data=st.binary(min_size=0, max_size=600))
@settings(max_examples=150, deadline=None)
def test_fuzz_snapshot_table(data: bytes) -> None:
    """Any table bytes parse or fail cleanly; a 1-entry table with claimed huge names stays bounded."""
    nb = int.from_bytes(data[:2] or b"\0", "big") % 8
    try:
        entries, size = parse_snapshot_table(data, nb, disk_size=1 << 20)
    except VdkitError:
        return
    assert len(entries) == nb and size >= 0


def test_huge_snapshot_claims_do_not_allocate() -> None:
    entry = struct.pack(">QIHHIIQII", 0, 0, 0xFFFF, 0xFFFF, 0, 0, 0, 0, 1024)
    entries, size = parse_snapshot_table(entry, 1, disk_size=0)
    assert size == 40 + 1024 + 2 * 0xFFFF and entries[0].name == ""
