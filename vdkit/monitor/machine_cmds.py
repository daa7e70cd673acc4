"""Protocol and run-state QMP commands.

``qmp_capabilities``, ``query-version``, ``query-commands``, ``query-status``,
``stop``, ``cont``, ``quit`` and ``human-monitor-command``.  The block
commands are in :mod:`vdkit.monitor.block_cmds`, the NBD ones in
:mod:`vdkit.monitor.nbd_cmds`; the daemon assembles the registry
(``vdkit.daemon.main.build_registry``).  ``query-commands`` and
``human-monitor-command`` use the registry that runs them (``ctx.registry``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vdkit.errors import VdkitError
from vdkit.info.model import StatusInfo
from vdkit.monitor.commands import Arg, CommandContext, CommandRegistry, opt
from vdkit.monitor.qmp_wire import version_info

if TYPE_CHECKING:
    from vdkit.devices.registry import DeviceRegistry


def qmp_capabilities(ctx: CommandContext, args: dict[str, Any]) -> None:
    enable = args.get("enable", [])
    offered = ["oob"] if ctx.session is not None and ctx.session.offer_oob else []
    for cap in enable:
        if cap not in offered:
            raise VdkitError(f"Capability {cap} not available")
    if ctx.session is not None:
        ctx.session.negotiate(enable)


def query_version(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return version_info(ctx.machine.package)


def query_status(ctx: CommandContext, args: dict[str, Any]) -> StatusInfo:
    state = ctx.machine.run_state
    return StatusInfo(running=state == "running", status=state)


def stop(ctx: CommandContext, args: dict[str, Any]) -> None:
    if ctx.machine.stop():
        ctx.emit("STOP")
        if ctx.machine.jobs.jobs:
            # QEMU drains all I/O once the VM is stopped: running jobs pause and resume (their events
            # come after STOP, so STOP goes out first through the same ordered sink)
            sink = ctx.machine.event_sink
            if sink is not None:
                sink(list(ctx.events))
                ctx.events.clear()
            ctx.machine.jobs.drain()


def cont(ctx: CommandContext, args: dict[str, Any]) -> None:
    if ctx.machine.cont():
        ctx.emit("RESUME")


def shutdown_events(machine: DeviceRegistry, reason: str) -> list[tuple[str, dict[str, Any]]]:
    """What a shutdown (``quit``, a signal) announces, in QEMU's order: ``SHUTDOWN``, then
    ``BLOCK_EXPORT_DELETED`` for each NBD export, oldest first, as the exports are closed."""
    events: list[tuple[str, dict[str, Any]]] = [("SHUTDOWN", {"guest": False, "reason": reason})]
    svc = machine.exports
    if svc is not None:
        events += [("BLOCK_EXPORT_DELETED", {"id": e.id}) for e in svc.list_exports()]
    return events


def quit_(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.machine.shutdown_requested = "host-qmp-quit"
    for event in shutdown_events(ctx.machine, "host-qmp-quit"):
        ctx.emit(*event)


def human_monitor_command(ctx: CommandContext, args: dict[str, Any]) -> str:
    from vdkit.monitor.hmp import run_line

    if "cpu-index" in args:
        # QEMU keeps the index in a C int (2**32 is CPU 0 again); the machine has one CPU, index 0
        index = (args["cpu-index"] + (1 << 31)) % (1 << 32) - (1 << 31)
        if index != 0:
            raise VdkitError("Parameter 'cpu-index' expects a CPU number")

    assert ctx.registry is not None  # set by the registry that dispatched this command
    return run_line(ctx.registry, ctx, args["command-line"])


def query_commands(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, str]]:
    assert ctx.registry is not None
    return [{"name": n} for n in ctx.registry.names()]


def register(reg: CommandRegistry) -> None:
    r = reg.register
    r("qmp_capabilities", opt("enable", "array", items=Arg("enable", enum=("oob",), enum_label="null")),
      negotiation=True)(qmp_capabilities)
    r("query-version")(query_version)
    r("query-commands")(query_commands)
    r("query-status")(query_status)
    r("stop")(stop)
    r("cont")(cont)
    r("quit")(quit_)
    r("human-monitor-command", Arg("command-line"), opt("cpu-index", "int"))(human_monitor_command)
