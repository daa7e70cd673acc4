"""Block jobs meeting real I/O errors, against qemu-system-x86_64: blkdebug rules under a job's source or target.

Both daemons run the same chain (``test_mirror_diff``'s base/mid/top) with the same blkdebug rules
(``vdkit.protocols.blkdebug``): a ``read_aio`` rule under the drive's active image (``-drive
file=blkdebug:CONF:DIR/top.qcow2``), ``write_aio`` rules under targets added with ``blockdev-add``.  Each
job runs under one ``on-*-error`` policy (report, stop, enospc, ignore); compared: the events in order
(a run of identical BLOCK_JOB_ERRORs counted once: QEMU's parallel requests fail each), ``query-block-jobs``
while a stopped job waits (``io-status``), the answers of resume/complete/cancel, and the files afterwards
(``qemu-img compare`` across the runs and with what was copied, ``qemu-img info --backing-chain``).
Offsets are masked only where QEMU's parallel requests make them vary (a failed job's last progress).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import qemu_img, qemu_io
from tests.daemon.conftest import Daemons
from tests.daemon.test_mirror_diff import Pair, _error_events, _wait

_OFFSET = re.compile(r'"offset": \d+')
_ONCE = '[inject-error]\nevent = "read_aio"\nerrno = "5"\nonce = "on"\n'


def _same_events(p: Pair, *, mask_offsets: bool) -> list[str]:
    def mask(e: str) -> str:
        return _OFFSET.sub('"offset": N', e) if mask_offsets else e

    q, v = (_error_events(m, d, mask) for m, d in zip(p.mons, p.dirs, strict=True))
    assert v == q, "\n".join(["qemu:", *q, "vdkit:", *v])
    return q


def _wait_status(p: Pair, status: str, count: int = 1) -> None:
    for m in p.mons:
        _wait(m, "JOB_STATUS_CHANGE", count, status=status)


def _ended(p: Pair, *, mask_offsets: bool) -> None:
    """The job gone in both (status null: concluded and dismissed), its events alike."""
    _wait_status(p, "null")
    _same_events(p, mask_offsets=mask_offsets)


def _resume_stopped(p: Pair, job: str, *, mask: re.Pattern[str] | None = None, paused: int = 1) -> None:
    """A job its error policy stopped: paused in both (the ``paused``-th time), its query-block-jobs
    entry alike (io-status; ``mask``: what QEMU's parallel requests make differ), then resumed."""
    _wait_status(p, "paused", paused)
    p.same("query-block-jobs", mask=mask)
    p.same("block-job-resume", {"device": job})


# (command, arguments, what the job does after its one failed read: "stop" (paused, resumed), "ready"
# (then completed), "done" (finishes by itself), "fail"), the files to compare afterwards
SOURCE_CASES: list[tuple[str, dict[str, Any], str, tuple[str, ...]]] = [
    ("drive-mirror", {"target": "DIR/o.qcow2", "sync": "full", "on-source-error": "stop"}, "stop", ("o.qcow2",)),
    ("drive-mirror", {"target": "DIR/o.qcow2", "sync": "full"}, "fail", ("top.qcow2",)),
    ("drive-backup", {"target": "DIR/o.qcow2", "sync": "full", "on-source-error": "ignore"}, "done", ("o.qcow2",)),
    ("block-commit", {"on-error": "ignore"}, "ready", ("base.qcow2", "top.qcow2")),
    ("block-commit", {"on-error": "stop"}, "stop", ("base.qcow2", "top.qcow2")),
]


@pytest.mark.parametrize(("cmd", "args", "after", "files"), SOURCE_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in SOURCE_CASES])
def test_source_read_error(daemons: Daemons, tmp_path: Path, cmd: str, args: dict[str, Any], after: str,
                           files: tuple[str, ...]) -> None:
    """One failed data read of the active image (a ``once`` rule): the policy's BLOCK_JOB_ERROR, then the
    job goes on as QEMU's does (a stopped job retries after resume, an ignored read is copied again later:
    nothing is missing from the target or the base afterwards)."""
    conf = tmp_path / "once.conf"
    conf.write_text(_ONCE)
    p = Pair(daemons, tmp_path, drive=["-drive", f"file=blkdebug:{conf}:DIR/top.qcow2,if=none,id=disk0"])
    p.same("query-block")  # the node's name as QEMU gives it, no actual-size through blkdebug
    p.same(cmd, {"device": "disk0", "job-id": "j", **args})
    p.wait("BLOCK_JOB_ERROR")
    if after == "stop":
        _resume_stopped(p, "j")  # io-status failed
        after = "ready" if cmd != "drive-backup" else "done"
    if after == "ready":
        p.wait("BLOCK_JOB_READY")
        p.same("query-block-jobs")
        p.same("block-job-complete", {"device": "j"})
    _ended(p, mask_offsets=after == "fail")
    p.same("query-block")
    p.quit(daemons)
    for name in files:
        p.compare(name)
    if cmd != "block-commit" and after != "fail":
        p.compare(files[0], "top.qcow2")  # the whole disk got there


def _target(d: Path, name: str) -> None:
    assert qemu_img("create", "-q", "-f", "qcow2", str(d / name), "4M").returncode == 0


def _bad_node(name: str, **rule: Any) -> dict[str, Any]:
    """A qcow2 target over a blkdebug node failing writes of its data (``write_aio``) by ``rule``."""
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": f"DIR/{name}.qcow2"},
                     "inject-error": [{"event": "write_aio", **rule}]}}


def test_target_write_errors(daemons: Daemons, tmp_path: Path) -> None:
    """blockdev-backup / blockdev-mirror into qcow2 targets whose writes fail (blkdebug): enospc turns
    ENOSPC into a stop (io-status nospace) and EIO into a report; ignore and stop retry a write that
    failed once, so the target ends up whole; a permanent error under ignore floods errors until the
    job is cancelled (the monitor keeps answering)."""
    p = Pair(daemons, tmp_path)
    names = ("t1", "t2", "t3", "t4", "t5")
    for d in p.dirs:
        for n in names:
            _target(d, f"{n}.qcow2")
    p.same("blockdev-add", _bad_node("t1", errno=28))
    p.same("blockdev-add", _bad_node("t2"))
    p.same("blockdev-add", _bad_node("t3", once=True))
    p.same("blockdev-add", _bad_node("t4", once=True))
    p.same("blockdev-add", _bad_node("t5"))
    # the nodes as QEMU lists them: the blkdebug nodes (json: names, the image as a file node below,
    # nested as its backing-image) and the targets over them
    p.same("query-named-block-nodes")
    p.same("query-named-block-nodes", {"flat": True})
    p.same("x-debug-query-block-graph")  # (the blkdebug nodes' image edges pass their parents' needs)

    p.same("blockdev-backup", {"device": "disk0", "target": "t1", "sync": "full", "job-id": "b1",
                               "on-target-error": "enospc"})
    _wait_status(p, "paused", 2)  # (the backup's start drains: paused/running first)
    p.same("query-block-jobs", mask=_OFFSET)  # io-status nospace
    p.same("block-job-cancel", {"device": "b1", "force": True})
    _ended(p, mask_offsets=True)

    p.same("blockdev-backup", {"device": "disk0", "target": "t2", "sync": "full", "job-id": "b2",
                               "on-target-error": "enospc"})  # EIO under enospc: reported
    _ended(p, mask_offsets=True)

    p.same("blockdev-mirror", {"device": "disk0", "target": "t3", "sync": "full", "job-id": "m3",
                               "on-target-error": "stop"})
    _resume_stopped(p, "m3", mask=_OFFSET)  # io-status failed
    p.wait("BLOCK_JOB_READY")
    p.same("block-job-cancel", {"device": "m3"})  # ready: ends without a pivot, target complete
    _ended(p, mask_offsets=False)

    p.same("blockdev-backup", {"device": "disk0", "target": "t4", "sync": "full", "job-id": "b4",
                               "on-target-error": "ignore"})
    _ended(p, mask_offsets=False)

    p.same("blockdev-mirror", {"device": "disk0", "target": "t5", "sync": "full", "job-id": "m5",
                               "on-target-error": "ignore"})
    p.wait("BLOCK_JOB_ERROR")
    p.same("block-job-cancel", {"device": "m5", "force": True})
    _ended(p, mask_offsets=True)
    p.quit(daemons)
    for n in ("t3", "t4"):
        p.compare(f"{n}.qcow2", "top.qcow2")
    for n in ("t1", "t2", "t5"):  # what a failed job left: consistent images, nothing leaked, in both
        for d in p.dirs:
            r = qemu_img("check", "-q", str(d / f"{n}.qcow2"))
            assert r.returncode == 0, r.stdout + r.stderr


BAD_OPTIONS: list[dict[str, Any]] = [
    {},
    {"inject-error": [{"event": "nosuch"}]},
    {"inject-error": [{}]},
    {"inject-error": [{"event": "read_aio", "iotype": "nope"}]},
    {"set-state": [{"event": "read_aio"}]},
    {"config": "DIR/nofile.conf"},
    {"align": 3},
    *({"config": f"DIR/bad{i}.conf"} for i in range(1, 9)),
]
_BAD_CONFIGS = ['[inject-error]\nevent = "nosuch"\n', '[foo]\nevent = "read_aio"\n', '[inject-error]\nerrno = "5"\n',
                "garbage\n", '[set-state]\nevent = "read_aio"\n',
                '[inject-error]\nevent = "read_aio"\nonce = "maybe"\n',
                '[inject-error]\nevent = "read_aio"\nsector = "x"\n', '[inject-error]\nevent = "read_aio"\nfoo = "1"\n']


def test_blkdebug_options(daemons: Daemons, tmp_path: Path) -> None:
    """blockdev-add of blkdebug nodes: QEMU's texts for bad rules, options and config files."""
    p = Pair(daemons, tmp_path)
    for d in p.dirs:
        for i, text in enumerate(_BAD_CONFIGS, 1):
            (d / f"bad{i}.conf").write_text(text)
    for opts in BAD_OPTIONS:
        image = {"driver": "file", "filename": "DIR/base.qcow2"}
        args = {"driver": "blkdebug", "node-name": "x", **({"image": image} if opts else {}), **opts}
        p.same("blockdev-add", args)
        p.same("blockdev-del", {"node-name": "x"})


@pytest.mark.parametrize("policy", ["ignore", "stop", "report"])
def test_stream_read_error_below(daemons: Daemons, tmp_path: Path, policy: str) -> None:
    """block-stream of a -blockdev chain whose middle image reads through blkdebug (one failed data read):
    ignore skips the range and still fails the job at its end, leaving the chain as it was (vdkit used to
    complete and drop the backing, losing the range); stop retries after resume; report fails at once."""
    conf = tmp_path / "once.conf"
    conf.write_text(_ONCE)
    chain = ["-blockdev", "driver=file,node-name=bf,filename=DIR/base.qcow2",
             "-blockdev", "driver=qcow2,node-name=base,file=bf",
             "-blockdev", "driver=qcow2,node-name=mid,file.driver=blkdebug,file.image.driver=file,"
                          f"file.image.filename=DIR/mid.qcow2,file.config={conf},backing=base",
             "-blockdev", "driver=file,node-name=tf,filename=DIR/top.qcow2",
             "-blockdev", "driver=qcow2,node-name=top,file=tf,backing=mid"]
    p = Pair(daemons, tmp_path, drive=chain)
    p.same("query-named-block-nodes")  # mid named by its options and its backing (json:), blkdebug:CONF:FILE
    p.same("block-stream", {"device": "top", "job-id": "j", "on-error": policy})
    p.wait("BLOCK_JOB_ERROR")
    if policy == "stop":
        _resume_stopped(p, "j")  # io-status failed
    _ended(p, mask_offsets=False)
    p.quit(daemons)
    p.compare("top.qcow2")  # streamed (stop) or still over mid (the failed ones), alike in both


_ENOSPC = '[inject-error]\nevent = "write_aio"\nerrno = "28"\n'
_WRITE_ONCE = '[inject-error]\nevent = "write_aio"\nerrno = "5"\nonce = "on"\n'
COMMIT_CASES = [("intermediate", "ignore", _WRITE_ONCE), ("intermediate", "stop", _WRITE_ONCE),
                ("intermediate", "enospc", _ENOSPC), ("active", "stop", _WRITE_ONCE), ("active", "report", _WRITE_ONCE)]


@pytest.mark.parametrize(("kind", "policy", "rules"), COMMIT_CASES, ids=[f"{c[0]}-{c[1]}" for c in COMMIT_CASES])
def test_commit_write_error_into_base(daemons: Daemons, tmp_path: Path, kind: str, policy: str, rules: str) -> None:
    """block-commit into a base whose writes fail (blkdebug under the base of a -blockdev chain): the
    failed write's BLOCK_JOB_ERROR (operation write) by the policy; a stopped job is resumed (a permanent
    ENOSPC stops it again: then cancelled); the base's content afterwards equals QEMU's.  Where an active
    commit (QEMU's mirror: parallel requests in another order) got when it failed is masked."""
    conf = tmp_path / "rules.conf"
    conf.write_text(rules)
    chain = ["-blockdev", "driver=qcow2,node-name=base,file.driver=blkdebug,file.image.driver=file,"
                          f"file.image.filename=DIR/base.qcow2,file.config={conf}",
             "-blockdev", "driver=file,node-name=mf,filename=DIR/mid.qcow2",
             "-blockdev", "driver=qcow2,node-name=mid,file=mf,backing=base",
             "-blockdev", "driver=file,node-name=tf,filename=DIR/top.qcow2",
             "-blockdev", "driver=qcow2,node-name=top,file=tf,backing=mid"]
    p = Pair(daemons, tmp_path, drive=chain)
    args = {"device": "top", "job-id": "j", "on-error": policy, "base-node": "base"}
    if kind == "intermediate":
        args["top-node"] = "mid"
    p.same("block-commit", args)
    p.wait("BLOCK_JOB_ERROR")
    masked = kind == "active"
    if policy in ("stop", "enospc"):
        _resume_stopped(p, "j", mask=_OFFSET if masked else None)  # io-status failed / nospace
        if policy == "enospc":  # still no space: stopped again
            _wait_status(p, "paused", 2)
            p.same("block-job-cancel", {"device": "j", "force": True})
    if kind == "active" and policy != "report":
        p.wait("BLOCK_JOB_READY")
        p.same("block-job-complete", {"device": "j"})
    _ended(p, mask_offsets=masked)
    p.quit(daemons)
    if policy != "report":  # (a failed active commit got elsewhere in QEMU's order)
        p.compare("base.qcow2")
    for d in p.dirs:  # nothing damaged, nothing leaked (the failed write's clusters are given back, as QEMU does)
        r = qemu_img("check", "-q", str(d / "base.qcow2"))
        assert r.returncode == 0, r.stdout + r.stderr


def test_failed_job_kept_until_dismissed(daemons: Daemons, tmp_path: Path) -> None:
    """A job failed by an I/O error with auto-dismiss off: query-block-jobs and query-jobs list it concluded
    with its ``error`` (a member block-jobs.md §11 had not captured), HMP info block-jobs, then job-dismiss."""
    conf = tmp_path / "once.conf"
    conf.write_text(_ONCE)
    p = Pair(daemons, tmp_path, drive=["-drive", f"file=blkdebug:{conf}:DIR/top.qcow2,if=none,id=disk0"])
    p.same("block-commit", {"device": "disk0", "job-id": "j", "auto-dismiss": False})
    _wait_status(p, "concluded")
    p.same("query-block-jobs")
    p.same("query-jobs")
    p.hmp("info block-jobs")
    p.same("job-dismiss", {"id": "j"})
    _ended(p, mask_offsets=False)


def test_job_verbs_on_a_stopped_job(daemons: Daemons, tmp_path: Path) -> None:
    """The job-* verbs on a mirror stopped by a read error (block-jobs.md §11: only "Job not found" was
    captured): job-pause of the paused job and job-complete before ready refused, job-resume, job-complete
    when ready, query-jobs in pending (auto-finalize off), job-cancel there."""
    conf = tmp_path / "once.conf"
    conf.write_text(_ONCE)
    p = Pair(daemons, tmp_path, drive=["-drive", f"file=blkdebug:{conf}:DIR/top.qcow2,if=none,id=disk0"])
    p.same("drive-mirror", {"device": "disk0", "job-id": "m", "target": "DIR/o.qcow2", "sync": "full",
                            "on-source-error": "stop", "auto-finalize": False})
    _wait_status(p, "paused")
    p.same("job-pause", {"id": "m"})
    p.same("job-complete", {"id": "m"})
    p.same("query-jobs")
    p.same("job-resume", {"id": "m"})
    p.wait("BLOCK_JOB_READY")
    p.same("job-complete", {"id": "m"})
    _wait_status(p, "pending")
    p.same("query-jobs")
    p.same("job-cancel", {"id": "m"})
    _ended(p, mask_offsets=False)
    p.same("query-block")


RULES = {
    # the first read_aio moves to state 2, where the next one arms the failure
    "second-read": '[set-state]\nevent = "read_aio"\nstate = "1"\nnew_state = "2"\n\n'
                   '[inject-error]\nevent = "read_aio"\nstate = "2"\nonce = "on"\n',
    # sectors are the blkdebug node's own (host offsets in top.qcow2): 640 is its first data cluster,
    # 7000 lies past the end of the file (never read)
    "data-sector": '[inject-error]\nevent = "read_aio"\nsector = "640"\nonce = "on"\nimmediately = "on"\n',
    "unread-sector": '[inject-error]\nevent = "read_aio"\nsector = "7000"\n',
    "flush-only": '[inject-error]\nevent = "read_aio"\niotype = "flush"\n',
}


@pytest.mark.parametrize("rules", sorted(RULES))
def test_rule_matching(daemons: Daemons, tmp_path: Path, rules: str) -> None:
    """Which request a rule fails, as QEMU matches it: states (set-state), sectors of the node itself,
    I/O types; a mirror with on-source-error stop shows it (paused with io-status failed, or ready)."""
    conf = tmp_path / "rules.conf"
    conf.write_text(RULES[rules])
    p = Pair(daemons, tmp_path, drive=["-drive", f"file=blkdebug:{conf}:DIR/top.qcow2,if=none,id=disk0"],
             top_writes=("write -P 0x44 3M 64k",))  # (a second data read)
    p.same("drive-mirror", {"device": "disk0", "job-id": "m", "target": "DIR/m.qcow2", "sync": "full",
                            "on-source-error": "stop"})
    fails = rules in ("second-read", "data-sector")
    p.wait("BLOCK_JOB_ERROR" if fails else "BLOCK_JOB_READY")  # stopped by the error, or in sync without
    if fails:
        _resume_stopped(p, "m", mask=_OFFSET)  # (QEMU's parallel reads: the others may be done)
        p.wait("BLOCK_JOB_READY")
    p.same("query-block-jobs")
    p.same("block-job-cancel", {"device": "m"})
    _ended(p, mask_offsets=False)
    p.quit(daemons)
    p.compare("m.qcow2", "top.qcow2")


@pytest.mark.parametrize("spec", [
    "file.driver=blkdebug,file.config=CONF,file.image.filename=DIR/top.qcow2,format=qcow2",
    "file.driver=blkdebug,file.image.filename=DIR/top.qcow2,format=qcow2",
    "file=DIR/top.qcow2,file.driver=blkdebug,file.config=CONF,format=qcow2",
])
def test_blkdebug_drive_options(daemons: Daemons, tmp_path: Path, spec: str) -> None:
    """A -drive whose file node is blkdebug by options: the node named blkdebug:CONFIG:FILE as QEMU names
    it, and its rule met by a job (the drive's read fails once).  (driver=blkdebug at the top: QEMU
    nests the image's node in query-block as the drive's backing-image, vdkit does not.)"""
    conf = tmp_path / "once.conf"
    conf.write_text(_ONCE)
    p = Pair(daemons, tmp_path, drive=["-drive", spec.replace("CONF", str(conf)) + ",if=none,id=disk0"])
    p.same("query-block")
    p.same("drive-backup", {"device": "disk0", "job-id": "b", "target": "DIR/b.qcow2", "sync": "full",
                            "format": "qcow2", "on-source-error": "ignore"})
    _ended(p, mask_offsets=False)
    p.quit(daemons)
    p.compare("b.qcow2")


def test_raw_nodes_over_blkdebug(daemons: Daemons, tmp_path: Path) -> None:
    """Under a raw node every request is guest data (QEMU's raw announces read_aio/write_aio for each): a
    write_aio rule fails a backup into a raw target, a read_aio rule a mirror of a raw drive; both stop,
    are resumed and finish; the files alike."""
    conf = tmp_path / "once.conf"
    conf.write_text(_ONCE)

    def raws(d: Path) -> None:
        for name in ("t.raw", "s.raw"):
            assert qemu_img("create", "-q", "-f", "raw", str(d / name), "4M").returncode == 0
        assert qemu_io("-f", "raw", "-c", "write -P 0x44 1M 64k", str(d / "s.raw")).returncode == 0

    p = Pair(daemons, tmp_path, drive=["-drive", "file=DIR/top.qcow2,if=none,id=disk0",
                                       "-drive", f"file=blkdebug:{conf}:DIR/s.raw,format=raw,if=none,id=disk1"],
             prepare=raws)
    p.same("blockdev-add", {"driver": "raw", "node-name": "t", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": "DIR/t.raw"},
        "inject-error": [{"event": "write_aio", "once": True}]}})
    for cmd, args in (("blockdev-backup", {"device": "disk0", "target": "t", "on-target-error": "stop"}),
                      ("drive-mirror", {"device": "disk1", "target": "DIR/m.raw", "format": "raw",
                                        "on-source-error": "stop"})):
        p.same(cmd, {"job-id": "j", "sync": "full", **args})
        p.wait("BLOCK_JOB_ERROR")
        # (masked: how far QEMU's parallel requests got)
        _resume_stopped(p, "j", mask=_OFFSET, paused=2 if cmd == "blockdev-backup" else 1)
        if cmd == "drive-mirror":
            p.wait("BLOCK_JOB_READY")
            p.same("block-job-cancel", {"device": "j"})
        _ended(p, mask_offsets=True)
    p.quit(daemons)
    p.compare("t.raw", "top.qcow2")
    p.compare("m.raw", "s.raw")
