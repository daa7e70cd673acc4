"""HMP: the human monitor's line parser and commands.

Every command parses its arguments the way QEMU's HMP does (errors such as
``loadvm: string expected`` plus the ``Try "help ..."`` line), calls the QMP
handler (through :meth:`CommandRegistry.call`, so the same validation and the
same model objects), and renders the result with ``vdkit.info.render_human``.
Failures print ``Error: <message>``.  The returned text uses ``\\r\\n`` line
ends, as the monitor sends them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vdkit.errors import VdkitError
from vdkit.info import render_human
from vdkit.info.model import BlockDeviceInfo, BlockInfo, SnapshotInfo
from vdkit.monitor import block_cmds
from vdkit.monitor.commands import CommandContext, CommandRegistry


class HmpArgError(Exception):
    """Bad arguments: ``message`` then the ``Try "help <cmd>"`` hint."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Args:
    """A cursor over the rest of a command line."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.pos = 0

    def _skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self._skip()
        return self.pos >= len(self.text)

    def peek_flag(self) -> str | None:
        self._skip()
        if self.text.startswith("-", self.pos) and self.pos + 1 < len(self.text):
            return self.text[self.pos + 1]
        return None

    def take_flag(self) -> None:
        self.pos += 2

    def string(self, *, optional: bool = False, what: str = "string expected") -> str | None:
        self._skip()
        if self.pos >= len(self.text):
            if optional:
                return None
            raise HmpArgError(f"{self.name}: {what}")
        t = self.text
        if t[self.pos] == '"':
            out = []
            i = self.pos + 1
            while i < len(t) and t[i] != '"':
                if t[i] == "\\" and i + 1 < len(t):
                    c = t[i + 1]
                    esc = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}.get(c)
                    if esc is None:
                        raise HmpArgError(f"unsupported escape code: '\\{c}'")
                    out.append(esc)
                    i += 2
                    continue
                out.append(t[i])
                i += 1
            if i >= len(t):
                raise HmpArgError("untermintated string")
            self.pos = i + 1
            return "".join(out)
        start = self.pos
        while self.pos < len(t) and not t[self.pos].isspace():
            self.pos += 1
        return t[start:self.pos]

    def integer(self) -> int:
        self._skip()
        t = self.text
        if self.pos >= len(t):
            raise HmpArgError("unexpected end of expression")
        m = re.compile(r"(0x[0-9a-fA-F]+|[0-9]+)").match(t, self.pos)
        if m is None:
            raise HmpArgError(f"invalid char '{t[self.pos]}' in expression")
        self.pos = m.end()
        if self.pos < len(t) and not t[self.pos].isspace():
            raise HmpArgError(f"invalid char '{t[self.pos]}' in expression")
        return int(m.group(), 0)

    def end(self) -> None:
        if not self.at_end():
            raise HmpArgError(f"{self.name}: extraneous characters at the end of line")


@dataclass(frozen=True)
class HmpCommand:
    names: tuple[str, ...]
    params: str
    help: str
    run: Callable[[CommandRegistry, CommandContext, _Args], str]

    def help_line(self, prefix: str = "") -> str:
        return f"{prefix}{'|'.join(self.names)} {self.params} -- {self.help}\n"


def _qmp(reg: CommandRegistry, ctx: CommandContext, command: str, **args: Any) -> Any:
    return reg.call(ctx, command, {k: v for k, v in args.items() if v is not None})


# -- info subcommands ----------------------------------------------------------


def _info_block(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    nodes = verbose = False
    while (flag := a.peek_flag()) is not None:
        if flag == "n" and not nodes:
            nodes = True
        elif flag == "v" and not verbose:
            verbose = True
        else:
            raise HmpArgError(f"{a.name}: unsupported option -{flag}")
        a.take_flag()
    device = a.string(optional=True)
    a.end()
    out: list[str] = []
    printed = False
    if not nodes:
        infos: list[BlockInfo] = _qmp(reg, ctx, "query-block")
        for i, b in enumerate(infos):
            if device is not None and b.device != device:
                continue
            if i:
                out.append("\n")
            name = b.device
            if b.inserted is not None and b.inserted.node_name:
                name += f" ({b.inserted.node_name})"
            out.append(render_human.block_entry(
                name, b.inserted, qdev=b.qdev, io_status=b.io_status, removable=b.removable, locked=b.locked,
                tray_open=b.tray_open, verbose=verbose))
            printed = True
    if not printed and (nodes or device is not None):
        named: list[BlockDeviceInfo] = _qmp(reg, ctx, "query-named-block-nodes")
        for i, n in enumerate(named):
            if device is not None and n.node_name != device:
                continue
            if i:
                out.append("\n")
            out.append(render_human.block_entry(n.node_name or "", n, verbose=verbose))
    return "".join(out)


def _info_snapshots(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    a.end()
    infos: list[BlockInfo] = _qmp(reg, ctx, "query-block")
    writable = [b for b in infos if b.inserted is not None and not b.inserted.ro]
    capable = [b for b in writable if b.inserted is not None and b.inserted.drv == "qcow2"]
    if not capable:
        return render_human.info_snapshots(False, [], [], any_snapshots=False)
    lists: list[tuple[str, list[SnapshotInfo]]] = []
    for b in capable:
        assert b.inserted is not None
        snaps = list(b.inserted.image.snapshots or [])
        if snaps:
            lists.append((b.device, snaps))
    if not lists:
        return render_human.info_snapshots(True, [], [], any_snapshots=False)
    global_snaps: list[SnapshotInfo] = _qmp(reg, ctx, "query-snapshots")
    names = {s.name for s in global_snaps}
    partial = [(dev, [s for s in snaps if s.name not in names]) for dev, snaps in lists]
    return render_human.info_snapshots(True, global_snaps, partial, any_snapshots=True)


def _info_status(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    a.end()
    st = _qmp(reg, ctx, "query-status")
    if st.running:
        return "VM status: running\n"
    return "VM status: paused\n" if st.status == "paused" else f"VM status: paused ({st.status})\n"


def _info_version(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    a.end()
    v = _qmp(reg, ctx, "query-version")
    q = v["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']}{v['package']}\n"


def _info_blockstats(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    a.end()
    out = []
    for s in _qmp(reg, ctx, "query-blockstats"):
        st = s.stats
        out.append(
            f"{s.device}: rd_bytes={st.rd_bytes} wr_bytes={st.wr_bytes} rd_operations={st.rd_operations} "
            f"wr_operations={st.wr_operations} flush_operations={st.flush_operations} "
            f"wr_total_time_ns={st.wr_total_time_ns} rd_total_time_ns={st.rd_total_time_ns} "
            f"flush_total_time_ns={st.flush_total_time_ns} rd_merged={st.rd_merged} wr_merged={st.wr_merged} "
            f"idle_time_ns={st.idle_time_ns or 0}\n"
        )
    return "".join(out)


INFO_COMMANDS = (
    HmpCommand(("block",), "[-n] [-v] [device]", "show info of one block device or all block devices "
               "(-n: show named nodes; -v: show details)", _info_block),
    HmpCommand(("blockstats",), "", "show block device statistics", _info_blockstats),
    HmpCommand(("snapshots",), "", "show the currently saved VM snapshots", _info_snapshots),
    HmpCommand(("status",), "", "show the current VM status (running|paused)", _info_status),
    HmpCommand(("version",), "", "show the version of QEMU", _info_version),
)


# -- top-level commands ----------------------------------------------------------


def _device(a: _Args) -> str:
    d = a.string(what="block device name expected")
    assert d is not None
    return d


def _help(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    what = a.string(optional=True)
    sub = a.string(optional=True) if what == "info" else None
    if what is None:
        return "".join(c.help_line() for c in COMMANDS) + "".join(c.help_line("info ") for c in INFO_COMMANDS)
    if what == "info":
        cmds = [c for c in INFO_COMMANDS if sub is None or sub in c.names]
        return "".join(c.help_line("info ") for c in cmds)
    return "".join(c.help_line() for c in COMMANDS if what in c.names)


def _info(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    sub = a.string(optional=True)
    if sub is None:
        return "".join(c.help_line("info ") for c in INFO_COMMANDS)
    for c in INFO_COMMANDS:
        if sub in c.names:
            a.name = sub
            try:
                return c.run(reg, ctx, a)
            except HmpArgError as exc:
                raise HmpArgError(exc.message + f'\nTry "help info {sub}" for more information') from exc
    return f"unknown command: 'info {sub}'\n"


def _eject(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    force = None
    if a.peek_flag() == "f":
        a.take_flag()
        force = True
    dev = _device(a)
    a.end()
    _qmp(reg, ctx, "eject", device=dev, force=force)
    return ""


def _change(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    dev = _device(a)
    if a.peek_flag() == "f":
        a.take_flag()
    filename = a.string()
    fmt = a.string(optional=True)
    mode = a.string(optional=True)
    a.end()
    _qmp(reg, ctx, "blockdev-change-medium", device=dev, filename=filename, format=fmt, **{"read-only-mode": mode})
    return ""


def _throttle(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    dev = _device(a)
    vals = {k: a.integer() for k in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")}
    a.end()
    _qmp(reg, ctx, "block_set_io_throttle", device=dev, **vals)
    return ""


def _simple(qmp_name: str) -> Callable[[CommandRegistry, CommandContext, _Args], str]:
    def run(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
        a.end()
        _qmp(reg, ctx, qmp_name)
        return ""

    return run


def _savevm(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    tag = a.string(optional=True)
    a.end()
    block_cmds.savevm(ctx, {"name": tag} if tag is not None else {})
    return ""


def _tagged(fn: Callable[[CommandContext, dict[str, Any]], None]) -> Callable[..., str]:
    def run(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
        tag = a.string()
        a.end()
        fn(ctx, {"name": tag})
        return ""

    return run


def _snap_internal(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    dev = _device(a)
    name = a.string()
    a.end()
    _qmp(reg, ctx, "blockdev-snapshot-internal-sync", device=dev, name=name)
    return ""


def _snap_delete_internal(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    dev = _device(a)
    name = a.string()
    sid = a.string(optional=True)
    a.end()
    _qmp(reg, ctx, "blockdev-snapshot-delete-internal-sync", device=dev, name=name, id=sid)
    return ""



# -- NBD server (handlers live with the daemon: vdkit.daemon.nbd_export) --------------------------


def _hmp_flags(a: _Args, allowed: str) -> set[str]:
    """QEMU's ``-x`` flag arguments; any other letter is ``unsupported option``."""
    got: set[str] = set()
    while (f := a.peek_flag()) is not None:
        if f not in allowed:
            raise HmpArgError(f"{a.name}: unsupported option -{f}")
        a.take_flag()
        got.add(f)
    return got


def _nbd_start(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    from vdkit.daemon import nbd_export

    flags = _hmp_flags(a, "aw")
    uri = a.string()
    a.end()
    assert uri is not None
    if "w" in flags and "a" not in flags:
        raise VdkitError("-w only valid together with -a")
    host, sep, port = uri.rpartition(":")
    if uri.startswith("unix:"):
        addr: dict[str, Any] = {"type": "unix", "data": {"path": uri[5:]}}
    elif sep and port:
        addr = {"type": "inet", "data": {"host": host.strip("[]"), "port": port}}
    else:
        raise VdkitError(f"error parsing address '{uri}'")
    nbd_export.nbd_server_start(ctx, {"addr": addr})
    if "a" in flags:  # every drive with a medium, under its name (QEMU's hmp_nbd_server_start)
        try:
            for d in ctx.machine.drives:
                if d.medium is not None:
                    nbd_export.nbd_server_add(ctx, {"device": d.id, "writable": "w" in flags})
        except VdkitError:
            nbd_export.nbd_server_stop(ctx, {})
            raise
    return ""


def _nbd_add(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    from vdkit.daemon import nbd_export

    flags = _hmp_flags(a, "w")
    dev = _device(a)
    name = a.string(optional=True)
    a.end()
    args: dict[str, Any] = {"device": dev, "writable": "w" in flags}
    if name is not None:
        args["name"] = name
    nbd_export.nbd_server_add(ctx, args)
    return ""


def _nbd_remove(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    from vdkit.daemon import nbd_export

    flags = _hmp_flags(a, "f")
    name = a.string()
    a.end()
    nbd_export.nbd_server_remove(ctx, {"name": name, "mode": "hard" if "f" in flags else "safe"})
    return ""


def _nbd_stop(reg: CommandRegistry, ctx: CommandContext, a: _Args) -> str:
    from vdkit.daemon import nbd_export

    a.end()
    nbd_export.nbd_server_stop(ctx, {})
    return ""


COMMANDS = (
    HmpCommand(("block_set_io_throttle",), "device bps bps_rd bps_wr iops iops_rd iops_wr",
               "change I/O throttle limits for a block drive", _throttle),
    HmpCommand(("change",), "device [-f] filename [format [read-only-mode]]",
               "change a removable medium, optional format, use -f to force the operation", _change),
    HmpCommand(("cont", "c"), "", "resume emulation", _simple("cont")),
    HmpCommand(("delvm",), "tag", "delete a VM snapshot from its tag", _tagged(block_cmds.delvm)),
    HmpCommand(("eject",), "[-f] device", "eject a removable medium (use -f to force it)", _eject),
    HmpCommand(("help", "?"), "[cmd]", "show the help", _help),
    HmpCommand(("info",), "[subcommand]", "show various information about the system state", _info),
    HmpCommand(("loadvm",), "tag", "restore a VM snapshot from its tag", _tagged(block_cmds.loadvm)),
    HmpCommand(("nbd_server_add",), "nbd_server_add [-w] device [name]", "export a block device via NBD", _nbd_add),
    HmpCommand(("nbd_server_remove",), "nbd_server_remove [-f] name",
               "remove an export previously exposed via NBD", _nbd_remove),
    HmpCommand(("nbd_server_start",), "nbd_server_start [-a] [-w] host:port",
               "serve block devices on the given host and port", _nbd_start),
    HmpCommand(("nbd_server_stop",), "nbd_server_stop", "stop serving block devices using the NBD protocol",
               _nbd_stop),
    HmpCommand(("quit", "q"), "", "quit the emulator", _simple("quit")),
    HmpCommand(("savevm",), "tag", "save a VM snapshot. If no tag is provided, a new snapshot is created",
               _savevm),
    HmpCommand(("snapshot_blkdev_internal",), "device name", "take an internal snapshot of device.\n"
               "\t\t\tThe format of the image used by device must\n\t\t\tsupport it, such as qcow2.\n\t\t\t",
               _snap_internal),
    HmpCommand(("snapshot_delete_blkdev_internal",), "device name [id]", "delete an internal snapshot of device.\n"
               "\t\t\tIf id is specified, qemu will try delete\n\t\t\tthe snapshot matching both id and name.\n"
               "\t\t\tThe format of the image used by device must\n\t\t\tsupport it, such as qcow2.\n\t\t\t",
               _snap_delete_internal),
    HmpCommand(("stop", "s"), "", "stop emulation", _simple("stop")),
)


def run_line_lf(reg: CommandRegistry, ctx: CommandContext, line: str) -> str:
    """Run one command line; output with ``\\n`` line ends."""
    text = line.strip()
    if not text:
        return ""
    m = re.match(r"\S+", text)
    assert m is not None
    name = m.group()
    rest = text[m.end():]
    cmd = next((c for c in COMMANDS if name in c.names), None)
    if cmd is None:
        return f"unknown command: '{name}'\n"
    try:
        return cmd.run(reg, ctx, _Args(name, rest))
    except HmpArgError as exc:
        if "\nTry " in exc.message:
            return exc.message + "\n"
        return f'{exc.message}\nTry "help {name}" for more information\n'
    except VdkitError as exc:
        return f"Error: {exc.message}\n"


def run_line(reg: CommandRegistry, ctx: CommandContext, line: str) -> str:
    """Run one command line; output with the monitor's ``\\r\\n`` line ends."""
    return run_line_lf(reg, ctx, line).replace("\n", "\r\n")
