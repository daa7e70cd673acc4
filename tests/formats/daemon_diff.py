"""One daemon round trip for a format: vdkit-daemon and qemu-system-x86_64 on the same drive.

``query-block``, ``query-named-block-nodes`` and ``info block -v`` must read the
same; the drive exported (writable) over NBD by each must read as the image
and as each other; the same qemu-io writes over NBD to both must leave files
that ``same_files`` accepts once both processes quit.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path

from tests.conftest import qemu_img
from tests.daemon.conftest import Daemons, normalise
from tests.helpers.qemu_io import qemu_io_script
from tests.nbd.conftest import short_sock

NBD_WRITES = ["write -P 0x31 0 64k", "write -P 0x32 70000 1000", "write -z 3M 128k", "write -P 0x33 2M 1M"]


def _identical(a: str, b: str, *opts: str) -> None:
    r = qemu_img("compare", *opts, a, b)
    assert (r.returncode, r.stdout) == (0, "Images are identical.\n"), r.stdout + r.stderr


def bytes_equal(q: Path, v: Path) -> None:
    assert q.read_bytes() == v.read_bytes()


def _actual_size_checked(text: str, image: Path) -> str:
    """Each daemon's ``actual-size`` values must be allocations (st_blocks, as QEMU stats them) of its own
    files (the image, a backing file);
    then the value is masked.  Two files written alike can still differ by an ext4 extent-tree block
    (fragmentation of the free space at the time), so the two daemons' numbers are not compared."""
    allocated = {f.stat().st_blocks * 512 for f in image.parent.iterdir() if f.is_file()}  # image, backing
    sizes = {int(m) for m in re.findall(r'"actual-size": (\d+)', text)}
    assert sizes and sizes <= allocated, (sizes, allocated)
    return re.sub(r'"actual-size": \d+', '"actual-size": N', text)


def _disk_size_checked(text: str, image: Path) -> str:
    """``info block -v``'s ``disk size:`` lines, checked and masked as :func:`_actual_size_checked` does."""
    from vdkit.info.render_human import size_to_str

    allocated = {size_to_str(f.stat().st_blocks * 512) for f in image.parent.iterdir() if f.is_file()}
    sizes = set(re.findall(r"^disk size: ([^\r\n]*)", text, re.M))
    assert sizes and sizes <= allocated, (sizes, allocated)
    return re.sub(r"^disk size: [^\r\n]*", "disk size: N", text, flags=re.M)


def daemon_drive_roundtrip(tmp_path: Path, image: str, fmt: str, setup: Callable[[Path], None], *,
                           writes: list[str] = NBD_WRITES,
                           same_files: Callable[[Path, Path], None] = bytes_equal) -> None:
    daemons = Daemons(tmp_path)
    try:
        qm, vm = daemons.pair(["-drive", f"file={image},format={fmt},if=none,id=d0"], setup)
        for cmd in ("query-block", "query-named-block-nodes"):
            q = _actual_size_checked(normalise(qm.cmd_line(cmd)), tmp_path / "q" / image).replace(
                str(tmp_path / "q"), "DIR")
            v = _actual_size_checked(normalise(vm.cmd_line(cmd)), tmp_path / "v" / image).replace(
                str(tmp_path / "v"), "DIR")
            assert v == q, f"{cmd} differs:\n" + "\n".join(difflib.unified_diff(
                q.splitlines(), v.splitlines(), "qemu-system-x86_64", "vdkit-daemon", lineterm=""))
        v, q = (_disk_size_checked(normalise(mon.hmp("info block -v")), tmp_path / side / image).replace(
            str(tmp_path / side), "DIR") for mon, side in ((vm, "v"), (qm, "q")))
        assert v == q, "info block -v differs:\n" + "\n".join(difflib.unified_diff(
            q.splitlines(), v.splitlines(), "qemu-system-x86_64", "vdkit-daemon", lineterm=""))
        socks = []
        for mon in (qm, vm):
            sock = short_sock("n.sock")
            assert mon.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
            assert mon.cmd("nbd-server-add", {"device": "d0", "writable": True}) == {"return": {}}
            socks.append(f"nbd+unix:///d0?socket={sock}")
        _identical(socks[0], socks[1], "-f", "raw", "-F", "raw")
        _identical(socks[1], str(tmp_path / "v" / image), "-U", "-f", "raw", "-F", fmt)
        for op in writes:
            for url in socks:
                qemu_io_script(None, url, [op], "raw")
        _identical(socks[0], socks[1], "-f", "raw", "-F", "raw")
        for mon in (qm, vm):
            mon.send_raw(b'{"execute": "quit"}')
        for proc in daemons.procs:
            proc.wait(timeout=60)
        same_files(tmp_path / "q" / image, tmp_path / "v" / image)
    finally:
        daemons.cleanup()
