"""qcow2 metadata writers on small images run without numpy (issue 14: its import is ~10 interpreter starts).

``create -f qcow2`` and ``snapshot -c/-a/-d`` hold their tables as lists (``vdkit.io.tables.SMALL``)
below ``NUMPY_MIN_BYTES``; what each process imports is read from ``python -X importtime`` of the
installed entry point, and the results are checked by ``qemu-img check`` (the byte-for-byte and
model comparisons live in tests/diff/test_create.py and tests/test_snapshot_*.py, run on both backends).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, check_ok, qemu_img, qemu_io

SCRIPT = ROOT / "scripts" / "vdkit-img"
# numpy (~10 interpreter starts) and the standard modules that cost milliseconds each (functools brings
# collections; see tests/unit/test_startup.py)
HEAVY = {"numpy", "collections", "functools", "typing", "dataclasses", "inspect", "re", "enum", "ast", "pathlib"}
# what a snapshot operation has no use for: the qcow2 data path (its overlap test is the driver's own,
# vdkit.formats.qcow2.overlap) and zlib with it; operator.py and bisect.py (their C modules serve)
NOT_FOR_SNAPSHOTS = {"vdkit.formats.qcow2.io", "zlib", "operator", "bisect"}


def _imported(argv: list[str], cwd: Path, env: dict[str, str]) -> set[str]:
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.pop("VDKIT_TABLES", None)  # the automatic choice, unless the test forces one
    e.update(env)
    p = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=cwd, env=e, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}


def _imports(args: list[str], cwd: Path, **env: str) -> set[str]:
    """What ``vdkit-img args`` imports beyond a bare interpreter (a venv's site hooks import some)."""
    return _imported([str(SCRIPT), *args], cwd, env) - _imported(["-c", "pass"], cwd, {})


@pytest.mark.parametrize("opts", ["", "cluster_size=4k,refcount_bits=1", "extended_l2=on,refcount_bits=64",
                                  "compat=0.10", "preallocation=metadata,cluster_size=64k"])
def test_create_without_numpy(tmp_path: Path, opts: str) -> None:
    args = ["create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), "new.qcow2", "1G"]
    assert not HEAVY & _imports(args, tmp_path)
    check_ok("check", str(tmp_path / "new.qcow2"))


def test_snapshots_without_numpy(tmp_path: Path) -> None:
    img = tmp_path / "img.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "4G")
    qemu_io("-c", "write -P 1 0 8M", "-c", "write -P 2 1G 3M", "-c", "write -c -P 3 2G 64k", str(img))
    for cmd in (["-c", "s1"], ["-c", "s2"], ["-a", "s1"], ["-d", "s2"], ["-d", "s1"]):
        assert not (HEAVY | NOT_FOR_SNAPSHOTS) & _imports(["snapshot", *cmd, "img.qcow2"], tmp_path), cmd
        check_ok("check", str(img))
    assert "numpy" in _imports(["snapshot", "-c", "s3", "img.qcow2"], tmp_path, VDKIT_TABLES="numpy")
    check_ok("check", str(img))


@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "compat=0.10,cluster_size=512", "extended_l2=on"])
def test_convert_to_qcow2_without_numpy(tmp_path: Path, opts: str) -> None:
    """``convert -O qcow2`` of a small image writes its data through list L1/L2 tables (data, zeros and
    holes; the smallest clusters need several L2 tables): no numpy, and the file qemu-img writes."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(64 << 10))
    os.truncate(raw, 6 << 20)  # a hole at the end
    o = ["-o", opts] if opts else []
    args = ["convert", "-f", "raw", "-O", "qcow2", *o, "src.raw", "v.qcow2"]
    assert "numpy" not in _imports(args, tmp_path)
    check_ok("convert", "-f", "raw", "-O", "qcow2", *o, str(raw), str(tmp_path / "q.qcow2"))
    assert (tmp_path / "v.qcow2").read_bytes() == (tmp_path / "q.qcow2").read_bytes()
    check_ok("check", str(tmp_path / "v.qcow2"))
    (tmp_path / "v.qcow2").unlink()
    assert "numpy" in _imports(args, tmp_path, VDKIT_TABLES="numpy")
    assert (tmp_path / "v.qcow2").read_bytes() == (tmp_path / "q.qcow2").read_bytes()


@pytest.mark.parametrize("size, stride", [(1900 << 30, 600 << 30), (30 << 30, 512 << 20)],
                         ids=["2TB-sparse", "60-tables"])
def test_convert_to_big_sparse_qcow2_without_numpy(tmp_path: Path, size: int, stride: int) -> None:
    """A big disk with little data: the new image's L1 names no table, so its writer holds lists
    whatever the virtual size (numpy's import was ten times qemu-img's whole run on 1.9 TB); with
    data in 60 L2 tables the list cache (48 tables) evicts and writes tables back: the file qemu-img
    writes either way."""
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for at in range(0, size, stride):
            f.seek(at + 12345)
            f.write(os.urandom(70000))
    args = ["convert", "-f", "raw", "-O", "qcow2", "src.raw", "v.qcow2"]
    assert "numpy" not in _imports(args, tmp_path)
    check_ok("convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp_path / "q.qcow2"))
    assert (tmp_path / "v.qcow2").read_bytes() == (tmp_path / "q.qcow2").read_bytes()
    check_ok("check", str(tmp_path / "v.qcow2"))


def _set_refcount(path: Path, cluster: int, value: int) -> None:
    """Overwrite one 16-bit refcount of the first refcount block (a leak or a missing reference)."""
    with open(path, "r+b") as f:
        header = f.read(64)
        f.seek(int.from_bytes(header[48:56], "big"))
        block = int.from_bytes(f.read(8), "big")
        f.seek(block + 2 * cluster)
        f.write(value.to_bytes(2, "big"))


@pytest.mark.parametrize("damage", ["leak", "missing reference"])
def test_check_repairs_and_growth_without_numpy(tmp_path: Path, damage: str) -> None:
    """``check -r leaks``/``-r all`` of a small damaged image (a leaked cluster, or a data cluster whose
    refcount is 0, which rebuilds the refcount structure) and ``resize`` growing (also with metadata
    preallocation) and shrinking it (data cut) run on lists: no numpy, and each leaves the bytes
    qemu-img's run leaves on a copy; a consistent image's check is proven by runs without even the
    full walk's module."""
    v, q = tmp_path / "v.qcow2", tmp_path / "q.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(v), "1G")
    qemu_io("-c", "write -P 1 0 1M", "-c", "write -P 2 300M 192k", str(v))
    os.truncate(v, 3 << 20)  # room for the leaked cluster
    _set_refcount(v, 40, 1) if damage == "leak" else _set_refcount(v, 5, 0)
    repairs = [["check", "-r", "leaks"]] if damage == "leak" else []  # (-r leaks cannot rebuild: exit 1)
    for args in (*repairs, ["check", "-r", "all"], ["resize", "--shrink", "{}", "301M"],
                 ["resize", "--shrink", "{}", "200M"], ["resize", "--preallocation=metadata", "{}", "+5M"],
                 ["resize", "{}", "+3G"], ["resize", "{}", "+1T"]):
        if "{}" not in args:
            args.append("{}")
        q.write_bytes(v.read_bytes())
        mods = _imports([a.replace("{}", "v.qcow2") for a in args], tmp_path)
        assert not HEAVY & mods, (args, sorted(HEAVY & mods))
        qemu_img(*(a.replace("{}", str(q)) for a in args))
        assert v.read_bytes() == q.read_bytes(), args
    mods = _imports(["check", "v.qcow2"], tmp_path)
    assert "numpy" not in mods and "vdkit.formats.qcow2.check" not in mods, sorted(mods)
    check_ok("check", str(v))
    # marked corrupt but consistent: -r all proves it so by runs and clears the bit, as qemu-img does
    with open(v, "r+b") as f:
        f.seek(72)
        f.write((2).to_bytes(8, "big"))
    q.write_bytes(v.read_bytes())
    mods = _imports(["check", "-r", "all", "v.qcow2"], tmp_path)
    assert "numpy" not in mods and "vdkit.formats.qcow2.check" not in mods, sorted(mods)
    qemu_img("check", "-r", "all", str(q))
    assert v.read_bytes() == q.read_bytes()
    assert v.read_bytes()[72:80] == bytes(8)


def test_commit_without_numpy(tmp_path: Path) -> None:
    """``commit`` of a small overlay (its block status, the emptied top image) runs without numpy and
    leaves both files as qemu-img's commit leaves the same pair."""
    for side in ("v", "q"):
        d = tmp_path / side
        d.mkdir()
        check_ok("create", "-q", "-f", "qcow2", "base.qcow2", "1G", cwd=d)
        qemu_io("-c", "write -P 1 0 1M", "-c", "write -P 3 5M 64k", str(d / "base.qcow2"))
        check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
        qemu_io("-c", "write -P 2 512k 1M", "-c", "write -P 4 5M 64k", str(d / "top.qcow2"))
    assert "numpy" not in _imports(["commit", "top.qcow2"], tmp_path / "v")  # (block/commit.py imports typing)
    check_ok("commit", "top.qcow2", cwd=tmp_path / "q")
    for name in ("base.qcow2", "top.qcow2"):
        assert (tmp_path / "v" / name).read_bytes() == (tmp_path / "q" / name).read_bytes(), name


def test_bitmaps_without_numpy(tmp_path: Path) -> None:
    """``info`` of an image with two bitmaps, ``bitmap --add/--merge/--disable/--clear/--remove`` and a
    ``commit`` into a base whose bitmaps record it run without numpy (the bitmaps are bytearrays), and each
    leaves the files qemu-img's same command leaves on a copy."""
    for side in ("v", "q"):
        d = tmp_path / side
        d.mkdir()
        check_ok("create", "-q", "-f", "qcow2", "a.qcow2", "1G", cwd=d)
        check_ok("bitmap", "--add", "a.qcow2", "b0", cwd=d)
        qemu_io("-c", "write -P 1 0 3M", "-c", "write -P 2 700M 64k", str(d / "a.qcow2"))
        check_ok("bitmap", "--add", "-g", "4k", "a.qcow2", "b1", cwd=d)
        qemu_io("-c", "write -P 3 1M 5k", "-c", "write -P 4 900M 1M", str(d / "a.qcow2"))
        check_ok("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
        qemu_io("-c", "write -P 5 512k 1M", "-c", "write -P 6 300M 128k", str(d / "top.qcow2"))
    v, q = tmp_path / "v", tmp_path / "q"
    mods = _imports(["info", "a.qcow2"], v)
    assert "numpy" not in mods, sorted(mods)
    for args in (["bitmap", "--add", "-g", "16k", "a.qcow2", "b2"], ["bitmap", "--merge", "b0", "a.qcow2", "b2"],
                 ["bitmap", "--disable", "a.qcow2", "b1"], ["bitmap", "--clear", "a.qcow2", "b0"],
                 ["bitmap", "--remove", "a.qcow2", "b1"], ["commit", "top.qcow2"]):
        mods = _imports(args, v)
        assert not (HEAVY - {"typing"}) & mods, (args, sorted(HEAVY & mods))  # (block/commit.py imports typing)
        check_ok(*args, cwd=q)
        for name in ("a.qcow2", "top.qcow2"):
            assert (v / name).read_bytes() == (q / name).read_bytes(), (args, name)
    check_ok("check", str(v / "a.qcow2"))
