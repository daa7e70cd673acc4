"""All-or-nothing snapshot operations when a disk fails half way (in-process, no sockets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import check_ok
from vdkit.daemon.main import build_registry
from vdkit.devices.registry import DeviceRegistry, DriveSpec
from vdkit.errors import VdkitError
from vdkit.monitor.commands import CommandContext
from vdkit.monitor.hmp import run_line

REGISTRY = build_registry()  # the daemon's commands, as vdkit-daemon assembles them


@pytest.fixture
def machine(tmp_path: Path) -> Any:
    m = DeviceRegistry(start_paused=False)
    for d in ("d0", "d1", "d2"):
        check_ok("create", "-q", "-f", "qcow2", str(tmp_path / f"{d}.qcow2"), "8M")
        m.add_drive(DriveSpec(id=d, file=str(tmp_path / f"{d}.qcow2")))
    yield m
    m.close_all()
    for d in ("d0", "d1", "d2"):
        check_ok("check", str(tmp_path / f"{d}.qcow2"))


def _fail_on(machine: DeviceRegistry, drive: str, monkeypatch: pytest.MonkeyPatch) -> None:
    node = machine.find_drive(drive).medium.node  # type: ignore[union-attr]

    def boom(*a: object, **k: object) -> None:
        raise VdkitError("No space left on device")

    monkeypatch.setattr(node, "snapshot_create", boom)


def _names(machine: DeviceRegistry) -> list[set[str]]:
    return [{e.name for e in d.medium.node.driver.snapshots()} for d in machine.drives]  # type: ignore[union-attr]


def test_savevm_rolls_back(machine: DeviceRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = CommandContext(machine)
    assert run_line(REGISTRY, ctx, "savevm keep") == ""
    _fail_on(machine, "d2", monkeypatch)
    out = run_line(REGISTRY, ctx, "savevm broken")
    assert out == "Error: Could not create snapshot 'broken' on 'd2'\r\n"
    assert _names(machine) == [{"keep"}] * 3
    # the VM was running: stopped for the snapshot and resumed afterwards, also on failure
    assert [e[0] for e in ctx.events] == ["STOP", "RESUME", "STOP", "RESUME"]
    assert machine.run_state == "running"


def test_transaction_rolls_back(machine: DeviceRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = CommandContext(machine)
    _fail_on(machine, "d1", monkeypatch)
    acts = [{"type": "blockdev-snapshot-internal-sync", "data": {"device": d, "name": "t"}} for d in ("d0", "d1")]
    with pytest.raises(VdkitError) as exc:
        REGISTRY.dispatch(ctx, "transaction", {"actions": acts})
    assert exc.value.message == "Failed to create snapshot 't' on device 'd1': No space left on device"
    assert _names(machine) == [set()] * 3
