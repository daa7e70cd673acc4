"""Many clients at once: queries never see half a savevm/delvm/transaction.

Writers run ``savevm``/``delvm`` (HMP through QMP) and internal-snapshot
``transaction`` in loops while readers query; every answer must show each
snapshot name either on all disks or on none.  Iteration counts are fixed
(no timing assertions).  Afterwards every image passes ``qemu-img check``.
"""

from __future__ import annotations

import threading
from pathlib import Path

from tests.conftest import check_ok
from tests.daemon.conftest import Daemons, Monitor

DISKS = ("d0", "d1", "d2")
ROUNDS = 12
READERS = 4


def _names(block: dict[str, object]) -> set[str]:
    inserted = block["inserted"]
    assert isinstance(inserted, dict)
    return {s["name"] for s in inserted["image"].get("snapshots", [])}


def test_queries_consistent_under_snapshot_load(daemons: Daemons, tmp_path: Path) -> None:
    args: list[str] = []
    for d in DISKS:
        check_ok("create", "-q", "-f", "qcow2", str(tmp_path / f"{d}.qcow2"), "16M")
        args += ["-drive", f"file={d}.qcow2,if=none,id={d}"]
    _, path, _ = daemons.vdkit(args, tmp_path, paused=False)
    errors: list[str] = []
    done = threading.Event()

    def savevm_writer() -> None:
        m = Monitor(path).negotiate()
        try:
            for i in range(ROUNDS):
                for line in (f"savevm vm{i}", f"delvm vm{i - 1}" if i % 2 else "info status"):
                    out = m.hmp(line)
                    if out.startswith("Error"):
                        errors.append(f"{line}: {out}")
        finally:
            m.close()

    def transaction_writer() -> None:
        m = Monitor(path).negotiate()
        try:
            for i in range(ROUNDS):
                acts = [{"type": "blockdev-snapshot-internal-sync", "data": {"device": d, "name": f"t{i}"}}
                        for d in DISKS]
                r = m.cmd("transaction", {"actions": acts})
                if r != {"return": {}}:
                    errors.append(f"transaction {i}: {r}")
                if i % 3 == 2:
                    m.hmp(f"delvm t{i - 1}")
                # a failing transaction must leave nothing behind
                bad = [*acts[:2], {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d2",
                                                                                        "name": f"t{i}"}}]
                bad[0] = {"type": "blockdev-snapshot-internal-sync", "data": {"device": "d0", "name": f"x{i}"}}
                r = m.cmd("transaction", {"actions": bad})
                if "error" not in r:
                    errors.append(f"bad transaction {i} succeeded")
        finally:
            m.close()

    def reader(k: int) -> None:
        m = Monitor(path).negotiate()
        try:
            while not done.is_set():
                blocks = m.cmd("query-block")["return"]
                sets = [_names(b) for b in blocks]
                if any(s != sets[0] for s in sets):
                    errors.append(f"reader {k}: inconsistent query-block {sets}")
                if any(n.startswith("x") for s in sets for n in s):
                    errors.append(f"reader {k}: failed transaction left {sets}")
                info = m.hmp("info snapshots")
                if "partial" in info:
                    errors.append(f"reader {k}: partial snapshots {info!r}")
                snaps = m.cmd("query-snapshots")["return"]
                if len({s["name"] for s in snaps}) != len(snaps):
                    errors.append(f"reader {k}: duplicate names {snaps}")
        finally:
            m.close()

    readers = [threading.Thread(target=reader, args=(k,)) for k in range(READERS)]
    writers = [threading.Thread(target=savevm_writer), threading.Thread(target=transaction_writer)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(timeout=240)
    done.set()
    for t in readers:
        t.join(timeout=60)
    assert not errors, errors[:5]
    m = daemons.monitor(path).negotiate()
    blocks = m.cmd("query-block")["return"]
    assert {f"vm{ROUNDS - 1}", f"t{ROUNDS - 1}"} <= _names(blocks[0])
    m.cmd("quit")
    # "quit" answers before the process has closed its images; their locks go with the process.
    for proc in daemons.procs:
        proc.wait(timeout=60)
    for d in DISKS:
        check_ok("check", str(tmp_path / f"{d}.qcow2"))
