"""The pieces of ``convert``'s data path that are not visible in a single diff test.

* zero-sector maps found with ``bytes.find``/``startswith`` equal the plain
  per-sector definition (numpy), including the fallback for many stretches;
* ``-p`` arithmetic without numpy equals numpy's float32 arithmetic;
* reads into reused buffers (``readinto``) equal ``read`` on every corpus
  image, through backing chains and past the end of shorter backing files;
* a source read error stops the copy after the pieces before it were written
  (the read-ahead thread must not report it early or lose it).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import check_ok, qemu_img, qemu_io, vdkit_img
from tests.diff.io_corpus import KINDS, build
from tests.helpers.patching import get_u64, set_u64
from vdkit.block import io as bio
from vdkit.block.copy import SECTOR, ZeroMap, _zero_prefix, _zero_sectors_numpy, data_extent, pow2floor
from vdkit.block.node import open_image
from vdkit.block.progress import Progress


def _reference(buf: bytes, n: int) -> bytes:
    return bytes(int(not any(buf[i * SECTOR : (i + 1) * SECTOR])) for i in range(n))


def _pattern(rng: random.Random, n: int, stretches: int) -> bytearray:
    buf = bytearray(rng.randbytes(n * SECTOR))
    for _ in range(stretches):
        start = rng.randrange(n * SECTOR)
        length = rng.choice([1, 100, 511, 512, 513, 1024, 1500, 4096, 20000, 70000])
        buf[start : start + length] = bytes(len(buf[start : start + length]))
    return buf


@pytest.mark.parametrize("seed", range(40))
def test_zero_map_matches_definition(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 7, 64, 300, 4096])
    zmap = ZeroMap(4096 * SECTOR)
    buf = _pattern(rng, n, rng.choice([0, 1, 3, 10, 100, 400]))
    buf += rng.randbytes(rng.randrange(3)) * 512  # bytes past the piece must be ignored
    assert zmap.sectors(buf, n) == _reference(buf, n)
    assert _zero_sectors_numpy(buf, n) == _reference(buf, n)
    assert zmap.is_zero(buf, n * SECTOR) == (not any(buf[: n * SECTOR]))


@given(st.binary(max_size=3000), st.integers(0, 3000))
def test_zero_prefix_counts_leading_zero_bytes(tail: bytes, zeros: int) -> None:
    """_zero_prefix (startswith comparisons) equals the plain definition, lstrip's count."""
    data = bytes(zeros) + tail
    assert _zero_prefix(bytes(6000), memoryview(data)) == len(data) - len(data.lstrip(b"\x00"))


def test_zero_map_special_cases() -> None:
    zmap = ZeroMap(64 * SECTOR)
    assert zmap.sectors(bytearray(64 * SECTOR), 64) == b"\x01" * 64
    assert zmap.sectors(bytearray(b"\x01" * (64 * SECTOR)), 64) == bytes(64)
    alternating = bytearray()
    for i in range(64):  # more stretches than the Python loop takes: numpy finishes
        alternating += bytes(SECTOR) if i % 2 else b"\x01" * SECTOR
    assert zmap.sectors(alternating, 64) == bytes([0, 1] * 32)
    # sectors starting with a zero word but not zero: candidates that numpy finishes
    heads = bytearray(b"\x01" * (64 * SECTOR))
    for i in range(64):
        heads[i * SECTOR : i * SECTOR + 8] = bytes(8)
    heads[5 * SECTOR : 7 * SECTOR] = bytes(2 * SECTOR)
    assert zmap.sectors(heads, 64) == _reference(heads, 64)
    assert zmap.sectors(heads, 30) == _reference(heads, 30)
    # zero bytes across the first words of neighbouring sectors, then a real zero sector
    cross = bytearray(b"\x01" * (8 * SECTOR))
    cross[SECTOR + 1 : SECTOR + 8] = bytes(7)
    cross[2 * SECTOR : 2 * SECTOR + 4] = bytes(4)
    cross[6 * SECTOR : 7 * SECTOR] = bytes(SECTOR)
    assert zmap.sectors(cross, 8) == bytes([0, 0, 0, 0, 0, 0, 1, 0])
    # a zero window that straddles two sectors is not a zero sector
    buf = bytearray(b"\x01" * (4 * SECTOR))
    buf[300 : 300 + SECTOR] = bytes(SECTOR)
    assert zmap.sectors(buf, 4) == bytes(4)


def _plan(zero: bytes, n: int, sector: int, min_sparse: int) -> list[tuple[int, bool]]:
    """write_piece's walk over a zero map: (sectors, written) steps."""
    out, i = [], 0
    while i < n:
        k, data = data_extent(zero, i, n - i, min_sparse, sector + i, pow2floor(min_sparse))
        out.append((k, data))
        i += k
    return out


@st.composite
def _piece(draw: st.DrawFn) -> tuple[bytearray, int, int, int]:
    """A data piece with zero stretches (on the -S alignment grid or off it, some at the piece's ends)
    and sectors that start with a zero word but hold data further in; its first sector and -S (sectors)."""
    n = draw(st.integers(1, 160))
    sector = draw(st.integers(0, 300))
    min_sparse = draw(st.sampled_from([1, 2, 3, 7, 8, 12, 16, 24, 64]))
    a = pow2floor(min_sparse)
    buf = bytearray(random.Random(draw(st.integers(0, 2**32))).randbytes(n * SECTOR))
    for _ in range(draw(st.integers(0, 4))):
        length = draw(st.sampled_from([1, 2, a - 1, a, a + 1, 2 * a, min_sparse, min_sparse + 1])) * SECTOR
        length += draw(st.sampled_from([0, 0, 0, -1, 1, 100]))
        where = draw(st.sampled_from(["start", "end", "grid", "grid", "any"]))
        s = draw(st.integers(0, n - 1))
        if where == "grid":  # from an aligned sector (alignment counts from the image's start)
            s -= (sector + s) % a
        start = 0 if where == "start" else max(0, n * SECTOR - length) if where == "end" else \
            max(0, s) * SECTOR + draw(st.sampled_from([0, 0, 0, 8, 300]))
        buf[start : start + max(0, length)] = bytes(len(buf[start : start + max(0, length)]))
    for _ in range(draw(st.integers(0, 3))):
        h = draw(st.integers(0, n - 1))
        buf[h * SECTOR : h * SECTOR + 8] = bytes(8)
    return buf, n, sector, min_sparse


@settings(max_examples=300, deadline=None)
@given(piece=_piece())
def test_all_data_means_one_write(piece: tuple[bytearray, int, int, int]) -> None:
    """ZeroMap.all_data (heads read every `alignment` sectors, and the first sector) is only
    true where the full zero map would make write_piece write the piece whole, in one write."""
    buf, n, sector, min_sparse = piece
    zmap = ZeroMap(n * SECTOR)
    a = pow2floor(min_sparse)
    zero = zmap.sectors(buf, n)
    if zmap.all_data(buf, n, -sector % a, a):
        assert _plan(zero, n, sector, min_sparse) == [(n, True)]
    if zero == bytes(n) and not any(buf[i * SECTOR : i * SECTOR + 8] == bytes(8) for i in range(n)):
        assert zmap.all_data(buf, n, -sector % a, a)  # no zero first word: nothing more to read


def test_progress_float32_like_numpy(capsys: pytest.CaptureFixture[str]) -> None:
    f = np.float32
    rng = random.Random(1)
    for min_skip in (1.0, 2.0, 0.5):
        p = Progress(True, min_skip=min_skip)
        cur, last = f(0), f(0)
        for _ in range(500):
            if rng.random() < 0.5:
                value = 100.0 * rng.randrange(10**6) / rng.randrange(10**6, 10**7)
                want = f(value)
                p.set(value)
            else:
                delta, max_ = rng.random() * 3, rng.choice([100, 50, 7])
                want = f(cur + f(f(delta) / f(100)) * f(max_))
                p.add(delta, max_)
            want = min(want, f(100))
            cur = want
            if want > f(last + f(min_skip)) or want < f(last - f(min_skip)) or want == 0 or want == 100:
                last = want
            assert p.current == float(cur) and p.last == float(last)
    capsys.readouterr()


@pytest.mark.parametrize("kind", KINDS)
def test_readinto_equals_read(workdir: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = build(kind, workdir)
    monkeypatch.chdir(workdir)  # the data file's name is relative
    node = open_image(name, None, readonly=True)
    try:
        size = node.driver.virtual_size
        rng = random.Random(kind)
        spans = [(0, size)] + [(o, rng.randrange(1, 300_000)) for o in
                               (rng.randrange(size) for _ in range(30))]
        for offset, length in spans:
            length = min(length, size - offset)
            buf = bytearray(b"\xa5" * (length + 100))
            bio.readinto(node, offset, memoryview(buf)[:length])
            assert bytes(buf[:length]) == bio.read(node, offset, length), (offset, length)
            assert buf[length:] == b"\xa5" * 100
    finally:
        node.close()


def test_read_error_after_written_pieces(workdir: Path) -> None:
    """A bad entry in the second L2 table: both tools fail alike, after vdkit wrote the first 4 MiB."""
    from tests.helpers.qemu_io import qio

    check_ok("create", "-q", "-f", "qcow2", "bad.qcow2", "1G", cwd=workdir)
    qio("bad.qcow2", ["write -P 1 0 4M", "write -P 2 512M 4M"], workdir)
    node = open_image(str(workdir / "bad.qcow2"), None, readonly=True)
    try:
        l2_off = int(node.driver.clusters.l1[1]) & 0x00FFFFFFFFFFFE00  # type: ignore[attr-defined]
    finally:
        node.close()
    bad = workdir / "bad.qcow2"
    set_u64(bad, l2_off, get_u64(bad, l2_off) | 0x200)  # entry 0 of the second table: unaligned host offset
    q = qemu_img("convert", "-O", "raw", "bad.qcow2", "q.out", cwd=workdir)
    v = vdkit_img("convert", "-O", "raw", "bad.qcow2", "v.out", cwd=workdir)
    assert q.returncode == v.returncode == 1
    assert v.normalized_stderr() == q.stderr
    # what qemu-img wrote before failing depends on its coroutines' timing; vdkit
    # copies in order, so everything before the failed piece is there
    with open(workdir / "v.out", "rb") as fv:
        assert fv.read(4 << 20) == b"\x01" * (4 << 20)


def test_readinto_bounds_like_pread(workdir: Path) -> None:
    """Reads into a buffer refuse offsets past the block layer's limit with EIO, as ImageFile.pread."""
    import errno

    from vdkit.io.file import MAX_OFFSET, ImageFile

    (workdir / "f.raw").write_bytes(b"\x07" * 1000)
    with ImageFile(workdir / "f.raw") as f:
        buf = bytearray(b"\xff" * 2048)
        f.readinto(0, memoryview(buf))
        assert buf == b"\x07" * 1000 + bytes(1048)
        for offset in (MAX_OFFSET, 1 << 63, -512):
            with pytest.raises(OSError) as exc:
                f.readinto(offset, memoryview(buf)[:512])
            assert exc.value.errno == errno.EIO


def _both_ways(node):  # type: ignore[no-untyped-def]
    """(runs, preallocation) decoded with numpy and without, from fresh I/O engines of one node."""
    from vdkit.formats.qcow2.io import Qcow2IO

    out = []
    size = node.driver.virtual_size
    for pure in (False, True):
        io = Qcow2IO(node.driver)
        io._pure_tables = 10**6 if pure else 0
        try:
            runs = [(r.kind, r.guest, r.length, r.host) for r in io.runs(0, size)]
            out.append((runs, io.metadata_preallocation))
        except Exception as exc:  # noqa: BLE001 - the errors must match too
            out.append((type(exc), str(exc)))
    return out


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("raw", "extl2")])
def test_python_table_decoding_equals_numpy(workdir: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = build(kind, workdir)
    monkeypatch.chdir(workdir)
    node = open_image(name, None, readonly=True)
    try:
        with_numpy, without = _both_ways(node)
        assert with_numpy == without
    finally:
        node.close()


@pytest.mark.parametrize("seed", range(12))
def test_python_table_decoding_random_entries(workdir: Path, seed: int) -> None:
    """Random L2 entries (data, zero flags, compressed descriptors, bad offsets): same runs or same error."""
    rng = random.Random(seed)
    cs = rng.choice([512, 4096, 65536])
    check_ok("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", "r.qcow2", "64M", cwd=workdir)
    from tests.helpers.qemu_io import qio

    qio("r.qcow2", ["write -P 1 0 64k", "write -P 2 40M 64k"], workdir)
    node = open_image(str(workdir / "r.qcow2"), None, readonly=True)
    try:
        l1 = [int(x) for x in node.driver.clusters.l1]  # type: ignore[attr-defined]
    finally:
        node.close()
    tables = [e & 0x00FFFFFFFFFFFE00 for e in l1 if e]
    with open(workdir / "r.qcow2", "r+b") as f:
        for l2 in tables:
            entries = []
            host = rng.randrange(1, 1000) * cs
            for _ in range(cs // 8):
                r = rng.random()
                if r < 0.3:
                    e = 0
                elif r < 0.7:
                    host += cs if rng.random() < 0.9 else 3 * cs
                    e = host | (1 << 63 if rng.random() < 0.9 else 0)
                elif r < 0.8:
                    e = 1 | (rng.randrange(4) * cs if rng.random() < 0.5 else 0)
                elif r < 0.9:
                    e = (1 << 62) | rng.randrange(1, 1 << 40)
                else:
                    e = host + (512 if seed % 3 == 0 else 0)
                entries.append(e)
            f.seek(l2)
            f.write(b"".join(e.to_bytes(8, "big") for e in entries))
    node = open_image(str(workdir / "r.qcow2"), None, readonly=True)
    try:
        with_numpy, without = _both_ways(node)
        assert with_numpy == without
    finally:
        node.close()


@pytest.mark.parametrize("sharing", [False, True], ids=["ext4", "sharing-fs"])
@pytest.mark.parametrize("share", [False, True], ids=["locked", "force-share"])
def test_mapped_pieces_and_kernel_copy(workdir: Path, monkeypatch: pytest.MonkeyPatch, share: bool,
                                       sharing: bool) -> None:
    """Data runs of a locked raw/qcow2 source are mapped (not read) and, on a file system that shares
    extents (``sharing-fs``: ``ImageFile.shares_extents`` made to say so, as XFS or btrfs would), copied
    file to file by the kernel; on this one (ext4) written from the mapping.

    The outputs (bytes and allocation map) equal qemu-img's for a qcow2 -> raw and a raw -> qcow2
    copy of data with zero sectors, zero clusters, holes and a partial last cluster, at the default
    -S (pages faulted in by the zero scan) and at -S 0 and 1M (populated by madvise first); with -U
    (the file not locked against resizing) nothing is mapped.
    """
    import os

    from vdkit.block import copy as bcopy
    from vdkit.cli.main import main

    rnd = random.Random(7)
    size = (9 << 20) + 1536  # the last piece ends inside a cluster
    with open(workdir / "src.raw", "wb") as f:
        f.truncate(size)
        f.write(rnd.randbytes(3 << 20))
        f.write(bytes(1 << 20))  # zeros written as data
        f.write(rnd.randbytes(4096) + bytes(8192) + rnd.randbytes(1000))  # short zero stretch inside data
        f.seek(7 << 20)
        f.write(rnd.randbytes((2 << 20) + 1536))
    check_ok("convert", "-f", "raw", "-O", "qcow2", "src.raw", "src.qcow2", cwd=workdir)
    mapped: list[int] = []
    populated: list[bool] = []
    copied: list[int] = []
    real_map, real_cfr = bcopy.Mapped.__init__, os.copy_file_range

    def count_map(self: bcopy.Mapped, file: object, offset: int, length: int, windows: object = None,
                  populate: bool = True) -> None:
        mapped.append(length)
        populated.append(populate)
        real_map(self, file, offset, length, windows, populate=populate)  # type: ignore[arg-type]

    def count_cfr(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        copied.append(count)
        return real_cfr(src, dst, count, offset_src, offset_dst)

    from vdkit.io.file import ImageFile

    monkeypatch.setattr(bcopy.Mapped, "__init__", count_map)
    monkeypatch.setattr(os, "copy_file_range", count_cfr)
    monkeypatch.setattr(ImageFile, "shares_extents", lambda self: sharing)
    monkeypatch.chdir(workdir)
    u = ["-U"] if share else []
    for src, fmt, out, sparse in (("src.qcow2", "raw", "raw", []), ("src.raw", "qcow2", "qcow2", []),
                                  ("src.qcow2", "raw", "raw", ["-S", "0"]),
                                  ("src.raw", "qcow2", "qcow2", ["-S", "1M"])):
        (workdir / f"v.{out}").unlink(missing_ok=True)
        check_ok("convert", *u, *sparse, "-O", fmt, src, f"q.{out}", cwd=workdir)
        populated.clear()
        assert main(["convert", *u, *sparse, "-O", fmt, src, f"v.{out}"]) == 0
        assert share or set(populated) == {bool(sparse)}
        assert check_ok("compare", f"q.{out}", f"v.{out}", cwd=workdir).returncode == 0
        q_map = check_ok("map", "--output=json", f"q.{out}", cwd=workdir).stdout
        assert check_ok("map", "--output=json", f"v.{out}", cwd=workdir).stdout == q_map
        if out == "qcow2":
            assert (workdir / "q.qcow2").read_bytes() == (workdir / "v.qcow2").read_bytes()
    if share:
        assert not mapped and not copied
    else:
        assert mapped and bool(copied) == sharing
        # pieces were views of windows faulted in by the scan or by madvise(MADV_POPULATE_READ) through
        # ctypes (the GIL released), which this kernel knows: a refusal would switch back to MAP_POPULATE
        assert bcopy._madvise() is not None


@pytest.mark.parametrize("value", ["0", "17", "abc", "+4", " 4", "04", "4 ", "-4", "0x4", "", "8k", "010", "08",
                                   "0x", "16", "1"])
def test_in_flight_option_like_qemu_img(workdir: Path, value: str) -> None:
    """-m N (requests in flight; here pieces read ahead): strtol's syntax and 1..16, qemu-img's text; the
    data written does not depend on it."""
    check_ok("create", "-q", "-f", "qcow2", "src.qcow2", "8M", cwd=workdir)
    from tests.helpers.qemu_io import qio

    qio("src.qcow2", ["write -P 7 1M 3M", "write -z 5M 1M"], workdir)
    q = qemu_img("convert", "-m", value, "-O", "raw", "src.qcow2", "q.raw", cwd=workdir)
    v = vdkit_img("convert", "-m", value, "-O", "raw", "src.qcow2", "v.raw", cwd=workdir)
    assert (v.returncode, v.normalized_stderr()) == (q.returncode, q.stderr)
    if q.returncode == 0:
        assert (workdir / "q.raw").read_bytes() == (workdir / "v.raw").read_bytes()


class _FakeInFlight:
    """A source file taking reads in flight, as RBD's (``start_readinto``/``finish_read``), over a local file.

    A started read fills its buffer with 0xee and does the real read only when finished, so a buffer
    written or reused before its read is done shows in the output; a buffer in two reads at once, more
    reads in flight than allowed, or a read never finished fail the test.  ``fail_at``: the read (by
    start order) that fails with EIO.
    """

    def __init__(self, fd: int, filename: str, limit: int, fail_at: int | None = None) -> None:
        self.fd = fd
        self.filename = filename
        self.limit = limit
        self.fail_at = fail_at
        self.started = 0
        self.in_flight: dict[int, int] = {}  # id of the buffer -> read number
        self.most = 0

    def start_readinto(self, offset: int, view: memoryview) -> tuple[int, int, memoryview]:
        key = id(view.obj)
        assert key not in self.in_flight, "a buffer in two reads at once"
        self.in_flight[key] = self.started
        self.most = max(self.most, len(self.in_flight))
        assert len(self.in_flight) <= self.limit
        view[:] = b"\xee" * len(view)
        self.started += 1
        return self.started - 1, offset, view

    def finish_read(self, read: tuple[int, int, memoryview]) -> None:
        import errno
        import os

        number, offset, view = read
        assert self.in_flight.pop(id(view.obj)) == number
        if number == self.fail_at:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        n = os.preadv(self.fd, [view], offset)
        view[n:] = bytes(len(view) - n)


def _walks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for each copy, whether its walk ran in a read-ahead thread (``ReadAhead(threaded=)``)."""
    from vdkit.block import copy as bcopy

    threaded: list[bool] = []
    real = bcopy.ReadAhead.__init__

    def init(self: bcopy.ReadAhead, *args: object, **kw: object) -> None:
        threaded.append(bool(kw.get("threaded", True)))
        real(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(bcopy.ReadAhead, "__init__", init)
    return threaded


@pytest.mark.parametrize("depth", ["1", "2", "4", "16"])
@pytest.mark.parametrize("sparse", ["4k", "0"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_reads_in_flight(workdir: Path, monkeypatch: pytest.MonkeyPatch, depth: str, sparse: str, fmt: str) -> None:
    """Data pieces of a source that takes reads in flight (RBD) are read several at a time into the copy's
    buffers and written in order: bytes and allocation map equal qemu-img's for data, zeros written as
    data, short zero stretches, holes and a partial last piece, for -m 1..16 and -S 0; no buffer is
    passed on or reused before its read is done, at most -m reads are in flight, none is left behind.
    A raw target is written in the caller's thread while a read-ahead thread walks the source; a qcow2
    target's writes run in a writer thread and the walk in the caller's."""
    from vdkit.block import copy as bcopy
    from vdkit.cli.main import main

    rnd = random.Random(11)
    size = (13 << 20) + 1536
    with open(workdir / "src.raw", "wb") as f:
        f.truncate(size)
        f.write(rnd.randbytes(5 << 20))
        f.write(bytes(1 << 20))
        f.write(rnd.randbytes(4096) + bytes(8192) + rnd.randbytes(1000))
        f.seek(9 << 20)
        f.write(rnd.randbytes((4 << 20) + 1536))
    fakes: list[_FakeInFlight] = []

    def fake_async_file(node: object, filename: str, layer: int) -> _FakeInFlight:
        fake = _FakeInFlight(node.driver.file.fd, filename, int(depth))  # type: ignore[attr-defined]
        fakes.append(fake)
        return fake

    monkeypatch.setattr(bcopy, "async_file", fake_async_file)
    monkeypatch.chdir(workdir)
    threaded = _walks(monkeypatch)
    args = ["convert", "-m", depth, "-S", sparse, "-f", "raw", "-O", fmt, "src.raw"]
    check_ok(*args, f"q.{fmt}", cwd=workdir)
    assert main([*args, f"v.{fmt}"]) == 0
    assert threaded == [fmt == "raw"]
    assert (workdir / f"q.{fmt}").read_bytes() == (workdir / f"v.{fmt}").read_bytes()
    q_map = check_ok("map", "--output=json", f"q.{fmt}", cwd=workdir).stdout
    assert check_ok("map", "--output=json", f"v.{fmt}", cwd=workdir).stdout == q_map
    assert len(fakes) == 1 and fakes[0].started >= 6 and not fakes[0].in_flight
    if depth != "1":
        assert fakes[0].most > 1


@pytest.mark.parametrize("fail_at", [0, 1, 4])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_read_in_flight_fails(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                              fail_at: int, fmt: str) -> None:
    """A read in flight that fails is reported as the same read done synchronously is (qemu-img's text,
    its piece's offset), after every piece before it was written; the reads behind it are waited for.
    Both ways of walking (a read-ahead thread for raw, the caller's thread for qcow2)."""
    import errno
    import os

    from vdkit.block import copy as bcopy
    from vdkit.cli.main import main

    rnd = random.Random(3)
    with open(workdir / "src.raw", "wb") as f:
        f.write(rnd.randbytes(12 << 20))
    fakes: list[_FakeInFlight] = []

    def fake_async_file(node: object, filename: str, layer: int) -> _FakeInFlight:
        fake = _FakeInFlight(node.driver.file.fd, filename, 8, fail_at)  # type: ignore[attr-defined]
        fakes.append(fake)
        return fake

    monkeypatch.chdir(workdir)
    with monkeypatch.context() as m:
        m.setattr(bcopy, "async_file", fake_async_file)
        threaded = _walks(m)
        assert main(["convert", "-m", "8", "-f", "raw", "-O", fmt, "src.raw", f"v.{fmt}"]) == 1
        assert threaded == [fmt == "raw"]
    in_flight_err = capsys.readouterr().err
    assert not fakes[0].in_flight
    pieces = 0
    real = bcopy.Copier.readinto

    def failing(self: bcopy.Copier, sector: int, n: int, view: memoryview) -> None:
        nonlocal pieces
        pieces += 1
        if pieces - 1 == fail_at:
            exc = OSError(errno.EIO, os.strerror(errno.EIO))
            raise bcopy.IOFailure(exc, f"error while reading at byte {sector * SECTOR}")
        real(self, sector, n, view)

    monkeypatch.setattr(bcopy.Copier, "readinto", failing)
    monkeypatch.setattr(bcopy.Copier, "host_extent", lambda self, sector, n: None)
    assert main(["convert", "-f", "raw", "-O", fmt, "src.raw", f"s.{fmt}"]) == 1
    assert capsys.readouterr().err == in_flight_err
    assert f"error while reading at byte {fail_at * (2 << 20)}: Input/output error" in in_flight_err
    if fmt == "qcow2":
        assert qemu_img("check", "v.qcow2", cwd=workdir).returncode == 0
        check_ok("convert", "-O", "raw", "v.qcow2", "v.raw", cwd=workdir)
    written = (workdir / "v.raw").read_bytes()[: fail_at * (2 << 20)]
    assert written == (workdir / "src.raw").read_bytes()[: fail_at * (2 << 20)]


@pytest.mark.parametrize("fail_at", [1, 3])
def test_write_fails_with_reads_in_flight(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], fail_at: int) -> None:
    """A qcow2 target's write failing while the walk (in the caller's thread) has reads in flight:
    qemu-img's message, an image ``qemu-img check`` finds clean, and every read finished before the
    copy returns (the walk is closed, its buffers no longer the reads')."""
    import errno
    import os

    from vdkit.block import copy as bcopy
    from vdkit.cli.main import main
    from vdkit.io.file import ImageFile

    rnd = random.Random(5)
    with open(workdir / "src.raw", "wb") as f:
        f.write(rnd.randbytes(16 << 20))
    fakes: list[_FakeInFlight] = []

    def fake_async_file(node: object, filename: str, layer: int) -> _FakeInFlight:
        fake = _FakeInFlight(node.driver.file.fd, filename, 8)  # type: ignore[attr-defined]
        fakes.append(fake)
        return fake

    real, writes = ImageFile.write_parts, []

    def failing(self: ImageFile, offset: int, parts: list[bytes | bytearray | memoryview]) -> None:
        writes.append(offset)
        if len(writes) == fail_at + 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(self, offset, parts)  # type: ignore[arg-type]

    monkeypatch.setattr(bcopy, "async_file", fake_async_file)
    monkeypatch.setattr(ImageFile, "write_parts", failing)
    monkeypatch.chdir(workdir)
    threaded = _walks(monkeypatch)
    assert main(["convert", "-m", "8", "-f", "raw", "-O", "qcow2", "src.raw", "v.qcow2"]) == 1
    assert threaded == [False]
    err = capsys.readouterr().err
    assert err.startswith("vdkit-img: error while writing at byte ") and err.endswith(": Input/output error\n"), err
    assert fakes[0].started > fail_at + 1 and not fakes[0].in_flight
    assert qemu_img("check", "v.qcow2", cwd=workdir).returncode == 0


@pytest.mark.parametrize("layout", ["in-order", "reversed", "striped-1M"])
def test_vhdx_blocks_mapped_by_location(workdir: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """vhdx has no block status with offsets (QEMU 7.2's driver reports none, and ``map`` shows none),
    so the copy asks the driver where a piece lies (``FormatDriver.data_location``): a piece in fully
    present blocks that follow each other in the file is mapped, any other is read. Outputs equal
    qemu-img's (qcow2 byte for byte; raw: contents and allocation map) for blocks in file order,
    blocks written in reverse (no piece of two blocks follows in the file), and 1 MiB blocks with
    absent (zero) blocks inside pieces; with ``-U`` nothing is mapped."""
    from vdkit.block import copy as bcopy
    from vdkit.cli.main import main

    rnd = random.Random(13)
    if layout == "striped-1M":
        with open(workdir / "src.raw", "wb") as f:
            f.truncate(12 << 20)
            for i in range(12):
                if i % 4 in (0, 2):
                    f.seek(i << 20)
                    f.write(rnd.randbytes(1 << 20))
        check_ok("convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", "src.raw", "s.vhdx", cwd=workdir)
    else:
        check_ok("create", "-q", "-f", "vhdx", "-o", "block_size=1M", "s.vhdx", "8M", cwd=workdir)
        order = range(8) if layout == "in-order" else range(7, -1, -1)
        for i in order:  # each write allocates its block at the end of the file
            r = qemu_io("-f", "vhdx", "-c", f"write -P {i + 1} {i}M 1M", "s.vhdx", cwd=workdir)
            assert r.returncode == 0, r.stderr
    mapped: list[int] = []
    real = bcopy.Mapped.__init__

    def count_map(self: bcopy.Mapped, file: object, offset: int, length: int, windows: object = None,
                  populate: bool = True) -> None:
        mapped.append(length)
        real(self, file, offset, length, windows, populate=populate)  # type: ignore[arg-type]

    monkeypatch.setattr(bcopy.Mapped, "__init__", count_map)
    monkeypatch.chdir(workdir)
    for share in ([], ["-U"]):
        for fmt in ("raw", "qcow2"):
            mapped.clear()
            check_ok("convert", *share, "-O", fmt, "s.vhdx", f"q.{fmt}", cwd=workdir)
            assert main(["convert", *share, "-O", fmt, "s.vhdx", f"v.{fmt}"]) == 0
            if fmt == "qcow2":
                assert (workdir / "q.qcow2").read_bytes() == (workdir / "v.qcow2").read_bytes()
            else:
                assert check_ok("compare", "q.raw", "v.raw", cwd=workdir).returncode == 0
                assert (check_ok("map", "--output=json", "v.raw", cwd=workdir).stdout
                        == check_ok("map", "--output=json", "q.raw", cwd=workdir).stdout)
            # in order: every 2 MiB piece spans two blocks that follow each other; reversed: none does;
            # striped: each piece holds an absent block
            assert bool(mapped) == (layout == "in-order" and not share), (layout, share, mapped)


@pytest.mark.parametrize("window", [3 << 20, 32 << 20, 0], ids=["3M", "32M", "no-madvise"])
def test_mapped_windows(workdir: Path, monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    """Mapped pieces are views of windows of the source file (one mapping for many pieces, a piece
    crossing a window's end starting the next): qemu-img's bytes and map for qcow2 -> raw and
    raw -> qcow2; every window is unmapped by the end.  Without madvise, pieces are mapped one by one."""
    from vdkit.block import copy as bcopy
    from vdkit.cli.main import main

    rnd = random.Random(5)
    with open(workdir / "src.raw", "wb") as f:
        f.truncate(24 << 20)
        for mib in range(24):
            kind = mib % 4
            f.seek(mib << 20)
            f.write(rnd.randbytes(1 << 20) if kind in (0, 3) else bytes(1 << 20) if kind == 1 else b"")
        f.seek(17 << 20)
        f.write(rnd.randbytes(3000) + bytes(20000) + rnd.randbytes(5000))
    check_ok("convert", "-f", "raw", "-O", "qcow2", "src.raw", "src.qcow2", cwd=workdir)
    windows: list[bcopy.MapWindow] = []
    real_init = bcopy.MapWindow.__init__

    def track(self: bcopy.MapWindow, file: object, start: int, end: int) -> None:
        real_init(self, file, start, end)  # type: ignore[arg-type]
        windows.append(self)

    monkeypatch.setattr(bcopy.MapWindow, "__init__", track)
    if window:
        monkeypatch.setattr(bcopy.MapWindow, "SIZE", window)
    else:
        monkeypatch.setattr(bcopy, "_madvise", lambda: None)
    monkeypatch.chdir(workdir)
    for src, fmt, out in (("src.qcow2", "raw", "raw"), ("src.raw", "qcow2", "qcow2")):
        check_ok("convert", "-O", fmt, src, f"q.{out}", cwd=workdir)
        assert main(["convert", "-O", fmt, src, f"v.{out}"]) == 0
        assert (workdir / f"q.{out}").read_bytes() == (workdir / f"v.{out}").read_bytes()
        q_map = check_ok("map", "--output=json", f"q.{out}", cwd=workdir).stdout
        assert check_ok("map", "--output=json", f"v.{out}", cwd=workdir).stdout == q_map
    if not window:
        assert not windows
    else:
        assert windows and all(w.mm.closed for w in windows)
        assert len(windows) <= (2 * (24 << 20)) // window + 2


def test_allocate_asks_on_ext4_what_stat_sees(tmp_path: Path) -> None:
    """``ImageFile.on_ext4``, which the allocating tests below take as given, against coreutils'
    ``stat -f`` on the same folder (ext2/3/4's magic, ``ef53``)."""
    import subprocess

    from vdkit.io.file import ImageFile

    path = tmp_path / "f"
    path.write_bytes(b"")
    seen = subprocess.run(["stat", "-f", "-c", "%t", str(path)], capture_output=True, text=True, check=True)
    with ImageFile(path, readonly=True) as f:
        assert f.on_ext4() == (seen.stdout.strip() == "ef53")


@pytest.mark.parametrize("refused", [False, True], ids=["allocated", "refused"])
def test_raw_target_allocates_what_it_writes(workdir: Path, monkeypatch: pytest.MonkeyPatch, refused: bool) -> None:
    """A raw target on ext4 gets the blocks of each big data write allocated first (fallocate keeping
    the size): bytes, map and allocated blocks (after writeback) equal qemu-img's output for data with
    -S holes inside it, short writes, a zero cluster and a partial last cluster; a refused allocation
    (no space) is not asked again and the writes go on as before."""
    import os

    from vdkit.block import target as btarget
    from vdkit.cli.main import main
    from vdkit.io.file import ImageFile

    rnd = random.Random(3)
    size = (6 << 20) + 1536
    with open(workdir / "src.raw", "wb") as f:
        f.truncate(size)
        f.write(rnd.randbytes(1 << 20) + bytes(64 << 10) + rnd.randbytes(3 << 19))  # a 64 KiB hole inside data
        f.seek(3 << 20)
        f.write(rnd.randbytes(70 << 10))  # a short data run
        f.seek(4 << 20)
        f.write(bytes(1 << 20) + rnd.randbytes((1 << 20) + 1536))  # zeros written as data, partial end
    check_ok("convert", "-f", "raw", "-O", "qcow2", "src.raw", "src.qcow2", cwd=workdir)
    calls: list[tuple[int, int]] = []
    real = ImageFile.allocate

    def allocate(self: ImageFile, offset: int, length: int) -> bool:
        calls.append((offset, length))
        return False if refused else real(self, offset, length)

    monkeypatch.setattr(ImageFile, "allocate", allocate)
    monkeypatch.chdir(workdir)
    check_ok("convert", "-O", "raw", "src.qcow2", "q.raw", cwd=workdir)
    assert main(["convert", "-O", "raw", "src.qcow2", "v.raw"]) == 0
    assert (workdir / "q.raw").read_bytes() == (workdir / "v.raw").read_bytes()
    q_map = check_ok("map", "--output=json", "q.raw", cwd=workdir).stdout
    assert check_ok("map", "--output=json", "v.raw", cwd=workdir).stdout == q_map
    blocks = []
    for name in ("q.raw", "v.raw"):
        fd = os.open(workdir / name, os.O_RDONLY)
        try:
            os.fsync(fd)  # ext4 counts delayed allocations differently until they are written out
            blocks.append(os.fstat(fd).st_blocks)
        finally:
            os.close(fd)
    assert blocks[0] == blocks[1]
    with ImageFile(workdir / "v.raw", readonly=True) as f:
        ext4 = f.on_ext4()
    if refused:
        assert len(calls) == int(ext4)
    else:
        assert ext4 == bool(calls) and all(length >= btarget._ALLOCATE_MIN for _, length in calls)


def _file_layout(path: Path) -> tuple[list[tuple[int, int]], int]:
    """(data ranges by SEEK_DATA/SEEK_HOLE, st_blocks) after the file is written out."""
    import os

    from tests.conftest import data_extents

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # ext4 counts delayed allocations differently until they are written out
        return data_extents(path), os.fstat(fd).st_blocks
    finally:
        os.close(fd)


@pytest.mark.parametrize("opts", ["", "cluster_size=128k", "extended_l2=on", "refcount_bits=1", "cluster_size=4096"])
@pytest.mark.parametrize("mode", ["allocated", "small-chunks", "refused", "small-copy"])
def test_qcow2_target_allocates_ahead(workdir: Path, monkeypatch: pytest.MonkeyPatch, opts: str, mode: str) -> None:
    """A new qcow2 target on ext4 gets its blocks allocated ahead of the writes that grow it, in file
    order (fallocate keeping the size), and what lies past the end given back at the end: bytes, map,
    the file's data/hole layout equals qemu-img's output (zeros written as data, holes, a partial
    last sector; two writer threads; chunks smaller than the copy's writes) and nothing past the end
    stays allocated.  (The first chunk is allocated by writeback, after the ones ahead of it: the
    file may have an extent more than qemu-img's, and from five extents on one 4 KiB tree block.)
    A refused allocation is not asked again and the writes go on as before; a copy smaller than the
    first chunk, and an image of clusters below 64 KiB, allocate nothing ahead."""
    from vdkit.cli.main import main
    from vdkit.formats.qcow2.target import Qcow2Target
    from vdkit.io.file import ImageFile

    rnd = random.Random(5)
    size = (9 << 20) + 1536
    with open(workdir / "src.raw", "wb") as f:
        f.truncate(size)
        for i in range(9):
            f.seek(i << 20)
            f.write(bytes(1 << 20) if i % 3 == 1 else rnd.randbytes(1 << 20) if i % 3 == 0 else b"")
        f.seek(9 << 20)
        f.write(rnd.randbytes(1536))
    calls: list[tuple[int, int]] = []
    real = ImageFile.allocate

    def allocate(self: ImageFile, offset: int, length: int) -> bool:
        calls.append((offset, length))
        return False if mode == "refused" else real(self, offset, length)

    monkeypatch.setattr(ImageFile, "allocate", allocate)
    if mode != "small-copy":
        monkeypatch.setattr(Qcow2Target, "ALLOCATE_AHEAD", (192 << 10) if mode == "small-chunks" else (1 << 20))
    monkeypatch.chdir(workdir)
    o = ["-o", opts] if opts else []
    check_ok("convert", "-f", "raw", "-O", "qcow2", *o, "src.raw", "q.qcow2", cwd=workdir)
    assert main(["convert", "-f", "raw", "-O", "qcow2", *o, "src.raw", "v.qcow2"]) == 0
    assert (workdir / "q.qcow2").read_bytes() == (workdir / "v.qcow2").read_bytes()
    q_map = check_ok("map", "--output=json", "q.qcow2", cwd=workdir).stdout
    assert check_ok("map", "--output=json", "v.qcow2", cwd=workdir).stdout == q_map
    v_layout, v_blocks = _file_layout(workdir / "v.qcow2")
    q_layout, q_blocks = _file_layout(workdir / "q.qcow2")
    assert v_layout == q_layout
    # nothing allocated past the end is left (a few extent-tree blocks at most)
    assert v_blocks * 512 <= sum(b - a for a, b in v_layout) + (64 << 10)
    if mode in ("refused", "small-copy"):  # written as before: the same blocks
        assert v_blocks == q_blocks
    with ImageFile(workdir / "v.qcow2", readonly=True) as f:
        ext4 = f.on_ext4()
    ahead = ext4 and opts != "cluster_size=4096"  # (not below 64 KiB clusters: see Qcow2Target)
    if not ahead or mode in ("refused", "small-copy"):
        assert len(calls) == int(ahead and mode == "refused")
        return
    assert calls and all(a[0] + a[1] == b[0] for a, b in zip(calls, calls[1:], strict=False))  # in order, no gap
    if mode == "small-chunks":
        assert len(calls) >= 3  # one extension per write


def test_allocate_ahead_gives_back_the_blocks_past_the_end(workdir: Path) -> None:
    """ImageFile.allocate_ahead: writes past ``start`` allocate a chunk at a time from ``start``; the
    end gives back what lies past the end of the file, and later writes are plain ones."""
    import os

    from vdkit.io.file import ImageFile

    path = workdir / "f.bin"
    path.write_bytes(b"\x01" * 1000)
    mib = 1 << 20
    first = b"\x03" * mib + b"\x04" * 4096
    with ImageFile(path, readonly=False) as f:
        f.allocate_ahead(4 * mib, 4096)
        f.pwrite(1000, b"\x02" * 100)  # below start: nothing allocated ahead
        f.pwritev(4096, [first[:mib], first[mib:]])  # inside the first chunk: written as usual
        os.fsync(f.fd)
        before = os.fstat(f.fd).st_blocks
        assert before * 512 <= 4096 + len(first)
        f.pwrite(4 * mib + 4096, b"\x06" * 4096)  # past start + chunk: the next chunk is allocated
        os.fsync(f.fd)
        assert os.fstat(f.fd).st_blocks - before >= (4 * mib) // 512 - 16
        f.pwrite(4096 + len(first), bytes(4 * mib - len(first)))  # (the file is written whole)
        f.end_allocate_ahead()
        os.fsync(f.fd)
        end = 4 * mib + 2 * 4096
        assert os.fstat(f.fd).st_size == end
        assert os.fstat(f.fd).st_blocks * 512 <= end
        f.pwrite(end, b"\x05")
        assert os.fstat(f.fd).st_size == end + 1
    data = path.read_bytes()
    assert data[:4096] == b"\x01" * 1000 + b"\x02" * 100 + bytes(4096 - 1100)
    assert data[4096 : 4096 + len(first)] == first
    assert data[4 * mib + 4096 :] == b"\x06" * 4096 + b"\x05"
