"""Block and character devices as ``convert``/``create`` targets, against qemu-img.

qemu-img writes a block device in place: it is never truncated, it must be large enough already
(``Cannot grow device files``), it is not zero-initialised (zero ranges are written, as discards
where the device takes them, unless ``--target-is-zero``), and ``/dev/null`` / ``/dev/full`` cannot
grow at all.  Each case runs qemu-img on one loop device and vdkit-img on another, both over
sparse files of the same size filled with the same stale bytes; the exit codes, outputs (device
names blanked), the device contents and the backing files' data extents (what was discarded) must
match.  Loop devices need root, as ``make test`` runs; without them the test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Result, check_ok, data_extents, qemu_img, qemu_io, vdkit_img

STALE = b"\xaa"


class Loop:
    """A loop device over a sparse file filled with stale bytes."""

    def __init__(self, backing: Path, size: int) -> None:
        backing.write_bytes(STALE * size)
        self.backing = backing
        r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
        assert r.returncode == 0, f"losetup failed (tests need root): {r.stderr}"
        self.dev = r.stdout.strip()

    def sync(self) -> None:
        fd = os.open(self.dev, os.O_RDONLY)
        try:
            os.fsync(fd)  # the device's page cache reaches the backing file
        finally:
            os.close(fd)

    def detach(self) -> None:
        subprocess.run(["losetup", "-d", self.dev], check=False)


@pytest.fixture
def loops(workdir: Path) -> Iterator[Callable[[str, int], Loop]]:
    made: list[Loop] = []

    def make(name: str, size: int) -> Loop:
        loop = Loop(workdir / name, size)
        made.append(loop)
        return loop

    try:
        yield make
    finally:
        for loop in made:
            loop.detach()


def _sources(d: Path) -> None:
    """src.raw: data, holes, and written zeros (data to block status, zeros to -S); src.qcow2 likewise."""
    check_ok("create", "-q", "-f", "raw", "src.raw", "4M", cwd=d)
    cmds = ["write -P 1 0 1M", "write -P 2 2M 64k", "write -P 0 3M 128k", "write -P 3 3200k 4k"]
    assert qemu_io("-f", "raw", *[a for c in cmds for a in ("-c", c)], str(d / "src.raw")).returncode == 0
    check_ok("create", "-q", "-f", "qcow2", "src.qcow2", "4M", cwd=d)
    cmds = ["write -P 4 64k 192k", "write -z 1M 512k", "write -P 0 2M 64k", "write -P 5 3M 4k"]
    assert qemu_io(*[a for c in cmds for a in ("-c", c)], str(d / "src.qcow2")).returncode == 0


def _norm(r: Result, dev: str, vdkit: bool) -> tuple[int, str, str]:
    err = r.normalized_stderr() if vdkit else r.stderr
    return r.returncode, r.stdout.replace(dev, "DEV"), err.replace(dev, "DEV")


def _both(loops: Callable[[str, int], Loop], workdir: Path, args: list[str], size: int = 8 << 20,
          prepare: list[str] | None = None, contents: bool = True) -> tuple[int, str, str]:
    """Run ``args`` (``DEV`` = the device) with both tools on twin devices; everything must match.

    ``contents=False``: a failed creation's leftovers are not compared (qemu-img's half-written
    metadata is not reproduced), only the messages, and that the device is still there.
    """
    q, v = loops("q.dev", size), loops("v.dev", size)
    out = {}
    for who, loop in (("qemu", q), ("vdkit", v)):
        if prepare:
            check_ok(*[loop.dev if a == "DEV" else a for a in prepare], cwd=workdir)
        argv = [loop.dev if a == "DEV" else a for a in args]
        r = (qemu_img if who == "qemu" else vdkit_img)(*argv, cwd=workdir)
        out[who] = _norm(r, loop.dev, who == "vdkit")
        loop.sync()
    assert out["vdkit"] == out["qemu"], args
    assert stat.S_ISBLK(os.stat(v.dev).st_mode), "the device node must survive a failed creation"
    if not contents:
        return out["qemu"]
    assert v.backing.read_bytes() == q.backing.read_bytes(), f"device contents differ for {args}"
    assert data_extents(v.backing) == data_extents(q.backing), f"discarded ranges differ for {args}"
    return out["qemu"]


@pytest.mark.parametrize("args", [
    ["-O", "raw", "src.raw"],
    ["-O", "raw", "-S", "0", "src.raw"],
    ["-O", "raw", "-S", "4k", "src.raw"],
    ["-O", "raw", "-S", "64k", "src.qcow2"],
    ["-O", "raw", "src.qcow2"],
    ["-n", "-O", "raw", "src.raw"],
    ["-n", "-O", "raw", "src.qcow2"],
    ["-n", "--target-is-zero", "-O", "raw", "src.raw"],
    ["-n", "--target-is-zero", "-O", "raw", "-S", "0", "src.qcow2"],
    ["-O", "qcow2", "src.raw"],
    ["-O", "qcow2", "src.qcow2"],
    ["-O", "qcow2", "-c", "src.qcow2"],
    ["-O", "qcow2", "-o", "cluster_size=4k", "src.raw"],
])
def test_convert_to_device(loops: Callable[[str, int], Loop], workdir: Path, args: list[str]) -> None:
    _sources(workdir)
    rc, _, _ = _both(loops, workdir, ["convert", *args, "DEV"])
    assert rc == 0


def test_convert_into_qcow2_on_device(loops: Callable[[str, int], Loop], workdir: Path) -> None:
    """-n into a qcow2 image that create put on the device."""
    _sources(workdir)
    rc, _, _ = _both(loops, workdir, ["convert", "-n", "-O", "qcow2", "src.qcow2", "DEV"],
                     prepare=["create", "-q", "-f", "qcow2", "DEV", "4M"])
    assert rc == 0


@pytest.mark.parametrize("args", [
    ["create", "-f", "raw", "DEV", "4M"],
    ["create", "-f", "raw", "DEV", "8M"],
    ["create", "-f", "raw", "DEV", "100M"],  # too small: Cannot grow device files
    ["create", "-f", "raw", "-o", "preallocation=falloc", "DEV", "4M"],
    ["create", "-f", "raw", "-o", "preallocation=full", "DEV", "4M"],
    ["create", "-f", "raw", "-o", "preallocation=metadata", "DEV", "4M"],
    ["create", "-f", "raw", "-o", "preallocation=bogus", "DEV", "4M"],
    ["create", "-f", "qcow2", "DEV", "4M"],
    ["create", "-f", "qcow2", "DEV", "100M"],  # the image only needs its metadata to fit
    ["create", "-f", "qcow2", "-o", "cluster_size=4k,extended_l2=off", "DEV", "1G"],
])
def test_create_on_device(loops: Callable[[str, int], Loop], workdir: Path, args: list[str]) -> None:
    _both(loops, workdir, args)


@pytest.mark.parametrize("args", [
    ["convert", "-O", "raw", "src.raw", "DEV"],
    ["convert", "-n", "-O", "raw", "src.raw", "DEV"],
    ["convert", "-O", "raw", "-S", "0", "src.qcow2", "DEV"],
])
def test_device_too_small(loops: Callable[[str, int], Loop], workdir: Path, args: list[str]) -> None:
    _sources(workdir)
    rc, _, err = _both(loops, workdir, args, size=1 << 20)
    assert rc == 1 and err


@pytest.mark.parametrize("args", [
    ["resize", "-f", "raw", "DEV", "8M"],
    ["resize", "-f", "raw", "DEV", "16M"],
    ["resize", "-f", "raw", "--shrink", "DEV", "4M"],
    ["resize", "-f", "raw", "DEV", "4M"],
    ["resize", "-f", "raw", "--preallocation=falloc", "DEV", "16M"],
    ["resize", "-f", "raw", "--preallocation=metadata", "DEV", "16M"],
])
def test_resize_device(loops: Callable[[str, int], Loop], workdir: Path, args: list[str]) -> None:
    """A raw device keeps its size: resizing it to anything else fails."""
    _both(loops, workdir, args)


@pytest.mark.parametrize(("args", "size"), [
    (["create", "-f", "qcow2", "DEV", "4M"], 32 << 10),  # no room for the header cluster
    (["create", "-f", "qcow2", "DEV", "4M"], 128 << 10),  # nor for the refcount table
    (["create", "-f", "qcow2", "-o", "preallocation=metadata", "DEV", "4M"], 2 << 20),
    (["create", "-f", "qcow2", "-o", "preallocation=falloc", "DEV", "4M"], 8 << 20),
    (["create", "-f", "qcow2", "-o", "preallocation=full", "DEV", "4M"], 8 << 20),
    (["convert", "-O", "qcow2", "-o", "preallocation=full", "src.raw", "DEV"], 8 << 20),
    (["convert", "-O", "qcow2", "src.raw", "DEV"], 128 << 10),
])
def test_qcow2_on_device_fails(loops: Callable[[str, int], Loop], workdir: Path, args: list[str],
                               size: int) -> None:
    _sources(workdir)
    rc, _, err = _both(loops, workdir, args, size=size, contents=False)
    assert rc == 1 and err


@contextlib.contextmanager
def _only_user_of(dev: str) -> Iterator[None]:
    """Hold a lock file shared by every test worker while ``dev`` is used: both tools take QEMU's image
    locks on the device itself, so a run of this test in another xdist worker on the same device at the
    same moment makes one of them fail with a lock conflict the other did not see."""
    path = Path(tempfile.gettempdir()) / f"vdkit-tests{dev.replace('/', '-')}.lock"
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.mark.parametrize("dev", ["/dev/null", "/dev/full"])
@pytest.mark.parametrize("args", [
    ["convert", "-O", "raw", "src.raw"],
    ["convert", "-f", "raw", "-O", "raw", "-n", "src.raw"],
    ["create", "-f", "raw", "@", "1M"],
    ["create", "-f", "raw", "@", "0"],
    ["convert", "-O", "qcow2", "src.raw"],
    ["create", "-f", "qcow2", "@", "1M"],
    ["create", "-f", "qcow2", "-o", "preallocation=metadata", "@", "1M"],
    ["create", "-f", "qcow2", "-o", "preallocation=full", "@", "1M"],
    ["resize", "-f", "raw", "@", "1M"],
])
def test_character_devices(workdir: Path, dev: str, args: list[str]) -> None:
    """Nothing can be created on /dev/null or /dev/full, and a failed creation never removes them."""
    _sources(workdir)
    argv = [dev if a == "@" else a for a in args] + ([] if "@" in args else [dev])
    with _only_user_of(dev):
        q = qemu_img(*argv, cwd=workdir)
        v = vdkit_img(*argv, cwd=workdir)
    if not stat.S_ISCHR(os.stat(dev).st_mode):  # put the machine right before failing
        minor = {"/dev/null": 3, "/dev/full": 7}[dev]
        os.mknod(dev + ".vdkit-restore", 0o666 | stat.S_IFCHR, os.makedev(1, minor))
        os.chmod(dev + ".vdkit-restore", 0o666)
        os.replace(dev + ".vdkit-restore", dev)
        pytest.fail(f"{dev} was replaced by a regular file")
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
