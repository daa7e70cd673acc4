"""Image locking interoperates with QEMU in both directions.

QEMU holds OFD byte locks on an image while it uses it; vdkit takes the same
bytes.  So a running VM (or qemu-io) makes ``vdkit-img info`` fail exactly as
``qemu-img info`` does (unless ``-U``), and an image vdkit holds open makes
qemu-img and qemu-io fail.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import held_by_qemu_io, require_tool
from tests.data import generate as g
from tests.data.compare import run_qemu, run_vdkit, same
from vdkit.block.node import open_image
from vdkit.errors import LockError
from vdkit.io.file import flock_bytes, flock_type


@pytest.fixture(scope="module")
def vm_holding(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A paused VM with the image attached read-write."""
    require_tool("qemu-system-x86_64")
    d = tmp_path_factory.mktemp("locked")
    img = g.create(d, "lk.qcow2", "1M")
    g.snapshot(img, "-c", "s1")
    g.bitmap_add(img, "bm")  # the running VM marks it in-use in the image: -U info shows that flag
    with g.Vm(img):
        yield img


def test_vm_lock_info_fails_like_qemu_img(vm_holding: Path) -> None:
    d, name = vm_holding.parent, vm_holding.name
    for args in (["info", name], ["info", "--output=json", name], ["info", "--backing-chain", name],
                 ["snapshot", "-l", name]):
        q = same(args, d)
        assert q.returncode == 1
        assert q.stderr == (f"qemu-img: Could not open '{name}': Failed to get shared \"write\" lock\n"
                            f"Is another process using the image [{name}]?\n")


def test_vm_lock_force_share(vm_holding: Path) -> None:
    d, name = vm_holding.parent, vm_holding.name
    for args in (["info", "-U", name], ["info", "--force-share", "--output=json", name],
                 ["snapshot", "-l", "-U", name]):
        assert same(args, d).returncode == 0
    assert "in-use" in same(["info", "-U", "--output=json", name], d).stdout
    # The lock is on the file, not the name: an absolute path is refused the same way.
    same(["info", str(vm_holding)], "/")


def test_vm_lock_library(vm_holding: Path) -> None:
    with pytest.raises(LockError):
        open_image(vm_holding, readonly=True)
    with open_image(vm_holding, readonly=True, force_share=True) as node:
        assert [s.name for s in node.snapshots()] == ["s1"]


def test_qemu_io_lock(tmp_path: Path) -> None:
    img = g.create(tmp_path, "io.qcow2", "1M")
    with held_by_qemu_io(img, "qcow2"):
        same(["info", "io.qcow2"], tmp_path)
        same(["info", "-U", "io.qcow2"], tmp_path)
        same(["snapshot", "-l", "io.qcow2"], tmp_path)
    # Released when the holder exits.
    assert same(["info", "io.qcow2"], tmp_path).returncode == 0


def test_vdkit_rw_open_blocks_qemu(tmp_path: Path) -> None:
    img = g.create(tmp_path, "mine.qcow2", "1M")
    with open_image(img, readonly=False):
        q = run_qemu(["info", "mine.qcow2"], tmp_path)
        assert q.returncode == 1
        assert q.stderr == ("qemu-img: Could not open 'mine.qcow2': Failed to get shared \"write\" lock\n"
                            "Is another process using the image [mine.qcow2]?\n")
        assert run_qemu(["info", "-U", "mine.qcow2"], tmp_path).returncode == 0
        io = subprocess.run([require_tool("qemu-io"), "-f", "qcow2", "-c", "write 0 512", "mine.qcow2"],
                            cwd=tmp_path, capture_output=True, text=True)
        assert io.returncode == 1
        assert 'Failed to get "write" lock' in io.stderr
        assert "Is another process using the image [mine.qcow2]?" in io.stderr
        # Another vdkit process is refused with qemu-img's words too.
        v = run_vdkit(["info", "mine.qcow2"], tmp_path)
        assert (v.returncode, v.normalized_stderr()) == (1, q.stderr)
    assert run_qemu(["info", "mine.qcow2"], tmp_path).returncode == 0


def test_vdkit_ro_open_blocks_qemu_writer(tmp_path: Path) -> None:
    """A read-only vdkit user refuses to share "write", like qemu-img info does."""
    img = g.create(tmp_path, "ro.qcow2", "1M")
    with open_image(img, readonly=True):
        assert run_qemu(["info", "ro.qcow2"], tmp_path).returncode == 0  # readers share
        io = subprocess.run([require_tool("qemu-io"), "-f", "qcow2", "-c", "write 0 512", "ro.qcow2"],
                            cwd=tmp_path, capture_output=True, text=True)
        assert io.returncode == 1 and 'Failed to get "write" lock' in io.stderr
        w = run_qemu(["snapshot", "-c", "x", "ro.qcow2"], tmp_path)
        assert w.returncode == 1 and 'Failed to get "write" lock' in w.stderr
    with open_image(img, readonly=True, force_share=True):
        io = subprocess.run([require_tool("qemu-io"), "-f", "qcow2", "-c", "write 0 512", "ro.qcow2"],
                            cwd=tmp_path, capture_output=True, text=True)
        assert io.returncode == 0, io.stderr


# A process holding single lock bytes (QEMU's encoding: 100 + perm in use, 200 + perm refused to others;
# perms 0 consistent read, 1 write, 3 resize) on files, until its stdin closes.
_HOLDER = """
import fcntl, os, struct, sys
fds = [os.open(p, os.O_RDONLY) for p in sys.argv[2:]]
for fd in fds:
    fcntl.fcntl(fd, 37, struct.pack("@hhqqi4x", fcntl.F_RDLCK, 0, int(sys.argv[1]), 1, 0))  # F_OFD_SETLK
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def _holding(byte: int, *paths: Path) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(byte), *map(str, paths)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()


_LOCK_COMMANDS = [
    ["info", "IMG"], ["info", "-U", "IMG"], ["info", "--backing-chain", "top.qcow2"], ["check", "IMG"],
    ["check", "-U", "IMG"], ["map", "top.qcow2"], ["map", "-U", "IMG"], ["snapshot", "-l", "IMG"],
    ["compare", "IMG", "top.qcow2"], ["convert", "-O", "raw", "IMG", "out.raw"],
    ["convert", "-U", "-O", "raw", "top.qcow2", "out.raw"], ["snapshot", "-c", "s", "IMG"],
    ["check", "-r", "leaks", "IMG"], ["resize", "IMG", "2M"], ["rebase", "-u", "-b", "", "IMG"],
]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("byte", [200, 201, 203, 101, 103])
def test_lock_bytes_like_qemu_img(tmp_path: Path, fmt: str, byte: int) -> None:
    """Which lock bytes each command takes, observed from the refusals: another process holds one byte
    on the image (an image of ``fmt``, also the raw backing file of top.qcow2) and every command must
    be refused, or not, as qemu-img's.  A raw image passes on what qemu-img shares (others' writes,
    except for convert's sources), formats with metadata refuse others' writes, ``info`` reads no data."""
    dirs = []
    for who in ("q", "v"):
        d = tmp_path / who
        d.mkdir()
        g.create(d, f"img.{fmt}", "1M", fmt)
        g.create(d, "top.qcow2", "1M", backing=f"img.{fmt}", backing_fmt=fmt)
        dirs.append(d)
    q_dir, v_dir = dirs
    with _holding(byte, q_dir / f"img.{fmt}", v_dir / f"img.{fmt}"):
        for cmd in _LOCK_COMMANDS:
            args = [a.replace("IMG", f"img.{fmt}") for a in cmd]
            q, v = run_qemu(args, q_dir), run_vdkit(args, v_dir)
            assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr), args


def test_raw_writer_lets_readers_in(tmp_path: Path) -> None:
    """qemu-io writing a raw image shares everything (its raw node passes on what it shares): qemu-img's
    readers, and writers that take no unshared permission, open it; a qcow2 writer refuses them."""
    for fmt in ("raw", "qcow2"):
        img = g.create(tmp_path, f"w.{fmt}", "1M", fmt)
        with held_by_qemu_io(img, fmt) if fmt == "qcow2" else _held_raw(img):
            for args in (["info", img.name], ["check", img.name], ["map", img.name], ["snapshot", "-l", img.name],
                         ["info", "-U", img.name], ["convert", "-O", "raw", img.name, "o.raw"],
                         ["snapshot", "-c", "s", img.name], ["resize", "-f", fmt, img.name, "2M"]):
                same(args, tmp_path)


@contextmanager
def _held_raw(img: Path) -> Iterator[None]:
    """qemu-io holding a raw image read-write (it refuses nobody, so the refusal of a write-sharing
    reader cannot show it is there: wait for its write byte instead)."""
    import time

    cmd = [require_tool("qemu-io"), "-f", "raw", "-c", "sleep 600000", str(img)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        # its write byte (101: "uses write"; it shares everything, so no 2xx byte) on the image's inode,
        # read without opening the image: a probing qemu-img here could hold a byte just as qemu-io opens
        # it, and qemu-io would fail
        inode = f":{img.stat().st_ino} "
        while not _ofd_locked(inode, 101):
            assert time.monotonic() < deadline and proc.poll() is None, "qemu-io never locked the image"
            time.sleep(0.05)
        yield
    finally:
        proc.kill()
        proc.wait()


def _ofd_locked(inode: str, byte: int) -> bool:
    """Does some process hold an OFD lock on lock byte ``byte`` of the file whose inode is ``inode``?"""
    with open("/proc/locks") as f:  # e.g. "1: OFDLCK ADVISORY  READ -1 fe:00:2343431 100 101" (a range)
        for line in f:
            if "OFDLCK" in line and inode in line:
                start, end = line.split()[-2:]
                if int(start) <= byte <= (int(end) if end != "EOF" else byte):
                    return True
    return False


@settings(max_examples=200, deadline=None)
@given(ltype=st.sampled_from([fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK]), start=st.integers(0, 2**63 - 1),
       length=st.integers(0, 2**63 - 1), pid=st.integers(-(2**31), 2**31 - 1))
def test_flock_bytes_are_the_c_struct(ltype: int, start: int, length: int, pid: int) -> None:
    """The lock requests built by hand (no ``struct`` import at start-up) are the bytes of C's ``struct
    flock`` as ``struct`` lays it out natively, and ``l_type`` reads back from any returned one."""
    import struct

    layout = struct.Struct("@hhqqi4x")
    assert flock_bytes(ltype, start, length) == layout.pack(ltype, os.SEEK_SET, start, length, 0)
    assert flock_type(layout.pack(ltype, os.SEEK_CUR, start, length, pid)) == ltype
