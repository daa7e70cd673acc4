"""Image locking interoperates with QEMU in both directions.

QEMU holds OFD byte locks on an image while it uses it; vdkit takes the same
bytes.  So a running VM (or qemu-io) makes ``vdkit-img info`` fail exactly as
``qemu-img info`` does (unless ``-U``), and an image vdkit holds open makes
qemu-img and qemu-io fail.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import held_by_qemu_io, require_tool
from tests.data import generate as g
from tests.data.compare import run_qemu, run_vdkit, same
from vdkit.block.node import open_image
from vdkit.errors import LockError


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
