"""Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) against vdkit-daemon's ``-nbd`` export."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

from tests.conftest import qemu_img, qemu_io, require_tool
from tests.helpers.qemu_io import qemu_io_script
from tests.nbd.client import NbdClient
from tests.nbd.conftest import free_port
from vdkit.nbd import wire as w


def run(*cmd: str) -> str:
    p = subprocess.run([require_tool(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (cmd, p.stdout, p.stderr)
    return p.stdout


def make_image(d: Path, name: str = "a.qcow2", size: str = "4M", backing: str | None = None) -> Path:
    args = ["create", "-f", "qcow2"]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    r = qemu_img(*args, name, size, cwd=d)
    assert r.returncode == 0, r.stderr
    return d / name


def qio(target: str, *cmds: str, fmt: str = "qcow2") -> str:
    return qemu_io_script(None, target, cmds, fmt, readonly=bool(cmds) and all(c.startswith("read") for c in cmds))


def map_types(entries: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """qemu-img map JSON -> merged (start, length, NBD base:allocation type)."""
    out: list[tuple[int, int, int]] = []
    for e in entries:
        t = (0 if e["data"] else w.STATE_HOLE) | (w.STATE_ZERO if e["zero"] else 0)
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], t)
        else:
            out.append((e["start"], e["length"], t))
    return out


def nbdinfo_map(uri: str) -> list[tuple[int, int, int]]:
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(run("nbdinfo", "--map", "--json", uri))]


def test_list_info_and_map_match_qemu_img(workdir: Path, serve: Any) -> None:
    base = make_image(workdir, "base.qcow2")
    qio(str(base), "write -P 0x11 0 192k", "write -P 0x22 1M 64k")
    top = make_image(workdir, "top.qcow2", backing="base.qcow2")
    qio(str(top), "write -P 0x33 64k 64k", "write -z 1M 64k", "write -P 0x44 3M 4k")
    raw = workdir / "r.raw"
    raw.write_bytes(b"\x55" * 65536 + bytes(65536 * 3))
    s = serve(["-drive", "file=top.qcow2,if=none,id=drive0",
               "-drive", "file=r.raw,format=raw,if=none,id=raw0,readonly=on"], workdir)
    listing = json.loads(run("nbdinfo", "--list", "--json", s.uri("")))
    assert sorted(e["export-name"] for e in listing["exports"]) == ["drive0", "raw0"]
    info = json.loads(run("nbdinfo", "--json", s.uri()))
    exp = info["exports"][0]
    assert exp["export-size"] == 4 << 20 and exp["is_read_only"] is False and exp["can_zero"] is True
    assert "base:allocation" in exp["contexts"]
    assert json.loads(run("nbdinfo", "--json", s.uri("raw0")))["exports"][0]["is_read_only"] is True
    for name, image, fmt in (("drive0", top, "qcow2"), ("raw0", raw, "raw")):
        direct = json.loads(qemu_img("map", "-U", "-f", fmt, "--output=json", str(image)).stdout)
        assert nbdinfo_map(s.uri(name)) == map_types(direct), name
        over_nbd = json.loads(qemu_img("map", "--output=json", "-f", "raw", s.uri(name)).stdout)
        assert map_types(over_nbd) == map_types(direct)
    r = qemu_img("compare", "-U", "-F", "qcow2", "-f", "raw", s.uri(), str(top))
    assert r.returncode == 0, r.stdout + r.stderr
    info_nbd = qemu_img("info", "--output=json", "-f", "raw", s.uri())
    assert json.loads(info_nbd.stdout)["virtual-size"] == 4 << 20


def test_writes_read_back_and_survive_daemon_stop(workdir: Path, serve: Any) -> None:
    make_image(workdir)
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    uri = s.uri()
    qio(uri, "write -P 0xa5 0 300k", "write -P 0x5a 1M 1M", "write -z 1536k 64k", "discard 3M 64k",
        "write -P 0x77 4000k 96k", "flush", fmt="raw")
    qio(uri, "read -P 0xa5 0 300k", "read -P 0x5a 1M 512k", "read -P 0 1536k 64k", "read -P 0x5a 1600k 448k",
        "read -P 0x77 4000k 96k", fmt="raw")
    # nbdcopy in and out
    payload = os.urandom(2 << 20)
    src = workdir / "in.raw"
    src.write_bytes(payload + bytes(2 << 20))
    run("nbdcopy", str(src), uri)
    out = workdir / "out.raw"
    run("nbdcopy", uri, str(out))
    assert out.read_bytes() == src.read_bytes()
    conv = workdir / "conv.qcow2"
    assert qemu_img("convert", "-f", "raw", "-O", "qcow2", uri, str(conv)).returncode == 0
    s.qmp.cmd("quit")
    s.proc.wait(timeout=30)
    assert qemu_img("check", str(workdir / "a.qcow2")).returncode == 0
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(src), str(workdir / "a.qcow2")).returncode == 0
    assert qemu_img("compare", str(conv), str(workdir / "a.qcow2")).returncode == 0


def test_read_only_export_refuses_writes(workdir: Path, serve: Any) -> None:
    make_image(workdir)
    qio(str(workdir / "a.qcow2"), "write -P 0x42 0 64k")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0,readonly=on"], workdir)
    r = qemu_io("-f", "raw", "-c", "write -P 1 0 4k", s.uri())
    assert r.returncode == 1 and "Permission denied" in r.stderr  # the read-only flag: qemu refuses rw opens
    assert "read 4096/4096" in qio(s.uri(), "read -P 0x42 0 4k", fmt="raw")
    c = NbdClient(s.sock, "drive0")
    assert c.flags & w.TFLAG_READ_ONLY
    assert c.write(0, b"x" * 512) == w.EPERM
    assert c.request(w.CMD_WRITE_ZEROES, 0, 512).error == w.EPERM
    assert c.request(w.CMD_TRIM, 0, 512).error == w.EPERM
    assert c.read(0, 4096) == b"\x42" * 4096
    c.close()


def test_errors_keep_connection_serving(workdir: Path, serve: Any) -> None:
    make_image(workdir, size="1M")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    c = NbdClient(s.sock, "drive0")
    assert c.request(w.CMD_READ, 1 << 20, 1).error == w.EINVAL
    assert c.write((1 << 20) - 1, b"ab") == w.ENOSPC
    assert c.request(w.CMD_READ, 0, w.MAX_PAYLOAD + 1).error == w.EINVAL
    assert c.request(17).error == w.EINVAL
    assert c.request(w.CMD_READ, 0, 4, flags=0x100).error == w.EINVAL
    # FUA write, NO_HOLE zeroes, FAST_ZERO, cache, block status (REQ_ONE)
    assert c.write(0, b"\x01" * 8192, flags=w.CMDFLAG_FUA) == 0
    assert c.request(w.CMD_WRITE_ZEROES, 4096, 4096, flags=w.CMDFLAG_NO_HOLE).error == 0
    assert c.request(w.CMD_WRITE_ZEROES, 65536, 65536, flags=w.CMDFLAG_FAST_ZERO).error == 0
    assert c.request(w.CMD_CACHE, 0, 65536).error == 0
    assert c.read(0, 8192) == b"\x01" * 4096 + bytes(4096)
    bs = c.request(w.CMD_BLOCK_STATUS, 0, 1 << 20)
    assert bs.error == 0 and bs.extents[0] == (65536, 0) and sum(n for n, _ in bs.extents) == 1 << 20
    assert len(c.request(w.CMD_BLOCK_STATUS, 0, 1 << 20, flags=w.CMDFLAG_REQ_ONE).extents) == 1
    # pipelined requests: all answered
    handles = {c.send(w.CMD_READ, i * 4096, 4096) for i in range(32)}
    assert {c.receive()[0] for _ in range(32)} == handles
    # garbage: the connection is dropped, the daemon keeps serving others
    c.sock.sendall(b"\xff" * 64)
    assert c.sock.recv(100) == b""
    c2 = NbdClient(s.sock, "drive0", structured=False)
    assert c2.read(0, 16) == b"\x01" * 16
    assert c2.request(w.CMD_BLOCK_STATUS, 0, 16).error == w.EINVAL  # no meta context without structured replies
    c2.close()


def test_tcp_and_many_clients(workdir: Path, serve: Any) -> None:
    make_image(workdir)
    port = free_port()
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir, nbd=f"tcp:127.0.0.1:{port}")
    uri = f"nbd://127.0.0.1:{port}/drive0"
    assert json.loads(qemu_img("info", "--output=json", "-f", "raw", uri).stdout)["virtual-size"] == 4 << 20
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            c = NbdClient(("127.0.0.1", port), "drive0")
            for j in range(16):
                assert c.write((i * 16 + j) * 16384, bytes([i + 1]) * 16384) == 0
            assert c.request(w.CMD_FLUSH).error == 0
            c.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        qio(uri, f"read -P {i + 1} {i * 16 * 16384} {16 * 16384}", fmt="raw")
    assert s.proc.poll() is None


def test_garbage_from_many_clients(workdir: Path, serve: Any) -> None:
    """Random bytes during the handshake and after GO: connections end, the daemon keeps serving."""
    import random
    import socket

    make_image(workdir, size="1M")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    rng = random.Random(7)
    for i in range(40):
        if i % 2:
            c = NbdClient(s.sock, "drive0")
            sock = c.sock
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(s.sock)
            sock.recv(18)
            if i % 4 == 0:
                sock.sendall(w.CLIENT_FLAGS.pack(3))
        sock.sendall(rng.randbytes(rng.randrange(1, 3000)))
        sock.close()
    c = NbdClient(s.sock, "drive0")
    assert c.write(0, b"ok" * 100) == 0 and c.read(0, 200) == b"ok" * 100
    c.close()
    assert s.qmp.cmd("query-status")["return"]["status"] == "running"
    assert s.proc.poll() is None


def test_sparse_reads_send_holes(workdir: Path, serve: Any) -> None:
    make_image(workdir, size="2M")
    qio(str(workdir / "a.qcow2"), "write -P 0x61 64k 64k", "write -z 192k 64k", "write -P 0x62 1M 4k")
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    c = NbdClient(s.sock, "drive0")
    # a raw look at the chunks of one structured read
    handle = c.send(w.CMD_READ, 0, 2 << 20)
    chunks = []
    while True:
        magic, flags, rtype, h, n = w.STRUCTURED_HEADER.unpack(c.sock.recv(20, 0x100))
        payload = b""
        while len(payload) < n:
            payload += c.sock.recv(n - len(payload))
        assert (magic, h) == (w.STRUCTURED_REPLY_MAGIC, handle)
        offset = w.U64.unpack_from(payload)[0]
        length = w.U32.unpack_from(payload, 8)[0] if rtype == w.REPLY_TYPE_OFFSET_HOLE else n - 8
        chunks.append((rtype, offset, length, payload[8:] if rtype == w.REPLY_TYPE_OFFSET_DATA else None))
        if flags & w.REPLY_FLAG_DONE:
            break
    hole, data = w.REPLY_TYPE_OFFSET_HOLE, w.REPLY_TYPE_OFFSET_DATA
    assert [c[:3] for c in chunks] == [(hole, 0, 65536), (data, 65536, 65536), (hole, 131072, 917504),
                                       (data, 1 << 20, 65536), (hole, (1 << 20) + 65536, (1 << 20) - 65536)]
    assert chunks[1][3] == b"\x61" * 65536 and chunks[3][3] == b"\x62" * 4096 + bytes(61440)
    # with DF: one chunk; without structured replies: plain data
    assert c.request(w.CMD_READ, 0, 2 << 20, flags=w.CMDFLAG_DF).data[65536:131072] == b"\x61" * 65536
    c.close()
    c = NbdClient(s.sock, "drive0", structured=False)
    assert c.read(0, 2 << 20)[1 << 20:(1 << 20) + 4097] == b"\x62" * 4096 + b"\0"
    c.close()


def test_reads_from_host_files_equal_qemu_img(workdir: Path, serve: Any) -> None:
    """Data runs read straight from their host file (raw backing, qcow2 clusters, an external data
    file) and through the format (compressed clusters) give what qemu-img convert reads, with
    nbdcopy's structured reads and with plain replies (qemu-io over a non-structured client)."""
    import random

    rnd = random.Random(3)
    (workdir / "base.raw").write_bytes(rnd.randbytes(3 << 20) + bytes(1 << 20))
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "5M",
                    cwd=workdir).returncode == 0
    qio(str(workdir / "top.qcow2"), "write -P 0x33 64k 192k", "write -c -P 0x44 1M 128k", "write -z 2M 64k",
        "write -P 0x55 4M 1M")
    assert qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={workdir / 'data.bin'}", "ext.qcow2", "3M",
                    cwd=workdir).returncode == 0
    qio(str(workdir / "ext.qcow2"), "write -P 0x66 0 1M", "write -P 0x77 2M 512k")
    for name, img in (("drive0", "top.qcow2"), ("drive1", "ext.qcow2")):
        assert qemu_img("convert", "-O", "raw", img, f"{name}.want", cwd=workdir).returncode == 0
    s = serve(["-drive", "file=top.qcow2,if=none,id=drive0", "-drive", "file=ext.qcow2,if=none,id=drive1"],
              workdir)
    for name in ("drive0", "drive1"):
        want = (workdir / f"{name}.want").read_bytes()
        run("nbdcopy", f"nbd+unix:///{name}?socket={s.sock}", str(workdir / f"{name}.got"))
        assert (workdir / f"{name}.got").read_bytes() == want
        c = NbdClient(s.sock, name, structured=False)
        assert c.read(0, len(want)) == want
        c.close()
        # pipelined reads arriving highest offset first (as qemu-img's parallel ones do), structured
        c = NbdClient(s.sock, name)
        handles = {c.send(w.CMD_READ, off, 65536): off for off in reversed(range(0, len(want), 65536))}
        for _ in handles:
            h, r = c.receive()
            assert r.data == want[handles[h]:handles[h] + 65536]
        c.close()


def test_status_runs_kept_by_a_connection_follow_changes(workdir: Path, serve: Any) -> None:
    """A connection's cached status run never serves stale bytes: after a write that moves a cluster
    (copy-on-write under an internal snapshot) on this connection (also pipelined behind a read) or on
    another one, and after loadvm, reads see the disk as it is."""
    make_image(workdir, size="8M")
    qio(str(workdir / "a.qcow2"), "write -P 0x11 0 8M")
    assert qemu_img("snapshot", "-c", "s0", "a.qcow2", cwd=workdir).returncode == 0  # every cluster shared
    s = serve(["-drive", "file=a.qcow2,if=none,id=drive0"], workdir)
    a, b = NbdClient(s.sock, "drive0"), NbdClient(s.sock, "drive0")
    assert a.read(0, 1 << 20) == b"\x11" * (1 << 20)  # caches a run covering the whole disk
    assert b.write(256 << 10, b"\x22" * 65536) == 0  # another connection moves a cluster
    assert a.read(256 << 10, 65536) == b"\x22" * 65536
    # pipelined on one connection: read, write (moves a cluster), read, in one batch
    h1 = a.send(w.CMD_READ, 1 << 20, 65536)
    h2 = a.send(w.CMD_WRITE, 1 << 20, 65536, b"\x33" * 65536)
    h3 = a.send(w.CMD_READ, 1 << 20, 65536)
    replies = dict(a.receive() for _ in range(3))
    assert replies[h1].data == b"\x11" * 65536 and replies[h2].error == 0 and replies[h3].data == b"\x33" * 65536
    assert a.read(2 << 20, 65536) == b"\x11" * 65536
    hmp = {"command-line": "savevm s1"}
    assert s.qmp.cmd("human-monitor-command", hmp)["return"] == ""
    assert b.write(4 << 20, b"\x44" * 65536) == 0
    assert a.read(4 << 20, 1 << 20) == b"\x44" * 65536 + b"\x11" * ((1 << 20) - 65536)
    assert s.qmp.cmd("human-monitor-command", {"command-line": "loadvm s1"})["return"] == ""
    assert a.read(4 << 20, 1 << 20) == b"\x11" * (1 << 20)
    a.close()
    b.close()
