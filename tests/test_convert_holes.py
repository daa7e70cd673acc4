"""convert: holes of the source file inside a mapped data piece are zero sectors without being read.

A format's block status places a data run in its file (qemu-img's VHD writer leaves the unwritten
half of a block a hole of the file); the copy engine asks the file for holes inside each mapped
piece (``block.copy.file_holes``), leaves their pages unmapped and marks their sectors zero.
What must hold, and is checked here:

* ``file_holes`` finds exactly the whole sectors of the file's holes, counted from the piece,
  and only holes of at least ``-S`` sectors;
* the zero map built around the holes (``zero_sectors_around``) is the one the scan of every
  sector gives, on random sparse files and pieces that start anywhere (property test);
* ``convert`` of qemu-img-made VHD images (whose blocks hold holes, data at 512 bytes past a 4 KiB
  boundary) to qcow2 and raw with ``-S 4k``/``64k``/``0`` writes what qemu-img writes (the qcow2 file
  byte for byte, the raw file's bytes and allocation), and the holes were found and not scanned.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import check_ok
from vdkit.block import copy as bcopy
from vdkit.block.copy import SECTOR, ZeroMap, file_holes, zero_sectors_around

BLOCK = 4096  # the file system's block: holes start and end on these


def _sparse_file(path: Path, layout: list[tuple[str, int]]) -> bytes:
    """A file of ``(kind, blocks)`` stretches: 'data' (random, with some zero sectors), 'zero' (zeros
    written), 'hole'; returns its content."""
    rnd = random.Random(len(layout) * 7919 + sum(n for _, n in layout))
    content = bytearray()
    with open(path, "wb") as f:
        for kind, n in layout:
            size = n * BLOCK
            if kind == "data":
                chunk = bytearray(rnd.randbytes(size))
                for _ in range(rnd.randrange(3)):  # a zero sector or two inside the data
                    s = rnd.randrange(size // SECTOR)
                    chunk[s * SECTOR : (s + 1) * SECTOR] = bytes(SECTOR)
                f.write(chunk)
            elif kind == "zero":
                f.write(bytes(size))
                chunk = bytearray(size)
            else:
                f.seek(size, os.SEEK_CUR)
                chunk = bytearray(size)
            content += chunk
        f.truncate(len(content))
    return bytes(content)


def _holes_of(path: Path) -> list[tuple[int, int]]:
    """The file's holes as the file system reports them (byte ranges)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out, pos = [], 0
        while pos < size:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:
                data = size
            out.append((hole, data))
            pos = data
        return out
    finally:
        os.close(fd)


def test_file_holes_finds_whole_sectors_of_holes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    _sparse_file(path, [("data", 2), ("hole", 3), ("data", 1), ("hole", 1), ("zero", 1), ("hole", 4)])
    fs_holes = _holes_of(path)
    if fs_holes != [(2 * BLOCK, 5 * BLOCK), (6 * BLOCK, 7 * BLOCK), (8 * BLOCK, 12 * BLOCK)]:
        pytest.fail(f"this file system does not report holes as expected: {fs_holes}")
    fd = os.open(path, os.O_RDONLY)
    try:
        size = 12 * BLOCK
        # from offset 0: sectors of each hole
        assert file_holes(fd, 0, size, 1) == [(16, 40), (48, 56), (64, 96)]
        # a piece starting 512 bytes past a block (a VHD block's data): counted from there
        assert file_holes(fd, 512, size - 512, 1) == [(15, 39), (47, 55), (63, 95)]
        # a piece starting inside a hole, ending inside another
        assert file_holes(fd, 3 * BLOCK, 4 * BLOCK, 1) == [(0, 16), (24, 32)]
        # -S 16 sectors: the one-block holes are left to the scan
        assert file_holes(fd, 0, size, 16) == [(16, 40), (64, 96)]
        # an unaligned piece start: only whole sectors inside the hole
        assert file_holes(fd, 2 * BLOCK - 100, 200 + BLOCK, 1) == [(1, 8)]
        assert file_holes(fd, 0, 2 * BLOCK, 1) == []  # no hole inside
    finally:
        os.close(fd)
    assert file_holes(-1, 0, 4096, 1) == []  # an error: nothing is taken for a hole


_KIND = st.sampled_from(["data", "zero", "hole"])


@settings(max_examples=60, deadline=None)
@given(layout=st.lists(st.tuples(_KIND, st.integers(1, 6)), min_size=1, max_size=10),
       start=st.integers(0, 4 * BLOCK // SECTOR), min_sparse=st.sampled_from([1, 8, 16, 128]))
def test_zero_map_around_holes_is_the_scans(tmp_path_factory: pytest.TempPathFactory,
                                            layout: list[tuple[str, int]], start: int, min_sparse: int) -> None:
    path = tmp_path_factory.mktemp("holes") / "f"
    content = _sparse_file(path, layout)
    offset = min(start * SECTOR, len(content) - SECTOR)
    offset -= offset % SECTOR
    n = (len(content) - offset) // SECTOR
    zmap = ZeroMap(n * SECTOR)
    view = memoryview(content)[offset : offset + n * SECTOR]
    fd = os.open(path, os.O_RDONLY)
    try:
        holes = file_holes(fd, offset, n * SECTOR, min_sparse)
    finally:
        os.close(fd)
    for first, last in holes:
        assert last - first >= min_sparse
        assert view[first * SECTOR : last * SECTOR] == bytes((last - first) * SECTOR), "a 'hole' holds data"
    assert zero_sectors_around(zmap, view, n, holes) == zmap.sectors(view, n)


def _vpc_source(d: Path) -> None:
    """A qemu-img VHD whose blocks are part data, part hole (and zeros written inside data)."""
    rnd = random.Random(11)
    mib = 1 << 20
    with open(d / "src.raw", "wb") as f:
        f.truncate(12 * mib + 7 * SECTOR)
        for i in range(12):
            kind = i % 4
            f.seek(i * mib)
            if kind == 0:
                f.write(rnd.randbytes(mib))
            elif kind == 1:
                f.write(rnd.randbytes(3000) + bytes(mib - 6000) + rnd.randbytes(3000))  # a zero run in data
            elif kind == 2:
                f.write(bytes(mib))  # zeros written: the VHD block stays a hole there
        f.seek(12 * mib)
        f.write(rnd.randbytes(5 * SECTOR))
    check_ok("convert", "-f", "raw", "-O", "vpc", "src.raw", "src.vpc", cwd=d)


@pytest.mark.parametrize("sparse", ["4k", "64k", "0"])
def test_vpc_convert_skips_file_holes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse: str) -> None:
    from vdkit.cli.main import main

    _vpc_source(tmp_path)
    assert (tmp_path / "src.vpc").stat().st_blocks * 512 < (tmp_path / "src.vpc").stat().st_size, \
        "qemu-img's VHD has no holes here: nothing to test"
    found: list[list[tuple[int, int]]] = []
    real = bcopy.file_holes

    def spy(fd: int, offset: int, length: int, min_sectors: int) -> list[tuple[int, int]]:
        holes = real(fd, offset, length, min_sectors)
        found.append(holes)
        return holes

    monkeypatch.setattr(bcopy, "file_holes", spy)
    monkeypatch.chdir(tmp_path)
    for fmt in ("qcow2", "raw"):
        check_ok("convert", "-S", sparse, "-O", fmt, "src.vpc", f"q.{fmt}", cwd=tmp_path)
        assert main(["convert", "-S", sparse, "-O", fmt, "src.vpc", f"v.{fmt}"]) == 0
        assert check_ok("compare", f"q.{fmt}", f"v.{fmt}", cwd=tmp_path).returncode == 0
        q_map = check_ok("map", "--output=json", f"q.{fmt}", cwd=tmp_path).stdout
        assert check_ok("map", "--output=json", f"v.{fmt}", cwd=tmp_path).stdout == q_map
        if fmt == "qcow2":
            assert (tmp_path / "q.qcow2").read_bytes() == (tmp_path / "v.qcow2").read_bytes()
    if sparse == "0":
        assert not found  # every zero is written: the holes are read
    else:
        assert any(found), "no hole was found inside the VHD's blocks"
