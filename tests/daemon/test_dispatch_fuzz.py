"""Fuzz the command layer in-process: any request gets an answer or a VdkitError, never another exception.

Requests are drawn from the real registry's command names with argument
dicts mixing the real argument names and random JSON values; HMP gets random
lines made of real command words.  A daemon would report anything else as an
internal error, which is a bug.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import check_ok
from vdkit.daemon.main import build_registry
from vdkit.devices.registry import DeviceRegistry, DriveSpec
from vdkit.errors import VdkitError
from vdkit.monitor.commands import CommandContext
from vdkit.monitor.hmp import COMMANDS, INFO_COMMANDS, run_line
from vdkit.monitor.qmp_wire import QmpSession

REGISTRY = build_registry()  # the daemon's commands, as vdkit-daemon assembles them

ARG_NAMES = ["device", "id", "name", "flat", "query-nodes", "bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr",
             "bps_max", "iops_size", "group", "force", "filename", "format", "read-only-mode", "actions", "type",
             "data", "properties", "command-line", "enable", "bps_max_length"]
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 64), 2 ** 64) | st.sampled_from(
        ["d0", "empty", "#block000", "s1", "", "x", "../nonexist", "raw", "qcow2", "read-only", "oob",
         "blockdev-snapshot-internal-sync", "abort", "info block", "savevm s1"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(ARG_NAMES), c, max_size=3),
    max_leaves=8,
)
SKIP = {"quit"}


@pytest.fixture(scope="module")
def machine() -> Iterator[DeviceRegistry]:
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "d0.qcow2"
        check_ok("create", "-q", "-f", "qcow2", str(img), "4M")
        m = DeviceRegistry(start_paused=True)
        m.add_drive(DriveSpec(id="d0", file=str(img)))
        m.add_drive(DriveSpec(id="empty"))
        yield m
        m.close_all()
        check_ok("check", str(img))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(set(REGISTRY.names()) - SKIP)),
       st.dictionaries(st.sampled_from(ARG_NAMES), VALUES, max_size=5))
def test_qmp_dispatch(machine: DeviceRegistry, name: str, args: dict[str, Any]) -> None:
    session = QmpSession()
    session.negotiate([])
    ctx = CommandContext(machine, session)
    with machine.lock:
        try:
            REGISTRY.dispatch(ctx, name, args)
        except VdkitError:
            pass


WORDS = [w for c in COMMANDS for w in c.names if w not in ("quit", "q")] + \
    [w for c in INFO_COMMANDS for w in c.names] + ["d0", "empty", "-n", "-v", "-f", "s1", '"quoted tag"', "1", "x"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(WORDS) | st.text(max_size=6), min_size=1, max_size=5))
def test_hmp_lines(machine: DeviceRegistry, words: list[str]) -> None:
    if words[0] in ("quit", "q"):
        return
    with machine.lock:
        out = run_line(REGISTRY, CommandContext(machine), " ".join(words))
    assert isinstance(out, str)
    assert out == "" or out.endswith("\r\n")
