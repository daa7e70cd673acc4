"""-drive options at start-up: vdkit-daemon's refusals (exit status and stderr) and acceptances against QEMU 7.2.

QEMU checks a -drive in stages: the id while it reads the command line, then
per drive its own options (cache, index, read-only, media, if, snapshot),
the block options (throttling numbers, aio, the limits, detect-zeroes, error
actions, force-share, format, discard), the image, what only the open image
tells (aio=native, options no layer took: "Block format 'qcow2' does not
support the option ..."), and once every drive is open the guest devices
(IDE, then virtio).  The first error wins; both processes must print it alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, check_ok, require_tool
from tests.daemon.conftest import QEMU_BASE, Daemons, normalise, normalise_hmp


def _setup(d: Path) -> None:
    for name in "abcdefgh":
        check_ok("create", "-q", "-f", "qcow2", str(d / f"{name}.qcow2"), "1M")
    check_ok("create", "-q", "-f", "raw", str(d / "r.raw"), "1M")


REFUSED = [
    "file=a.qcow2,if=none,bps_max_length=3,bps_max=10,bps=5",
    "file=a.qcow2,if=none,iops_rd_max_length=3,iops_rd_max=5,iops_rd=1",
    "file=a.qcow2,if=none,throttling.bps-total-max-length=3,throttling.bps-total=5",
    "file=a.qcow2,if=none,bps=abc", "file=a.qcow2,if=none,bps=1k", "file=a.qcow2,if=none,bps=1.5",
    "file=a.qcow2,if=none,bps_max=abc", "file=a.qcow2,if=none,iops_size=abc",
    "file=a.qcow2,if=none,throttling.bps-total=abc", "file=a.qcow2,if=none,bps=99999999999999999999",
    "file=a.qcow2,if=none,bps=-1", "file=a.qcow2,if=none,bps=5,throttling.bps-total=6",
    "file=a.qcow2,if=none,readonly=maybe", "file=a.qcow2,if=none,read-only=maybe",
    "file=a.qcow2,if=none,cache.direct=maybe", "file=a.qcow2,if=none,cache=bogus",
    "file=a.qcow2,if=none,foo=bar", "file=r.raw,format=raw,if=none,foo=bar", "file=r.raw,if=none,foo=bar",
    "file=nonexist.qcow2,if=none,foo=bar", "if=none,id=d0,foo=bar", "if=virtio,foo=bar",
    "file=r.raw,format=raw,if=none,l2-cache-size=1M", "file=r.raw,if=none,lazy-refcounts=on",
    # short-form booleans: nokey is key=off, each warned about as deprecated before the error
    "file=a.qcow2,if=none,readonly,foo=bar", "file=a.qcow2,if=none,noreadonly,nosnapshot,foo=bar",
    "file=a.qcow2,if=none,noreadonly,id=1x",
    "file=a.qcow2,if=none,serial=abc", "file=a.qcow2,if=none,boot=on",
    "if=virtio,id=v", "if=ide,id=v", "if=ide", "if=virtio,readonly=on",
    "file=a.qcow2,if=ide,readonly=on", "file=a.qcow2,if=ide,readonly=on,foo=bar",
    "file=a.qcow2,if=scsi", "if=scsi", "file=a.qcow2,if=scsi,id=d0,bus=1,unit=3", "file=nonexist.qcow2,if=scsi",
    "file=a.qcow2,if=sd", "file=a.qcow2,if=mtd", "file=a.qcow2,if=xen", "file=a.qcow2,if=bogus",
    "file=a.qcow2,if=none,media=bogus", "file=a.qcow2,if=none,werror=bogus", "file=a.qcow2,if=none,rerror=bogus",
    "file=a.qcow2,if=none,rerror=enospc", "file=a.qcow2,if=none,aio=native", "file=a.qcow2,if=none,aio=bogus",
    "file=a.qcow2,if=none,id=d0,,bps=5", "file=a.qcow2,if=none,id=1abc", "file=a.qcow2,if=none,id=",
    "file=a.qcow2,if=ide,index=6", "file=a.qcow2,if=ide,bus=6", "file=a.qcow2,if=ide,bus=0,unit=1",
    "file=a.qcow2,if=ide,index=1,bus=1", "file=a.qcow2,if=none,index=abc",
    "file=a.qcow2,if=none,snapshot=maybe", "file=a.qcow2,if=none,detect-zeroes=bogus",
    "file=a.qcow2,if=none,discard=bogus", "file=a.qcow2,if=none,format=bogus",
    "file=a.qcow2,if=none,force-share=on", "file=a.qcow2,if=none,force-share=maybe",
    "file=a.qcow2,if=none,node-name=1x", "file=a.qcow2,if=none,node-name=d0,id=d0",
    "file=a.qcow2,if=none,bps=1,bps_rd=1,detect-zeroes=bogus",
    # several errors: the first QEMU checks wins
    "file=a.qcow2,if=none,foo=bar,bps=abc", "file=a.qcow2,if=none,werror=bogus,bps=abc",
    "file=a.qcow2,if=none,werror=bogus,aio=bogus", "file=a.qcow2,if=none,rerror=bogus,werror=bogus",
    "file=a.qcow2,if=none,detect-zeroes=bogus,bps=abc", "file=a.qcow2,if=none,cache=bogus,bps=abc",
    "file=a.qcow2,if=none,discard=bogus,aio=bogus", "file=a.qcow2,if=none,discard=bogus,format=bogus",
    "file=a.qcow2,if=none,werror=bogus,format=bogus", "file=a.qcow2,if=none,werror=bogus,discard=bogus",
    "file=a.qcow2,if=none,readonly=maybe,bps=abc", "file=a.qcow2,if=none,snapshot=maybe,media=bogus",
    "file=a.qcow2,if=bogus,media=bogus", "file=a.qcow2,if=none,index=abc,readonly=maybe",
    "file=a.qcow2,if=none,cache.direct=x,cache=bogus", "file=a.qcow2,if=none,force-share=on,werror=bogus",
    "file=a.qcow2,if=none,foo=bar,aio=native", "file=nonexist.qcow2,if=none,aio=native",
    "file=a.qcow2,if=none,bps=1,bps_rd=1,aio=bogus",
    # more than one drive
    "file=a.qcow2,if=none,id=d0 && file=r.raw,if=none,id=d0,format=raw",
    "file=a.qcow2,if=none,id=d0 && file=a.qcow2,if=none,id=d1",
    "file=a.qcow2,if=ide,media=cdrom && file=r.raw,format=raw,if=ide,index=0",
    "file=a.qcow2,if=virtio && file=r.raw,format=raw,if=virtio,index=0",
    "file=a.qcow2,if=none,index=0 && file=r.raw,format=raw,if=none,index=0",
    "file=a.qcow2,if=none,id=x && file=r.raw,format=raw,if=none,id=y,node-name=x",
    "file=a.qcow2,if=ide,id=x,readonly=on && file=nonexist,if=none",
    "file=a.qcow2,if=ide,id=x,readonly=on && if=ide,id=y",
    "if=virtio,id=x && if=ide,id=y", "if=ide,id=y && if=virtio,id=x",
]


def _drives(case: str) -> list[str]:
    return [a for d in case.split(" && ") for a in ("-drive", d)]


def _start(cmd: list[str], args: list[str], cwd: Path) -> tuple[int | str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TZ="UTC")
    sock = str(cwd / "x.sock")
    try:
        r = subprocess.run([*cmd, *args, "-qmp", f"unix:{sock},server=on,wait=off"], cwd=cwd, env=env,
                           capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "still running", ""
    return r.returncode, r.stderr.decode()


@pytest.mark.parametrize("case", REFUSED)
def test_refused_like_qemu(tmp_path: Path, case: str) -> None:
    _setup(tmp_path)
    q_rc, q_err = _start([require_tool("qemu-system-x86_64"), *QEMU_BASE], _drives(case), tmp_path)
    v_rc, v_err = _start([sys.executable, "-m", "vdkit.daemon.main", "-S"], _drives(case), tmp_path)
    assert q_rc == 1, q_err  # the case list is of refusals
    assert (v_rc, v_err.replace("vdkit-daemon: ", "")) == (q_rc, q_err.replace("qemu-system-x86_64: ", ""))


ACCEPTED = [
    ["file=a.qcow2,if=ide", "file=b.qcow2,if=ide,media=cdrom", "file=c.qcow2,if=none", "file=d.qcow2,if=virtio",
     "file=e.qcow2,if=none", "file=f.qcow2,if=virtio"],
    ["file=a.qcow2,if=ide,index=3", "file=b.qcow2,if=ide", "file=c.qcow2,if=none,index=5",
     "file=d.qcow2,if=virtio,index=2", "file=e.qcow2,if=none", "file=f.qcow2,if=virtio",
     "file=g.qcow2,if=ide,bus=2,unit=0,media=cdrom"],
    ["file=a.qcow2,if=virtio,media=cdrom", "file=b.qcow2,if=none,index=1,media=cdrom",
     "file=c.qcow2,if=none,copy-on-read=on", "file=d.qcow2,if=none,force-share=on,readonly=on",
     "file=e.qcow2,if=none,snapshot=off,auto-read-only=on,driver=qcow2,stats-account-invalid=on,werror=stop,"
     "rerror=ignore,aio=threads,l2-cache-size=1M,file.locking=off",
     "file=f.qcow2,if=none,aio=native,cache.direct=on,bps=0x10,iops=010",
     "file=g.qcow2,if=virtio,readonly=on", "file=h.qcow2,if=ide,media=cdrom,readonly=on"],
    ["file=a.qcow2,if=floppy", "if=floppy", "file=b.qcow2,if=ide", "file=c.qcow2,if=pflash"],
    ["file=a.qcow2,if=floppy,media=cdrom"],
    ["file=a.qcow2,if=none,cache=off", "file=b.qcow2,if=none,cache=directsync"],  # QEMU's cache mode table
    ["if=ide,media=cdrom", "if=none,media=cdrom,index=3", "file=r.raw,format=raw,if=none,werror=enospc,rerror=report",
     "file=a.qcow2,if=none,id=a_b.c-d,detect-zeroes=unmap,discard=ignore"],
]


@pytest.mark.parametrize("drives", ACCEPTED)
def test_accepted_like_qemu(daemons: Daemons, drives: list[str]) -> None:
    """Automatic ids (q35: one IDE unit per bus; per-interface indexes), devices, read-only states."""
    q, v = daemons.pair([a for d in drives for a in ("-drive", d)], _setup)
    for name in ("query-block", "query-named-block-nodes"):
        assert normalise(v.cmd_line(name)) == normalise(q.cmd_line(name)), name
    assert normalise_hmp(v.hmp("info block")) == normalise_hmp(q.hmp("info block"))
    # every drive ejected (refused for fixed disks), then the state again
    for b in q.cmd("query-block")["return"]:
        assert normalise(v.cmd_line("eject", {"device": b["device"]})) == \
            normalise(q.cmd_line("eject", {"device": b["device"]})), b["device"]
    assert normalise(v.cmd_line("query-block")) == normalise(q.cmd_line("query-block"))
    assert [e["event"] for e in v.events] == [e["event"] for e in q.events]


def _setup_snapshot(d: Path) -> None:
    _setup(d)
    check_ok("snapshot", "-c", "s1", str(d / "a.qcow2"))
    check_ok("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(d / "t.qcow2"))


def test_snapshot_on_like_qemu(daemons: Daemons, tmp_path: Path) -> None:
    """snapshot=on: the image read-only under a temporary qcow2 overlay (unlinked once open), named by
    QEMU's json: description; savevm and internal snapshots go to the overlay, the image is untouched."""
    import re

    def norm(text: str) -> str:
        return re.sub(r"vl\.[A-Za-z0-9]{6}", "vl.XXXXXX", text)

    q, v = daemons.pair(["-drive", "file=a.qcow2,if=none,id=d0,snapshot=on",
                         "-drive", "file=r.raw,format=raw,if=virtio,id=v0,snapshot=on",
                         "-drive", "file=t.qcow2,if=none,id=t,snapshot=on,cache=none",
                         "-drive", "file=c.qcow2,if=ide,media=cdrom,id=cd,snapshot=on"], _setup_snapshot)
    for name in ("query-block", "query-named-block-nodes", "query-blockstats"):
        assert norm(normalise(v.cmd_line(name))) == norm(normalise(q.cmd_line(name))), name
    for line in ("info block -v", "info snapshots", "savevm x", "info snapshots", "loadvm x", "delvm x",
                 "snapshot_blkdev_internal d0 y", "info snapshots"):
        qo, vo = normalise_hmp(q.hmp(line)), normalise_hmp(v.hmp(line))
        assert norm(re.sub(r"disk size: .*", "", vo)) == norm(re.sub(r"disk size: .*", "", qo)), line
    # a medium inserted later gets no overlay, but keeps the overlay's cache flags
    for device, filename in (("t", "e.qcow2"), ("cd", "f.qcow2")):
        args = {"device": device, "filename": filename}
        assert normalise(v.cmd_line("blockdev-change-medium", args)) == \
            normalise(q.cmd_line("blockdev-change-medium", args))
    for name in ("query-block", "query-named-block-nodes"):
        ql, vl = normalise(q.cmd_line(name)), normalise(v.cmd_line(name))
        ql, vl = (re.sub(r'"(actual|virtual)-size": \d+', "SIZE", x) for x in (ql, vl))
        assert norm(vl) == norm(ql), name
    q.cmd("quit")
    v.cmd("quit")
    for side in ("q", "v"):
        out = subprocess.run(["qemu-img", "snapshot", "-l", str(tmp_path / side / "a.qcow2")],
                             capture_output=True, text=True).stdout
        assert " s1 " in out and " x " not in out and " y " not in out, (side, out)


@pytest.mark.parametrize("args", [
    ["-qmp", "bogus:x,server=on"], ["-qmp", "bogus"], ["-monitor", "tcp:localhost:abc,server=on,wait=off"],
    ["-qmp", "tcp::abc,server=on,wait=off"], ["-qmp", "unix:/nonexist/q.sock,server=on,wait=off"],
    ["-qmp", "unix:z.sock,server=on,wait=off,foo=1,bar=2"],
    # QEMU binds monitor sockets after creating the pid file and before opening drives
    ["-drive", "file=nonexist.qcow2,if=none", "-monitor", "unix:/nonexist/h.sock,server=on,wait=off"],
    ["-pidfile", "/nonexist/p.pid", "-qmp", "unix:/nonexist/q.sock,server=on,wait=off"],
])
def test_monitor_options_like_qemu(tmp_path: Path, args: list[str]) -> None:
    _setup(tmp_path)
    q_rc, q_err = _start([require_tool("qemu-system-x86_64"), *QEMU_BASE], args, tmp_path)
    v_rc, v_err = _start([sys.executable, "-m", "vdkit.daemon.main", "-S"], args, tmp_path)
    assert q_rc == 1, q_err
    assert (v_rc, v_err.replace("vdkit-daemon: ", "")) == (q_rc, q_err.replace("qemu-system-x86_64: ", ""))
