"""``map``'s chain walk over the layers' runs against the per-position walk it replaced.

:func:`vdkit.block.io.map_entries` walks each layer's runs once
(``FormatDriver.status_runs``: qcow2's cached table runs, or ``block_status``
asked at each run's start for every other format) and descends into the
backing node only where a layer leaves a range unallocated.  Every image here
is mapped four ways — qcow2's runs or the generic per-run queries, L2 tables
decoded with numpy or in Python — and each must give what qemu-img map's own
loop gives (``chain_status`` at every position, merged: the old walk, kept
here as the model), entries and the error at the same point; the entries are
also compared with ``qemu-img map --output=json`` (the oracle) where it succeeds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_img
from tests.helpers.patching import set_u64
from tests.helpers.qemu_io import qemu_io_script
from vdkit.block.driver import FormatDriver
from vdkit.block.io import MapEntry, chain_status, map_entries
from vdkit.block.node import open_image
from vdkit.formats.qcow2.driver import Qcow2Driver

Walk = tuple[list[tuple[object, ...]], tuple[str, str] | None]


def _row(e: MapEntry) -> tuple[object, ...]:
    return (e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset, e.filename)


def _per_position(node, start: int, end: int):  # type: ignore[no-untyped-def]
    """The old walk: ``chain_status`` at every position (qemu-img map's loop), merged."""
    cur = None
    pos = start
    while pos < end:
        nxt = chain_status(node, pos, min(1 << 30, end - pos))
        pos += nxt.length
        if cur is not None and cur.mergeable(nxt):
            cur.length += nxt.length
            continue
        if cur is not None:
            yield cur
        cur = nxt
    if cur is not None:
        yield cur


def _walk(cwd: Path, name: str, *, generic: bool, pure: bool, reference: bool = False,
          monkeypatch: pytest.MonkeyPatch) -> Walk:
    """Entries (and the error that ended the walk) of a fresh open of ``name``."""
    with monkeypatch.context() as m:
        m.chdir(cwd)
        if generic:
            m.setattr(Qcow2Driver, "status_runs", FormatDriver.status_runs)
        node = open_image(name, None, readonly=True)
        try:
            for layer in node.chain():
                if isinstance(layer.driver, Qcow2Driver) and not layer.driver.geometry.extended_l2:
                    layer.driver.io._pure_tables = 10**6 if pure else 0
            size = node.driver.virtual_size
            walk = _per_position(node, 0, size) if reference else map_entries(node, 0, size)
            rows: list[tuple[object, ...]] = []
            try:
                for e in walk:
                    rows.append(_row(e))
            except Exception as exc:  # noqa: BLE001 - the error must be the same one, at the same point
                return rows, (type(exc).__name__, str(exc))
            return rows, None
        finally:
            node.close()


def _qemu_rows(cwd: Path, name: str) -> list[tuple[object, ...]] | None:
    r = qemu_img("map", "--output=json", name, cwd=cwd)
    if r.returncode != 0:
        return None
    out = []
    for d in json.loads(r.stdout):
        out.append((d["start"], d["length"], d["depth"], d["present"], d["zero"], d["data"], d.get("offset")))
    return out


def _check_all_ways(cwd: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Walk:
    model = _walk(cwd, name, generic=True, pure=False, reference=True, monkeypatch=monkeypatch)
    for generic in (False, True):
        for pure in (False, True):
            got = _walk(cwd, name, generic=generic, pure=pure, monkeypatch=monkeypatch)
            assert got == model, (generic, pure)
    theirs = _qemu_rows(cwd, name)
    if model[1] is None:
        assert theirs is not None
        assert [row[:7] for row in model[0]] == theirs  # (qemu-img 7.2's JSON names no file)
    return model


def _random_ops(rng: random.Random, size: int, n: int) -> list[str]:
    ops = []
    for _ in range(n):
        off = rng.randrange(0, size // 512) * 512
        length = min(size - off, rng.choice([512, 4096, 65536, 200 * 512, 1 << 20]))
        if length <= 0:
            continue
        kind = rng.choice(["write -P 0x5a", "write -P 0x5a", "write -z", "write -z -u", "discard"])
        ops.append(f"{kind} {off} {length}")
    return ops


@pytest.mark.parametrize("seed", range(8))
def test_random_chains_all_ways(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """base (raw or qcow2) <- mid <- top of random sizes, cluster sizes and writes."""
    rng = random.Random(seed)
    mib = 1 << 20
    base_fmt = rng.choice(["raw", "qcow2"])
    sizes = [rng.randrange(1, 9) * mib // 2 for _ in range(3)]
    names = [f"base.{base_fmt}", "mid.qcow2", "top.qcow2"]
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
        fmt = base_fmt if i == 0 else "qcow2"
        opts = []
        if fmt == "qcow2":
            cs = rng.choice([512, 4096, 65536])
            opts = ["-o", f"cluster_size={cs}" + (",extended_l2=on" if cs >= 16384 and rng.random() < 0.5 else "")]
        backing = ["-b", names[i - 1], "-F", base_fmt if i == 1 else "qcow2"] if i else []
        check_ok("create", "-q", "-f", fmt, *opts, *backing, name, str(size), cwd=tmp_path)
        qemu_io_script(tmp_path, name, _random_ops(rng, size, rng.randrange(3, 12)), fmt)
    for name in names[1:]:
        _check_all_ways(tmp_path, name, monkeypatch)


def test_special_layers_all_ways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metadata preallocation (data runs split by the file's holes), an external data file,
    compressed clusters and a backing longer than its overlay."""
    check_ok("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "p.qcow2", "2M", cwd=tmp_path)
    qemu_io_script(tmp_path, "p.qcow2", ["write -P 1 64k 64k", "write -P 2 1M 4k"], "qcow2")
    check_ok("create", "-q", "-f", "qcow2", "-o", "data_file=d.bin", "x.qcow2", "2M", cwd=tmp_path)
    qemu_io_script(tmp_path, "x.qcow2", ["write -P 1 0 64k", "write -z 1536k 64k"], "qcow2")
    check_ok("create", "-q", "-f", "qcow2", "c.qcow2", "4M", cwd=tmp_path)
    qemu_io_script(tmp_path, "c.qcow2", ["write -c -P 1 0 64k", "write -c -P 2 64k 64k", "write -P 3 1M 64k"], "qcow2")
    check_ok("create", "-q", "-f", "qcow2", "-b", "c.qcow2", "-F", "qcow2", "short.qcow2", "1M", cwd=tmp_path)
    qemu_io_script(tmp_path, "short.qcow2", ["write -P 4 4k 4k"], "qcow2")
    for name in ("p.qcow2", "x.qcow2", "c.qcow2", "short.qcow2"):
        _check_all_ways(tmp_path, name, monkeypatch)


def test_corrupt_entry_in_backing_fails_at_the_same_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unaligned data offset in the backing's L2 table: the walk stops there, entries before it out."""
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "b.qcow2", "1M", cwd=tmp_path)
    qemu_io_script(tmp_path, "b.qcow2", ["write -P 1 0 64k", "write -P 2 512k 64k"], "qcow2")
    img = tmp_path / "b.qcow2"
    raw = img.read_bytes()
    l1 = int.from_bytes(raw[40:48], "big")
    l2 = int.from_bytes(raw[l1 : l1 + 8], "big") & 0x00FFFFFFFFFFFE00
    set_u64(img, l2 + 8 * 130, (1 << 63) | 0x50200)  # guest 520 KiB
    check_ok("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2", "1M", cwd=tmp_path)
    qemu_io_script(tmp_path, "t.qcow2", ["write -P 3 4k 4k", "write -P 4 700k 4k"], "qcow2")
    rows, err = _check_all_ways(tmp_path, "t.qcow2", monkeypatch)
    assert err is not None and "unaligned" in err[1]
    assert rows and rows[-1][0] < 520 * 1024
