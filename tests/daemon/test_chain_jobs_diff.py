"""Stream and commit inside a longer -drive chain, against qemu-system-x86_64: jobs on the drive's backing nodes.

The chain is base <- mid1 <- mid2 <- top (1 MiB of its own data in each, relative header names) under one
``-drive``.  Its backing nodes have automatic names, which differ between the two daemons, so each
daemon's command names the node it lists for that file (``query-named-block-nodes``); the answers are
compared with the names masked.  Cases: an intermediate stream into mid2 (no job-id: QEMU's refusal;
``base-node``, ``base`` by file name, the whole chain below), a stream of the drive down to a ``bottom``
node, commits spanning two intermediates (``top``/``base`` by file name and ``top-node``/``base-node``),
and one held by ``speed`` and a pause while the nodes are listed.  Compared: answers, events in order,
``query-block`` and ``query-named-block-nodes`` afterwards, and the files (``qemu-img info
--backing-chain`` of the active image, ``qemu-img compare`` of every image with QEMU's).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import qemu_img, qemu_io
from tests.daemon.conftest import Daemons, Monitor, normalise
from tests.daemon.test_mirror_diff import _events, _wait

_NAMES = ("base", "mid1", "mid2", "top")
_SIZES = re.compile(r'"actual-size": \d+')


def _chain(d: Path) -> None:
    prev = None
    for i, name in enumerate(_NAMES):
        args = ["create", "-q", "-f", "qcow2", *(["-b", f"{prev}.qcow2", "-F", "qcow2"] if prev else [])]
        assert qemu_img(*args, str(d / f"{name}.qcow2"), "4M").returncode == 0
        r = qemu_io("-c", f"write -P {0x11 * (i + 1):#x} {i}M 1M", str(d / f"{name}.qcow2"))
        assert r.returncode == 0, r.stderr
        prev = name


class ChainPair:
    """Both daemons on their own copy of the chain; ``@NAME`` in arguments is that daemon's node of NAME.qcow2."""

    def __init__(self, daemons: Daemons, tmp: Path) -> None:
        self.dirs = [tmp / "q", tmp / "v"]
        for d in self.dirs:
            d.mkdir()
            _chain(d)
        drive = ["-drive", "file=DIR/top.qcow2,if=none,id=disk0"]
        _, qpath, _ = daemons.qemu([a.replace("DIR", str(self.dirs[0])) for a in drive], self.dirs[0])
        _, vpath, _ = daemons.vdkit([a.replace("DIR", str(self.dirs[1])) for a in drive], self.dirs[1])
        self.mons = [daemons.monitor(qpath).negotiate(), daemons.monitor(vpath).negotiate()]

    def _node(self, m: Monitor, d: Path, name: str) -> str:
        for e in json.loads(m.cmd_line("query-named-block-nodes"))["return"]:
            if e["drv"] == "qcow2" and e["image"]["filename"] == str(d / f"{name}.qcow2"):
                return str(e["node-name"])
        raise AssertionError(f"no node of {name}.qcow2")

    def _args(self, m: Monitor, d: Path, args: dict[str, Any] | None) -> dict[str, Any] | None:
        if args is None:
            return None
        out = {}
        for k, v in args.items():
            if isinstance(v, str) and v.startswith("@"):
                v = self._node(m, d, v[1:])
            elif isinstance(v, str):
                v = v.replace("DIR", str(d))
            out[k] = v
        return out

    def same(self, name: str, args: dict[str, Any] | None = None) -> str:
        outs = [_SIZES.sub('"actual-size": N', normalise(m.cmd_line(name, self._args(m, d, args))))
                .replace(str(d), "DIR") for m, d in zip(self.mons, self.dirs, strict=True)]
        assert outs[1] == outs[0], f"{name} {args}:\nqemu:  {outs[0]}\nvdkit: {outs[1]}"
        return outs[0]

    def wait(self, status: str) -> None:
        for m in self.mons:
            _wait(m, "JOB_STATUS_CHANGE", status=status)

    def same_events(self) -> None:
        q, v = (_events(m, d) for m, d in zip(self.mons, self.dirs, strict=True))
        assert v == q, "\n".join(["qemu:", *q, "vdkit:", *v])

    def finish(self, daemons: Daemons) -> None:
        """Quit both; the files alike: the active image's chain as qemu-img shows it, every image's content."""
        for m in self.mons:
            m.send_raw(b'{"execute": "quit"}')
        for p in daemons.procs:
            p.wait(timeout=60)
        infos = [re.sub(r"disk size: .*", "", qemu_img("info", "--backing-chain", str(d / "top.qcow2")).stdout)
                 .replace(str(d), "DIR") for d in self.dirs]
        assert infos[1] == infos[0]
        for name in _NAMES:
            r = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", "-s", *(str(d / f"{name}.qcow2") for d in self.dirs))
            assert r.returncode == 0, (name, r.stdout, r.stderr)


CASES: list[tuple[str, dict[str, Any]]] = [
    ("block-stream", {"device": "@mid2", "job-id": "j", "base-node": "@base"}),
    ("block-stream", {"device": "@mid2", "job-id": "j", "base": "DIR/base.qcow2"}),
    ("block-stream", {"device": "@mid2", "job-id": "j"}),
    ("block-stream", {"device": "disk0", "job-id": "j", "bottom": "@mid1"}),
    ("block-commit", {"device": "disk0", "job-id": "j", "top": "DIR/mid2.qcow2", "base": "DIR/base.qcow2"}),
    ("block-commit", {"device": "disk0", "job-id": "j", "top-node": "@mid2", "base-node": "@base"}),
]


@pytest.mark.parametrize(("cmd", "args"), CASES, ids=[f"{c}-{'-'.join(sorted(a))}" for c, a in CASES])
def test_job_inside_the_chain(daemons: Daemons, tmp_path: Path, cmd: str, args: dict[str, Any]) -> None:
    p = ChainPair(daemons, tmp_path)
    if args["device"] != "disk0":
        p.same(cmd, {k: v for k, v in args.items() if k != "job-id"})  # a node without a backend: no default id
    p.same(cmd, args)
    p.wait("null")
    p.same_events()
    p.same("query-block")
    p.same("query-named-block-nodes")
    p.finish(daemons)


@pytest.mark.parametrize("cmd", ["block-stream", "block-commit"])
def test_held_job_inside_the_chain(daemons: Daemons, tmp_path: Path, cmd: str) -> None:
    """The same jobs held still (speed 1, paused): the nodes listed meanwhile (the job's filter in the
    chain, the read-only states), then cancelled: the chain as it was."""
    p = ChainPair(daemons, tmp_path)
    args = ({"device": "@mid2", "base-node": "@base"} if cmd == "block-stream"
            else {"device": "disk0", "top-node": "@mid2", "base-node": "@base"})
    p.same(cmd, {**args, "job-id": "j", "speed": 1})
    p.same("block-job-pause", {"device": "j"})
    p.wait("paused")
    p.same("query-block-jobs")
    p.same("query-named-block-nodes")
    p.same("block-job-cancel", {"device": "j", "force": True})
    p.wait("null")
    p.same_events()
    p.same("query-named-block-nodes")
    p.finish(daemons)


def test_nodes_of_a_concluded_stream(daemons: Daemons, tmp_path: Path) -> None:
    """qemu-system-x86_64 7.2 dies (SIGSEGV) answering query-named-block-nodes while a stream job is concluded
    and not dismissed, so QEMU is not asked then.  vdkit answers with the graph as the finished job left it:
    the same listing as after job-dismiss (no copy-on-read filter, the streamed-over image gone), the chain
    query-block shows; after the dismiss both daemons list the same nodes."""
    p = ChainPair(daemons, tmp_path)
    p.same("block-stream", {"device": "disk0", "job-id": "s", "auto-dismiss": False, "base": "DIR/mid1.qcow2"})
    p.wait("concluded")
    p.same("query-block-jobs")
    p.same("query-block")
    v, vdir = p.mons[1], p.dirs[1]
    while_concluded = [normalise(v.cmd_line("query-named-block-nodes", args)) for args in (None, {"flat": True})]
    listed = json.loads(while_concluded[0])["return"]
    assert sorted(e["image"]["filename"] for e in listed if e["drv"] == "qcow2") == [
        str(vdir / f"{n}.qcow2") for n in ("base", "mid1", "top")]
    assert all(e["drv"] != "copy-on-read" for e in listed)
    p.same("job-dismiss", {"id": "s"})
    p.wait("null")
    p.same_events()
    assert [normalise(v.cmd_line("query-named-block-nodes", args)) for args in (None, {"flat": True})] == \
        while_concluded
    p.same("query-named-block-nodes")
    p.same("query-named-block-nodes", {"flat": True})
    p.finish(daemons)


def _blockdev_chain(ro: bool) -> list[str]:
    """test_mirror_diff's base <- mid <- top as -blockdev nodes, each backing given by reference (so mid and
    top are named json:{...}); base and mid read-only or not."""
    flag = ",read-only=on" if ro else ""
    return ["-blockdev", f"driver=file,node-name=bf,filename=DIR/base.qcow2{flag}",
            "-blockdev", f"driver=qcow2,node-name=base,file=bf{flag}",
            "-blockdev", f"driver=file,node-name=mf,filename=DIR/mid.qcow2{flag}",
            "-blockdev", f"driver=qcow2,node-name=mid,file=mf,backing=base{flag}",
            "-blockdev", "driver=file,node-name=tf,filename=DIR/top.qcow2",
            "-blockdev", "driver=qcow2,node-name=top,file=tf,backing=mid"]


@pytest.mark.parametrize("ro", [False, True], ids=["rw-chain", "ro-chain"])
def test_sync_top_target_over_a_json_backing(daemons: Daemons, tmp_path: Path, ro: bool) -> None:
    """drive-backup/drive-mirror sync top of a -blockdev chain whose backings were given by reference: the
    target's header names mid by its json:{...} name and QEMU opens that name again as new nodes; mid open
    read-write in the daemon refuses them its lock (QEMU's "Could not open backing file: Failed to get
    shared "write" lock"; vdkit's open policy used to refuse the json: name itself), a read-only chain lets
    them open: the jobs run, the new nodes are listed while they do, the targets' headers and data alike."""
    from tests.daemon.test_mirror_diff import Pair

    p = Pair(daemons, tmp_path, drive=_blockdev_chain(ro))
    # (a backup with a speed limit whose one chunk is all there is: done at once, as QEMU's)
    p.same("drive-backup", {"device": "top", "job-id": "b", "target": "DIR/b.qcow2", "sync": "top",
                            "speed": 1})
    if ro:
        p.wait("JOB_STATUS_CHANGE", status="null")
    p.same("drive-mirror", {"device": "top", "job-id": "m", "target": "DIR/m.qcow2", "sync": "top"})
    p.wait("BLOCK_JOB_READY")
    p.same("query-named-block-nodes")  # (the target's nodes opened from the json: name among them)
    p.same("block-job-cancel", {"device": "m"})  # ready: completes without a pivot
    p.wait("JOB_STATUS_CHANGE", 2 if ro else 1, status="null")
    p.same_events(mask=re.compile(r'(?<="offset": )\d+'))
    p.same("query-named-block-nodes")
    p.quit(daemons)
    p.compare("m.qcow2")
    if ro:
        p.compare("b.qcow2")
