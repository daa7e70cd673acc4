"""Bad input and bad conditions: the daemon answers with an error and keeps serving."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from tests.conftest import check_ok
from tests.daemon.conftest import Daemons, Monitor


def _alive(m: Monitor) -> None:
    assert m.cmd("query-status", id="alive")["id"] == "alive"


def test_bad_input_keeps_serving(daemons: Daemons, tmp_path: Path) -> None:
    _, path, _ = daemons.vdkit([], tmp_path)
    m = daemons.monitor(path).negotiate()
    # oversized: a 2 MiB string (the limit is 1 MiB per message)
    m.send_raw(b'{"execute": "query-status", "id": "' + b"x" * (2 << 20) + b'"}')
    first = json.loads(m.read_line())
    assert first["error"]["desc"] == "JSON token size limit exceeded"
    # the rest of the oversized message is garbage to the lexer; drain whatever it answers
    m.send_raw(b'{"execute":"query-version","id":"sync"}')
    while '"sync"' not in (line := m.read_line()):
        assert json.loads(line)["error"]["class"] == "GenericError"
    m.send_raw(b"[" * 300 + b"]" * 300)
    assert json.loads(m.read_line())["error"]["desc"] == "JSON nesting depth limit exceeded"
    m.send_raw(b'{"execute":"query-version","id":"sync2"}')
    while '"sync2"' not in (line := m.read_line()):
        pass
    for data in [b'\xff\xfe{"execute":"query-status"}', b'{"execute":"query-status", "id": "\xc3\x28"}',
                 b'{"execute":"no-such-command"}', b'{"execute":"query-block","arguments":{"flat":1}}',
                 b'{"execute":"query-named-block-nodes","arguments":{"flat":"yes"}}', b"\x00\x01\x02 nul"]:
        m.send_raw(data + b'{"execute":"query-status","id":"alive"}')
        while '"alive"' not in (line := m.read_line()):
            reply = json.loads(line)
            assert "return" in reply or reply["error"]["class"] in ("GenericError", "CommandNotFound")


def test_client_disconnects_mid_command(daemons: Daemons, tmp_path: Path) -> None:
    for i in range(2):
        check_ok("create", "-q", "-f", "qcow2", str(tmp_path / f"d{i}.qcow2"), "16M")
    proc, path, _ = daemons.vdkit(["-drive", "file=d0.qcow2,if=none,id=d0", "-drive", "file=d1.qcow2,if=none,id=d1"],
                                  tmp_path)
    for n in range(5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"human-monitor-command",'
                  b'"arguments":{"command-line":"savevm gone%d"}}' % n)
        s.close()  # without reading anything
        t = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        t.connect(path)
        t.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-bl')  # half a request
        t.close()
    m = daemons.monitor(path).negotiate()
    _alive(m)
    snaps = m.cmd("query-snapshots")["return"]
    # each savevm either happened completely or not at all
    names = {s["name"] for s in snaps}
    info = m.cmd("query-block")["return"]
    for b in info:
        disk_names = {s["name"] for s in b["inserted"]["image"].get("snapshots", [])}
        assert {n for n in disk_names if n.startswith("gone")} == {n for n in names if n.startswith("gone")}
    m.cmd("quit")
    assert proc.wait(timeout=20) == 0  # quit answers before the images close (as QEMU): wait for the locks
    for i in range(2):
        check_ok("check", str(tmp_path / f"d{i}.qcow2"))


def test_drive_file_disappears(daemons: Daemons, tmp_path: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "gone.qcow2"), "16M")
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "cut.qcow2"), "16M")
    _, path, _ = daemons.vdkit(["-drive", "file=gone.qcow2,if=none,id=g", "-drive", "file=cut.qcow2,if=none,id=c"],
                               tmp_path)
    m = daemons.monitor(path).negotiate()
    os.unlink(tmp_path / "gone.qcow2")
    os.truncate(tmp_path / "cut.qcow2", 0)
    for name, args in [("query-block", None), ("query-named-block-nodes", None), ("query-blockstats", None),
                       ("blockdev-snapshot-internal-sync", {"device": "g", "name": "s"}),
                       ("blockdev-snapshot-internal-sync", {"device": "c", "name": "s"}),
                       ("query-snapshots", None),
                       ("human-monitor-command", {"command-line": "info block -v"}),
                       ("human-monitor-command", {"command-line": "savevm x"}),
                       ("human-monitor-command", {"command-line": "info snapshots"})]:
        r = m.cmd(name, args)
        assert "return" in r or not r["error"]["desc"].startswith("internal error"), (name, r)
    _alive(m)
    assert m.cmd("eject", {"device": "c"}) == {"return": {}}
    _alive(m)


def test_queries_never_write(daemons: Daemons, tmp_path: Path) -> None:
    import hashlib

    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "16M")
    check_ok("snapshot", "-c", "s", str(tmp_path / "base.qcow2"))
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(tmp_path / "top.qcow2"))
    files = [tmp_path / "base.qcow2", tmp_path / "top.qcow2"]
    before = [(hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files]
    proc, path, _ = daemons.vdkit(["-drive", "file=top.qcow2,if=none,id=t"], tmp_path)
    m = daemons.monitor(path).negotiate()
    for name, args in [("query-block", None), ("query-named-block-nodes", None), ("query-blockstats", None),
                       ("query-snapshots", None), ("human-monitor-command", {"command-line": "info block -v"}),
                       ("human-monitor-command", {"command-line": "info snapshots"}),
                       ("human-monitor-command", {"command-line": "loadvm nonexist"}),
                       ("blockdev-snapshot-internal-sync", {"device": "t", "name": ""}),
                       ("block_set_io_throttle", {"device": "t", "bps": 1, "bps_rd": 0, "bps_wr": 0, "iops": 0,
                                                  "iops_rd": 0, "iops_wr": 0})]:
        m.cmd(name, args)
    m.cmd("quit")
    assert proc.wait(timeout=20) == 0
    after = [(hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files]
    assert after == before


def test_hmp_socket_garbage(daemons: Daemons, tmp_path: Path) -> None:
    _, path, hpath = daemons.vdkit([], tmp_path, hmp=True)
    assert hpath is not None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(hpath)
    s.sendall(b"\xff\xfe\x00garbage\r\n" + b"a" * 100_000 + b"\n\r\rinfo status\n")
    buf = b""
    while b"VM status: paused (prelaunch)\r\n(qemu) " not in buf:
        data = s.recv(65536)
        assert data, buf[-500:]
        buf += data
    s.close()
    m = daemons.monitor(path).negotiate()
    _alive(m)


def test_hmp_cpu_index_and_integer_range(daemons: Daemons, tmp_path: Path) -> None:
    """human-monitor-command's cpu-index names the one CPU (a C int: 2**40 is CPU 0 again); integers
    beyond int64 are of the wrong type.  Compared with QEMU byte for byte."""
    from tests.daemon.conftest import normalise

    q, v = daemons.pair([], lambda d: None)
    for index in [0, 1, 5, -1, 2 ** 32 - 1, 2 ** 32 + 1, 2 ** 40, 2 ** 63, 2 ** 70, -(2 ** 63) - 1, "x", None, 0.0,
                  True]:
        for line in ("info status", "nonexist"):
            data = json.dumps({"execute": "human-monitor-command",
                               "arguments": {"command-line": line, "cpu-index": index}}).encode()
            q.send_raw(data)
            v.send_raw(data)
            assert normalise(v.response_line()) == normalise(q.response_line()), (line, index)
