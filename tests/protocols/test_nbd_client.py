"""The NBD client: vdkit-img reads exports of qemu-nbd and of vdkit-daemon as qemu-img does.

Servers are real (``qemu-nbd``, ``vdkit-daemon -nbd``, and small misbehaving
listeners made here); every command runs through qemu-img and vdkit-img on the
same export and the outputs are compared byte for byte
(``shared/reference/protocols.md`` §1 has QEMU 7.2's transcripts).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, qemu_io, vdkit_img
from tests.daemon.conftest import daemons  # noqa: F401  (fixture)
from tests.helpers.qemu_nbd import QemuNbd
from tests.nbd.conftest import free_port, serve, short_sock  # noqa: F401  (serve: fixture)


def _same(args: list[str], cwd: Path | None = None) -> str:
    return assert_same(args, cwd).stdout


@pytest.fixture
def qnbd(tmp_path: Path) -> Iterator[QemuNbd]:
    servers = QemuNbd(tmp_path)
    yield servers
    servers.stop()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """d.qcow2 (0xab at [0,1M), zero clusters at [4M,5M), 0xcd at 8M) and e.qcow2 (exported raw)."""
    d = tmp_path / "d.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(d), "64M")
    assert qemu_io("-c", "write -P 0xab 0 1M", "-c", "write -z 4M 1M", "-c", "write -P 0xcd 8M 64k",
                   str(d)).returncode == 0
    e = tmp_path / "e.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(e), "16M")
    assert qemu_io("-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 3M 128k", str(e)).returncode == 0
    return tmp_path


def test_info_map_convert_compare_over_unix_and_tcp(qnbd: QemuNbd, images: Path) -> None:
    sock = short_sock("q.sock")
    qnbd.start(images / "d.qcow2", "-k", sock, "-x", "d", "-f", "qcow2")
    port = free_port()
    qnbd.start(images / "e.qcow2", "-p", str(port), "-b", "127.0.0.1", "-x", "r", "-f", "raw")
    unix = f"nbd+unix:///d?socket={sock}"
    tcp = f"nbd://127.0.0.1:{port}/r"  # the qcow2 file's bytes: probed as qcow2 through NBD
    for name in (unix, f"nbd:unix:{sock}:exportname=d", tcp, f"nbd:127.0.0.1:{port}:exportname=r",
                 f"nbd+tcp://127.0.0.1:{port}/r", f"nbd://127.0.0.1:{port}/%72"):
        for args in (["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"], ["check"],
                     ["snapshot", "-l"]):
            _same([*args, name])
    _same(["info", "-f", "raw", tcp])
    _same(["info", "-f", "qcow2", unix])  # not a qcow2: "Image is not in qcow2 format"
    _same(["compare", unix, str(images / "e.qcow2")])
    _same(["compare", "-U", tcp, str(images / "e.qcow2")])
    for name, out in ((unix, "u"), (tcp, "t")):
        assert qemu_img("convert", "-O", "qcow2", name, str(images / f"{out}q.qcow2")).returncode == 0
        v = vdkit_img("convert", "-O", "qcow2", name, str(images / f"{out}v.qcow2"))
        assert v.returncode == 0, v.stderr
        assert (images / f"{out}q.qcow2").read_bytes() == (images / f"{out}v.qcow2").read_bytes()


def test_vdkit_reads_its_own_daemons_export(serve, tmp_path: Path) -> None:  # noqa: F811
    img = tmp_path / "disk.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "8M")
    assert qemu_io("-c", "write -P 0x5a 1M 192k", str(img)).returncode == 0
    served = serve(["-drive", f"file={img},format=qcow2,if=none,id=drive0"], tmp_path)
    uri = served.uri()
    for args in (["info"], ["info", "--output=json"], ["map", "--output=json"], ["map"]):
        _same([*args, uri])
    _same(["compare", uri, "-U", str(img)])


def test_filename_and_connection_errors(qnbd: QemuNbd, images: Path) -> None:
    sock = short_sock("q.sock")
    qnbd.start(images / "d.qcow2", "-k", sock, "-x", "d", "-f", "qcow2")
    dead = free_port()
    for name in ("nbd:", "nbd:127.0.0.1", "nbd:127.0.0.1:10809:r", "nbd://", "nbd:///r", "nbd+unix:///d",
                 f"nbd+unix://localhost/d?socket={sock}", f"nbd+unix:///d?socket={sock}&foo=b",
                 f"nbd://127.0.0.1:{dead}/r?socket=x", "nbd://127.0.0.1:abc/r", "nbd://127.0.0.1:70000/r",
                 "nbd+foo://127.0.0.1/r", "NBD://127.0.0.1/r", f"nbd://127.0.0.1:{dead}/r",
                 f"nbd+unix:///d?socket={images}/nonexist.sock", "nbd:unix:",
                 f"nbd+unix:///nope?socket={sock}", f"nbd+unix://?socket={sock}"):
        _same(["info", name])


def _listener(behaviour: bytes | None) -> tuple[str, threading.Thread]:
    """A unix listener that accepts once, sends ``behaviour`` (None: nothing) and closes."""
    path = short_sock("bad.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)

    def run() -> None:
        for _ in range(2):  # one connection for qemu-img, one for vdkit-img
            conn, _ = srv.accept()
            if behaviour:
                conn.sendall(behaviour)
            conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return path, t


@pytest.mark.parametrize("behaviour", [None, b"HELLOXXXYYYYYYYY", b"NBDMAGIC"])
def test_misbehaving_servers(behaviour: bytes | None) -> None:
    path, t = _listener(behaviour)
    _same(["info", f"nbd+unix:///x?socket={path}"])
    t.join(10)


def test_server_that_never_speaks_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-img 7.2 hangs forever here; vdkit ends with QEMU's timeout text after a bounded wait."""
    from vdkit.errors import OpenError
    from vdkit.protocols import nbd

    path = short_sock("mute.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    try:
        with pytest.raises(OpenError, match="Connection attempt cancelled by timeout"):
            nbd.NbdClient(nbd.parse_name(f"nbd+unix:///x?socket={path}"), readonly=True, timeout=0.5)
    finally:
        srv.close()


def test_server_that_stops_answering_fails_the_request(qnbd: QemuNbd, images: Path) -> None:
    """A server that stops answering mid-transfer (qemu-nbd stopped with SIGSTOP): QEMU 7.2 waits forever;
    vdkit's request fails with EIO once its reply is overdue (IO_TIMEOUT, shortened here), and the
    process is free to report it."""
    from vdkit.protocols import nbd

    sock = short_sock("stall.sock")
    qnbd.start(images / "d.qcow2", "-k", sock, "-x", "d", "-f", "qcow2", "-r")
    client = nbd.NbdClient(nbd.parse_name(f"nbd+unix:///d?socket={sock}"), readonly=True, io_timeout=1.0)
    assert client.read(0, 4096) == b"\xab" * 4096
    os.kill(qnbd.pids[-1], signal.SIGSTOP)
    try:
        with pytest.raises(nbd.NbdError, match="Input/output error"):
            client.read(1 << 20, 4096)
    finally:
        os.kill(qnbd.pids[-1], signal.SIGCONT)
        client.sock.close()


def test_relative_backing_over_nbd(qnbd: QemuNbd, tmp_path: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "4M")
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(tmp_path / "top.qcow2"))
    port = free_port()
    qnbd.start(tmp_path / "top.qcow2", "-p", str(port), "-b", "127.0.0.1", "-x", "t", "-f", "raw", "-r")
    name = f"nbd://127.0.0.1:{port}/t"
    for args in (["info"], ["info", "--output=json"], ["info", "--backing-chain"], ["map"]):
        _same([*args, name])
