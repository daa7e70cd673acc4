"""End-to-end through real clients: ``qemu.qmp.QMPClient`` (async), ``qmp-shell``, raw HMP and TCP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.conftest import ROOT, check_ok, require_tool, venv_tool
from tests.daemon.conftest import Daemons


def _image(tmp: Path, name: str = "a.qcow2", size: str = "16M") -> str:
    check_ok("create", "-q", "-f", "qcow2", str(tmp / name), size)
    return name


def test_qemu_qmp_client(daemons: Daemons, tmp_path: Path) -> None:
    _image(tmp_path)
    _, path, _ = daemons.vdkit(["-drive", "file=a.qcow2,if=none,id=d0"], tmp_path)

    async def run() -> None:
        qmp = QMPClient("test")
        await qmp.connect(path)
        try:
            assert qmp.greeting is not None
            assert qmp.greeting.QMP.version["package"].startswith("vdkit")
            status = await qmp.execute("query-status")
            assert status == {"status": "prelaunch", "singlestep": False, "running": False}
            blocks = await qmp.execute("query-block")
            assert isinstance(blocks, list) and blocks[0]["device"] == "d0"
            listener = EventListener()
            with qmp.listen(listener):
                await qmp.execute("cont")
                ev = await asyncio.wait_for(listener.get(), 10)
                assert ev["event"] == "RESUME"
            try:
                await qmp.execute("blockdev-snapshot-internal-sync", {"device": "nonexist", "name": "x"})
            except ExecuteError as exc:
                assert exc.error_class == "GenericError"
                assert exc.error.error.desc == "Cannot find device='nonexist' nor node-name='nonexist'"
            else:
                raise AssertionError("error expected")
            await qmp.execute("blockdev-snapshot-internal-sync", {"device": "d0", "name": "via-qemu-qmp"})
            snaps = await qmp.execute("query-snapshots")
            assert [s["name"] for s in snaps] == ["via-qemu-qmp"]  # type: ignore[index,union-attr]
            # several requests in flight at once, answered by id
            results = await asyncio.gather(*(qmp.execute("query-block") for _ in range(20)))
            assert all(r == results[0] for r in results)
            text = await qmp.execute("human-monitor-command", {"command-line": "info snapshots"})
            assert "via-qemu-qmp" in text  # type: ignore[operator]
        finally:
            await qmp.disconnect()

    asyncio.run(run())


def test_qmp_shell(daemons: Daemons, tmp_path: Path) -> None:
    _image(tmp_path)
    _, path, _ = daemons.vdkit(["-drive", "file=a.qcow2,if=none,id=d0"], tmp_path)
    script = "query-status\nblockdev-snapshot-internal-sync device=d0 name=shell1\nquery-snapshots\n"
    p = subprocess.run([venv_tool("qmp-shell"), path], input=script.encode(), capture_output=True, timeout=60)
    out = p.stdout.decode()
    assert '"status": "prelaunch"' in out
    assert '"name": "shell1"' in out
    ph = subprocess.run([venv_tool("qmp-shell"), "-H", path], input=b"info block\n", capture_output=True, timeout=60)
    assert "d0 (#block" in ph.stdout.decode()


def _hmp_session(path: str, lines: list[str]) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    buf = b""
    try:
        for line in [*lines, None]:
            while not buf.endswith(b"(qemu) "):
                data = s.recv(65536)
                if not data:
                    return buf.decode()
                buf += data
            if line is None:
                break
            s.sendall(line.encode() + b"\r\n")
            buf += b"<<" + line.encode() + b">>"
    finally:
        s.close()
    return buf.decode()


def test_hmp_socket(daemons: Daemons, tmp_path: Path) -> None:
    _image(tmp_path)
    proc, path, hpath = daemons.vdkit(["-drive", "file=a.qcow2,if=none,id=d0"], tmp_path, hmp=True)
    assert hpath is not None
    out = _hmp_session(hpath, ["info status", "snapshot_blkdev_internal d0 h1", "info snapshots", "nosuch",
                               "loadvm", "quit"])
    assert out.startswith("QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
    assert "<<info status>>VM status: paused (prelaunch)\r\n(qemu) " in out
    assert "--        h1 " in out
    assert "<<nosuch>>unknown command: 'nosuch'\r\n(qemu) " in out
    assert 'loadvm: string expected\r\nTry "help loadvm" for more information\r\n' in out
    assert proc.wait(timeout=20) == 0


def test_tcp_and_multiple_qmp_sockets(daemons: Daemons, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc, path, _ = daemons.vdkit([], tmp_path, extra=["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"])
    deadline = time.monotonic() + 20
    while True:
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with c:
        f = c.makefile("rb")
        assert json.loads(f.readline())["QMP"]["capabilities"] == ["oob"]
        c.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":"t"}')
        assert json.loads(f.readline()) == {"return": {}}
        assert json.loads(f.readline())["id"] == "t"
    m = daemons.monitor(path).negotiate()
    assert m.cmd("query-status")["return"]["status"] == "prelaunch"


def test_daemonize_and_pidfile(tmp_path: Path) -> None:
    _image(tmp_path)
    sock = str(tmp_path / "d.sock")
    pidfile = tmp_path / "d.pid"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "vdkit.daemon.main", "-drive", "file=a.qcow2,if=none,id=d0",
                        "-qmp", f"unix:{sock},server=on,wait=off", "--daemonize", "--pidfile", str(pidfile)],
                       cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    try:
        assert os.path.exists(sock)
        # the image is locked while the daemon has it open
        r2 = subprocess.run([require_tool("qemu-img"), "snapshot", "-c", "x", str(tmp_path / "a.qcow2")],
                            capture_output=True)
        assert r2.returncode != 0 and b"lock" in r2.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pidfile.exists() or os.path.exists(sock):
        assert time.monotonic() < deadline, "daemon did not clean up"
        time.sleep(0.05)
    check_ok("snapshot", "-c", "x", str(tmp_path / "a.qcow2"))  # lock released


def test_startup_errors(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, msg in [
        (["-drive", "file=nonexist.qcow2,if=none"],
         "vdkit-daemon: -drive file=nonexist.qcow2,if=none: Could not open 'nonexist.qcow2': "
         "No such file or directory\n"),
        (["-drive", "if=none,bps=1,bps_rd=1"], "vdkit-daemon: -drive if=none,bps=1,bps_rd=1: bps/iops/max total "
         "values and read/write values cannot be used at the same time\n"),
        (["-bogus"], "vdkit-daemon: -bogus: invalid option\n"),
        (["-qmp", "pipe:x"],
         "vdkit-daemon: 'pipe:x' is not a supported monitor address (unix:PATH or tcp:HOST:PORT)\n"),
    ]:
        r = subprocess.run([sys.executable, "-m", "vdkit.daemon.main", *args], cwd=tmp_path, env=env,
                           capture_output=True, timeout=60)
        assert r.returncode == 1
        assert r.stderr.decode() == msg


def _start_both(tmp: Path, args: list[str], *, daemonize: bool = False) -> list[tuple[int, str]]:
    """Run QEMU and vdkit-daemon with ``args`` (expected to fail at start-up): [(exit status, stderr)] each."""
    from tests.daemon.conftest import QEMU_BASE

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = []
    for name, cmd in (("qemu-system-x86_64", [require_tool("qemu-system-x86_64"), *QEMU_BASE]),
                      ("vdkit-daemon", [sys.executable, "-m", "vdkit.daemon.main", "-S"])):
        flag = ["-daemonize"] if daemonize else []
        r = subprocess.run([*cmd, *flag, *args], cwd=tmp, env=env, capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        out.append((r.returncode, r.stderr.decode().replace(f"{name}: ", "")))
    return out


def test_pidfile_like_qemu(daemons: Daemons, tmp_path: Path) -> None:
    """Mode 0600 whatever the umask, the pid and a newline, a lock against a second daemon, QEMU's errors
    (made before drives are opened), removed on exit, also after a start-up failure."""
    _image(tmp_path)
    old = os.umask(0o022)
    try:
        pidfiles = [tmp_path / "q.pid", tmp_path / "v.pid"]
        procs = [daemons.qemu(["-pidfile", str(pidfiles[0])], tmp_path)[0],
                 daemons.vdkit(["-pidfile", str(pidfiles[1])], tmp_path)[0]]
    finally:
        os.umask(old)
    for proc, pidfile in zip(procs, pidfiles, strict=True):
        st = pidfile.stat()
        assert (st.st_mode & 0o777, pidfile.read_text()) == (0o600, f"{proc.pid}\n")
    # a second process with the same pid file: refused by the lock, whoever holds it
    for held in pidfiles:
        (q_rc, q_err), (v_rc, v_err) = _start_both(tmp_path, ["-pidfile", str(held)])
        assert (v_rc, v_err) == (q_rc, q_err) == (1, "cannot create PID file: Cannot lock pid file: "
                                                     "Resource temporarily unavailable\n")
    for proc, pidfile in zip(procs, pidfiles, strict=True):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not pidfile.exists()
    for args in (["-pidfile", "/nonexist/p.pid"], ["-pidfile", str(tmp_path)],
                 ["-pidfile", "/nonexist/p.pid", "-drive", "file=nonexist.qcow2,if=none"],
                 ["-pidfile", str(tmp_path / "x.pid"), "-drive", "file=nonexist.qcow2,if=none"]):
        for daemonize in (False, True):
            q, v = _start_both(tmp_path, args, daemonize=daemonize)
            assert v == q, (args, daemonize)
            assert not (tmp_path / "x.pid").exists()


@pytest.mark.parametrize("target", ["tcp:127.0.0.1:xyz", "tcp::xyz", "tcp:nohost", "tcp:", "tcp:[::1"])
def test_monitor_tcp_address_errors_like_qemu(target: str, tmp_path: Path) -> None:
    """-qmp tcp:...: the chardev grammar (HOST:PORT or :PORT) and getaddrinfo's port errors, as QEMU."""
    q, v = _start_both(tmp_path, ["-qmp", f"{target},server=on,wait=off"])
    assert v == q and q[0] == 1
