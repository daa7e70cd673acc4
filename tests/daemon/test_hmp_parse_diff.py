"""HMP argument parsing, differential against QEMU 7.2.

The same command lines go to ``qemu-system-x86_64 -S`` and ``vdkit-daemon -S``
(same drives, same images) through ``human-monitor-command`` and through the
raw ``-monitor`` socket; the outputs must be equal once node names and the
qdev path are blanked out.  Lines that change state (throttling, media) are
followed by ``info block`` so their effect is compared too.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import Daemons, Monitor, normalise_hmp

DRIVES = ["-drive", "file=a.qcow2,if=none,id=d0", "-drive", "if=ide,media=cdrom,id=cd0",
          "-drive", "file=b.qcow2,if=virtio,id=v0"]


def _setup(d: Path) -> None:
    for args in (["-f", "qcow2", "a.qcow2", "64M"], ["-f", "qcow2", "b.qcow2", "64M"], ["-f", "raw", "r.raw", "1M"]):
        subprocess.run(["qemu-img", "create", "-q", *args], cwd=d, check=True)


T = "block_set_io_throttle d0 "
EXPRESSIONS = [
    "2+3", "(1)", "2+3&1", "2*3+1", "1+2*3", "2|4*2", "6^3", "~0", "~-5", "-1", "--1", "010", "0x1f", "0X1F",
    "-7/2+10", "-7%3+10", "(1+2)*3", "( 1 + 2 ) ", "'a'", "1000000000000000", "1000000000000001",
    "18446744073709551615", "0xffffffffffffffff", "0x7fffffffffffffff+2",
]
EXPRESSION_ERRORS = [
    "1/0", "1%0", "(1", "((1)", "()", "(1))0", "1+", "'ab'", "' ", "'é'", "9999999999999999999999",
    "18446744073709551616", "0x10000000000000000", "0777777777777777777777777", "1k", "1.5", "x", "é", "0x",
    "0xg", ")", "1)", "$foo", "$", "$_x", "$1",
]
THROTTLE = (
    [line for e in EXPRESSIONS for line in (T + e + " 0 0 0 0 0", "info block d0")]
    + [T + e + " 0 0 0 0 0" for e in EXPRESSION_ERRORS]
    + [T + "1 +2 0 0 0 0 0", "info block d0", T + "1 -1 0 0 0 0", T + "08 0 0 0 0 0", T + "08 0 0 0 0",
       "info block d0", T + "1 0 0 0 0 0x", T + "1 0 0 0 0 (0", T + "1 0 0 0 0 -", T.strip(), "block_set_io_throttle",
       T + "1 2 3 4 5", T + "1 0 0 0 0 0 0", 'block_set_io_throttle "d0" 0 0 0 0 0 0',
       'block_set_io_throttle "d0 0 0 0 0 0 0', T + "0 0 0 0 0 0", "info block d0"]
)
FLAGS = [
    "info block -v -n", "info block -nv", "info block -n -n", "info block -v -v", "info block -", "info block - d0",
    "info block -x d0", "info block --", "info block -n-v", "info block -vd0", "info block -nd0",
    "info    block -x", "  info    block -x", "eject -x cd0", "eject -fx cd0", "eject -f", "eject", "eject - cd0",
    "eject cd0 -f", "change cd0 -x r.raw", "nbd_server_start -x", "nbd_server_start -w", "nbd_server_start -w -a x",
    "nbd_server_add -x d0", "nbd_server_add -w", "nbd_server_remove -x", "nbd_server_remove -f",
    # a foreign -X passes a flag slot when "-X" occurs later in the argument notation ("read-only-mode")
    *("change cd0 -" + c + " r.raw" for c in "omredtasF,:?"), "change cd0 -", "eject -e cd0", "eject -d cd0", "eject -",
    "info block -e", "nbd_server_add -e d0", "nbd_server_start -r x", "nbd_server_start -", "nbd_server_remove -",
    "nbd_server_remove -a x",
]
NAMES = [
    "stop x", "s x", "cont x", "c x", "quit x", "q x", "  stop x", "stop\tx", "stop\nx", "stop/x", "info/x block",
    "info block/x", "info block/ d0", "info nonexist", "info    nonexist", "  info nonexist", "info nonexist x",
    "nonexist", "  nonexist  x", "non/exist", "/x", "INFO status", "info status\x1c", "info\x0bstatus",
    "eject \x1cd0", "eject\x0bcd0", "stop\x0c", "info status x", "info version x", "info snapshots x",
    "info blockstats x", "info status -x", "nbd_server_stop x",
]
HELP = [
    "help nonexist", "help info nonexist", "help info  nonexist", "help   info   nonexist", "help nonexist extra",
    "help c extra", "help info status extra", 'help "nonexist"', 'help "info" "nonexist"', 'help "unterminated',
    "help stop|s", "help stop", "help s", "help ?", "? stop", "help info status", "help info block", "help eject",
    "help change", "help savevm", "help loadvm", "help delvm", "help quit", "help q", "help cont", "help help",
    "help snapshot_blkdev_internal", "help snapshot_delete_blkdev_internal", "help block_set_io_throttle",
    "help nbd_server_start", "help nbd_server_add", "help nbd_server_remove", "help nbd_server_stop",
    "help \t stop", 'help "stop', 'help "stop"x', 'help in"fo" status', 'help info "status', "help c\\ x",
]
STRINGS = [
    'eject "cd0', 'eject "cd0"x', 'eject "a\\qb"', 'eject "a\\nb"', 'eject "a\\"b"', "eject \"a\\'b\"",
    'eject "a\\\\b"', 'eject "a\\rb"', 'eject "a\\', "eject " + "x" * 1100, 'eject "' + "y" * 1100 + '"',
    "change cd0", "change cd0 -f", "change", 'change cd0 "r.raw', "change cd0 r.raw raw bogus",
    "change cd0 r.raw raw read-only extra", "change nonexist r.raw raw bogus", "change cd0 nonexist.raw raw bogus",
    "change cd0 r.raw bogusfmt bogus", 'change cd0 r.raw "" bogus', "change vnc foo", "change vnc password xyz",
    "change vnc password xyz bogus", "change vnc foo bar bogus", "change vnc foo bar", "change vnc",
    'change vnc "password" xyz', "change VNC foo", 'change cd0 "r.raw" "raw" "retain"', "info block cd0",
    "eject cd0", "info block cd0",
    'savevm "abc', 'savevm "a\\qb"', 'savevm "abc" x', 'loadvm "abc', "loadvm", "loadvm a b", "delvm", 'delvm "a',
    "delvm a b", "snapshot_blkdev_internal", "snapshot_blkdev_internal d0", 'snapshot_blkdev_internal d0 "a',
    "snapshot_blkdev_internal d0 a b", "snapshot_delete_blkdev_internal", "snapshot_delete_blkdev_internal d0",
    "snapshot_delete_blkdev_internal d0 a b c", 'snapshot_delete_blkdev_internal d0 "a',
    'snapshot_delete_blkdev_internal d0 a "b', "snapshot_delete_blkdev_internal d0 nonexist", "nbd_server_start",
    'nbd_server_start -a -w "x', "nbd_server_add", "nbd_server_add d0 a b", 'nbd_server_add d0 "a',
    "nbd_server_remove", "nbd_server_remove a b", "nbd_server_stop",
    # empty names
    'eject ""', 'change "" r.raw', 'change cd0 ""', 'block_set_io_throttle "" 0 0 0 0 0 0', 'info block ""',
    'info block -n ""', 'info block -v ""', 'snapshot_delete_blkdev_internal d0 x ""', 'snapshot_blkdev_internal "" x',
    'info block \\"d0\\"', 'delvm ""', 'delvm "  "', "nbd_server_start 127.0.0.1:0", 'nbd_server_add d0 ""',
    'nbd_server_add "" x', "nbd_server_add d0", "nbd_server_add d0", "nbd_server_add -w d0 w1", 'nbd_server_remove ""',
    "nbd_server_remove -f d0", "nbd_server_remove w1", "nbd_server_stop",
    # errors with hint lines (printed after the message, as error_report does)
    "change cd0 -f b.qcow2", "change cd0 b.qcow2 qcow2", "change cd0 a.qcow2", "change d0 b.qcow2",
    "change cd0 nonexist.qcow2", "change cd0 /tmp", "change cd0 r.raw qcow2", "info block cd0",
]

# nbd_server_start's address strings (successful ones on port 0: both daemons run on this host)
NBD = [line for a in ("unix:", "localhost", "localhost:", ":", ":10809x", "[::1", "[::1]", "[::1]:0", "tcp:127.0.0.1:0",
                      "tcp:", "tcp:localhost", "fd:3", "fd:", "vsock:1", "vsock:", "127.0.0.1:0,x=y",
                      "inet:127.0.0.1:10996", "abc:def:10995", "127.0.0.1:abc", "-w unix:", "-w localhost",
                      "-w 127.0.0.1:0", "tcp:[::1", "tcp::", "a" * 70 + ":1", "[" + "1" * 70 + "]:1", "/tmp/x.sock")
       for line in ("nbd_server_start " + a, "nbd_server_stop")]

# over the raw socket (QEMU echoes the line with cursor control; that is stripped)
RAW = [
    "stop x", 'savevm "abc', T + "2+3 0 0 0 0 0", "info block d0", "info block -", "info block -v -n", "q x",
    "help info nonexist", "eject -x cd0", "change cd0", "change cd0 r.raw raw bogus",
    T + "9999999999999999999999 0 0 0 0 0", "info status",
]


def _norm(text: str) -> str:
    return normalise_hmp(re.sub(r"(Attached to: +)\S+", r"\1X", text))


@pytest.fixture
def hmp_pair(daemons: Daemons, tmp_path: Path) -> tuple[Monitor, Monitor, str, str]:
    qdir, vdir = tmp_path / "q", tmp_path / "v"
    for d in (qdir, vdir):
        d.mkdir()
        _setup(d)
    _, qpath, qhmp = daemons.qemu(DRIVES, qdir, hmp=True)
    _, vpath, vhmp = daemons.vdkit(DRIVES, vdir, hmp=True)
    assert qhmp and vhmp
    return daemons.monitor(qpath).negotiate(), daemons.monitor(vpath).negotiate(), qhmp, vhmp


@pytest.mark.parametrize("lines", [THROTTLE, FLAGS, NAMES, HELP, STRINGS, NBD],
                         ids=["expr", "flags", "names", "help", "strings", "nbd"])
def test_human_monitor_command(hmp_pair: tuple[Monitor, Monitor, str, str], lines: list[str]) -> None:
    q, v, _, _ = hmp_pair
    diffs = []
    for line in lines:
        want, got = _norm(q.hmp(line)), _norm(v.hmp(line))
        if want != got:
            diffs.append((line, want, got))
    assert diffs == []


def _raw_session(path: str, lines: list[str]) -> list[bytes]:
    """Each line's output on the raw monitor socket, echo and cursor control removed."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    buf = b""
    outputs: list[bytes] = []
    try:
        for line in [*lines, "info version"]:
            while buf.count(b"(qemu) ") < len(outputs) + 1:
                data = s.recv(1 << 16)
                assert data, "monitor closed"
                buf += data
            s.sendall(line.encode() + b"\n")
            outputs.append(b"")
            time.sleep(0.05)
        while buf.count(b"(qemu) ") < len(lines) + 2:
            buf += s.recv(1 << 16)
    finally:
        s.close()
    chunks = buf.split(b"(qemu) ")[1:len(lines) + 1]
    # QEMU echoes what is typed, redrawing the line after each key: the output starts after the last redraw
    return [c.rsplit(b"\x1b[K\r\n", 1)[-1] for c in chunks]


def test_raw_monitor_socket(hmp_pair: tuple[Monitor, Monitor, str, str]) -> None:
    _, _, qhmp, vhmp = hmp_pair
    want = [_norm(c.decode("utf-8", "replace")) for c in _raw_session(qhmp, RAW)]
    got = [_norm(c.decode("utf-8", "replace")) for c in _raw_session(vhmp, RAW)]
    assert len(got) == len(want) == len(RAW)
    assert list(zip(RAW, got, strict=True)) == list(zip(RAW, want, strict=True))
