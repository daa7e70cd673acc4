"""Block jobs against ``qemu-system-x86_64`` 7.2 (``block-jobs.md`` §3-§5, §9): block-stream, block-commit
(intermediate and active), the job control verbs, queries and events.

Both daemons get the same script on identical trees (``qemu/`` and ``vdki/``).  Jobs are held still with
``speed: 1`` and ``block-job-pause`` (never with sleeps): the script waits for a job's status events
before it queries.  Answers are compared after masking the tree path and automatic node names; the
events are compared as one sequence in order (without time stamps, whose interleaving with answers is
not deterministic in QEMU either).  After ``quit`` the files are compared: ``qemu-img info
--backing-chain`` of the active image and ``qemu-img compare`` of each image with QEMU's.
"""

from __future__ import annotations

import difflib
import re
import subprocess
from functools import partial
from pathlib import Path

from tests.conftest import check_ok, require_tool
from tests.daemon.conftest import Daemons
from tests.helpers.qemu_io import qemu_io_script
from tests.helpers.qmp_script import run_script

MiB = 1 << 20


def setup_chain(d: Path) -> None:
    """base (1 MiB at 0) <- mid (64 KiB at 0, 1 MiB at 1 MiB, zeros at 3 MiB) <- top (1 MiB at 2 MiB), 4 MiB,
    relative header names."""
    check_ok("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
    qemu_io_script(d, "base.qcow2", ["write -P 0x11 0 1M"], "qcow2")
    # the first step of every job copies 64 KiB: held there
    qemu_io_script(d, "mid.qcow2", ["write -P 0x22 0 64k"], "qcow2")
    qemu_io_script(d, "mid.qcow2", ["write -P 0x22 1M 1M"], "qcow2")
    qemu_io_script(d, "mid.qcow2", ["write -z 3M 64k"], "qcow2")
    qemu_io_script(d, "top.qcow2", ["write -P 0x33 2M 1M"], "qcow2")
    check_ok("create", "-q", "-f", "qcow2", "other.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "spare.qcow2", "4M", cwd=d)


def _blank_sizes(text: str) -> str:
    """Allocated file sizes vary by a block between runs of QEMU itself (host allocation): blanked."""
    return re.sub(r'"actual-size": \d+', '"actual-size": N', text)


run_jobs = partial(run_script, setup=setup_chain, quit=True, events=True, qmp_filter=_blank_sizes)
"""``run_script`` with the job suite's chain, answers and events compared, both processes quit at the end;
``mask=``: timing-dependent values of QEMU's (e.g. how far a paused job got)."""


def same_files(trees: dict[str, Path], active: str, names: list[str]) -> None:
    """``qemu-img info --backing-chain`` of the active image alike; every image's content equal to QEMU's."""
    info = {}
    for who, d in trees.items():
        r = subprocess.run([require_tool("qemu-img"), "info", "--backing-chain", active], cwd=d,
                           capture_output=True, text=True, check=False)
        text = re.sub(r"disk size: .*", "disk size: N", r.stdout)  # host allocation varies by a block
        info[who] = (r.returncode, text.replace(str(d), "DIR"), r.stderr.replace(str(d), "DIR"))
    diff = "".join(difflib.unified_diff(info["qemu"][1].splitlines(True), info["vdkit"][1].splitlines(True)))
    assert info["vdkit"] == info["qemu"], diff
    for name in names:
        for who in ("qemu", "vdkit"):
            r = subprocess.run([require_tool("qemu-img"), "check", name], cwd=trees[who], capture_output=True,
                               text=True, check=False)
            assert r.returncode == 0, (who, name, r.stdout, r.stderr)
        r = subprocess.run([require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "qcow2", "-s",
                            str(trees["qemu"] / name), str(trees["vdkit"] / name)],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, (name, r.stdout, r.stderr)


DRIVE = ["-drive", "file=DIR/top.qcow2,if=none,id=disk0", "-drive", "file=DIR/other.qcow2,if=none,id=disk1"]
HELD = ("query-block-jobs", None)


def test_intermediate_commit_held_and_resumed(daemons: Daemons) -> None:
    trees = run_jobs(daemons, DRIVE, [
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "base": "DIR/base.qcow2", "speed": 1}),
        ("block-job-pause", {"device": "disk0"}),
        ("@wait", "disk0", "paused"),
        HELD,
        ("query-jobs", None),
        ("block-job-pause", {"device": "disk0"}),
        ("block-job-complete", {"device": "disk0"}),
        ("block-job-cancel", {"device": "disk0"}),
        ("block-job-set-speed", {"device": "disk0", "speed": -1}),
        ("block-job-set-speed", {"device": "nojob", "speed": 0}),
        ("job-pause", {"id": "nojob"}),
        ("block-job-finalize", {"id": "disk0"}),
        ("job-dismiss", {"id": "disk0"}),
        ("block-job-set-speed", {"device": "disk0", "speed": 0}),
        HELD,
        ("block-job-resume", {"device": "disk0"}),
        ("@wait", "disk0", "null"),
        ("block-job-resume", {"device": "disk0"}),
        HELD,
        ("query-block", None),
    ])
    same_files(trees, "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"])


def test_stream_to_base_and_whole_chain(daemons: Daemons) -> None:
    trees = run_jobs(daemons, DRIVE, [
        ("block-stream", {"device": "disk0", "base": "DIR/base.qcow2", "job-id": "s1"}),
        ("@wait", "s1", "null"),
        ("query-block", None),
        ("block-stream", {"device": "disk0", "base": "DIR/base.qcow2", "job-id": "s2"}),
        ("@wait", "s2", "null"),
        ("block-stream", {"device": "disk1", "job-id": "s3", "speed": 1}),
        ("@wait", "s3", "null"),
        ("block-stream", {"device": "disk0", "job-id": "s4", "speed": 1}),
        ("block-job-pause", {"device": "s4"}),
        ("@wait", "s4", "paused"),
        HELD,
        ("block-stream", {"device": "disk0", "job-id": "s5"}),
        ("block-commit", {"device": "disk0", "job-id": "s5"}),
        ("block-job-cancel", {"device": "s4", "force": True}),
        ("@wait", "s4", "null"),
        ("block-stream", {"device": "disk0", "job-id": "s6", "auto-dismiss": False}),
        ("@wait", "s6", "concluded"),
        ("query-jobs", None),
        ("job-dismiss", {"id": "s6"}),
        ("query-block", None),
    ])
    same_files(trees, "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"])


def test_active_commit_complete_and_manual_finalize(daemons: Daemons) -> None:
    trees = run_jobs(daemons, DRIVE, [
        ("block-commit", {"device": "disk0", "auto-finalize": False, "auto-dismiss": False}),
        ("@wait", "disk0", "ready"),
        HELD,
        ("job-finalize", {"id": "disk0"}),
        ("job-dismiss", {"id": "disk0"}),
        ("block-job-pause", {"device": "disk0"}),
        ("@wait", "disk0", "standby"),
        ("block-job-complete", {"device": "disk0"}),  # accepted in standby: done once resumed
        ("block-job-resume", {"device": "disk0"}),
        ("@wait", "disk0", "pending"),
        HELD,
        ("job-dismiss", {"id": "disk0"}),
        ("job-finalize", {"id": "disk0"}),
        ("query-jobs", None),
        ("job-dismiss", {"id": "disk0"}),
        ("job-dismiss", {"id": "disk0"}),
        ("query-block", None),
    ])
    same_files(trees, "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"])


def test_active_commit_cancelled_when_ready(daemons: Daemons) -> None:
    trees = run_jobs(daemons, DRIVE, [
        ("block-commit", {"device": "disk0", "base": "DIR/mid.qcow2", "job-id": "ac"}),
        ("@wait", "ac", "ready"),
        ("block-job-cancel", {"device": "ac"}),
        ("@wait", "ac", "null"),
        ("query-block", None),
        ("block-commit", {"device": "disk0", "base": "mid.qcow2", "job-id": "ac2"}),
        ("@wait", "ac2", "ready"),
        ("block-job-cancel", {"device": "ac2", "force": True}),
        ("@wait", "ac2", "null"),
        ("query-block", None),
    ])
    same_files(trees, "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"])


def test_commit_and_stream_errors(daemons: Daemons) -> None:
    run_jobs(daemons, DRIVE, [
        ("block-commit", {}),
        ("block-commit", {"device": "nodev"}),
        ("block-commit", {"device": "disk0", "base": "x", "base-node": "y"}),
        ("block-commit", {"device": "disk0", "top": "x", "top-node": "y"}),
        ("block-commit", {"device": "disk0", "top-node": "nonode"}),
        ("block-commit", {"device": "disk0", "base-node": "nonode"}),
        ("block-commit", {"device": "disk0", "top": "DIR/nonexist.qcow2"}),
        ("block-commit", {"device": "disk0", "top": "nosuch/mid.qcow2"}),
        ("block-commit", {"device": "disk0", "top": "DIR/base.qcow2"}),
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "base": "DIR/top.qcow2"}),
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "base": "DIR/mid.qcow2"}),
        ("block-commit", {"device": "disk0", "base": "DIR/nonexist.qcow2"}),
        ("block-commit", {"device": "disk0", "backing-file": "x.qcow2"}),
        ("block-commit", {"device": "disk0", "job-id": "#bad"}),
        ("block-commit", {"device": "disk0", "speed": -1}),
        ("block-commit", {"device": "disk1"}),
        ("block-stream", {"device": "nodev"}),
        ("block-stream", {"device": "disk0", "base": "DIR/nonexist.qcow2"}),
        ("block-stream", {"device": "disk0", "base": "DIR/top.qcow2"}),
        ("block-stream", {"device": "disk0", "base-node": "nonode"}),
        ("block-stream", {"device": "disk0", "base": "a", "base-node": "b"}),
        ("block-stream", {"device": "disk0", "bottom": "a", "base-node": "b"}),
        ("block-stream", {"device": "disk0", "backing-file": "x.qcow2"}),
        ("block-stream", {"device": "disk0", "job-id": "#bad"}),
        ("block-stream", {"device": "disk0", "speed": -1, "job-id": "neg"}),
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "speed": 1, "job-id": "c1"}),
        ("block-job-pause", {"device": "c1"}),
        ("@wait", "c1", "paused"),
        ("block-commit", {"device": "disk0", "job-id": "#bad"}),
        ("block-stream", {"device": "disk0"}),
        ("block-stream", {"device": "disk1", "job-id": "c1"}),
        ("block-commit", {"device": "disk1", "job-id": "c1"}),
        ("block-job-cancel", {"device": "c1"}),
        ("block-job-cancel", {"device": "c1", "force": True}),
        ("@wait", "c1", "null"),
        ("query-block-jobs", None),
    ])


def test_hmp_job_commands(daemons: Daemons) -> None:
    """HMP: info block-jobs, block_stream, block_job_* (speed in MiB by default), the offline commit."""
    trees = run_jobs(daemons, DRIVE, [
        "info block-jobs",
        "block_stream disk0 1B",
        "block_job_pause disk0",
        ("@wait", "disk0", "paused"),
        "info block-jobs",
        "block_stream disk0",
        "block_stream nodev",
        "block_job_set_speed disk0 x",
        "block_job_set_speed disk0 -1",
        "block_job_set_speed disk0 1.5",
        "info block-jobs",
        "block_job_complete disk0",
        "block_job_cancel disk0",
        "block_job_resume nojob",
        "block_job_cancel -f disk0",
        ("@wait", "disk0", "null"),
        "info block-jobs",
        "block_job_pause disk0",
        "commit nodev",
        "commit disk1",
        "commit disk0",
        "commit all",
        ("query-block", None),
        "help block_job_cancel",
        "help block_stream",
        "help commit",
        "help block_job_set_speed",
    ])
    same_files(trees, "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"])


THROTTLE = {"device": "disk0", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}


def test_conflicts_while_a_job_runs(daemons: Daemons) -> None:
    """§8: what other commands answer while a (paused) commit job holds the drive; afterwards they work."""
    run_jobs(daemons, DRIVE, [
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "speed": 1}),
        ("block-job-pause", {"device": "disk0"}),
        ("@wait", "disk0", "paused"),
        ("block-commit", {"device": "disk0", "job-id": "x"}),
        ("block-stream", {"device": "disk0", "job-id": "x"}),
        ("blockdev-snapshot-internal-sync", {"device": "disk0", "name": "i1"}),
        ("blockdev-snapshot-sync", {"device": "disk0", "snapshot-file": "DIR/s1.qcow2"}),
        ("eject", {"device": "disk0"}),
        ("eject", {"device": "disk0", "force": True}),
        ("block_resize", {"device": "disk0", "size": 8 * MiB}),
        ("block_set_io_throttle", THROTTLE),
        ("blockdev-change-medium", {"device": "disk0", "filename": "DIR/other.qcow2"}),
        ("blockdev-change-medium", {"device": "disk0", "filename": "DIR/spare.qcow2"}),
        "change disk0 DIR/spare.qcow2",
        ("blockdev-snapshot-sync", {"device": "disk1", "snapshot-file": "DIR/s2.qcow2"}),
        ("transaction", {"actions": []}),
        "info block-jobs",
        ("query-block", None),
        ("block-job-cancel", {"device": "disk0", "force": True}),
        ("@wait", "disk0", "null"),
        ("eject", {"device": "disk0"}),
        ("block_resize", {"device": "disk0", "size": 8 * MiB}),
        ("block_set_io_throttle", THROTTLE),
    ])


def test_running_job_drains(daemons: Daemons) -> None:
    """A running (rate-limited) job is paused and resumed by a transaction's drain: the event pairs.
    A job still running at quit is cancelled (after a drain) and its events still reach the client."""
    run_jobs(daemons, DRIVE, [
        ("block-stream", {"device": "disk0", "speed": 1}),
        ("blockdev-snapshot-sync", {"device": "disk0", "snapshot-file": "DIR/s1.qcow2"}),
        ("block-job-pause", {"device": "disk0"}),
        ("@wait", "disk0", "paused"),
        ("blockdev-snapshot-sync", {"device": "disk1", "snapshot-file": "DIR/s2.qcow2"}),
        ("block-job-cancel", {"device": "disk0", "force": True}),
        ("@wait", "disk0", "null"),
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "speed": 1, "job-id": "left"}),
    ])


NODES = ("query-named-block-nodes", None)
FLAT = ("query-named-block-nodes", {"flat": True})


def test_filter_nodes_while_jobs_run(daemons: Daemons) -> None:
    """§1.2: commit_top / copy-on-read / mirror_top listed (newest first) while a job holds the chain."""
    run_jobs(daemons, DRIVE, [
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "speed": 1, "job-id": "c"}),
        ("block-job-pause", {"device": "c"}),
        ("@wait", "c", "paused"),
        "info block -n",
        NODES,
        FLAT,
        ("query-block", None),
        ("block-job-cancel", {"device": "c", "force": True}),
        ("@wait", "c", "null"),
        "info block -n",
        ("block-stream", {"device": "disk0", "base": "DIR/base.qcow2", "speed": 1, "job-id": "s"}),
        ("block-job-pause", {"device": "s"}),
        ("@wait", "s", "paused"),
        "info block -n",
        NODES,
        ("query-block", None),
        ("block-job-cancel", {"device": "s", "force": True}),
        ("@wait", "s", "null"),
        ("block-commit", {"device": "disk0", "speed": 1, "job-id": "a"}),
        ("block-job-pause", {"device": "a"}),
        ("@wait", "a", "paused"),
        "info block -n",
        ("query-block", None),  # the job's anonymous dirty bitmap, listed without a name
        NODES,
        FLAT,
        ("block-job-cancel", {"device": "a", "force": True}),
        ("@wait", "a", "null"),
        ("query-block", None),  # and gone with the job
    ], mask=_ACTIVE_COMMIT_COUNT)


# QEMU's active commit may take a pause that came at once while it is still filling its dirty bitmap (the
# first allocated run marked, len still 0) or after its first step: how far the paused job got is timing
_ACTIVE_COMMIT_COUNT = re.compile(r'(?<="granularity": 65536, )"count": \d+|"len": \d+, "offset": \d+')


def test_jobs_on_a_snapshot_on_drive(daemons: Daemons) -> None:
    """snapshot=on: HMP commit writes the temporary overlay into the image; an active commit pivots off it."""
    trees = run_jobs(daemons, ["-drive", "file=DIR/top.qcow2,if=none,id=disk0,snapshot=on"], [
        "commit disk0",
        ("block-commit", {"device": "disk0", "base": "DIR/mid.qcow2", "job-id": "ac"}),
        ("@wait", "ac", "ready"),
        ("block-job-complete", {"device": "ac"}),
        ("@wait", "ac", "null"),
        ("query-block", None),
        "info block -n",
    ])
    same_files(trees, "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"])


BLOCKDEV = [
    "-blockdev", "driver=file,node-name=f-base,filename=DIR/base.qcow2",
    "-blockdev", "driver=qcow2,node-name=n-base,file=f-base,read-only=on",
    "-blockdev", "driver=file,node-name=f-ro,filename=DIR/other.qcow2,read-only=on",
    "-blockdev", "driver=qcow2,node-name=n-ro,file=f-ro,read-only=on",
    "-blockdev", "driver=qcow2,node-name=n-ov,file.driver=file,file.filename=DIR/spare.qcow2,backing=n-ro",
    "-blockdev", "driver=qcow2,node-name=n-mid,file.driver=file,file.filename=DIR/mid.qcow2,backing=n-base",
    "-blockdev", "driver=qcow2,node-name=n-top,file.driver=file,file.filename=DIR/top.qcow2,backing=n-mid",
]


def test_jobs_on_blockdev_nodes(daemons: Daemons) -> None:
    """§4.3: jobs on -blockdev chains (node names, no backend: an explicit job-id is needed)."""
    trees = run_jobs(daemons, BLOCKDEV, [
        ("block-commit", {"device": "n-top", "top-node": "n-top", "base-node": "n-mid"}),
        ("block-commit", {"device": "n-mid", "job-id": "x"}),
        ("block-commit", {"device": "n-ov", "job-id": "ro"}),
        ("block-commit", {"device": "n-top", "top-node": "n-top", "base-node": "n-mid", "job-id": "ac"}),
        ("@wait", "ac", "ready"),
        ("query-block-jobs", None),
        ("block-stream", {"device": "n-top", "job-id": "s"}),
        ("blockdev-del", {"node-name": "n-top"}),
        ("block-job-complete", {"device": "ac"}),
        ("@wait", "ac", "null"),
        "info block -n",
        ("block-stream", {"device": "n-top", "base-node": "n-base", "job-id": "s", "speed": 1}),
        ("block-job-pause", {"device": "s"}),
        ("@wait", "s", "paused"),
        HELD,
        ("block-job-set-speed", {"device": "s", "speed": 0}),
        ("block-job-resume", {"device": "s"}),
        ("@wait", "s", "null"),
        "info block -n",
        ("query-named-block-nodes", {"flat": True}),
    ])
    same_files(trees, "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"])


def test_stream_bottom_on_blockdev_chain(daemons: Daemons) -> None:
    trees = run_jobs(daemons, BLOCKDEV, [
        ("block-stream", {"device": "n-top", "bottom": "nonode", "job-id": "b"}),
        ("block-stream", {"device": "n-top", "bottom": "n-ro", "job-id": "b"}),
        ("block-stream", {"device": "n-top", "bottom": "n-mid", "base": "x", "job-id": "b"}),
        ("block-stream", {"device": "n-top", "base-node": "n-ro", "job-id": "b"}),
        ("block-stream", {"device": "n-top", "base-node": "n-top", "job-id": "b"}),
        ("block-stream", {"device": "n-mid", "job-id": "m", "speed": 1}),  # into a backing node
        ("block-job-pause", {"device": "m"}),
        ("@wait", "m", "paused"),
        "info block -n",
        ("block-stream", {"device": "n-top", "bottom": "n-mid", "job-id": "b"}),
        ("block-commit", {"device": "n-top", "job-id": "c"}),
        ("block-job-set-speed", {"device": "m", "speed": 0}),
        ("block-job-resume", {"device": "m"}),
        ("@wait", "m", "null"),
        "info block -n",
        ("block-stream", {"device": "n-top", "bottom": "n-mid", "job-id": "b"}),
        ("@wait", "b", "null"),
        "info block -n",
    ])
    same_files(trees, "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"])


def test_backing_file_strings(daemons: Daemons) -> None:
    """backing-file is written verbatim (even a name that does not exist); the node then has a json: name."""
    trees = run_jobs(daemons, DRIVE, [
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "backing-file": "custom-name.qcow2",
                          "job-id": "c"}),
        ("@wait", "c", "null"),
        ("query-block", None),
        "info block -n",
        # a json: node's header name is resolved against its file's folder: custom-name.qcow2 is no file
        ("block-stream", {"device": "disk0", "base": "DIR/base.qcow2", "job-id": "s"}),
        ("@wait", "s", "null"),
        ("query-block", None),  # the header now names the base's filename: a plain name again
        ("block-stream", {"device": "disk0", "base": "custom-name.qcow2", "backing-file": "base.qcow2",
                          "job-id": "t"}),
    ])
    same_files(trees, "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"])


def test_jobs_on_a_read_only_drive(daemons: Daemons) -> None:
    """QEMU reopens the nodes a job writes read-write, also below a read-only drive."""
    trees = run_jobs(daemons, ["-drive", "file=DIR/top.qcow2,if=none,id=disk0,readonly=on"], [
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "job-id": "c", "speed": 1}),
        ("block-job-cancel", {"device": "c", "force": True}),
        ("@wait", "c", "null"),
        "commit disk0",
        ("block-stream", {"device": "disk0", "base": "DIR/base.qcow2", "job-id": "s"}),
        ("@wait", "s", "null"),
        ("query-block", None),
        ("block-commit", {"device": "disk0", "job-id": "p"}),
        ("@wait", "p", "ready"),
        ("block-job-complete", {"device": "p"}),
        ("@wait", "p", "null"),
        ("query-block", None),
        "info block -n",
    ])
    same_files(trees, "top.qcow2", ["top.qcow2", "mid.qcow2", "base.qcow2"])


def test_stop_drains_jobs(daemons: Daemons) -> None:
    """stop (of a running VM) drains after STOP: a running job pauses, resumes and takes a step; cont does not."""
    run_jobs(daemons, DRIVE, [
        ("stop", None),
        ("cont", None),
        ("block-stream", {"device": "disk0", "speed": 1, "job-id": "s"}),
        ("stop", None),  # (a query now would catch QEMU's kicked step in flight or not: not compared)
        ("cont", None),
        ("stop", None),
        ("block-job-pause", {"device": "s"}),
        ("@wait", "s", "paused"),
        ("cont", None),
        HELD,
        ("block-job-cancel", {"device": "s", "force": True}),
        ("@wait", "s", "null"),
    ])


def test_job_verbs_by_their_job_names(daemons: Daemons) -> None:
    """job-* and block-job-* spellings on ready and concluded jobs (job-cancel is a forced cancel)."""
    run_jobs(daemons, DRIVE, [
        ("block-commit", {"device": "disk0", "job-id": "a", "auto-dismiss": False}),
        ("@wait", "a", "ready"),
        ("job-pause", {"id": "a"}),
        ("@wait", "a", "standby"),
        ("job-pause", {"id": "a"}),
        ("job-resume", {"id": "a"}),
        ("@wait", "a", "ready"),
        ("job-resume", {"id": "a"}),
        ("job-cancel", {"id": "a"}),
        ("@wait", "a", "concluded"),
        ("query-block-jobs", None),
        ("query-jobs", None),
        ("block-job-cancel", {"device": "a"}),
        ("job-dismiss", {"id": "a"}),
        ("block-commit", {"device": "disk0", "job-id": "b", "auto-finalize": False}),
        ("@wait", "b", "ready"),
        ("job-complete", {"id": "b"}),
        ("@wait", "b", "pending"),
        ("block-job-finalize", {"id": "b"}),
        ("@wait", "b", "null"),
        ("block-job-dismiss", {"id": "b"}),
        ("job-finalize", {"id": "nojob"}),
        ("query-block", None),
    ])


def test_filter_node_names(daemons: Daemons) -> None:
    """filter-node-name: checked as QEMU checks it (for an intermediate commit after the job was created),
    the filter listed under it, and the name free again once the job is gone."""
    run_jobs(daemons, DRIVE, [
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "filter-node-name": "#bad", "job-id": "a"}),
        ("block-commit", {"device": "disk0", "filter-node-name": "#bad", "job-id": "#a"}),
        ("block-stream", {"device": "disk0", "filter-node-name": "#bad", "job-id": "#b"}),
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "filter-node-name": "disk1", "job-id": "a"}),
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "speed": 1, "filter-node-name": "f1",
                          "job-id": "c"}),
        ("block-job-pause", {"device": "c"}),
        ("@wait", "c", "paused"),
        "info block -n",
        ("block-stream", {"device": "disk1", "filter-node-name": "f1", "job-id": "d"}),
        ("block-job-cancel", {"device": "c", "force": True}),
        ("@wait", "c", "null"),
        ("block-stream", {"device": "disk0", "filter-node-name": "f1", "job-id": "e", "speed": 1}),
        ("block-job-pause", {"device": "e"}),
        ("@wait", "e", "paused"),
        "info block -n",
        ("block-job-cancel", {"device": "e", "force": True}),
        ("@wait", "e", "null"),
    ])


def _snapshots(d: Path, name: str) -> list[tuple[str, str]]:
    """(tag, VM size) of each internal snapshot of an image (dates and clocks differ by run)."""
    r = subprocess.run([require_tool("qemu-img"), "snapshot", "-l", "-U", name], cwd=d, capture_output=True,
                       text=True, check=True)
    return [(line.split()[1], line.split()[2] + line.split()[3]) for line in r.stdout.splitlines()[2:]]


def test_savevm_during_a_commit(daemons: Daemons) -> None:
    """§8: savevm is not refused during a job; it also snapshots the commit base the job holds writable."""
    trees = run_jobs(daemons, DRIVE, [
        ("block-commit", {"device": "disk0", "top": "DIR/mid.qcow2", "speed": 1, "job-id": "c"}),
        ("block-job-pause", {"device": "c"}),
        ("@wait", "c", "paused"),
        "savevm s1",
        ("block-job-cancel", {"device": "c", "force": True}),
        ("@wait", "c", "null"),
        "delvm s1",
    ])
    for name in ("top.qcow2", "mid.qcow2", "base.qcow2", "other.qcow2"):
        q, v = _snapshots(trees["qemu"], name), _snapshots(trees["vdkit"], name)
        assert [t for t, _ in v] == [t for t, _ in q], name
        if name == "base.qcow2":  # no VM state there (the active images' sizes differ: vdkit's own state)
            assert v == q == [("s1", "0B")]
