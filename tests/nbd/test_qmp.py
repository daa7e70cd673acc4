"""NBD QMP commands compared with QEMU 7.2: answers, errors, BLOCK_EXPORT_DELETED events."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import qemu_img
from tests.daemon.conftest import Daemons, Monitor, normalise
from tests.nbd.client import NbdClient
from tests.nbd.conftest import short_sock

DRIVES = ["-drive", "file=d.qcow2,if=none,id=drive0", "-drive", "file=r.qcow2,if=none,id=drive1,readonly=on",
          "-drive", "if=none,id=empty0"]


def setup(d: Path) -> None:
    for name in ("d.qcow2", "r.qcow2"):
        assert qemu_img("create", "-f", "qcow2", name, "1M", cwd=d).returncode == 0


def unix(path: str) -> dict[str, Any]:
    return {"addr": {"type": "unix", "data": {"path": path}}}


def run(m: Monitor, sock: str, script: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    out = []
    for name, args in script:
        if args is not None:
            args = json.loads(json.dumps(args).replace("@SOCK@", sock))
        m.events.clear()
        line = m.cmd_line(name, args)
        out += [normalise(json.dumps({"event": e["event"], "data": e.get("data")})) for e in m.events]
        out.append(f"{name} -> {normalise(line)}")
    return out


def wait_deleted(m: Monitor, lines: list[str], export_id: str) -> list[str]:
    """Wait for an export's BLOCK_EXPORT_DELETED, which QEMU may emit after the command returns.

    A hard removal with a connected client finishes when the client's coroutine has gone, so the
    event arrives during the command or during a later one; the test waits so both orders read alike.
    """
    marker = json.dumps({"event": "BLOCK_EXPORT_DELETED", "data": {"id": export_id}})
    seen = marker in lines
    lines = [line for line in lines if line != marker]
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        m.events.clear()
        m.cmd("query-status")
        seen = any(e["event"] == "BLOCK_EXPORT_DELETED" and e.get("data") == {"id": export_id} for e in m.events)
        if not seen:
            time.sleep(0.02)
    assert seen, f"no BLOCK_EXPORT_DELETED for {export_id}"
    return [*lines, f"deleted {export_id}"]


def node_name(m: Monitor, filename: str) -> str:
    nodes = m.cmd("query-named-block-nodes", {"flat": True})["return"]
    return next(n["node-name"] for n in nodes if n["file"] == filename and n["drv"] == "qcow2")


SCRIPT: list[tuple[str, dict[str, Any] | None]] = [
    ("query-block-exports", None),
    ("nbd-server-add", {"device": "drive0"}),
    ("nbd-server-add", {"device": "nosuch"}),  # the device is looked up before the server
    ("nbd-server-add", {"device": "empty0"}),
    ("nbd-server-add", {"device": "drive0", "bitmap": "bm"}),
    ("nbd-server-stop", None),
    ("nbd-server-start", {"addr": {"type": "unix", "path": "@SOCK@"}}),
    ("nbd-server-start", {"addr": {"type": "bogus", "data": {}}}),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1"}}}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/nonexistent/dir/x.sock"}}}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "@SOCK@"}}}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "@SOCK@"}}}),
    ("nbd-server-add", {"device": "nosuch"}),
    ("nbd-server-add", {"device": "empty0"}),
    ("nbd-server-add", {"device": "drive1", "writable": True}),
    ("nbd-server-add", {"device": "drive0", "writable": True}),
    ("nbd-server-add", {"device": "drive0"}),
    ("nbd-server-add", {"device": "drive0", "name": "other"}),
    ("nbd-server-add", {"device": "drive0", "name": "x", "bitmap": "bm"}),
    ("nbd-server-add", {"device": "drive0", "name": "y", "bogus": 1}),
    ("query-block-exports", None),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "drive0"}),
    ("block-export-add", {"id": "e1", "node-name": "drive0"}),
    ("block-export-add", {"type": "nbd", "id": "bad id", "node-name": "drive0"}),
    ("block-export-add", {"type": "nbd", "id": "drive0", "node-name": "drive0"}),
    ("nbd-server-remove", {"name": "nosuch"}),
    ("nbd-server-remove", {"name": "other", "mode": "bogus"}),
    ("nbd-server-remove", {"name": "other"}),
    ("block-export-del", {"id": "nosuch"}),
    ("block-export-del", {"id": "drive0", "mode": "hard"}),
    ("query-block-exports", None),
    ("nbd-server-stop", None),
    ("nbd-server-stop", None),
    ("query-block-exports", None),
    # exports named by a drive go with its medium
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "@SOCK@"}}}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "@SOCK@"}}, "tls-creds": "x"}),
    ("nbd-server-add", {"device": "drive0"}),
    ("nbd-server-add", {"device": "drive1", "name": "other"}),
    ("eject", {"device": "drive0"}),
    ("query-block-exports", None),
    ("blockdev-change-medium", {"device": "drive1", "filename": "d.qcow2"}),
    ("query-block-exports", None),
    ("nbd-server-stop", None),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "@SOCK@"}}, "tls-creds": "x"}),
]


def test_nbd_commands_match_qemu(daemons: Daemons) -> None:
    q, v = daemons.pair(DRIVES, setup)
    assert run(v, short_sock("n.sock"), SCRIPT) == run(q, short_sock("n.sock"), SCRIPT)


def test_block_export_add_by_node_name_matches_qemu(daemons: Daemons) -> None:
    q, v = daemons.pair(DRIVES, setup)
    results = []
    for m in (q, v):
        sock = short_sock("n.sock")
        rw, ro = node_name(m, "d.qcow2"), node_name(m, "r.qcow2")
        script: list[tuple[str, dict[str, Any] | None]] = [
            ("block-export-add", {"type": "nbd", "id": "e0", "node-name": rw}),
            ("nbd-server-start", unix(sock)),
            ("block-export-add", {"type": "nbd", "id": "e1", "node-name": rw}),
            ("block-export-add", {"type": "nbd", "id": "e2", "node-name": rw}),
            ("block-export-add", {"type": "nbd", "id": "e2", "node-name": rw, "name": "n2", "writable": True}),
            ("block-export-add", {"type": "nbd", "id": "e3", "node-name": ro, "name": "n3", "writable": True}),
            ("block-export-add", {"type": "nbd", "id": "e4", "node-name": ro, "bitmaps": ["x"]}),
            ("nbd-server-add", {"device": ro, "name": "byname"}),
            ("query-block-exports", None),
        ]
        out = run(m, sock, script)
        # the export is reachable by its name, writable as asked
        info = qemu_img("info", "--output=json", "-f", "raw", f"nbd+unix:///n2?socket={sock}")
        assert json.loads(info.stdout)["virtual-size"] == 1 << 20
        c = NbdClient(sock, "n2")
        out.append(f"flags {c.flags:#x}")
        # a connected client makes a safe removal fail; hard removal drops it
        out += run(m, sock, [("block-export-del", {"id": "e2"})])
        out += wait_deleted(m, run(m, sock, [("block-export-del", {"id": "e2", "mode": "hard"})]), "e2")
        out += run(m, sock, [("nbd-server-stop", None), ("query-block-exports", None)])
        c.sock.close()
        results.append(out)
    q_out, v_out = results  # the transmission flags too
    assert "\n".join(v_out) == "\n".join(q_out)


HMP_LINES = [
    "help nbd_server_start", "help nbd_server_add", "help nbd_server_remove", "help nbd_server_stop",
    "nbd_server_add drive0", "nbd_server_stop", "nbd_server_start", "nbd_server_start bogus",
    "nbd_server_start unix:/nonexistent/x", "nbd_server_start -x unix:@SOCK@", "nbd_server_start -w unix:@SOCK@",
    "nbd_server_start -a -w unix:@SOCK@", "nbd_server_add drive0", "nbd_server_add -w drive1 foo",
    "nbd_server_add nosuch", "nbd_server_remove foo", "nbd_server_remove nope", "nbd_server_remove -f drive0",
    "nbd_server_remove", "nbd_server_stop", "nbd_server_stop",
]


def test_hmp_nbd_commands_match_qemu(daemons: Daemons) -> None:
    q, v = daemons.pair(["-drive", "file=d.qcow2,if=none,id=drive0",
                         "-drive", "file=r.qcow2,if=none,id=drive1,readonly=on"], setup)
    outs = []
    for m in (q, v):
        sock = short_sock("n.sock")
        out = []
        for line in HMP_LINES:
            m.events.clear()
            out.append((line, m.hmp(line.replace("@SOCK@", sock)),
                        [json.dumps(e["data"]) for e in m.events]))
        outs.append(out)
    assert outs[1] == outs[0]


def test_shutdown_announces_the_exports_going(daemons: Daemons) -> None:
    """quit and SIGTERM: SHUTDOWN, then BLOCK_EXPORT_DELETED for each export, oldest first, as QEMU."""
    import os
    import signal

    outs = []
    for how in ("quit", "signal"):
        q, v = daemons.pair(DRIVES, setup)
        for m in (q, v):
            sock = short_sock("n.sock")
            run(m, sock, [("nbd-server-start", unix(sock)), ("nbd-server-add", {"device": "drive0"}),
                          ("block-export-add", {"type": "nbd", "id": "e2", "node-name": node_name(m, "d.qcow2"),
                                                "name": "x"})])
            m.events.clear()
            if how == "quit":
                lines = [m.cmd_line("quit")]
            else:
                proc = daemons.procs[len(daemons.procs) - 2 + (m is v)]
                os.kill(proc.pid, signal.SIGTERM)
                lines = []
            try:
                while True:
                    lines.append(m.read_line())
            except (EOFError, OSError):
                pass
            events = [json.loads(x) for x in lines]
            outs.append([(e.get("event"), e.get("data")) if "event" in e else e for e in m.events + events])
    assert outs[1] == outs[0] and outs[3] == outs[2]
    assert [e[0] for e in outs[2]] == ["SHUTDOWN", "BLOCK_EXPORT_DELETED", "BLOCK_EXPORT_DELETED"]
    # the events come before quit's answer
    assert [e[0] for e in outs[0][:3]] == [e[0] for e in outs[2]] and outs[0][3] == {"return": {}}
