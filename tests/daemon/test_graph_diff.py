"""The node graph: ``-blockdev``, ``blockdev-add``/``blockdev-del`` and ``block_resize``, against QEMU 7.2.

The same command sequences go to ``qemu-system-x86_64 -S -nodefaults`` and to
vdkit-daemon, each on its own identical tree of images (made by the same
``qemu-img`` commands); every answer is compared after masking the tree's path
(``DIR``) and automatic node names (``#blockN``).  ``block_resize`` answers
and virtual sizes are compared; the files' allocation after a resize is not
(vdkit's qcow2 engine grows and shrinks like ``qemu-img resize``, which
allocates less than QEMU's ``block_resize``: docs/daemon.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import check_ok, require_tool
from tests.daemon.conftest import QEMU_BASE, Daemons
from tests.helpers.qmp_script import run_script


def _setup(d: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "d.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "raw", "r.raw", "1M", cwd=d)


_run = partial(run_script, setup=_setup)


FILE_BASE = {"driver": "file", "filename": "DIR/base.qcow2"}
FILE_TOP = {"driver": "file", "filename": "DIR/top.qcow2"}
FILE_RAW = {"driver": "file", "filename": "DIR/r.raw"}


def test_blockdev_add_references_and_del(daemons: Daemons) -> None:
    """file by reference, backing by reference (json: filename), in-use refusals, deletion."""
    _run(daemons, [], [
        ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": "DIR/base.qcow2"}),
        ("query-named-block-nodes", None),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q1", "file": "f1"}),
        ("query-named-block-nodes", None),
        ("query-block", None),
        ("blockdev-del", {"node-name": "f1"}),
        # a second writer on the same file is a permission conflict; a read-only reader is fine
        ("blockdev-add", {"driver": "qcow2", "node-name": "qx", "file": "f1"}),
        ("blockdev-add", {"driver": "raw", "node-name": "rx", "file": "f1", "read-only": True}),
        ("block_resize", {"node-name": "f1", "size": 8388608}),
        ("blockdev-del", {"node-name": "rx"}),
        ("blockdev-add", {"driver": "file", "node-name": "fro", "filename": "DIR/d.qcow2", "read-only": True}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "qro", "file": "fro"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "qro", "file": "fro", "read-only": True}),
        ("block_resize", {"node-name": "qro", "size": 8388608}),
        ("block_resize", {"node-name": "fro", "size": 8388608}),
        ("blockdev-del", {"node-name": "qro"}),
        ("blockdev-del", {"node-name": "fro"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q2", "file": FILE_TOP, "backing": "q1"}),
        ("query-named-block-nodes", None),
        ("query-named-block-nodes", {"flat": True}),
        "info block -n",
        "info block -v q2",
        ("query-blockstats", {"query-nodes": True}),
        ("query-blockstats", None),
        ("blockdev-del", {"node-name": "q1"}),
        ("blockdev-del", {"node-name": "q2"}),
        ("blockdev-del", {"node-name": "q2"}),
        ("blockdev-del", {"node-name": "q1"}),
        ("blockdev-del", {"node-name": "f1"}),
        ("query-named-block-nodes", None),
    ])


def test_blockdev_add_options_and_errors(daemons: Daemons) -> None:
    """QAPI and node-name checks, inherited options of inline children, header backing, backing: null."""
    _run(daemons, [], [
        ("blockdev-add", {"driver": "qcow2", "file": FILE_BASE}),
        ("blockdev-add", {"node-name": "x"}),
        ("blockdev-add", {"driver": "nosuch", "node-name": "x"}),
        ("blockdev-add", {"driver": "file", "node-name": "x"}),
        ("blockdev-add", {"driver": "file", "node-name": "x", "filename": "DIR/nonexist"}),
        ("blockdev-add", {"driver": "file", "node-name": "#x", "filename": "DIR/r.raw"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": "nonode"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "x", "file": FILE_RAW}),
        ("blockdev-add", {"driver": "raw", "node-name": "r1", "read-only": True, "discard": "unmap",
                          "detect-zeroes": "on", "cache": {"direct": False, "no-flush": True}, "file": FILE_RAW}),
        ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": FILE_RAW}),
        ("blockdev-add", {"driver": "file", "node-name": "r2", "filename": "DIR/r.raw", "auto-read-only": True,
                          "read-only": True}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "t", "file": FILE_TOP}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "t2", "backing": None, "detect-zeroes": "unmap",
                          "discard": "unmap", "file": FILE_TOP}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "t3", "read-only": True, "backing": None,
                          "file": FILE_TOP}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "t4", "detect-zeroes": "unmap", "file": FILE_BASE}),
        ("query-named-block-nodes", None),
        "info block -n",
        ("query-block", None),
        ("blockdev-del", {"node-name": "t"}),
        ("blockdev-del", {}),
        # an automatic name no node has (QEMU numbers nodes by a process-wide count: a low one may exist)
        ("blockdev-del", {"node-name": "#block99999"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "t5", "backing": None, "file": FILE_TOP}),
        ("query-named-block-nodes", {"flat": True}),
        "info block -n",
    ])


def test_blockdev_add_qapi_errors(daemons: Daemons) -> None:
    """QAPI type checks of nested members, node-name rules of inline children, their deletion."""
    _run(daemons, [], [
        ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": 5}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": {}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": {"driver": "file"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "a", "backing": 5, "file": FILE_BASE}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "a", "cache": "x", "file": FILE_BASE}),
        ("blockdev-add", {"driver": "qcow2", "node-name": 5, "file": FILE_BASE}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "a", "bogus": 1, "file": FILE_BASE}),
        ("blockdev-add", {"driver": "file", "node-name": "a", "filename": "DIR/r.raw", "backing": None}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": {**FILE_BASE, "node-name": "a"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": {**FILE_BASE, "node-name": "af"}}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-del", {"node-name": "af"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "abcdefghijabcdefghijabcdefghijab", "file": FILE_RAW}),
        ("blockdev-del", {"node-name": "a"}),
        ("query-named-block-nodes", None),
    ])


def test_blockdev_command_line(daemons: Daemons) -> None:
    """-blockdev in dotted-key and JSON form, next to a -drive."""
    _run(daemons, [
        "-blockdev", "driver=file,node-name=bf,filename=DIR/base.qcow2,read-only=y",
        "-blockdev", "driver=qcow2,node-name=b,file=bf,read-only=on",
        "-blockdev", json.dumps({"driver": "qcow2", "node-name": "t", "file": FILE_TOP, "backing": "b"}),
        "-blockdev", "driver=raw,node-name=r,file.driver=file,file.filename=DIR/r.raw,cache.no-flush=on",
        "-drive", "file=DIR/d.qcow2,if=none,id=d0",
    ], [
        ("query-named-block-nodes", None),
        ("query-block", None),
        "info block -n",
        "info block",
        ("query-blockstats", {"query-nodes": True}),
        ("blockdev-del", {"node-name": "b"}),
    ])


def test_block_resize(daemons: Daemons) -> None:
    _run(daemons, [
        "-drive", "file=DIR/d.qcow2,if=none,id=d0,node-name=dn",
        "-drive", "file=DIR/base.qcow2,if=none,id=d1,readonly=on",
        "-drive", "if=none,id=d2",
        "-drive", "file=DIR/r.raw,if=none,id=d3,format=raw",
    ], [
        ("block_resize", {"size": 1}),
        ("block_resize", {"device": "d0"}),
        ("block_resize", {"device": "nodev", "size": 8388608}),
        ("block_resize", {"device": "d0", "size": -1}),
        ("block_resize", {"device": "d0", "size": 8388609}),
        ("block_resize", {"device": "d0", "size": 8388608}),
        ("block_resize", {"device": "d1", "size": 8388608}),
        ("block_resize", {"device": "d2", "size": 8388608}),
        ("block_resize", {"device": "d3", "size": 2097152}),
        ("block_resize", {"device": "d3", "size": 1000}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "t", "file": FILE_TOP}),
        ("block_resize", {"node-name": "t", "size": 8388608}),
        ("block_resize", {"device": "t", "size": 8388608}),
        ("block_resize", {"node-name": "dn", "size": 16777216}),
        ("block_resize", {"node-name": "nonode", "size": 4194304}),
        ("block_resize", {"device": "d0", "size": 1 << 62}),
        ("block_resize", {"device": "d0", "size": (1 << 63) - 1}),
        ("block_resize", {"device": "d3", "size": 1 << 62}),
        ("block_resize", {"device": "d3", "size": (1 << 63) - 1}),
        ("blockdev-del", {"node-name": "dn"}),
        "block_resize d0 32M",
        "block_resize d0",
        "block_resize nodev 1M",
        "block_resize d0 -1",
        "block_resize t 32M",
        "block_resize d3 1.5",
        "block_resize d3 1k",
        ("query-block", None),
        ("query-named-block-nodes", None),
        "info block",
    ], blank_sizes=True)


@pytest.mark.parametrize("text", [
    "driver=qcow2,node-name=x,file.driver=file,file.filename=DIR/nonexist",
    "driver=qcow2,file.driver=file,file.filename=DIR/base.qcow2",
    "driver=file,node-name=f,filename=DIR/r.raw,read-only=maybe",
    '{"driver": "file"}',
    "driver=raw,node-name=r,file=nope",
    "driver=qcow2,node-name=q,file.driver=file,file.filename=DIR/r.raw",
    # a key given a value and used as a prefix, in either order (keyval's "used inconsistently")
    "driver=qcow2,node-name=q,file=DIR/base.qcow2,file.filename=DIR/r.raw",
    "driver=qcow2,node-name=q,file.filename=DIR/r.raw,file=DIR/base.qcow2",
    "driver=qcow2,node-name=q,file.driver=file,file.filename.x=1,file.filename=DIR/r.raw",
    "driver=qcow2,node-name=q,node-name.a=1",
    # JSON: QEMU's parser texts (a key twice, premature end, a second value, a trailing comma)
    '{"driver": "qcow2", "node-name": "q", "file": "x", "file": {"driver": "file", "filename": "DIR/r.raw"}}',
    '{"driver": "qcow2", "file": {"driver": "file", "filename": "DIR/r.raw", "filename": "DIR/base.qcow2"}}',
    '{"driver": "qcow2", "node-name": "q"',
    '{"driver": "qcow2"} {}',
    '{"driver": "qcow2",}',
    '{"driver": "qcow2", "node-name": "q", "file": "x", "file.filename": "DIR/r.raw"}',
    '{"driver": qcow2}', '{"driver": "qcow2", "a": 01}', '{"driver" "qcow2"}', '{"driver": "qcow2", "a": 1, "a": 2',
    "{'driver': 'qcow2', 'node-name': 'q', 'file': {'driver': 'file', 'filename': 'DIR/nonexist'}}",
])
def test_blockdev_option_errors(tmp_path: Path, text: str) -> None:
    """A bad -blockdev stops start-up with QEMU's line (program name aside) and exit status 1."""
    _setup(tmp_path)
    arg = text.replace("DIR", str(tmp_path))
    out = {}
    for who, cmd in (("qemu", [require_tool("qemu-system-x86_64"), *QEMU_BASE]),
                     ("vdkit", [sys.executable, "-m", "vdkit.daemon.main", "-S"])):
        r = subprocess.run([*cmd, "-blockdev", arg], capture_output=True, text=True, timeout=60, check=False,
                           cwd=tmp_path)
        out[who] = (r.returncode, r.stderr.split(": ", 1)[1])
    assert out["vdkit"] == out["qemu"]
    assert out["qemu"][0] == 1


def _setup_chains(d: Path) -> None:
    _setup(d)
    check_ok("create", "-q", "-f", "qcow2", "a.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", cwd=d)
    check_ok("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2", cwd=d)  # a -> b -> a
    check_ok("create", "-q", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "m.qcow2", "4M", cwd=d)
    (d / "dir").mkdir()


def test_blockdev_add_backing_errors(daemons: Daemons) -> None:
    """Errors met while opening a header's chain keep one 'Could not open backing file: ' per level."""
    _run(daemons, [], [
        ("blockdev-add", {"driver": "qcow2", "node-name": "a2", "file": {"driver": "file", "filename": "DIR/a.qcow2"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "m", "file": {"driver": "file", "filename": "DIR/m.qcow2"}}),
        ("blockdev-add", {"driver": "file", "node-name": "d", "filename": "DIR/dir"}),
        ("query-named-block-nodes", None),
    ], setup=_setup_chains)


def test_blockdev_add_backing_loop(daemons: Daemons) -> None:
    """A read-only chain that loops: QEMU 7.2 keeps opening (it hangs); vdkit stops with qemu-img's loop error."""
    d = daemons.tmp / "loop"
    d.mkdir()
    _setup_chains(d)
    _, path, _ = daemons.vdkit([], d)
    m = daemons.monitor(path).negotiate()
    r = m.cmd("blockdev-add", {"driver": "qcow2", "node-name": "a", "read-only": True,
                               "file": {"driver": "file", "filename": str(d / "a.qcow2")}})
    loop = f"Backing file '{d}/a.qcow2' creates an infinite loop."
    assert r["error"]["desc"] == "Could not open backing file: Could not open backing file: " + loop
    assert m.cmd("query-named-block-nodes") == {"return": []}


def lock_bytes(d: Path, only: tuple[str, ...] = ()) -> str:
    """The OFD lock bytes held on each file of ``d`` (``/proc/locks``), e.g. ``a.qcow2: 100 201 203``."""
    names = {}
    for p in d.iterdir():
        if only and p.name not in only:
            continue
        st = p.stat()
        names[f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"] = p.name
    held: dict[str, set[int]] = {}
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if fields[1] != "->" and fields[5] in names:
                held.setdefault(names[fields[5]], set()).update(range(int(fields[6]), int(fields[7]) + 1))
    return "; ".join(f"{n}: {' '.join(map(str, sorted(b)))}" for n, b in sorted(held.items()))


def _setup_locks(d: Path) -> None:
    for n in ("a", "b"):
        check_ok("create", "-q", "-f", "qcow2", f"{n}.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "t.qcow2", cwd=d)
    check_ok("create", "-q", "-f", "raw", "r.raw", "1M", cwd=d)


FILE_A = {"driver": "file", "filename": "DIR/a.qcow2"}


@pytest.mark.parametrize("args", [
    ["-blockdev", "driver=file,node-name=f,filename=DIR/a.qcow2"],
    ["-blockdev", "driver=file,node-name=f,filename=DIR/a.qcow2,read-only=on"],
    ["-blockdev", "driver=raw,node-name=f,file.driver=file,file.filename=DIR/a.qcow2"],
    ["-blockdev", "driver=raw,node-name=f,read-only=on,file.driver=file,file.filename=DIR/a.qcow2"],
    # force-share goes down to inline children and the chain a header names
    ["-blockdev", "driver=qcow2,node-name=f,read-only=on,force-share=on,file.driver=file,"
                  "file.filename=DIR/t.qcow2"],
    ["-blockdev", "driver=qcow2,node-name=f,read-only=on,file.force-share=on,file.driver=file,"
                  "file.filename=DIR/t.qcow2"],
    # locking=off: no bytes on that file (the chain its header names still locks)
    ["-blockdev", "driver=qcow2,node-name=f,file.driver=file,file.filename=DIR/t.qcow2,file.locking=off"],
    ["-blockdev", "driver=file,node-name=f,filename=DIR/a.qcow2,locking=off",
     "-blockdev", "driver=qcow2,node-name=f2,file=f"],
])
def test_lock_bytes_of_unused_nodes(daemons: Daemons, args: list[str]) -> None:
    """A file or raw node nobody uses holds no lock (QEMU's permissions), so a read-only qcow2 node, a
    second raw node and another process may open the file; a writable qcow2 node takes the write lock."""
    _run(daemons, args, [
        lock_bytes,
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "read-only": True, "file": FILE_A}),
        lock_bytes,
        ("blockdev-add", {"driver": "raw", "node-name": "r2", "file": FILE_A}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "w", "file": FILE_A}),
        ("blockdev-del", {"node-name": "q"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "w", "file": FILE_A}),
        lock_bytes,
        ("blockdev-add", {"driver": "qcow2", "node-name": "q2", "read-only": True, "file": FILE_A}),
        ("blockdev-del", {"node-name": "w"}),
        lock_bytes,
    ], setup=_setup_locks)


def test_lock_bytes_and_conflicts_of_shared_file_nodes(daemons: Daemons) -> None:
    """Parents of one file node: their needs add up in the lock, and QEMU's pairwise conflict check
    (newest parent first) names who requires and who refuses; deleting a parent drops its bytes."""
    _run(daemons, [
        "-blockdev", "driver=file,node-name=f,filename=DIR/a.qcow2",
        "-blockdev", "driver=raw,node-name=r,file=f",
        "-blockdev", "driver=qcow2,node-name=t,file.driver=file,file.filename=DIR/t.qcow2",
    ], [
        lock_bytes,
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "read-only": True, "file": "f"}),
        lock_bytes,
        ("blockdev-add", {"driver": "qcow2", "node-name": "q2", "file": "f"}),
        ("blockdev-del", {"node-name": "q"}),
        ("blockdev-del", {"node-name": "t"}),
        lock_bytes,
        ("blockdev-add", {"driver": "qcow2", "node-name": "q2", "file": "f"}),
        lock_bytes,
        ("blockdev-add", {"driver": "qcow2", "node-name": "q3", "read-only": True, "file": "f"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r3", "read-only": True, "file": "f"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "t2", "read-only": True, "backing": "q2",
                          "file": {"driver": "file", "filename": "DIR/t.qcow2"}}),
        lock_bytes,
        ("blockdev-del", {"node-name": "t2"}),
        ("blockdev-del", {"node-name": "q2"}),
        lock_bytes,
        ("blockdev-add", {"driver": "file", "node-name": "fs", "filename": "DIR/b.qcow2", "read-only": True,
                          "force-share": True}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "qs", "read-only": True, "file": "fs"}),
        lock_bytes,
        ("blockdev-add", {"driver": "qcow2", "node-name": "qb", "file": {"driver": "file",
                                                                        "filename": "DIR/b.qcow2"}}),
        lock_bytes,
    ], setup=_setup_locks)


def test_lock_bytes_of_a_job_on_a_file_node_by_reference(daemons: Daemons) -> None:
    """A commit base over a file node by reference is reopened read-write: its file takes the write
    lock for the job and drops it again afterwards, as QEMU's permissions do.  (Only the base's bytes:
    QEMU's commit also refuses consistent reads of the intermediate image, vdkit's does not yet.)"""
    from tests.daemon.test_jobs_diff import BLOCKDEV, run_jobs

    def base_lock(d: Path) -> str:
        return lock_bytes(d, ("base.qcow2",))

    run_jobs(daemons, BLOCKDEV, [
        base_lock,
        ("block-commit", {"device": "n-top", "top-node": "n-mid", "base-node": "n-base", "job-id": "c",
                          "speed": 1}),
        ("block-job-pause", {"device": "c"}),
        ("@wait", "c", "paused"),
        base_lock,
        ("block-job-set-speed", {"device": "c", "speed": 0}),
        ("block-job-resume", {"device": "c"}),
        ("@wait", "c", "null"),
        base_lock,
    ])


def _setup_vm(d: Path) -> None:
    for n in ("a", "b", "c", "m", "t"):
        check_ok("create", "-q", "-f", "qcow2", f"{n}.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "raw", "r.raw", "1M", cwd=d)


def test_savevm_loadvm_delvm_on_blockdev_roots(daemons: Daemons) -> None:
    """VM snapshots take the drives, then the writable -blockdev nodes no node uses (QEMU's monitor-owned
    roots); info snapshots lists their snapshots under '' (no BlockBackend), and also those of a writable
    node used as another's backing, which savevm leaves out."""
    _run(daemons, [
        "-blockdev", "driver=qcow2,node-name=qa,file.driver=file,file.filename=DIR/a.qcow2",
        "-blockdev", "driver=qcow2,node-name=qm,file.driver=file,file.filename=DIR/m.qcow2",
        "-blockdev", "driver=qcow2,node-name=qt,file.driver=file,file.filename=DIR/t.qcow2,backing=qm",
    ], [
        "info snapshots",
        "savevm s1",
        "info snapshots",
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "qc", "file": {"driver": "file", "filename": "DIR/c.qcow2"}}),
        "info snapshots",
        "loadvm s1",
        "savevm s2",
        "info snapshots",
        "delvm s1",
        "info snapshots",
        "loadvm s2",
        ("blockdev-add", {"driver": "raw", "node-name": "rr", "file": {"driver": "file", "filename": "DIR/r.raw"}}),
        "savevm s3",
        "loadvm s2",
        "delvm s2",
        ("blockdev-del", {"node-name": "rr"}),
        ("blockdev-add", {"driver": "raw", "node-name": "rr", "read-only": True,
                          "file": {"driver": "file", "filename": "DIR/r.raw"}}),
        "savevm s3",
        "info snapshots",
        ("query-named-block-nodes", {"flat": True}),
    ], setup=_setup_vm, blank_sizes=True)


def test_savevm_blockdev_nodes_after_drives(daemons: Daemons) -> None:
    """A drive comes first (it takes the VM state); a -blockdev root joins every VM snapshot."""
    _run(daemons, [
        "-blockdev", "driver=qcow2,node-name=qa,file.driver=file,file.filename=DIR/a.qcow2",
        "-drive", "file=DIR/b.qcow2,if=none,id=d0",
    ], [
        "savevm s1",
        ("blockdev-add", {"driver": "qcow2", "node-name": "qc", "file": {"driver": "file", "filename": "DIR/c.qcow2"}}),
        "info snapshots",
        "savevm s2",
        "info snapshots",
        "loadvm s1",
        "delvm s1",
        "info snapshots",
        "loadvm s2",
        ("query-named-block-nodes", {"flat": True}),
    ], setup=_setup_vm, blank_sizes=True)


def _setup_options(d: Path) -> None:
    _setup_vm(d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "ov.qcow2", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "ro.qcow2", "4M", cwd=d)
    (d / "ro.qcow2").chmod(0o444)


def test_blockdev_options_shown(daemons: Daemons) -> None:
    """cache.*, discard, detect-zeroes, auto-read-only, file options, a backing by reference (json: name),
    backing: null, force-share, next to a -drive: every query view alike."""
    _run(daemons, [
        "-blockdev", "driver=qcow2,node-name=q1,cache.direct=on,discard=unmap,detect-zeroes=unmap,file.driver=file,"
                     "file.filename=DIR/a.qcow2,file.aio=native,file.cache.direct=on",
        "-blockdev", "driver=qcow2,node-name=q2,auto-read-only=on,file.driver=file,file.filename=DIR/ro.qcow2",
        "-blockdev", "driver=raw,node-name=r1,cache.no-flush=on,detect-zeroes=on,file.driver=file,"
                     "file.filename=DIR/r.raw,file.locking=off",
        "-blockdev", "driver=file,node-name=fo,filename=DIR/ov.qcow2",
        "-blockdev", "driver=qcow2,node-name=o1,file=fo,backing=q1",
        "-drive", "file=DIR/b.qcow2,if=none,id=d0,cache=none,discard=unmap,detect-zeroes=on",
    ], [
        ("query-named-block-nodes", None),
        ("query-named-block-nodes", {"flat": True}),
        ("query-block", None),
        "info block -n",
        "info block -v",
        ("blockdev-add", {"driver": "qcow2", "node-name": "o2", "backing": None, "read-only": True,
                          "file": {"driver": "file", "filename": "DIR/ov.qcow2", "read-only": True}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "o3", "cache": {"direct": True, "no-flush": True},
                          "file": {"driver": "file", "filename": "DIR/m.qcow2"}}),
        ("blockdev-add", {"driver": "file", "node-name": "f9", "filename": "DIR/t.qcow2", "force-share": True}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "f9", "force-share": True, "auto-read-only": True,
                          "file": {"driver": "file", "filename": "DIR/t.qcow2"}}),
        ("blockdev-add", {"driver": "file", "node-name": "f9", "filename": "DIR/t.qcow2", "force-share": True,
                          "read-only": True}),
        ("query-named-block-nodes", None),
        "info block -n",
        ("x-debug-query-block-graph", None),
    ], setup=_setup_options)


def _setup_debug_graph(d: Path) -> None:
    _setup_options(d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "ov.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)


def test_x_debug_query_block_graph(daemons: Daemons) -> None:
    """Backends (drives, empty drives, NBD exports), nodes in creation order, edges with QEMU's permissions
    (root, file of raw and qcow2, read-only and writable, backing), through graph changes."""
    _run(daemons, [
        "-drive", "file=DIR/top.qcow2,if=none,id=d0",
        "-drive", "if=none,id=d1",
        "-drive", "file=DIR/r.raw,format=raw,if=none,id=d2",
        "-drive", "file=DIR/ov.qcow2,if=none,id=d3,readonly=on",
        "-blockdev", "driver=file,node-name=f,filename=DIR/b.qcow2",
        "-blockdev", "driver=qcow2,node-name=q,file=f,read-only=on",
        "-blockdev", "driver=raw,node-name=r,file=f",
        "-blockdev", "driver=qcow2,node-name=t,file.driver=file,file.filename=DIR/m.qcow2,backing=q",
    ], [
        ("x-debug-query-block-graph", None),
        ("blockdev-add", {"driver": "qcow2", "node-name": "c", "file": {"driver": "file", "filename": "DIR/c.qcow2"}}),
        ("x-debug-query-block-graph", None),
        ("blockdev-del", {"node-name": "c"}),
        ("blockdev-snapshot-sync", {"device": "d0", "snapshot-file": "DIR/s1.qcow2"}),
        ("blockdev-snapshot-sync", {"node-name": "t", "snapshot-file": "DIR/s2.qcow2", "snapshot-node-name": "s2"}),
        ("x-debug-query-block-graph", None),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/nbd.sock"}}}),
        ("nbd-server-add", {"device": "d0", "writable": True}),
        ("nbd-server-add", {"device": "d2"}),
        ("x-debug-query-block-graph", None),
        ("eject", {"device": "d3"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "fs", "read-only": True, "force-share": True,
                          "file": {"driver": "file", "filename": "DIR/c.qcow2"}}),
        ("x-debug-query-block-graph", None),
    ], setup=_setup_debug_graph)


def test_blockdev_add_inline_and_referenced_backings(daemons: Daemons) -> None:
    """A backing opened after its node (QEMU's creation order and 'Could not open backing file: ' on its
    errors, the parent's name already taken); inline ones read-only unless they say otherwise, with the
    parent's cache mode; a raw node as backing (json: name)."""
    fa = {"driver": "file", "filename": "DIR/a.qcow2"}
    ov = {"driver": "file", "filename": "DIR/ov.qcow2"}
    _run(daemons, [], [
        ("blockdev-add", {"driver": "qcow2", "node-name": "i1", "file": ov, "backing": "nonode"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "i1", "file": ov,
                          "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "DIR/nonexist"}}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "i1", "file": ov,
                          "backing": {"driver": "qcow2", "node-name": "i1", "file": fa}}),
        ("query-named-block-nodes", None),
        ("blockdev-add", {"driver": "qcow2", "node-name": "i1", "discard": "unmap", "cache": {"direct": True},
                          "file": ov, "backing": {"driver": "qcow2", "read-only": False, "file": fa}}),
        ("blockdev-del", {"node-name": "i1"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "i1", "file": ov,
                          "backing": {"driver": "qcow2", "file": fa}}),
        # the inline backing is read-only: a second one on a file i1 holds writable is refused
        ("blockdev-add", {"driver": "qcow2", "node-name": "i2", "file": {"driver": "file", "filename": "DIR/top.qcow2"},
                          "backing": {"driver": "qcow2", "node-name": "i2b", "file": ov, "backing": None}}),
        ("blockdev-add", {"driver": "raw", "node-name": "rr", "file": {"driver": "file", "filename": "DIR/r.raw"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "i3", "file": {"driver": "file", "filename": "DIR/c.qcow2"},
                          "backing": "rr"}),
        ("query-named-block-nodes", None),
        "info block -n",
        ("x-debug-query-block-graph", None),
        ("blockdev-del", {"node-name": "i2b"}),
        ("blockdev-del", {"node-name": "i1"}),
        ("query-named-block-nodes", {"flat": True}),
    ], setup=_setup_debug_graph)


def _nbd_io(export: str, cmd: str, *, ro: bool = False) -> Callable[[Path], str]:
    """qemu-io over the daemon's NBD socket (``-r`` for a read-only export); its first output line (the
    rest is timing)."""
    def run(d: Path) -> str:
        r = subprocess.run([require_tool("qemu-io"), *(["-r"] if ro else []), "-f", "raw", "-c", cmd,
                            f"nbd+unix:///{export}?socket={d}/nbd.sock"], capture_output=True, text=True,
                           timeout=60, check=False)
        return f"{r.returncode} {(r.stdout + r.stderr).splitlines()[0]}"
    run.__qualname__ = f"nbd_io({export!r}, {cmd!r})"  # the step's name in the comparison
    return run


def test_nbd_exports_of_blockdev_nodes(daemons: Daemons) -> None:
    """nbd-server-add / block-export-add of -blockdev nodes (QEMU's unnamed BlockBackend): writes and
    reads through NBD, QEMU's refusals, blockdev-del while exported, the backends in the debug graph;
    the images alike afterwards."""
    trees = _run(daemons, [
        "-blockdev", "driver=qcow2,node-name=q1,file.driver=file,file.filename=DIR/a.qcow2",
        "-blockdev", "driver=raw,node-name=rr,file.driver=file,file.filename=DIR/r.raw",
        "-blockdev", "driver=qcow2,node-name=qr,read-only=on,file.driver=file,file.filename=DIR/b.qcow2",
    ], [
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/nbd.sock"}}}),
        ("nbd-server-add", {"device": "q1", "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "q1"}),
        ("block-export-add", {"type": "nbd", "id": "e3", "node-name": "qr", "writable": True}),
        ("nbd-server-add", {"device": "qr", "writable": True}),
        lock_bytes,
        ("block-export-add", {"type": "nbd", "id": "rr", "node-name": "rr", "writable": True}),
        ("query-block-exports", None),
        lock_bytes,
        _nbd_io("q1", "write -P 0x5a 0 64k"),
        _nbd_io("q1", "read -P 0x5a 0 64k"),
        _nbd_io("rr", "write -P 0x11 4k 4k"),
        _nbd_io("rr", "read -P 0x11 4k 4k"),
        _nbd_io("qr", "write -P 0x11 4k 4k"),
        ("blockdev-del", {"node-name": "q1"}),
        ("x-debug-query-block-graph", None),
        ("nbd-server-remove", {"name": "q1"}),
        ("blockdev-del", {"node-name": "q1"}),
        ("block-export-del", {"id": "rr"}),
        ("query-block-exports", None),
        lock_bytes,
        ("query-named-block-nodes", None),
    ], setup=_setup_debug_graph, blank_sizes=True, quit=True)
    for name, fmt in (("a.qcow2", "qcow2"), ("r.raw", "raw")):
        check_ok("compare", "-f", fmt, "-F", fmt, str(trees["qemu"] / name), str(trees["vdkit"] / name))


def test_nbd_export_follows_external_snapshots_of_blockdev_nodes(daemons: Daemons) -> None:
    """An exported -blockdev node snapshotted (sync, then onto a blockdev-add overlay): the export's backend
    moves to the overlay as QEMU's BlockBackend does, writes land there; the sync overlay is the backend's
    alone (blockdev-del: in use) and goes with the last export."""
    trees = _run(daemons, ["-blockdev", "driver=qcow2,node-name=q1,file.driver=file,file.filename=DIR/a.qcow2"], [
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/nbd.sock"}}}),
        ("nbd-server-add", {"device": "q1", "writable": True}),
        ("blockdev-snapshot-sync", {"node-name": "q1", "snapshot-file": "DIR/s1.qcow2", "snapshot-node-name": "s1"}),
        ("query-block-exports", None),
        _nbd_io("q1", "write -P 0x5a 0 64k"),
        ("query-named-block-nodes", None),
        ("blockdev-del", {"node-name": "s1"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "o2", "backing": None,
                          "file": {"driver": "file", "filename": "DIR/c.qcow2"}}),
        ("blockdev-snapshot", {"node": "s1", "overlay": "o2"}),
        ("query-block-exports", None),
        lock_bytes,
        _nbd_io("q1", "write -P 0x6b 64k 64k"),
        _nbd_io("q1", "read -P 0x5a 0 64k"),
        ("x-debug-query-block-graph", None),
        "info block -n",
        ("nbd-server-remove", {"name": "q1"}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-del", {"node-name": "o2"}),
        ("nbd-server-add", {"device": "q1", "writable": True}),
        ("blockdev-snapshot-sync", {"node-name": "q1", "snapshot-file": "DIR/s3.qcow2", "snapshot-node-name": "s3"}),
        ("nbd-server-stop", None),
        ("query-named-block-nodes", {"flat": True}),
    ], setup=_setup_debug_graph, blank_sizes=True, quit=True)
    for name in ("a.qcow2", "s1.qcow2", "c.qcow2"):
        check_ok("compare", "-f", "qcow2", "-F", "qcow2", str(trees["qemu"] / name), str(trees["vdkit"] / name))


def test_block_resize_refused_under_an_export(daemons: Daemons) -> None:
    """An NBD export's backend refuses to share resize (QEMU's permission conflict), for a drive, its node
    and a -blockdev node; once the export is gone the resize goes through."""
    _run(daemons, [
        "-drive", "file=DIR/a.qcow2,if=none,id=d0,node-name=dn",
        "-blockdev", "driver=raw,node-name=rr,file.driver=file,file.filename=DIR/r.raw",
    ], [
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/nbd.sock"}}}),
        ("nbd-server-add", {"device": "d0", "writable": True}),
        ("nbd-server-add", {"device": "rr"}),
        ("block_resize", {"device": "d0", "size": 8388608}),
        ("block_resize", {"node-name": "dn", "size": 8388608}),
        "block_resize d0 16M",
        ("block_resize", {"node-name": "rr", "size": 2097152}),
        ("nbd-server-stop", None),
        ("block_resize", {"device": "d0", "size": 8388608}),
        ("block_resize", {"node-name": "rr", "size": 2097152}),
        ("query-named-block-nodes", None),
    ], setup=_setup_debug_graph, blank_sizes=True)




_WRITABLE = ("vpc", "vdi", "vhdx", "qed", "parallels", "vmdk")
_READ_ONLY = ("bochs", "cloop", "dmg")


def _setup_formats(d: Path) -> None:
    from tests.formats.images import bochs_image, cloop_image, dmg_image

    check_ok("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    for fmt in _WRITABLE:
        check_ok("create", "-q", "-f", fmt, f"img.{fmt}", "4M", cwd=d)
    check_ok("create", "-q", "-f", "qed", "-b", "base.qcow2", "-F", "qcow2", "top.qed", cwd=d)
    check_ok("create", "-q", "-f", "vmdk", "-b", "img.vmdk", "-F", "vmdk", "top.vmdk", cwd=d)
    disk = bytes(range(256)) * 4096
    bochs_image(d / "img.bochs", disk)
    cloop_image(d / "img.cloop", disk)
    dmg_image(d / "img.dmg", disk)


def _node(fmt: str, name: str, file: str, **more: object) -> tuple[str, dict[str, object]]:
    return ("blockdev-add", {"driver": fmt, "node-name": name, **more,
                             "file": {"driver": "file", "filename": f"DIR/{file}"}})


def test_blockdev_add_of_every_format(daemons: Daemons) -> None:
    """Every format of the registry but luks opens as a -blockdev / blockdev-add node, as in QEMU (its
    schema: a file child, and a backing one for qed and vmdk; the read-only formats refuse a writable
    node): nodes and their info, graph, lock bytes, writes through an NBD export read back, files alike.
    Not compared: a vmdk with extent files of its own (QEMU opens each as an ``extents.N`` child node,
    which vdkit's graph does not draw; the same holds for a qcow2 data file)."""
    trees = _run(daemons, ["-blockdev", "driver=vpc,node-name=cl,file.driver=file,file.filename=DIR/img.vpc"], [
        ("blockdev-del", {"node-name": "cl"}),
        *(_node(fmt, f"n{fmt}", f"img.{fmt}") for fmt in _WRITABLE + _READ_ONLY),
        *(_node(fmt, f"n{fmt}", f"img.{fmt}", **{"read-only": True}) for fmt in _READ_ONLY),
        _node("qed", "tq", "top.qed"),
        _node("vmdk", "tv", "top.vmdk", backing=None),
        _node("vpc", "x", "img.vpc", backing=None),
        ("query-named-block-nodes", None),
        ("x-debug-query-block-graph", None),
        lock_bytes,
        "info block -n",
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "DIR/nbd.sock"}}}),
        *(("nbd-server-add", {"device": n, "writable": n[1:] not in _READ_ONLY}) for n in ("nvpc", "tq", "ndmg")),
        *(_nbd_io(n, "write -P 0x5a 64k 64k") for n in ("nvpc", "tq", "ndmg")),
        *(_nbd_io(n, "read -P 0x5a 64k 64k") for n in ("nvpc", "tq")),
        _nbd_io("ndmg", "read -v 510 4", ro=True),
        *(("nbd-server-remove", {"name": n}) for n in ("nvpc", "tq", "ndmg")),
        *(("blockdev-del", {"node-name": n}) for n in ("nvpc", "tq", "ndmg")),
        ("query-named-block-nodes", {"flat": True}),
    ], setup=_setup_formats, quit=True, mask=re.compile(r'(?<="cid": )\d+|(?<="parent-cid": )\d+'))
    for name, fmt in (("img.vpc", "vpc"), ("top.qed", "qed")):  # vmdk's CIDs are qemu-img create's own
        check_ok("compare", "-f", fmt, "-F", fmt, str(trees["qemu"] / name), str(trees["vdkit"] / name))
