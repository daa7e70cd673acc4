"""HMP: the human monitor's line parser and commands.

Every command declares its arguments in QEMU's notation (``force:-f,device:B``:
flags, block device names, file names, strings, rest of line, integer
expressions) and one parser reads them the way QEMU's HMP does (errors such as
``loadvm: string expected`` plus the ``Try "help ..."`` line); the command calls the QMP
handler (through :meth:`CommandRegistry.call`, so the same validation and the
same model objects), and renders the result with ``vdkit.info.render_human``.
Failures print ``Error: <message>``.  The returned text uses ``\\r\\n`` line
ends, as the monitor sends them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vdkit.block.snapshot import snapshot_info
from vdkit.errors import VdkitError
from vdkit.info import render_human
from vdkit.info.model import BlockDeviceInfo, BlockInfo, SnapshotInfo
from vdkit.monitor import block_cmds, nbd_cmds
from vdkit.monitor.commands import CommandContext, CommandRegistry
from vdkit.opts import parse_socket_address, strtosz


class HmpArgError(Exception):
    """Bad arguments: ``text`` (with its own line end, as QEMU prints it) then the ``Try "help <cmd>"`` hint."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# The parser works on the command line's UTF-8 bytes (one latin-1 char per
# byte), as QEMU's does: a string argument is cut at 1023 bytes and an invalid
# character in an expression is reported as its first byte.
_SPACE = " \t\n\v\f\r"  # C isspace()
_STR_MAX = 1023
_STR_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", "'": "'", '"': '"'}
_U64 = 1 << 64


def _to_bytes_text(line: str) -> str:
    # QEMU holds a NUL received over QMP as the two bytes C0 80 (modified UTF-8)
    return line.encode("utf-8", "surrogateescape").decode("latin-1").replace("\x00", "\xc0\x80")


def _from_bytes_text(text: str) -> str:
    return text.replace("\xc0\x80", "\x00").encode("latin-1").decode("utf-8", "surrogateescape")


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    return pos


def _get_str(text: str, pos: int) -> tuple[str | None, int]:
    """One word or ``"quoted string"`` (escapes ``\\n \\r \\\\ \\' \\"``); None when missing or malformed.

    QEMU prints its reason for a malformed string (unterminated, bad escape)
    on its own stdout, not on the monitor: the monitor only sees the
    caller's ``... expected``.
    """
    pos = _skip(text, pos)
    n = len(text)
    if pos >= n:
        return None, pos
    out: list[str] = []
    if text[pos] == '"':
        pos += 1
        while pos < n and text[pos] != '"':
            c = text[pos]
            pos += 1
            if c == "\\":
                e = text[pos] if pos < n else ""
                pos += 1
                if e not in _STR_ESCAPES or not e:
                    return None, pos
                c = _STR_ESCAPES[e]
            out.append(c)
        if pos >= n:
            return None, pos
        pos += 1
    else:
        start = pos
        while pos < n and text[pos] not in _SPACE:
            pos += 1
        out.append(text[start:pos])
    return "".join(out)[:_STR_MAX], pos


def _s64(v: int) -> int:
    v %= _U64
    return v - _U64 if v >= 1 << 63 else v


class _Expr:
    """HMP integer expressions: ``+ -`` below ``& | ^`` below ``* / %``; unary ``+ - ~``,
    parentheses, C integer literals (``0x1f``, ``017``), ``'c'`` character constants;
    64-bit two's complement arithmetic, C division."""

    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = _skip(text, pos)

    def fail(self, msg: str) -> HmpArgError:
        return HmpArgError(msg + "\n")

    def cur(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> None:
        if self.pos < len(self.text):
            self.pos = _skip(self.text, self.pos + 1)

    def sum(self) -> int:
        v = self.logic()
        while (op := self.cur()) and op in "+-":
            self.next()
            w = self.logic()
            v = _s64(v + w if op == "+" else v - w)
        return v

    def logic(self) -> int:
        v = self.prod()
        while (op := self.cur()) and op in "&|^":
            self.next()
            w = self.prod()
            v = _s64(v & w if op == "&" else v | w if op == "|" else v ^ w)
        return v

    def prod(self) -> int:
        v = self.unary()
        while (op := self.cur()) and op in "*/%":
            self.next()
            w = self.unary()
            if op == "*":
                v = _s64(v * w)
                continue
            if w == 0:
                raise self.fail("division by zero")
            q = abs(v) // abs(w)
            q = q if (v < 0) == (w < 0) else -q  # C: truncation toward zero
            v = _s64(q) if op == "/" else _s64(v - q * w)
        return v

    def unary(self) -> int:
        c = self.cur()
        if c == "+":
            self.next()
            return self.unary()
        if c == "-":
            self.next()
            return _s64(-self.unary())
        if c == "~":
            self.next()
            return _s64(~self.unary())
        if c == "(":
            self.next()
            v = self.sum()
            if self.cur() != ")":
                raise self.fail("')' expected")
            self.next()
            return v
        if c == "'":
            self.pos += 1
            ch = self.cur()
            if not ch:
                raise self.fail("character constant expected")
            self.pos += 1
            if self.cur() != "'":
                raise self.fail("missing terminating ' character")
            self.next()
            b = ord(ch)
            return b - 256 if b >= 0x80 else b  # a C char is signed
        if c == "$":
            # CPU registers: vdkit has no CPU, so no register is known
            raise self.fail("unknown register")
        if not c:
            raise self.fail("unexpected end of expression")
        return self.number()

    def number(self) -> int:
        """strtoull(…, 0): the longest valid C literal; ``0x`` without a hex digit is just ``0``."""
        t = self.text
        p = self.pos
        n = len(t)
        if t.startswith(("0x", "0X"), p) and p + 2 < n and t[p + 2] in "0123456789abcdefABCDEF":
            base, q = 16, p + 2
            digits = "0123456789abcdefABCDEF"
        elif t.startswith("0", p):
            base, q, digits = 8, p, "01234567"
        else:
            base, q, digits = 10, p, "0123456789"
        e = q
        while e < n and t[e] in digits:
            e += 1
        if e == q:
            raise self.fail(f"invalid char '{t[p]}' in expression")
        v = int(t[q:e], base)
        if v >= _U64:
            raise self.fail("number too large")
        self.pos = _skip(t, e)
        return _s64(v)


@dataclass(frozen=True)
class _Param:
    key: str
    kind: str  # "B" block device, "F" file name, "s" string, "S" rest of line, "l" integer, "-x" flag
    optional: bool = False
    rest: str = ""  # the argument notation after this argument


def _spec(text: str) -> tuple[_Param, ...]:
    """QEMU's HMP argument notation: ``device:B,force:-f,name:s?``."""
    items = [i for i in text.split(",") if i]
    out = []
    for n, item in enumerate(items):
        key, kind = item.split(":")
        rest = "".join("," + i for i in items[n + 1:])
        out.append(_Param(key, kind.rstrip("?"), kind.endswith("?"), rest))
    return tuple(out)


_EXPECTED = {"B": "block device name", "F": "filename", "s": "string"}


def _parse_args(name: str, params: tuple[_Param, ...], text: str, pos: int) -> dict[str, Any]:
    """Arguments in declared order.

    A flag's slot takes its own flag; any other ``-X`` is left for a later
    slot when ``-X`` occurs anywhere in the rest of the argument notation (as
    QEMU checks it: so ``-o`` and ``-m`` pass ``change``'s flag slot, through
    ``read-only-mode``, and become its file name), else it is refused.
    """
    args: dict[str, Any] = {}
    for prm in params:
        pos = _skip(text, pos)
        at_end = pos >= len(text)
        if prm.kind.startswith("-"):
            letter = prm.kind[1]
            if not at_end and text[pos] == "-":
                got = text[pos + 1] if pos + 1 < len(text) else ""
                if got == letter:
                    args[prm.key] = True
                    pos += 2
                elif "-" + got not in prm.rest:
                    # printf of a NUL character ends QEMU's message: no line end
                    raise HmpArgError(f"{name}: unsupported option -{got}" + ("\n" if got else ""))
            continue
        if prm.optional and at_end:
            continue
        if prm.kind == "l":
            ex = _Expr(text, pos)
            args[prm.key] = ex.sum()
            pos = ex.pos
        elif prm.kind == "o":  # a size, MiB when no suffix is given (QEMU's qemu_strtosz_MiB)
            value, pos = _get_str(text, pos)
            try:
                if value is None:
                    raise ValueError(text)
                args[prm.key] = strtosz(value + "M" if value[-1:].isdigit() or value.endswith(".") else value)
            except ValueError:
                raise HmpArgError("invalid size\n") from None
        elif prm.kind == "S":
            args[prm.key] = _from_bytes_text(text[pos:])
            pos = len(text)
        else:
            value, pos = _get_str(text, pos)
            if value is None:
                raise HmpArgError(f"{name}: {_EXPECTED[prm.kind]} expected\n")
            args[prm.key] = _from_bytes_text(value)
    if _skip(text, pos) < len(text):
        raise HmpArgError(f"{name}: extraneous characters at the end of line\n")
    return args


@dataclass(frozen=True)
class HmpCommand:
    names: tuple[str, ...]
    params: str
    help: str
    run: Callable[[CommandRegistry, CommandContext, dict[str, Any]], str]
    args_type: str = ""

    def help_line(self, prefix: str = "") -> str:
        return f"{prefix}{'|'.join(self.names)} {self.params} -- {self.help}\n"


def _qmp(reg: CommandRegistry, ctx: CommandContext, command: str, **args: Any) -> Any:
    return reg.call(ctx, command, {k: v for k, v in args.items() if v is not None})


# -- info subcommands ----------------------------------------------------------


def _info_block(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    nodes = a.get("nodes", False)
    verbose = a.get("verbose", False)
    device = a.get("device")
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


def _info_snapshots(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    infos: list[BlockInfo] = _qmp(reg, ctx, "query-block")
    writable = [b for b in infos if b.inserted is not None and not b.inserted.ro]
    able = {d.id for d in ctx.machine.drives if d.medium is not None and block_cmds.snapshot_capable(d.medium)}
    capable = [b for b in writable if b.device in able]
    # -blockdev nodes after the drives, named by their (absent) BlockBackend: ''
    graph = [gd for gd in block_cmds.graph_disks(ctx.machine, roots_only=False)
             if block_cmds.snapshot_capable(gd.medium)]
    roots = {id(gd.graph_node) for gd in block_cmds.graph_disks(ctx.machine, roots_only=True)}
    if not capable and not any(id(gd.graph_node) in roots for gd in graph):
        return render_human.info_snapshots(False, [], [], any_snapshots=False)
    lists: list[tuple[str, list[SnapshotInfo]]] = []
    for b in capable:
        assert b.inserted is not None
        snaps = list(b.inserted.image.snapshots or [])
        if snaps:
            lists.append((b.device, snaps))
    for gd in graph:
        if gd.medium.node.driver.snapshots():
            lists.append(("", [snapshot_info(e) for e in gd.medium.node.driver.snapshots()]))
    if not lists:
        return render_human.info_snapshots(True, [], [], any_snapshots=False)
    global_snaps: list[SnapshotInfo] = _qmp(reg, ctx, "query-snapshots")
    names = {s.name for s in global_snaps}
    partial = [(dev, [s for s in snaps if s.name not in names]) for dev, snaps in lists]
    return render_human.info_snapshots(True, global_snaps, partial, any_snapshots=True)


def _info_status(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    st = _qmp(reg, ctx, "query-status")
    if st.running:
        return "VM status: running\n"
    return "VM status: paused\n" if st.status == "paused" else f"VM status: paused ({st.status})\n"


def _info_version(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    v = _qmp(reg, ctx, "query-version")
    q = v["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']}{v['package']}\n"


def _info_blockstats(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
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


def _info_block_jobs(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    """One line per job (QEMU's ``info block-jobs``); ``device`` there is the job id."""
    from vdkit.monitor.job_cmds import BlockJobInfo

    jobs: list[BlockJobInfo] = _qmp(reg, ctx, "query-block-jobs")
    if not jobs:
        return "No active jobs\n"
    out = []
    for j in jobs:
        what = f"Streaming device {j.device}" if j.type == "stream" else f"Type {j.type}, device {j.device}"
        out.append(f"{what}: Completed {j.offset} of {j.len} bytes, speed limit {j.speed} bytes/s\n")
    return "".join(out)


INFO_COMMANDS = (
    HmpCommand(("block",), "[-n] [-v] [device]", "show info of one block device or all block devices "
               "(-n: show named nodes; -v: show details)", _info_block, "nodes:-n,verbose:-v,device:B?"),
    HmpCommand(("block-jobs",), "", "show progress of ongoing block device operations", _info_block_jobs),
    HmpCommand(("blockstats",), "", "show block device statistics", _info_blockstats),
    HmpCommand(("snapshots",), "", "show the currently saved VM snapshots", _info_snapshots),
    HmpCommand(("status",), "", "show the current VM status (running|paused)", _info_status),
    HmpCommand(("version",), "", "show the version of QEMU", _info_version),
)


# -- top-level commands ----------------------------------------------------------


def _find(table: tuple[HmpCommand, ...], name: str) -> HmpCommand | None:
    return next((c for c in table if name in c.names), None)


def _help(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    """Words split like string arguments (a malformed one prints nothing); the first unknown one is named."""
    text = _to_bytes_text(a.get("name") or "")
    words: list[str] = []
    pos = 0
    while _skip(text, pos) < len(text):
        word, pos = _get_str(text, pos)
        if word is None:
            return ""
        words.append(_from_bytes_text(word))
    if not words:
        return "".join(c.help_line() for c in COMMANDS) + "".join(c.help_line("info ") for c in INFO_COMMANDS)
    cmd = _find(COMMANDS, words[0])
    if cmd is None:
        return f"unknown command: '{words[0]}'\n"
    if cmd.names[0] == "info" and len(words) > 1:
        sub = _find(INFO_COMMANDS, words[1])
        if sub is None:
            return f"unknown command: 'info {words[1]}'\n"
        return sub.help_line("info ")
    if cmd.names[0] == "info":
        return "".join(c.help_line("info ") for c in INFO_COMMANDS)
    return cmd.help_line()


def _eject(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    _qmp(reg, ctx, "eject", device=a["device"], force=a.get("force"))
    return ""


_READ_ONLY_MODES = ("retain", "read-only", "read-write")


def _change(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    dev, target, fmt, mode = a["device"], a["target"], a.get("arg"), a.get("read-only-mode")
    if dev == "vnc":  # QEMU's "change vnc password [secret]"; this daemon has no VNC server
        if mode is not None:
            return "Parameter 'read-only-mode' is invalid for VNC\n"
        if target != "password":
            return "Expected 'password' after 'vnc'\n"
        if fmt is None:
            return "terminal does not support password prompting\n"
        return "Error: Could not set password\n"
    if mode is not None and mode not in _READ_ONLY_MODES:
        raise VdkitError(f"invalid parameter value: {mode}")
    _qmp(reg, ctx, "blockdev-change-medium", device=dev, filename=target, format=fmt, **{"read-only-mode": mode})
    return ""


def _throttle(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    if a["device"] == "":
        # QEMU looks an empty name up as a qdev id, where "" names the peripheral container
        raise VdkitError(" is not a hotpluggable device")
    _qmp(reg, ctx, "block_set_io_throttle", **a)
    return ""


def _simple(qmp_name: str) -> Callable[[CommandRegistry, CommandContext, dict[str, Any]], str]:
    def run(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
        _qmp(reg, ctx, qmp_name)
        return ""

    return run


def _savevm(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    block_cmds.savevm(ctx, {"name": a["name"]} if "name" in a else {})
    return ""


def _tagged(fn: Callable[[CommandContext, dict[str, Any]], None]) -> Callable[..., str]:
    def run(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
        fn(ctx, {"name": a["name"]})
        return ""

    return run


def _block_resize(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    _qmp(reg, ctx, "block_resize", device=a["device"], size=a["size"])
    return ""


def _job_verb(command: str, **fixed: Any) -> Callable[[CommandRegistry, CommandContext, dict[str, Any]], str]:
    """``block_job_*``: the QMP verb on the job named by ``device`` (prints nothing on success)."""

    def run(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
        extra = {k: a[k] for k in ("speed", "force") if k in a}
        _qmp(reg, ctx, command, device=a["device"], **fixed, **extra)
        return ""

    return run


def _block_stream(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    _qmp(reg, ctx, "block-stream", device=a["device"], speed=a.get("speed"), base=a.get("base"))
    return ""


def _commit(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    """The offline commit (not a job): the active image's data into its backing file, then emptied."""
    from vdkit.monitor.job_cmds import hmp_commit

    return hmp_commit(ctx, a["device"])


def _snapshot_blkdev(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    _qmp(reg, ctx, "blockdev-snapshot-sync", device=a["device"], **{"snapshot-file": a.get("snapshot-file")},
         format=a.get("format", "qcow2"), mode="existing" if a.get("reuse") else "absolute-paths")
    return ""


def _drive_job(command: str) -> Callable[[CommandRegistry, CommandContext, dict[str, Any]], str]:
    """``drive_mirror`` / ``drive_backup``: ``-f`` sync full (else top), ``-n`` an existing target, ``-c`` compress."""

    def run(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
        args: dict[str, Any] = {"device": a["device"], "target": a["target"], "format": a.get("format"),
                                "sync": "full" if a.get("full") else "top",
                                "mode": "existing" if a.get("reuse") else "absolute-paths"}
        if command == "drive-mirror":
            args["unmap"] = True
        elif a.get("compress"):
            args["compress"] = True
        _qmp(reg, ctx, command, **args)
        return ""

    return run


def _snap_internal(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    _qmp(reg, ctx, "blockdev-snapshot-internal-sync", device=a["device"], name=a["name"])
    return ""


def _snap_delete_internal(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    _qmp(reg, ctx, "blockdev-snapshot-delete-internal-sync", device=a["device"], name=a["name"], id=a.get("id"))
    return ""


# -- NBD server (the QMP handlers of vdkit.monitor.nbd_cmds) ------------------------------------------


def _nbd_start(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    uri = a["uri"]
    writable = a.get("writable", False)
    if writable and not a.get("all"):
        raise VdkitError("-w only valid together with -a")
    addr = parse_socket_address(uri)
    nbd_cmds.nbd_server_start(ctx, {"addr": addr})
    if a.get("all"):  # every drive with a medium, under its name (QEMU's hmp_nbd_server_start)
        try:
            for d in ctx.machine.drives:
                if d.medium is not None:
                    nbd_cmds.nbd_server_add(ctx, {"device": d.id, "writable": writable})
        except VdkitError:
            nbd_cmds.nbd_server_stop(ctx, {})
            raise
    return ""


def _nbd_add(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    args: dict[str, Any] = {"device": a["device"], "writable": a.get("writable", False)}
    if a.get("name") is not None:
        args["name"] = a["name"]
    nbd_cmds.nbd_server_add(ctx, args)
    return ""


def _nbd_remove(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    nbd_cmds.nbd_server_remove(ctx, {"name": a["name"], "mode": "hard" if a.get("force") else "safe"})
    return ""


def _nbd_stop(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    nbd_cmds.nbd_server_stop(ctx, {})
    return ""


def _info_help(reg: CommandRegistry, ctx: CommandContext, a: dict[str, Any]) -> str:
    return "".join(c.help_line("info ") for c in INFO_COMMANDS)


_THROTTLE_ARGS = "device:B,bps:l,bps_rd:l,bps_wr:l,iops:l,iops_rd:l,iops_wr:l"

COMMANDS = (
    HmpCommand(("block_job_cancel",), "[-f] device", "stop an active background block operation (use -f\n"
               "\t\t\t if you want to abort the operation immediately\n"
               "\t\t\t instead of keep running until data is in sync)",
               _job_verb("block-job-cancel"), "force:-f,device:B"),
    HmpCommand(("block_job_complete",), "device", "stop an active background block operation",
               _job_verb("block-job-complete"), "device:B"),
    HmpCommand(("block_job_pause",), "device", "pause an active background block operation",
               _job_verb("block-job-pause"), "device:B"),
    HmpCommand(("block_job_resume",), "device", "resume a paused background block operation",
               _job_verb("block-job-resume"), "device:B"),
    HmpCommand(("block_job_set_speed",), "device speed", "set maximum speed for a background block operation",
               _job_verb("block-job-set-speed"), "device:B,speed:o"),
    HmpCommand(("block_resize",), "device size", "resize a block image", _block_resize, "device:B,size:o"),
    HmpCommand(("block_set_io_throttle",), "device bps bps_rd bps_wr iops iops_rd iops_wr",
               "change I/O throttle limits for a block drive", _throttle, _THROTTLE_ARGS),
    HmpCommand(("block_stream",), "device [speed [base]]", "copy data from a backing file into a block device",
               _block_stream, "device:B,speed:o?,base:s?"),
    HmpCommand(("change",), "device [-f] filename [format [read-only-mode]]",
               "change a removable medium, optional format, use -f to force the operation", _change,
               "device:B,force:-f,target:F,arg:s?,read-only-mode:s?"),
    HmpCommand(("commit",), "device|all", "commit changes to the disk images (if -snapshot is used) or backing "
               "files", _commit, "device:B"),
    HmpCommand(("cont", "c"), "", "resume emulation", _simple("cont")),
    HmpCommand(("delvm",), "tag", "delete a VM snapshot from its tag", _tagged(block_cmds.delvm), "name:s"),
    HmpCommand(("drive_backup",), "[-n] [-f] [-c] device target [format]",
               "initiates a point-in-time\n\t\t\tcopy for a device. The device's contents are\n"
               "\t\t\tcopied to the new image file, excluding data that\n"
               "\t\t\tis written after the command is started.\n"
               "\t\t\tThe -n flag requests QEMU to reuse the image found\n"
               "\t\t\tin new-image-file, instead of recreating it from scratch.\n"
               "\t\t\tThe -f flag requests QEMU to copy the whole disk,\n"
               "\t\t\tso that the result does not need a backing file.\n"
               "\t\t\tThe -c flag requests QEMU to compress backup data\n"
               "\t\t\t(if the target format supports it).\n\t\t\t",
               _drive_job("drive-backup"), "reuse:-n,full:-f,compress:-c,device:B,target:s,format:s?"),
    HmpCommand(("drive_mirror",), "[-n] [-f] device target [format]",
               "initiates live storage\n\t\t\tmigration for a device. The device's contents are\n"
               "\t\t\tcopied to the new image file, including data that\n"
               "\t\t\tis written after the command is started.\n"
               "\t\t\tThe -n flag requests QEMU to reuse the image found\n"
               "\t\t\tin new-image-file, instead of recreating it from scratch.\n"
               "\t\t\tThe -f flag requests QEMU to copy the whole disk,\n"
               "\t\t\tso that the result does not need a backing file.\n\t\t\t",
               _drive_job("drive-mirror"), "reuse:-n,full:-f,device:B,target:s,format:s?"),
    HmpCommand(("eject",), "[-f] device", "eject a removable medium (use -f to force it)", _eject,
               "force:-f,device:B"),
    HmpCommand(("help", "?"), "[cmd]", "show the help", _help, "name:S?"),
    HmpCommand(("info",), "[subcommand]", "show various information about the system state", _info_help),
    HmpCommand(("loadvm",), "tag", "restore a VM snapshot from its tag", _tagged(block_cmds.loadvm), "name:s"),
    HmpCommand(("nbd_server_add",), "nbd_server_add [-w] device [name]", "export a block device via NBD", _nbd_add,
               "writable:-w,device:B,name:s?"),
    HmpCommand(("nbd_server_remove",), "nbd_server_remove [-f] name",
               "remove an export previously exposed via NBD", _nbd_remove, "force:-f,name:s"),
    HmpCommand(("nbd_server_start",), "nbd_server_start [-a] [-w] host:port",
               "serve block devices on the given host and port", _nbd_start, "all:-a,writable:-w,uri:s"),
    HmpCommand(("nbd_server_stop",), "nbd_server_stop", "stop serving block devices using the NBD protocol",
               _nbd_stop),
    HmpCommand(("quit", "q"), "", "quit the emulator", _simple("quit")),
    HmpCommand(("savevm",), "tag", "save a VM snapshot. If no tag is provided, a new snapshot is created",
               _savevm, "name:s?"),
    HmpCommand(("snapshot_blkdev",), "[-n] device [new-image-file] [format]",
               "initiates a live snapshot\n\t\t\tof device. If a new image file is specified, the\n"
               "\t\t\tnew image file will become the new root image.\n"
               "\t\t\tIf format is specified, the snapshot file will\n"
               "\t\t\tbe created in that format.\n"
               "\t\t\tThe default format is qcow2.  The -n flag requests QEMU\n"
               "\t\t\tto reuse the image found in new-image-file, instead of\n"
               "\t\t\trecreating it from scratch.",
               _snapshot_blkdev, "reuse:-n,device:B,snapshot-file:s?,format:s?"),
    HmpCommand(("snapshot_blkdev_internal",), "device name", "take an internal snapshot of device.\n"
               "\t\t\tThe format of the image used by device must\n\t\t\tsupport it, such as qcow2.\n\t\t\t",
               _snap_internal, "device:B,name:s"),
    HmpCommand(("snapshot_delete_blkdev_internal",), "device name [id]", "delete an internal snapshot of device.\n"
               "\t\t\tIf id is specified, qemu will try delete\n\t\t\tthe snapshot matching both id and name.\n"
               "\t\t\tThe format of the image used by device must\n\t\t\tsupport it, such as qcow2.\n\t\t\t",
               _snap_delete_internal, "device:B,name:s,id:s?"),
    HmpCommand(("stop", "s"), "", "stop emulation", _simple("stop")),
)


def _command_name(text: str, pos: int) -> tuple[str, int]:
    """A command name runs to a space or a ``/`` (QEMU's format suffix, as in ``x/4x``)."""
    pos = _skip(text, pos)
    end = pos
    while end < len(text) and text[end] != "/" and text[end] not in _SPACE:
        end += 1
    return text[pos:end], end


def run_line_lf(reg: CommandRegistry, ctx: CommandContext, line: str) -> str:
    """Run one command line; output with ``\\n`` line ends.

    Messages name the command as its table entry does (``stop|s: ...``);
    ``unknown command`` and the ``Try "help ..."`` hint quote the line up to
    the end of the command name, leading spaces included.
    """
    if ctx.registry is None:
        ctx.registry = reg
    text = _to_bytes_text(line)
    if _skip(text, 0) >= len(text):
        return ""
    name, pos = _command_name(text, 0)
    cmd = _find(COMMANDS, name)
    if cmd is None:
        return f"unknown command: '{_from_bytes_text(text[:pos])}'\n"
    if cmd.names[0] == "info" and _skip(text, pos) < len(text):
        sub, pos = _command_name(text, pos)
        cmd = _find(INFO_COMMANDS, sub)
        if cmd is None:
            return f"unknown command: '{_from_bytes_text(text[:pos])}'\n"
    typed = _from_bytes_text(text[:pos])
    try:
        args = _parse_args("|".join(cmd.names), _spec(cmd.args_type), text, pos)
    except HmpArgError as exc:
        return _from_bytes_text(exc.text) + f'Try "help {typed}" for more information\n'
    try:
        return cmd.run(reg, ctx, args)
    except VdkitError as exc:
        # as error_report: the message, then the hint lines (a leading NUL: no line end added)
        hint = exc.hint or ""
        if hint and not hint.endswith("\n") and not hint.startswith("\0"):
            hint += "\n"
        return f"Error: {exc.message}\n" + hint.replace("\0", "")


def run_line(reg: CommandRegistry, ctx: CommandContext, line: str) -> str:
    """Run one command line; output with the monitor's ``\\r\\n`` line ends."""
    return run_line_lf(reg, ctx, line).replace("\n", "\r\n")
