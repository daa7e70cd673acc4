"""qcow2 corruption events in the daemon, compared with qemu-system-x86_64 through an NBD export.

Both daemons export ``drive0`` (``nbd-server-start``/``nbd-server-add``) and
``qemu-io`` is the client.  A writable image meeting bad metadata emits
``BLOCK_IMAGE_CORRUPTED`` (fatal), is marked corrupt on disk and dies: later
NBD requests fail with EINVAL (ENOMEDIUM has no NBD code), ``query-block``
shows the drive as not inserted and ``query-named-block-nodes`` refuses the
node.  A read-only drive reports one non-fatal event and keeps working.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import qemu_io, require_tool
from tests.daemon.conftest import Daemons, Monitor, normalise
from tests.nbd.conftest import short_sock
from tests.test_corruption_events import _corrupt_bit, _image


def _client(mon: Monitor, readonly: bool, ops: list[str]) -> list[str]:
    """Start an NBD export of drive0, run each op with a fresh qemu-io client; its result lines."""
    sock = short_sock("n.sock")
    assert mon.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) == {"return": {}}
    assert mon.cmd("nbd-server-add", {"device": "drive0", "writable": not readonly}) == {"return": {}}
    out = []
    for op in ops:
        r = qemu_io("-f", "raw", *(["-r"] if readonly else []), "-c", op, f"nbd+unix:///drive0?socket={sock}")
        out.append((r.stdout.splitlines() or [""])[0].split(" bytes at ")[0] + r.stderr)
    return out


def _state(mon: Monitor) -> list[str]:
    """What a management tool sees afterwards: events, query-block, named nodes, HMP info block."""
    lines = [normalise(mon.cmd_line("query-block")), normalise(mon.cmd_line("query-named-block-nodes")),
             normalise(json.dumps(mon.hmp("info block")))]
    events = []
    for ev in mon.events:
        ev = dict(ev)
        ev.pop("timestamp")
        events.append(normalise(json.dumps(ev)))
    return events + lines


CASES = {
    # damage, readonly, qemu-io ops
    "read-kills": ("data_unaligned", False, ["read 0 4k", "read 0 4k", "write 0 4k", "read 1M 4k"]),
    "write-unaligned": ("data_unaligned", False, ["write 4k 4k", "read 1M 4k"]),
    "overlap": ("data_on_l1", False, ["write 4k 4k", "read 0 4k"]),
    "refblock": ("refblock_unaligned", False, ["write 0 4k", "write 1M 4k", "read 0 4k"]),
    "readonly": ("data_unaligned", True, ["read 0 4k", "read 0 4k", "read 1M 4k"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corruption_over_nbd(case: str, daemons: Daemons) -> None:
    require_tool("qemu-io")
    damage, readonly, ops = CASES[case]
    drive = "file=c.qcow2,if=none,id=drive0" + (",readonly=on" if readonly else "")
    qmon, vmon = daemons.pair(["-drive", drive], lambda d: _image(d / "c.qcow2", damage))
    q_out = _client(qmon, readonly, ops)
    v_out = _client(vmon, readonly, ops)
    assert v_out == q_out
    q_state, v_state = _state(qmon), _state(vmon)
    assert v_state == q_state
    assert sum('"BLOCK_IMAGE_CORRUPTED"' in s for s in v_state) == 1
    for d in ("q", "v"):
        assert _corrupt_bit(daemons.tmp / d / "c.qcow2") == (not readonly), d
