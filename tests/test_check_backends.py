"""The read-only qcow2 check answers alike on both table backends (issue 14: ``check`` without numpy).

Small images are checked on lists, entry by entry (``tables.SMALL``); big ones with numpy, table by
table (``tables.NUMPY``).  The differential suites (``tests/diff/test_check*.py``) compare vdkit with
qemu-img on the backend an image gets by its size, which for their small images is SMALL; this sweep
holds NUMPY to the same answers: images qemu-img made (snapshots, compressed clusters, extended L2,
refcount widths, small clusters, a data file), damaged by seeded overwrites of header fields and of
L1, L2, refcount table, refcount block and snapshot table entries, are checked in-process with each
backend forced, and the result and every reported line must agree; so must the proof by runs
(``check_runs``, which ``Qcow2Driver.check`` tries first on every read-only check) and its fallback.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import check_ok, qemu_io
from vdkit.block.node import open_image
from vdkit.errors import VdkitError
from vdkit.formats.qcow2 import check_runs
from vdkit.formats.qcow2.check_runs import check_clean
from vdkit.io import tables
from vdkit.record import fields

CS = 65536


def _write(path: Path, *cmds: str) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    r = qemu_io("-f", "qcow2", *args, path.name, cwd=path.parent)  # (a data file is named beside it)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("check-backends")
    data = ["write -P 1 0 192k", "write -P 2 1M 64k", "write -P 3 40M 128k", "write -z 3M 64k"]
    made: dict[str, Path] = {}

    def make(name: str, *opts: str, writes: list[str] = data) -> Path:
        path = d / f"{name}.qcow2"
        check_ok("create", "-q", "-f", "qcow2", *opts, str(path), "64M")
        _write(path, *writes)
        made[name] = path
        return path

    make("plain")
    snap = make("snap")
    check_ok("snapshot", "-c", "one", str(snap))
    _write(snap, "write -P 7 0 64k", "write -P 8 50M 64k")
    check_ok("snapshot", "-c", "two", str(snap))
    _write(snap, "write -P 9 64k 64k")
    make("extl2", "-o", "extended_l2=on", writes=[*data, "write -P 4 8M 4k", "write -P 5 9M 2k"])
    make("rc1", "-o", "refcount_bits=1")
    make("rc64", "-o", "refcount_bits=64")
    make("c4k", "-o", "cluster_size=4096")
    make("v2", "-o", "compat=0.10")
    raw = d / "comp.raw"
    raw.write_bytes(b"compressible data " * 20000)
    comp = d / "comp.qcow2"
    check_ok("convert", "-q", "-c", "-O", "qcow2", str(raw), str(comp))
    made["comp"] = comp
    check_ok("create", "-q", "-f", "qcow2", "-o", "data_file=df.raw", "df.qcow2", "64M", cwd=d)  # beside it
    _write(d / "df.qcow2", *data)
    made["df"] = d / "df.qcow2"
    return made


def _u64(data: bytes | bytearray, off: int) -> int:
    return int(struct.unpack_from(">Q", data, off)[0]) if off + 8 <= len(data) else 0


def _spots(img: bytes) -> list[tuple[str, int]]:
    """(structure, offset of one 8-byte entry) of the image's metadata."""
    cs = 1 << int(struct.unpack_from(">I", img, 20)[0])
    l1_size, l1_off, rt_off = struct.unpack_from(">IQQ", img, 36)
    rt_clusters, nb_snap, snap_off = struct.unpack_from(">IIQ", img, 56)
    # (not the L1 table sizes, header and snapshots': an image whose header names that many tables
    # is checked with numpy whatever the test forces, and hostile sizes have their own tests)
    spots = [("header", o) for o in (24, 40, 48, 64, 72, 80, 88, 96)]
    spots += [("l1", l1_off + 8 * i) for i in range(min(l1_size, 4))]
    for i in range(min(l1_size, 4)):
        l2 = _u64(img, l1_off + 8 * i) & 0x00FFFFFFFFFFFE00
        if l2:
            spots += [("l2", l2 + 8 * j) for j in range(0, cs // 8, max(1, cs // 8 // 24))]
            spots += [("l2", l2 + 8 * j) for j in range(4)]
    spots += [("reftable", rt_off + 8 * i) for i in range(min(rt_clusters * cs // 8, 3))]
    rb = _u64(img, rt_off) & ~(cs - 1)
    if rb:
        spots += [("refblock", rb + 8 * i) for i in range(16)]
    if nb_snap:
        spots += [("snapshots", snap_off + o) for o in (0, 12, 16, 32)]
    return [(what, off) for what, off in spots if off + 8 <= len(img)]


def _damage(img: bytearray, rng: random.Random) -> None:
    cs = 1 << int(struct.unpack_from(">I", img, 20)[0])
    for _ in range(rng.randint(1, 3)):
        what, off = rng.choice(_spots(bytes(img)))
        old = _u64(img, off)
        value = rng.choice([
            0, old ^ (1 << 63), old ^ (1 << 62), old ^ 1, old ^ (1 << rng.randrange(1, 62)), old + cs, old + 512,
            old - cs if old >= cs else old, rng.getrandbits(64), rng.getrandbits(20) * cs, 1 << 56,
            (old & ~0xFFFF) | rng.getrandbits(16),
        ])
        img[off:off + 8] = value.to_bytes(8, "big")


def _check(path: Path, backend: str, monkeypatch: pytest.MonkeyPatch, runs: bool = True) -> tuple[object, ...]:
    """The result and lines of a read-only check on ``backend`` (the walk by runs first, as
    ``Qcow2Driver.check`` does, or with ``runs`` False only the full walk)."""
    monkeypatch.setattr(tables, "FORCE", backend)
    monkeypatch.setattr(check_runs, "ENABLED", runs)
    lines: list[str] = []
    try:
        with open_image(str(path), "qcow2", readonly=True, force_share=True, check_mode=True) as node:
            res = node.driver.check(None, lines.append)
    except VdkitError as exc:
        return ("error", exc.message, *lines)
    return (*(getattr(res, f) for f in fields(res)), *lines)


@pytest.mark.parametrize("name", ["plain", "snap", "extl2", "rc1", "rc64", "c4k", "v2", "comp", "df"])
def test_backends_agree_on_damaged_images(templates: dict[str, Path], tmp_path: Path, name: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    good = templates[name].read_bytes()
    if name == "df":
        shutil.copy(templates[name].parent / "df.raw", tmp_path / "df.raw")
    monkeypatch.chdir(tmp_path)  # a data file's name is relative to the working directory, as in QEMU
    for seed in range(-1, 50):
        img = bytearray(good)
        if seed >= 0:
            _damage(img, random.Random(f"{name}/{seed}"))
        path = tmp_path / f"{name}.qcow2"
        path.write_bytes(img)
        small = _check(path, "small", monkeypatch, runs=False)
        numpy = _check(path, "numpy", monkeypatch, runs=False)
        assert small == numpy, f"seed {seed}"
        assert _check(path, "small", monkeypatch) == numpy, f"seed {seed} (by runs)"
        sparse = check_runs._SPARSE
        monkeypatch.setattr(check_runs, "_SPARSE", 0)  # every table through l2runs
        assert _check(path, "numpy", monkeypatch) == numpy, f"seed {seed} (by runs, dense)"
        monkeypatch.setattr(check_runs, "_SPARSE", sparse)
        if seed < 0:
            with open_image(str(path), "qcow2", readonly=True, force_share=True, check_mode=True) as node:
                proven = check_clean(node.driver)
            # (the walk by runs leaves snapshots, compressed and extended L2 entries, sub-byte refcounts and
            # data files to the full walk)
            assert (proven is not None) == (name in ("plain", "rc64", "c4k", "v2")), name
        if seed < 0:
            assert small[:2] == (0, 0), small  # the undamaged image: no corruptions, no leaks


def _repair(path: Path, backend: str, repair: str, monkeypatch: pytest.MonkeyPatch) -> tuple[object, ...]:
    """What ``vdkit-img check -r`` does on ``backend``: the repair, the double check when something was
    fixed (both results and every line), and the image file's bytes afterwards."""
    monkeypatch.setattr(tables, "FORCE", backend)
    lines: list[str] = []
    results: list[object] = []
    try:
        with open_image(str(path), "qcow2", readonly=False, check_mode=True, share_writes=True) as node:
            res = node.driver.check(repair, lines.append)
            results += [getattr(res, f) for f in fields(res)]
            if not res.error and (res.corruptions_fixed or res.leaks_fixed):
                again = node.driver.check(None, lines.append)
                results += [getattr(again, f) for f in fields(again)]
    except VdkitError as exc:
        results += ["error", exc.message]
    return (*results, *lines, _contents(path))


def _contents_of(img: bytes | bytearray, tmp_path: Path) -> tuple[int, str]:
    (tmp_path / "unrepaired").write_bytes(img)
    return _contents(tmp_path / "unrepaired")


def _contents(path: Path) -> tuple[int, str]:
    """A file's size and a digest of its data (a repair may extend it to a huge sparse size): the
    chunks of its data extents that are not all zeros, with their offsets."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < end:
                chunk = os.pread(fd, min(end - pos, 1 << 20), pos)
                if chunk.strip(b"\0"):
                    digest.update(pos.to_bytes(8, "big") + chunk)
                pos += len(chunk)
    return size, digest.hexdigest()


@pytest.mark.parametrize("name", ["plain", "snap", "extl2", "rc1", "rc64", "c4k", "v2", "comp", "df"])
def test_backends_repair_alike(templates: dict[str, Path], tmp_path: Path, name: str,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``check -r all`` and ``-r leaks`` of the damaged images on lists and with numpy: the same results,
    lines and repaired bytes (qemu-img's own answers: tests/diff/test_check*.py, on either backend)."""
    good = templates[name].read_bytes()
    monkeypatch.chdir(tmp_path)
    path = tmp_path / templates[name].name
    repaired = 0
    for seed in range(40):
        img = bytearray(good)
        _damage(img, random.Random(f"{name}/{seed}"))
        answers = []
        for backend in ("small", "numpy"):
            path.write_bytes(img)
            if name == "df":
                shutil.copy(templates[name].parent / "df.raw", tmp_path / "df.raw")
            answers.append(_repair(path, backend, "all" if seed % 2 else "leaks", monkeypatch))
        assert answers[0] == answers[1], f"seed {seed}"
        repaired += answers[0][-1] != _contents_of(img, tmp_path)
    assert repaired, "no damage was repaired: the sweep compares nothing"


def test_check_chooses_small_tables_for_small_images(templates: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a forced backend, a small image's check runs on lists (and so imports no numpy)."""
    from vdkit.formats.qcow2 import check as check_mod

    seen: list[bool] = []
    real = check_mod._Checker.__init__

    def spy(self: check_mod._Checker, *args: object) -> None:
        real(self, *args)  # type: ignore[arg-type]
        seen.append(self.small)

    monkeypatch.setattr(tables, "FORCE", None)
    monkeypatch.setattr(check_mod._Checker, "__init__", spy)
    with open_image(str(templates["snap"]), "qcow2", readonly=True, force_share=True, check_mode=True) as node:
        node.driver.check(None, lambda line: None)
    monkeypatch.setattr(tables, "NUMPY_MIN_BYTES", 1)
    with open_image(str(templates["snap"]), "qcow2", readonly=True, force_share=True, check_mode=True) as node:
        node.driver.check(None, lambda line: None)
    assert seen == [True, False]


@given(st.lists(st.sampled_from([0, 0, 0, 1, 1 << 56, 1 << 63, 0x80_0000_0005_0000]), max_size=300))
def test_nonzero_entries_of_a_table(entries: list[int]) -> None:
    """The proof by runs finds a table's used entries by bisecting its zero tail: exactly the non-zero ones."""
    raw = b"".join(e.to_bytes(8, "big") for e in entries)
    assert list(check_runs._nonzero_entries(raw)) == [i for i, e in enumerate(entries) if e]


@given(st.lists(st.tuples(st.integers(0, 3 * 4096), st.integers(1, 40), st.integers(0, 2)), max_size=12),
       st.integers(0, 3 * 4096 + 50), st.integers(0, 3 * 4096 + 100), st.integers(1, 70))
def test_small_counts_scan_as_the_paged_ones(ranges: list[tuple[int, int, int]], first: int, n: int,
                                             count: int) -> None:
    """The rebuild's allocation scans on the dict of counts (lists backend) answer as numpy's pages:
    set_range (zeros only where counted), dense, next_nonzero and zero_run (first fit, first zero,
    zeros at the end), over page boundaries."""
    from vdkit.formats.qcow2 import check as check_mod

    check_mod._numpy()
    paged, small = check_mod._Refs(16), check_mod._SmallRefs(16)
    for lo, length, value in ranges:
        paged.set_range(lo, lo + length, value)
        small.set_range(lo, lo + length, value)
    assert [int(v) for v in paged.dense(0, n)] == small.dense(0, n)
    assert paged.next_nonzero(first, n) == small.next_nonzero(first, n)
    assert paged.zero_run(first, n, count) == small.zero_run(first, n, count)
