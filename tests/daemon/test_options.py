"""-drive option syntax: unit checks and a differential run of the less common spellings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import check_ok, require_tool
from tests.daemon.conftest import Daemons, normalise, normalise_hmp
from vdkit.daemon.main import DriveIndexes, OptionError, parse_args, parse_drive, split_opts


def test_split_opts() -> None:
    assert split_opts("file=a,,b.qcow2,if=none,readonly") == [("file", "a,b.qcow2"), ("if", "none"),
                                                                ("readonly", "on")]


def test_parse_drive() -> None:
    d = parse_drive("file=x.qcow2,cache=directsync,throttling.iops-total=5,throttling.group=g,bps_max=9,bps=3")
    assert (d.cache.writeback, d.cache.direct, d.cache.no_flush) == (False, True, False)
    assert d.throttle.avg["iops"] == 5 and d.throttle.max["bps"] == 9 and d.group == "g"
    assert d.id == "none0"
    indexes = DriveIndexes()
    assert parse_drive("if=ide", indexes).id == "ide0-hd0"
    assert parse_drive("if=ide,media=cdrom", indexes).id == "ide1-cd0"  # q35: one unit per IDE bus
    # no -drive level takes it: left for the format driver, which refuses it once the image is open
    assert parse_drive("file=x,bogus=1").leftover == ["bogus"]
    assert parse_drive("file=x,bps_max_length=3").leftover == ["bps_max_length"]
    with pytest.raises(OptionError, match="Parameter 'read-only' expects 'on' or 'off'"):
        parse_drive("file=x,readonly=maybe")
    with pytest.raises(OptionError, match="Parameter 'throttling.bps-total' expects a number"):
        parse_drive("file=x,bps=1k")
    with pytest.raises(OptionError, match="bps_max/iops_max cannot be lower than bps/iops"):
        parse_drive("file=x,bps=10,bps_max=5")
    assert parse_drive("file=x,bps=0x10,iops=010").throttle.avg == {**parse_drive("").throttle.avg,
                                                                     "bps": 16, "iops": 8}


def test_parse_args() -> None:
    cfg = parse_args(["-S", "-machine", "q35", "-nodefaults", "--pidfile", "p", "-qmp", "unix:/tmp/s,server=on",
                      "-qmp", "tcp:127.0.0.1:4444,server=on,wait=off", "-monitor", "unix:/tmp/h,server=on,wait=off"])
    assert cfg.start_paused and cfg.pidfile == "p"
    assert [str(a) for a in cfg.qmp] == ["unix:/tmp/s", "tcp:127.0.0.1:4444"]
    # checked while the command line is read: identifiers and duplicates (the full -drive text first)
    with pytest.raises(OptionError, match="^-drive if=none,id=a,format=raw: Duplicate ID 'a' for drive$"):
        parse_args(["-drive", "if=none,id=a", "-drive", "if=none,id=a,format=raw"])
    with pytest.raises(OptionError, match="Parameter 'id' expects an identifier"):
        parse_args(["-drive", "if=none,id=d0,,bps=5"])


DRIVES = [
    "-drive", "file=wt.qcow2,if=none,id=wt,cache=writethrough",
    "-drive", "file=ds.qcow2,if=none,id=ds,cache=directsync,detect-zeroes=unmap,discard=unmap",
    "-drive", "file=th.qcow2,if=none,id=th,throttling.iops-total=5,throttling.iops-total-max=10,"
              "throttling.iops-size=4096,throttling.group=grp",
    "-drive", "file=nf.qcow2,if=none,id=nf,cache.no-flush=on,cache.direct=on,read-only=on",
]


def _setup(d: Path) -> None:
    for name in ("wt", "ds", "th", "nf"):
        check_ok("create", "-q", "-f", "qcow2", str(d / f"{name}.qcow2"), "4M")


def test_drive_spellings_vs_qemu(daemons: Daemons) -> None:
    q, v = daemons.pair(DRIVES, _setup)
    assert normalise(v.cmd_line("query-block")) == normalise(q.cmd_line("query-block"))
    for line in ("info block", "info block -n"):
        assert normalise_hmp(v.hmp(line)) == normalise_hmp(q.hmp(line))


def test_help_lists_the_accepted_options() -> None:
    """-h/-help/--help print a usage text (not the module docstring) naming each option parse_args takes."""
    import re
    import subprocess
    import sys

    from tests.daemon.conftest import _ENV
    from vdkit.daemon.main import USAGE

    for flag in ("-h", "-help", "--help", "--h"):
        p = subprocess.run([sys.executable, "-m", "vdkit.daemon.main", flag, "-bogus"], capture_output=True,
                           text=True, env=_ENV, timeout=60)
        assert (p.returncode, p.stdout, p.stderr) == (0, USAGE, ""), flag
    assert USAGE.startswith("usage: vdkit-daemon [options]\n")
    assert "Start-up follows" not in USAGE  # the module docstring is for developers
    listed = set(re.findall(r"^(-[A-Za-z]+)\b", USAGE, re.M)) | set(re.findall(r" or (-[A-Za-z]+)\b", USAGE))
    args = {"-drive": "file=x.qcow2,id=d0", "-qmp": "unix:/tmp/q.sock,server=on,wait=off",
            "-monitor": "unix:/tmp/h.sock,server=on,wait=off", "-nbd": "unix:/tmp/n.sock", "-pidfile": "p",
            "-machine": "q35", "-M": "q35", "-accel": "tcg", "-m": "1G", "-name": "x", "-display": "none",
            "-blockdev": "driver=file,node-name=f,filename=x", "-object": "secret,id=s0,data=x"}
    assert listed == {"-h", "-help", *args, "-nographic", "-S", "-daemonize", "-nodefaults", "-v"}
    from vdkit.block.secrets import OpenScope

    with OpenScope():  # (-object secret registers s0: in a scope of its own, not this process's)
        for opt in listed - {"-h", "-help"}:
            parse_args([opt, args[opt]] if opt in args else [opt])  # each is accepted
            parse_args(["-" + opt, args[opt]] if opt in args else ["-" + opt])
    with pytest.raises(OptionError, match="invalid option"):
        parse_args(["-hda", "x"])
    # the lines copied from qemu-system-x86_64 -h read as there
    qemu = subprocess.run([require_tool("qemu-system-x86_64"), "-h"], capture_output=True, text=True).stdout
    for line in ("-h or -help     display this help and exit\n", "-pidfile file   write PID to 'file'",
                 "-machine [type=]name[,prop[=value][,...]]\n", "-m [size=]megs[,slots=n,maxmem=size]\n",
                 "       [,cache=writethrough|writeback|none|directsync|unsafe][,format=f]\n",
                 "       [[,iops_max=im]|[[,iops_rd_max=irm][,iops_wr_max=iwm]]]\n",
                 "-qmp dev        like -monitor but opens in 'control' mode"):
        assert line in qemu and line.split(" dev ")[0] in USAGE, line
