"""Hostile metadata past the open-time checks: every library path fails cleanly, as QEMU does.

``test_bad_images`` covers what ``info`` sees at open time.  These tests go further: metadata that
passes the open checks but points where no file can go (offsets of 2^63 and more), and names that
are not UTF-8, reached through check, map, reads, writes and snapshot operations.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

import vdkit
from tests.conftest import check_ok, qemu_img, qemu_io, vdkit_img
from tests.helpers.patching import get_u64, set_u64
from vdkit.errors import VdkitError


def _template(tmp: Path) -> Path:
    img = tmp / "t.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M")
    assert qemu_io("-c", "write -P 1 0 64k", "-c", "write -c -P 2 1M 64k", str(img)).returncode == 0
    check_ok("snapshot", "-c", "s1", str(img))
    assert qemu_io("-c", "write -P 3 2M 8k", str(img)).returncode == 0
    check_ok("snapshot", "-c", "s2", str(img))
    return img


def _library_ops(path: Path) -> None:
    """Everything a library user may do to an image; only vdkit or OS errors may come out."""
    ops = ("info", "read", "map", "check", "write", "snapshot", "delete")
    for op in ops:
        writable = op in ("write", "snapshot", "delete")
        try:
            with vdkit.open(path, backing=False, readonly=not writable) as node:
                if op == "info":
                    vdkit.image_info(node)
                    node.snapshots()
                elif op == "read":
                    node.read(0, 4 << 20)
                elif op == "map":
                    list(node.map())
                elif op == "check" and node.format == "qcow2":
                    from vdkit.formats.qcow2.check import check

                    check(node.driver, None, lambda *_a, **_k: None)
                elif op == "write":
                    node.write(12288, b"x" * 70000)
                    node.write_zeroes(1 << 20, 65536)
                    node.discard(2 << 20, 8192)
                    node.flush()
                elif op == "snapshot":
                    node.snapshot_create("new", date_sec=1, date_nsec=0)
                elif op == "delete":
                    node.snapshot_delete(name="s1")
        except (VdkitError, OSError):
            pass


@pytest.mark.parametrize("seed", range(4))
def test_random_metadata_damage_never_escapes(seed: int, tmp_path: Path) -> None:
    """Seeded byte damage over the metadata (header, tables, snapshot table) and the whole file."""
    src = _template(tmp_path).read_bytes()
    rng = random.Random(seed)
    path = tmp_path / "f.qcow2"
    for _ in range(60):
        data = bytearray(src)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(0, min(len(data), 8 * 4096)) if rng.random() < 0.7 else rng.randrange(len(data))
            if rng.random() < 0.5:
                data[pos] = rng.randrange(256)
            else:
                for k in range(8):
                    if pos + k < len(data):
                        data[pos + k] = rng.choice([0, 0xFF, rng.randrange(256)])
        path.write_bytes(data)
        _library_ops(path)


def _huge_refblock(tmp: Path) -> Path:
    """A refcount table whose first entry points past 2^63: open is fine, refcount reads get EIO."""
    img = tmp / "h.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "1M")
    assert qemu_io("-c", "write -P 1 0 64k", str(img)).returncode == 0
    check_ok("snapshot", "-c", "s1", str(img))
    set_u64(img, get_u64(img, 48), 0xD200000000010000)  # the refcount table's first entry
    return img


@pytest.mark.parametrize("args", [["check"], ["check", "--output=json"], ["map", "--output=json"], ["info"],
                                  ["snapshot", "-c", "new"], ["snapshot", "-a", "s1"], ["snapshot", "-l"]])
def test_refblock_beyond_limit_matches_qemu(args: list[str], tmp_path: Path) -> None:
    src = _huge_refblock(tmp_path)
    for who in ("q", "v"):
        (tmp_path / who).mkdir()
        shutil.copy(src, tmp_path / who / "img.qcow2")
    q = qemu_img(*args, "img.qcow2", cwd=tmp_path / "q")
    v = vdkit_img(*args, "img.qcow2", cwd=tmp_path / "v")
    assert "internal error" not in v.stderr
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    assert (tmp_path / "v" / "img.qcow2").read_bytes() == (tmp_path / "q" / "img.qcow2").read_bytes()


def test_non_utf8_snapshot_names_survive_rewrites(tmp_path: Path) -> None:
    """Names are bytes to QEMU: a snapshot table rewritten by vdkit keeps undecodable names as they were."""
    base = tmp_path / "base.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(base), "1M")
    odd = b"\xff\xfename".decode("utf-8", "surrogateescape")
    check_ok("snapshot", "-c", odd, str(base))
    q, v = tmp_path / "q.qcow2", tmp_path / "v.qcow2"
    shutil.copy(base, q)
    shutil.copy(base, v)
    check_ok("snapshot", "-c", "next", str(q))
    r = vdkit_img("snapshot", "-c", "next", str(v))
    assert r.returncode == 0, r.stderr
    listing = [qemu_img("snapshot", "-l", str(p)).stdout.splitlines() for p in (q, v)]
    strip_dates = [[line[:36] for line in lines] for lines in listing]
    assert strip_dates[0] == strip_dates[1]
    assert b"\xff\xfename" in v.read_bytes()
    r = vdkit_img("snapshot", "-d", odd, str(v))
    assert r.returncode == 0, r.stderr
    assert b"\xff\xfename" not in qemu_img("snapshot", "-l", str(v)).stdout.encode("utf-8", "surrogateescape")
    assert qemu_img("check", str(v)).returncode == 0
