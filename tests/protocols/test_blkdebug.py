"""blkdebug names (``blkdebug:CONFIG:FILE``) on the command line, against qemu-img 7.2.

The same commands through the same rules in both tools: what reads the image as it is (info, map,
check, compare, convert with no rule), reads and writes that a rule fails (convert's "error while
reading/writing at byte N"), a once rule (the failure, then nothing), rules that never match, and the
config file's errors.  The commands that write run in twin folders (``vdkit_cwd``) and their outputs
are compared with ``qemu-img compare``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, qemu_io

CONFIGS = {
    "none": "",
    "read": '[inject-error]\nevent = "read_aio"\nerrno = "5"\n',
    "read-once": '[inject-error]\nevent = "read_aio"\nonce = "on"\n',
    "read-enospc": '[inject-error]\nevent = "read_aio"\nerrno = "28"\n',
    "write": '[inject-error]\nevent = "write_aio"\n',
    "pwritev": '[inject-error]\nevent = "pwritev"\nerrno = "28"\n',
    "flush": '[inject-error]\nevent = "flush_to_disk"\niotype = "flush"\n',
    "never": '[inject-error]\nevent = "vmstate_load"\n',  # (vdkit makes no l2_load: qcow2's own events)
    "bad-event": '[inject-error]\nevent = "nosuch"\n',
    "bad-group": '[nosuch]\nevent = "read_aio"\n',
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """src.qcow2 over base.qcow2 (data in both), the configs, in folder q/ and its twin v/."""
    for sub in ("q", "v"):
        d = tmp_path / sub
        d.mkdir()
        check_ok("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
        check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "src.qcow2", cwd=d)
        for image, cmd in (("base.qcow2", "write -P 0x11 0 1M"), ("src.qcow2", "write -P 0x22 2M 1M")):
            assert qemu_io("-c", cmd, str(d / image)).returncode == 0
        for name, text in CONFIGS.items():
            (d / f"{name}.conf").write_text(text)
    return tmp_path


@pytest.mark.parametrize("conf", ["none", "read", "never", "bad-event", "bad-group"])
def test_reading_commands(tree: Path, conf: str) -> None:
    name = f"blkdebug:{conf}.conf:src.qcow2"
    for args in (["info", "--backing-chain", name], ["map", name], ["map", "--output=json", name],
                 ["check", name], ["compare", name, "src.qcow2"]):
        assert_same(args, tree / "q")


def test_blkdebug_as_the_top_node(tree: Path) -> None:
    """``-f blkdebug``: the node itself is the disk (``file format: blkdebug``, the image's bytes, its
    block status naming the image file).  (A plain name under ``-f blkdebug``, which QEMU names
    ``blkdebug::NAME``, keeps its own name in vdkit.)"""
    for args in (["info", "-f", "blkdebug", "blkdebug::src.qcow2"], ["map", "-f", "blkdebug", "blkdebug::src.qcow2"],
                 ["map", "-f", "blkdebug", "--output=json", "blkdebug:read.conf:src.qcow2"]):
        assert_same(args, tree / "q")


@pytest.mark.parametrize("conf", ["none", "read", "read-once", "read-enospc", "never"])
def test_convert_from(tree: Path, conf: str) -> None:
    q = assert_same(["convert", "-O", "qcow2", f"blkdebug:{conf}.conf:src.qcow2", "out.qcow2"], tree / "q",
                    vdkit_cwd=tree / "v")
    if q.returncode == 0:
        r = qemu_img("compare", str(tree / "q" / "out.qcow2"), str(tree / "v" / "out.qcow2"))
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("conf", ["none", "flush", "write", "pwritev"])
def test_convert_into(tree: Path, conf: str) -> None:
    """convert -n into an existing qcow2 reached through blkdebug (convert's output is cache=unsafe: no
    flush reaches it).  A failed write is reported before the target's close reports its cache flushes
    (as qemu-img does): with every write after the first data write failing, only the refcount block
    cache's (the new L2 table was written before the data and is clean)."""
    for sub in ("q", "v"):
        check_ok("create", "-q", "-f", "qcow2", "dst.qcow2", "4M", cwd=tree / sub)
    q = assert_same(["convert", "-n", "-O", "qcow2", "src.qcow2", f"blkdebug:{conf}.conf:dst.qcow2"], tree / "q",
                    vdkit_cwd=tree / "v")
    for sub in ("q", "v"):  # a failed convert damaged nothing
        r = qemu_img("check", "-q", str(tree / sub / "dst.qcow2"))
        assert r.returncode == 0, r.stdout + r.stderr
    if q.returncode == 0:
        r = qemu_img("compare", str(tree / "q" / "dst.qcow2"), str(tree / "v" / "dst.qcow2"))
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("opts", [
    "driver=qcow2,file.driver=blkdebug,file.config=read.conf,file.image.filename=src.qcow2",
    "driver=qcow2,file.driver=blkdebug,file.image.driver=file,file.image.filename=src.qcow2",
    "driver=blkdebug,config=never.conf,image.filename=src.qcow2",
])
def test_image_opts(tree: Path, opts: str) -> None:
    """``--image-opts`` naming a config file and the image: the node is ``blkdebug:CONFIG:FILE``.  (Rules
    as options, ``file.inject-error.0.event=...``, are refused by vdkit here; QEMU names the node
    ``json:{...}`` of them.)"""
    for args in (["info", "--image-opts", opts], ["map", "--image-opts", opts]):
        assert_same(args, tree / "q")
