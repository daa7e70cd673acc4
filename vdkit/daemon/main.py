"""``vdkit-daemon``: command line parsing (QEMU's option syntax) and process setup.

Supported options (a subset of ``qemu-system-x86_64``'s, same syntax)::

    -drive file=...,id=...,if=none|ide|virtio,index=...|bus=...,unit=...,media=disk|cdrom,
           format=...,readonly=on,cache=writeback|none|writethrough|directsync|unsafe,
           cache.direct=on,cache.no-flush=on,detect-zeroes=off|on|unmap,discard=...,node-name=...,
           aio=threads|native|io_uring,werror=...,rerror=...,force-share=on,
           bps=...,bps_rd=...,bps_wr=...,iops=...,iops_rd=...,iops_wr=...,
           bps_max=...,...,iops_size=...,group=...
           (and the throttling.bps-total=... spellings, throttling.*-max-length among them)
    -blockdev driver=file|raw|qcow2,node-name=...,file.*=...|file=NODE,backing=NODE|,...  or  -blockdev JSON
    -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off   (repeatable)
    -monitor unix:PATH,server=on,wait=off | tcp:...     (HMP, line mode)
    -nbd unix:PATH | tcp:HOST:PORT   NBD server exporting every drive by its id
    -S                  start in the "prelaunch" state (otherwise "running")
    --pidfile FILE, --daemonize
    -machine/-display/-nodefaults/-name are accepted and ignored (there is no guest)

Start-up follows QEMU's order: the command line (drive ids), the pid file,
the monitor socket folders, then each drive (its options, its image), then
the guest devices' checks.
Drives are opened before daemonizing, so an unusable image is reported on
the terminal with exit status 1, as QEMU does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

# Before numpy is first imported (the qcow2 code of big images imports it): no BLAS thread pool, since the
# daemon does no linear algebra, and every thread it has starts after _main blocks the stop signals.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from vdkit.daemon.runtime import PROG, STOP_SIGNALS, Daemon, error_report  # noqa: E402
from vdkit.devices.exports import Address  # noqa: E402
from vdkit.devices.registry import DeviceRegistry, DriveSpec  # noqa: E402
from vdkit.devices.throttle import ThrottleConfig  # noqa: E402
from vdkit.errors import VdkitError  # noqa: E402
from vdkit.info.model import BlockdevCacheInfo  # noqa: E402
from vdkit.monitor import bitmap_cmds, block_cmds, graph_cmds, job_cmds, machine_cmds, mirror_cmds, nbd_cmds  # noqa: E402
from vdkit.monitor.commands import CommandRegistry  # noqa: E402
from vdkit.opts import CACHE_MODES, id_wellformed, inet_port  # noqa: E402
from vdkit.opts import parse_bool as opts_parse_bool  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.cli.main import QomObject
    from vdkit.devices.registry import Medium


def build_registry() -> CommandRegistry:
    """Every QMP command the daemon answers, assembled here rather than by import side effects.

    The order is ``query-commands``' order: run-state commands, block and snapshot commands, NBD.
    """
    reg = CommandRegistry()
    machine_cmds.register(reg)
    block_cmds.register(reg)
    graph_cmds.register(reg)
    bitmap_cmds.register(reg)
    job_cmds.register(reg)
    mirror_cmds.register(reg)
    nbd_cmds.register(reg)
    return reg


class OptionError(Exception):
    pass


def split_opts(text: str, *, short_flags: list[str] | None = None) -> list[tuple[str, str]]:
    """QEMU's ``key=value,key=value`` with ``,,`` as an escaped comma; a bare ``key`` is ``key=on``.

    With ``short_flags`` (a QemuOpts list such as ``-drive``) a bare ``nokey`` is ``key=off``, and
    QEMU's deprecation warning for each such short-form boolean is appended to the list.
    """
    from vdkit.opts import split_items

    out = []
    for item in split_items(text, empty=False):
        key, sep, value = item.partition("=")
        if not sep:
            prefix = "no" if short_flags is not None and key.startswith("no") else ""
            key, value = key[len(prefix):], "off" if prefix else "on"
            if short_flags is not None and key not in ("help", "?"):
                short_flags.append(f"short-form boolean option '{prefix}{key}' deprecated\n"
                                   f"Please use {key}={value} instead")
        out.append((key, value))
    return out


def parse_bool(key: str, value: str) -> bool:
    """:func:`vdkit.opts.parse_bool` with the command line's error."""
    try:
        return opts_parse_bool(key, value)
    except VdkitError as exc:
        raise OptionError(exc.message) from None


_UINT64_MAX = (1 << 64) - 1


def _parse_uint(key: str, value: str) -> int:
    """A QemuOpts number: decimal, 0x hex or 0 octal (strtoull's base 0)."""
    text = value.strip()
    neg = text.startswith("-")
    body = text[1:] if neg else text
    try:
        if body[:2].lower() == "0x":
            n = int(body[2:], 16)
        elif len(body) > 1 and body.startswith("0"):
            n = int(body[1:], 8)
        else:
            if not body.isdigit():
                raise ValueError
            n = int(body, 10)
    except ValueError:
        raise OptionError(f"Parameter '{key}' expects a number") from None
    if n > _UINT64_MAX:
        raise OptionError(f"Value '{value}' is too large for parameter '{key}'")
    return (-n) & _UINT64_MAX if neg else n


def _throttle_number(key: str, value: str) -> int:
    n = _parse_uint(key, value)
    return n - (1 << 64) if n >= 1 << 63 else n  # QEMU keeps them in int64 fields


# legacy -drive names -> throttling.* spellings (QEMU renames before it parses; the
# *_max_length limits have no legacy spelling: "bps_max_length" is an unknown option)
_LEGACY_THROTTLE = {
    "bps": "throttling.bps-total", "bps_rd": "throttling.bps-read", "bps_wr": "throttling.bps-write",
    "iops": "throttling.iops-total", "iops_rd": "throttling.iops-read", "iops_wr": "throttling.iops-write",
    "bps_max": "throttling.bps-total-max", "bps_rd_max": "throttling.bps-read-max",
    "bps_wr_max": "throttling.bps-write-max", "iops_max": "throttling.iops-total-max",
    "iops_rd_max": "throttling.iops-read-max", "iops_wr_max": "throttling.iops-write-max",
    "iops_size": "throttling.iops-size", "group": "throttling.group", "readonly": "read-only",
}
# throttling.* spelling -> (bucket, "avg"|"max"|"length")
_THROTTLE_OPTS: dict[str, tuple[str, str]] = {}
for _bucket, _name in (("bps", "bps-total"), ("bps_rd", "bps-read"), ("bps_wr", "bps-write"),
                       ("iops", "iops-total"), ("iops_rd", "iops-read"), ("iops_wr", "iops-write")):
    _THROTTLE_OPTS[f"throttling.{_name}"] = (_bucket, "avg")
    _THROTTLE_OPTS[f"throttling.{_name}-max"] = (_bucket, "max")
    _THROTTLE_OPTS[f"throttling.{_name}-max-length"] = (_bucket, "length")

_INTERFACES = ("ide", "scsi", "floppy", "pflash", "mtd", "sd", "virtio", "xen", "none")
# units per bus and buses of q35 (AHCI: 6 ports, one device each); 0 units: index = unit
_UNITS_PER_BUS = {"ide": 1, "scsi": 7}
_MAX_BUS = {"ide": 5}
# interfaces the q35 machine cannot attach a drive to
_UNSUPPORTED_IF = ("scsi", "sd", "mtd", "xen")
# qemu-img --help's list (Debian's 7.2): any other format= is an unknown driver before anything is opened
_QEMU_FORMATS = frozenset((
    "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read",
    "dmg", "file", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "iser", "luks",
    "nbd", "nfs", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum",
    "raw", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat"))
_ACCEPTED_FLAGS = ("copy-on-read", "auto-read-only", "stats-account-invalid", "stats-account-failed")
_ID_ERROR = ("Parameter 'id' expects an identifier\n"
             "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")


def check_drive_id(text: str, warnings: list[str] | None = None) -> str | None:
    """What QEMU checks while it parses the command line: the id must be an identifier; then it
    reads the options, warning about short-form booleans (appended to ``warnings``)."""
    drive_id = None
    flags: list[str] = []
    for key, value in split_opts(text, short_flags=flags):
        if key == "id":
            drive_id = value
    if drive_id is not None and not id_wellformed(drive_id):
        raise OptionError(_ID_ERROR)
    if warnings is not None:
        warnings += flags
    return drive_id


class DriveIndexes:
    """The indexes (bus/unit) taken so far, per interface, as QEMU assigns them."""

    def __init__(self) -> None:
        self.used: dict[str, set[int]] = {}

    def assign(self, interface: str, index: int | None, bus: int | None, unit: int | None) -> tuple[int, int, int]:
        per_bus = _UNITS_PER_BUS.get(interface, 0)
        if index is not None and (bus is not None or unit is not None):
            raise OptionError("index cannot be used with bus and unit")
        if index is not None:
            bus, unit = (index // per_bus, index % per_bus) if per_bus else (0, index)
        used = self.used.setdefault(interface, set())
        if bus is None and unit is None:
            index = 0
            while index in used:
                index += 1
            bus, unit = (index // per_bus, index % per_bus) if per_bus else (0, index)
        bus = bus or 0
        if unit is None:  # the first free unit of that bus
            unit = 0
            while (bus * per_bus if per_bus else 0) + unit in used:
                unit += 1
        if per_bus and unit >= per_bus:
            raise OptionError(f"unit {unit} too big (max is {per_bus - 1})")
        index = bus * per_bus + unit if per_bus else unit
        if index in used:
            raise OptionError(f"drive with bus={bus}, unit={unit} (index={index}) exists")
        used.add(index)
        return index, bus, unit


def parse_drive(text: str, indexes: DriveIndexes | None = None) -> DriveSpec:
    """One -drive, checked in QEMU's order (the first error wins, with QEMU's text).

    Options that no -drive level takes are kept in ``leftover``: QEMU hands
    them to the format driver, which refuses them once the image is open.
    """
    indexes = indexes or DriveIndexes()
    opts: dict[str, str] = {}
    order: list[str] = []
    pairs = split_opts(text, short_flags=[])  # QemuOpts: nokey is key=off (warned about while parsing)
    given = {k for k, _ in pairs}
    for key, value in pairs:
        canon = _LEGACY_THROTTLE.get(key)
        if canon is not None:
            if canon in given:
                raise OptionError(f"'{canon}' and its alias '{key}' can't be used at the same time")
            key = canon
        if key not in opts:
            order.append(key)
        opts[key] = value  # the last of a repeated option counts

    def take(key: str) -> str | None:
        if key in opts:
            order.remove(key)
        return opts.pop(key, None)

    spec = DriveSpec(id=take("id") or "", text=text)

    cache: BlockdevCacheInfo | None = None
    mode = take("cache")
    if mode is not None:
        if mode not in CACHE_MODES:
            raise OptionError("invalid cache option")
        cache = BlockdevCacheInfo(*CACHE_MODES[mode])
    numbers = {k: take(k) for k in ("index", "bus", "unit")}
    parsed = {k: None if v is None else _parse_uint(k, v) for k, v in numbers.items()}
    ro = take("read-only")
    spec.readonly = ro is not None and parse_bool("read-only", ro)
    media = take("media")
    if media is not None:
        if media not in ("disk", "cdrom"):
            raise OptionError(f"'{media}' invalid media")
        spec.media = media
    interface = take("if")
    if interface is not None:
        if interface not in _INTERFACES:
            raise OptionError(f"unsupported bus type '{interface}'")
        spec.interface = interface
    snapshot = take("snapshot")
    spec.snapshot = snapshot is not None and parse_bool("snapshot", snapshot)
    spec.index, spec.bus, unit = indexes.assign(spec.interface, parsed["index"], parsed["bus"], parsed["unit"])
    if not spec.id:
        per_bus = _UNITS_PER_BUS.get(spec.interface, 0)
        if per_bus:
            kind = "cd" if spec.media == "cdrom" else "hd"
            spec.id = f"{spec.interface}{spec.bus}-{kind}{unit}"
        else:
            spec.id = f"{spec.interface}{unit}"
    # blockdev options: throttling numbers first, then aio, the limits, detect-zeroes, error actions
    throttle = ThrottleConfig()
    for key in [k for k in order if k in _THROTTLE_OPTS or k == "throttling.iops-size"]:
        tvalue = take(key)
        assert tvalue is not None
        if key == "throttling.iops-size":
            throttle.iops_size = _throttle_number(key, tvalue)
            continue
        bucket, what = _THROTTLE_OPTS[key]
        getattr(throttle, what)[bucket] = _throttle_number(key, tvalue)
    aio = take("aio")
    if aio is not None:
        if aio not in ("threads", "native", "io_uring"):
            raise OptionError("invalid aio option")
        spec.aio = aio
    try:
        throttle.validate()
    except VdkitError as exc:
        raise OptionError(exc.message) from exc
    spec.throttle = throttle
    spec.group = take("throttling.group")
    dz = take("detect-zeroes")
    if dz is not None:
        if dz not in ("off", "on", "unmap"):
            raise OptionError(f"invalid parameter value: {dz}")
        spec.detect_zeroes = dz
    for key, what in (("werror", "write"), ("rerror", "read")):
        action = take(key)
        allowed = ("ignore", "stop", "report", "enospc") if key == "werror" else ("ignore", "stop", "report")
        if action is not None and action not in allowed:
            raise OptionError(f"'{action}' invalid {what} error action")
    share = take("force-share")
    if share is not None and parse_bool("force-share", share):
        if not spec.readonly:
            raise OptionError("force-share=on can only be used with read-only images")
        spec.force_share = True
    fmt, driver = take("format"), take("driver")
    spec.format = fmt if fmt is not None else driver
    if spec.format is not None and spec.format not in _QEMU_FORMATS:
        raise OptionError(f"Unknown driver '{spec.format}'")
    discard = take("discard")
    if discard is not None and discard not in ("ignore", "off", "unmap", "on"):
        raise OptionError("Invalid discard option")
    direct, no_flush, writeback = take("cache.direct"), take("cache.no-flush"), take("cache.writeback")
    if cache is None:
        cache = BlockdevCacheInfo()
    spec.cache = BlockdevCacheInfo(
        cache.writeback if writeback is None else parse_bool("cache.writeback", writeback),
        cache.direct if direct is None else parse_bool("cache.direct", direct),
        cache.no_flush if no_flush is None else parse_bool("cache.no-flush", no_flush))
    for key in _ACCEPTED_FLAGS:
        flag = take(key)
        if flag is not None:
            parse_bool(key, flag)
    node_name = take("node-name")
    if node_name is not None:
        if not id_wellformed(node_name):
            raise OptionError(f"Invalid node-name: '{node_name}'")
        spec.node_name = node_name
    spec.file = take("file")
    if spec.file is not None and spec.file.startswith("json:"):
        spec.options = _json_drive_options(spec, opts, take)
        return spec
    from vdkit.formats.registry import window_options
    from vdkit.protocols.registry import is_protocol

    if spec.file is not None and "file.filename" in opts and not is_protocol(spec.format):
        raise OptionError("Can't specify 'file' and 'filename' options at the same time")  # the file child's
    if _options_drive(spec, opts):  # a local image given (or its backing replaced) by options: as json:
        import json

        local = {} if spec.file is None else {"file.filename": spec.file}
        spec.file = "json:" + json.dumps(local)
        spec.options = _json_drive_options(spec, opts, take)
        return spec

    file_driver = opts.get("file.driver")
    by_name: str | None = None  # file=<a protocol's name>: that protocol, unless a file.driver says otherwise
    if spec.file is not None and file_driver is None:
        from vdkit.block.chain import protocol_of
        from vdkit.protocols.registry import driver_for_prefix

        by_name = driver_for_prefix(protocol_of(spec.file))
    if is_protocol(spec.format):  # the protocol is the drive's node
        spec.file = _protocol_drive_name(spec, opts, take, str(spec.format), top=True)
    elif any(key in opts for key in window_options(spec.format)):  # raw's offset/size
        spec.file = _window_drive(spec, opts, take, by_name)
    elif is_protocol(file_driver):  # a format over a protocol node given by its options
        spec.file = _protocol_drive_name(spec, opts, take, str(file_driver), top=False)
    elif by_name is not None:
        from vdkit.protocols.registry import protocol_module

        mod = protocol_module(by_name)
        name_key = getattr(mod, "FILENAME_OPTION", None)
        if name_key is not None:  # file=URL[,file.*]: the name is one of the protocol's options (file.url wins)
            from vdkit.block.chain import protocol_of
            from vdkit.protocols.registry import driver_for_prefix

            named = opts.get(f"file.{name_key}") or spec.file or ""
            by_name = driver_for_prefix(protocol_of(named)) or by_name
            spec.file = _protocol_drive_name(spec, opts, take, by_name, top=False)
        elif hasattr(mod, "AUTO_READ_ONLY"):
            mod.AUTO_READ_ONLY.add(spec.file)  # -drive sets auto-read-only on the protocol node
    # the protocol layer's options (file.locking=off, ...) are taken without effect
    spec.leftover = [k for k in order if not k.startswith("file.")]
    return spec


def _options_drive(spec: DriveSpec, opts: dict[str, str]) -> bool:
    """A -drive that names a local image by options (``driver=qcow2,file.filename=t.qcow2``, no ``file=``)
    or replaces the backing of one (``backing=``, ``backing.*`` beside a plain file name): the options
    go through the interpreter as a ``json:`` name's do.  Protocol nodes and raw windows keep their
    own paths."""
    from vdkit.block.chain import protocol_of
    from vdkit.formats.registry import window_options
    from vdkit.protocols.registry import is_protocol

    if is_protocol(spec.format) or opts.get("file.driver", "file") != "file":
        return False
    if any(key in opts for key in window_options(spec.format)):
        return False
    if spec.file is not None and protocol_of(spec.file) is not None:
        return False
    by_options = spec.file is None and "file.filename" in opts
    return by_options or any(key == "backing" or key.startswith("backing.") for key in opts)


def _json_drive_options(spec: DriveSpec, opts: dict[str, str], take: Callable[[str], str | None]) -> dict[str, object]:
    """``file=json:{...}``: the name's options (QEMU's grammar and texts, :mod:`vdkit.block.json_name`) with
    the -drive's own laid over them, as QEMU gives options beside a name precedence (``format=`` is the
    ``driver``, ``file.filename=`` replaces the name's file, ``offset=512`` its offset, as a string); a
    ``node-name`` inside the name names the node unless the -drive does.  What is left of them is the
    interpreter's (:func:`_interpret_json_drive`): its errors come when the drive opens, as QEMU's do."""
    from vdkit.block import json_name

    assert spec.file is not None
    try:
        given = json_name.parse(spec.file)
    except VdkitError as exc:
        raise OptionError(exc.message) from None
    for key in list(opts):
        given[key] = take(key) or ""
    if spec.format is not None:
        given["driver"] = spec.format
    node_name = given.pop("node-name", None)
    if spec.node_name is None and node_name is not None:
        if not isinstance(node_name, str) or not id_wellformed(node_name):
            raise OptionError(f"Invalid node-name: '{node_name}'")
        spec.node_name = node_name
    return given


def _protocol_drive_name(spec: DriveSpec, opts: dict[str, str], take: Callable[[str], str | None], driver: str,
                        *, top: bool) -> str:
    """``driver=P,...``, ``file.driver=P,file...`` or ``file=<P's name>[,file.*]`` for a protocol ``P``: the
    name the drive's node opens (the protocol module's ``name_for_options``, QEMU's texts), with the slots
    of ``vdkit.protocols.registry``.

    The protocol's options are taken off the drive's (whatever else is left is refused as for any drive):
    at the top the keys its ``drive_option`` claims, below a format the ``file.*`` keys (the tuning ones
    dropped unless it ``KEEPS_FILE_TUNING``), a file name given beside them as its ``FILENAME_OPTION``.
    ``-drive`` sets auto-read-only on the node: the name joins the module's ``AUTO_READ_ONLY``; a
    ``READ_ONLY`` protocol at the top makes the drive read-only; a module with ``json_name`` may name
    the node ``json:{...}`` by its options (:func:`protocol_json_name`).
    """
    from vdkit.protocols.registry import protocol_module

    mod = protocol_module(driver)
    if top:
        given = {k: take(k) or "" for k in [k for k in list(opts) if mod.drive_option(k)]}
        flat: dict[str, object] = {"driver": driver, **given}
        if getattr(mod, "READ_ONLY", False):
            spec.readonly = True  # the node itself is the drive's: auto-read-only makes it read-only
    else:
        take("file.driver")
        given = {k[len("file."):]: take(k) or "" for k in [k for k in list(opts) if k.startswith("file.")]}
        if not getattr(mod, "KEEPS_FILE_TUNING", False):
            given = {k: v for k, v in given.items() if k not in _FILE_TUNING}
        name_key = getattr(mod, "FILENAME_OPTION", None)
        if name_key is not None and name_key not in given and spec.file is not None:
            given[name_key] = spec.file
        flat = {"driver": spec.format, "file.driver": driver, **{f"file.{k}": v for k, v in given.items()}}
    reported: list[str] = []
    sink = hasattr(mod, "REPORT_SINK")
    if sink:
        setattr(mod, "REPORT_SINK", reported)  # noqa: B010 - lines it reports go under the -drive's location
    try:
        name: str = mod.name_for_options(given, driver)
    except VdkitError as exc:
        lines = [*reported, exc.message + (f"\n{exc.hint.rstrip()}" if exc.hint else "")]
        raise OptionError(f"\n{PROG}: -drive {spec.text}: ".join(lines)) from None
    finally:
        if sink:
            setattr(mod, "REPORT_SINK", None)  # noqa: B010
    auto_ro = getattr(mod, "AUTO_READ_ONLY", None)
    if auto_ro is not None:
        auto_ro.add(name)
    from vdkit.formats.registry import PROBE_FALLBACK

    # whether the options name the node json:{...}, whatever format ends up above it
    if hasattr(mod, "json_name") and mod.json_name(flat, PROBE_FALLBACK) is not None:
        PROTOCOL_JSON[spec.id] = (driver, flat)
    return name


def _window_drive(spec: DriveSpec, opts: dict[str, str], take: Callable[[str], str | None],
                  by_name: str | None) -> str:
    """``format=raw,offset=...,size=...``: a window into the file (``registry.window_name``), named
    ``json:{...}`` as QEMU names it (values are strings, as -drive gives them); a window over a
    protocol (``file.driver``, or ``by_name``: the protocol of ``file=``'s name) is refused by it."""
    from vdkit.formats.registry import window_name, window_options

    flat: dict[str, object] = {"driver": spec.format}
    for key in window_options(spec.format):
        value = take(key)
        if value is not None:
            flat[key] = value
    file_driver = take("file.driver")
    flat["file.driver"] = file_driver or by_name or "file"
    filename = spec.file if spec.file is not None else take("file.filename")
    if filename is not None:
        flat["file.filename"] = filename
    try:
        window = window_name(flat)
    except VdkitError as exc:
        raise OptionError(exc.message + (f"\n{exc.hint.rstrip()}" if exc.hint else "")) from None
    assert window is not None
    return window[0]


PROTOCOL_JSON: dict[str, tuple[str, dict[str, object]]] = {}
"""Drive id -> (protocol, the options QEMU names its node by: an http cookie, sslverify off), flattened
as ``--image-opts`` spells them; the ``json:{...}`` name is made once the format is known."""


_FILE_TUNING = ("locking", "aio", "cache.direct", "cache.no-flush", "read-only", "auto-read-only", "force-share",
                "discard", "detect-zeroes", "node-name")


def protocol_json_name(spec: DriveSpec, fmt: str, *, own: bool = False) -> str | None:
    """The ``json:{...}`` name QEMU gives a protocol drive's node opened as ``fmt`` (None: the plain name);
    ``own``: the name of the protocol node below the format node."""
    given = PROTOCOL_JSON.get(spec.id)
    if given is None:
        return None
    from vdkit.info.render_json import dumps_compact
    from vdkit.protocols.registry import protocol_module

    driver, flat = given
    desc = protocol_module(driver).json_name(flat, fmt)
    if desc is not None and own and isinstance(desc.get("file"), dict):
        desc = desc["file"]
    return None if desc is None else "json:" + dumps_compact(desc)


def check_opened(spec: DriveSpec, fmt: str | None) -> None:
    """After the image opened: the file driver's aio check, then options no layer took."""
    if spec.file and spec.aio == "native" and not spec.cache.direct:
        raise OptionError("aio=native was specified, but it requires cache.direct=on, which was not specified.")
    from vdkit.formats.registry import runtime_options

    own = frozenset() if fmt is None else runtime_options(fmt)  # the format's options, taken without effect
    leftover = [k for k in spec.leftover if k not in own]
    if leftover:
        if fmt is None:
            raise OptionError("Must specify either driver or file")
        raise OptionError(f"Block format '{fmt}' does not support the option '{leftover[0]}'")
    if spec.interface in _UNSUPPORTED_IF or spec.bus > _MAX_BUS.get(spec.interface, spec.bus):
        unit = spec.index % _UNITS_PER_BUS[spec.interface] if spec.interface in _UNITS_PER_BUS else spec.index
        raise OptionError(f"machine type does not support if={spec.interface},bus={spec.bus},unit={unit}")


def check_devices(specs: list[tuple[DriveSpec, bool, bool]]) -> None:
    """Once every drive is open, the guest devices take them: IDE disks first (no -drive prefix), then virtio.

    ``specs``: (spec, has a medium, medium read-only).
    """
    for spec, inserted, ro in specs:
        if spec.interface == "ide" and spec.media != "cdrom":
            if not inserted:
                raise OptionError("Device needs media, but drive is empty")
            if ro:
                raise OptionError("Block node is read-only")
    for spec, inserted, _ in specs:
        if spec.interface == "virtio" and not inserted:
            raise OptionError(f"-drive {spec.text}: Device needs media, but drive is empty")


# QEMU's character device spellings: the ones vdkit does not serve are refused as unsupported,
# anything else is not a char driver at all (QEMU's words)
_CHARDEV_NAMES = ("stdio", "null", "pty", "vc", "msmouse", "braille", "testdev", "ringbuf", "memory")
_CHARDEV_PREFIXES = ("unix:", "tcp:", "udp:", "telnet:", "tn3270:", "websocket:", "file:", "pipe:", "mon:",
                     "chardev:", "serial:", "tty:", "parallel:", "vc:", "/dev/", "COM", "null:", "spicevmc",
                     "spiceport")


def parse_address(text: str, option: str | None = None) -> Address:
    """A monitor (``option`` "-qmp"/"-monitor": QEMU's chardev texts) or NBD listening address."""
    target = text.split(",", 1)[0]

    def qemu_error(msg: str) -> OptionError:
        if option is None:
            return OptionError(msg)
        return OptionError(f"{option} {text}: {msg}\n{PROG}: {option} {text}: parse error: {text}")

    if option is not None and target not in _CHARDEV_NAMES and not target.startswith(_CHARDEV_PREFIXES):
        raise OptionError(f"{option} {text}: '{text}' is not a valid char driver\n"
                          f"{PROG}: {option} {text}: parse error: {text}")
    for key, value in split_opts(text)[1:]:
        if key not in ("server", "wait", "nowait", "nodelay", "id"):
            raise qemu_error(f"Invalid parameter '{key}'")
        if key == "server" and not parse_bool(key, value):
            raise OptionError("vdkit-daemon monitors are always servers (server=on)")
    if target.startswith("unix:"):
        return Address("unix", path=target[5:])
    if target.startswith("tcp:"):  # the chardev grammar: HOST:PORT or :PORT (no [IPv6] brackets)
        import re

        m = re.match(r"([^:]{1,64}):([^,]{1,32})", target[4:]) or re.match(r"()[:]([^,]{1,32})", target[4:])
        if m is None:
            raise OptionError(f"{option or '-nbd'} {text}: parse error: {text}")
        host, port = m.groups()
        try:
            return Address("tcp", host=host or "127.0.0.1", port=inet_port(host, port))
        except VdkitError as exc:
            raise OptionError(f"{option or '-nbd'} {text}: {exc.message}") from None
    raise OptionError(f"'{target}' is not a supported monitor address (unix:PATH or tcp:HOST:PORT)")


def _monitor(cfg: Config, option: str, text: str) -> Address:
    addr = parse_address(text, option)
    cfg.monitor_texts.append((option, text, addr))
    return addr


def check_monitor_paths(cfg: Config) -> None:
    """QEMU binds its monitor sockets before it opens drives: a unix socket in a missing folder fails first."""
    for option, text, addr in cfg.monitor_texts:
        if addr.kind == "unix" and not os.path.isdir(os.path.dirname(os.path.abspath(addr.path))):
            raise OptionError(f"{option} {text}: Failed to bind socket to {addr.path}: No such file or directory")


@dataclass
class Config:
    drive_texts: list[str] = field(default_factory=list)
    blockdev_texts: list[str] = field(default_factory=list)
    monitor_texts: list[tuple[str, str, Address]] = field(default_factory=list)
    qmp: list[Address] = field(default_factory=list)
    hmp: list[Address] = field(default_factory=list)
    nbd: list[Address] = field(default_factory=list)
    pidfile: str | None = None
    objects: dict[str, QomObject] = field(default_factory=dict)
    daemonize: bool = False
    start_paused: bool = False
    verbose: bool = False


# -h/-help: the options parse_args accepts, laid out as qemu-system-x86_64 -h lists its own
USAGE = """\
usage: vdkit-daemon [options]

vdkit's storage daemon: holds drives open, answers QMP and HMP as qemu-system-x86_64 7.2 does
and exports the drives over NBD.  There is no guest.  Options may start with - or --.

Standard options:
-h or -help     display this help and exit
-machine [type=]name[,prop[=value][,...]]
                accepted and ignored (the machine is always q35)
-M name         the same as -machine
-accel [accel=]accelerator[,prop[=value][,...]]
                accepted and ignored
-m [size=]megs[,slots=n,maxmem=size]
                accepted and ignored (no guest RAM)
-name string1[,process=string2][,debug-threads=on|off]
                accepted and ignored

Block device options:
-drive [file=file][,if=none|ide|virtio|floppy|pflash][,bus=n][,unit=m][,media=disk|cdrom][,index=i]
       [,cache=writethrough|writeback|none|directsync|unsafe][,format=f]
       [,cache.direct=on|off][,cache.no-flush=on|off]
       [,snapshot=on|off][,rerror=ignore|stop|report]
       [,werror=ignore|stop|report|enospc][,id=name][,node-name=name]
       [,aio=threads|native|io_uring][,force-share=on|off]
       [,readonly=on|off][,copy-on-read=on|off]
       [,discard=ignore|unmap][,detect-zeroes=on|off|unmap]
       [[,bps=b]|[[,bps_rd=r][,bps_wr=w]]]
       [[,iops=i]|[[,iops_rd=r][,iops_wr=w]]]
       [[,bps_max=bm]|[[,bps_rd_max=rm][,bps_wr_max=wm]]]
       [[,iops_max=im]|[[,iops_rd_max=irm][,iops_wr_max=iwm]]]
       [[,iops_size=is]]
       [[,group=g]]
       [,throttling.*=...]
                use 'file' as a drive image (qcow2 or raw; repeatable)
-object TYPENAME[,PROP1=VALUE1,...]
                create a new object (secret, tls-creds-x509 for NBD drives' tls-creds)
-blockdev [driver=]driver[,node-name=N][,discard=ignore|unmap]
          [,cache.direct=on|off][,cache.no-flush=on|off]
          [,read-only=on|off][,auto-read-only=on|off]
          [,force-share=on|off][,detect-zeroes=on|off|unmap]
          [,driver specific parameters...]
                configure a block backend (file, raw, qcow2; dotted keys or JSON)

Display options:
-display type[,...]
                accepted and ignored (there is no display)
-nographic      accepted and ignored

Monitor and export options:
-monitor unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off
                HMP monitor on a socket (line mode; repeatable)
-qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off
                like -monitor but opens in 'control' mode (QMP; repeatable)
-nbd unix:PATH | tcp:HOST:PORT
                NBD server exporting every drive under its id
                (unix sockets, of monitors and NBD alike, are created mode 0600)

Debug/Expert options:
-pidfile file   write PID to 'file' (mode 0600, locked)
-S              start paused, in the 'prelaunch' state (use 'cont' to run)
-daemonize      daemonize after the drives are opened
-nodefaults     accepted and ignored
-v              log debugging messages on stderr

See docs/daemon.md and docs/nbd.md for what differs from QEMU.
"""

_IGNORED_WITH_ARG = ("-machine", "-M", "-display", "-name", "-accel", "-m")
_IGNORED_FLAGS = ("-nodefaults", "-nographic")


def parse_args(argv: list[str]) -> Config:
    cfg = Config()
    ids: set[str] = set()
    i = 0

    def value(opt: str) -> str:
        nonlocal i
        if i + 1 >= len(argv):
            raise OptionError(f"{opt}: requires an argument")
        i += 1
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        opt = "-" + arg.lstrip("-") if arg.startswith("-") else arg
        try:
            if opt == "-drive":
                # QEMU checks only the id while it reads the command line; the rest when it opens the drive
                v = value(opt)
                warnings: list[str] = []
                try:
                    drive_id = check_drive_id(v, warnings)
                except OptionError as exc:
                    raise OptionError(f"-drive {v}: {exc}") from None
                for warning in warnings:
                    sys.stderr.write(f"{PROG}: -drive {v}: warning: {warning}\n")
                if drive_id is not None and drive_id in ids:
                    raise OptionError(f"-drive {v}: Duplicate ID '{drive_id}' for drive")
                if drive_id is not None:
                    ids.add(drive_id)
                cfg.drive_texts.append(v)
            elif opt == "-blockdev":  # opened before the drives, as QEMU does (vdkit.monitor.graph_cmds)
                cfg.blockdev_texts.append(value(opt))
            elif opt == "-object":  # created at once (secrets, TLS credentials for NBD drives)
                _object(cfg, value(opt))
            elif opt == "-qmp":
                cfg.qmp.append(_monitor(cfg, opt, value(opt)))
            elif opt == "-monitor":
                cfg.hmp.append(_monitor(cfg, opt, value(opt)))
            elif opt == "-nbd":  # NBD server exporting every drive by its id (vdkit.daemon.nbd_export)
                cfg.nbd.append(parse_address(value(opt)))
            elif opt == "-pidfile":
                cfg.pidfile = value(opt)
            elif opt == "-daemonize":
                cfg.daemonize = True
            elif opt == "-S":
                cfg.start_paused = True
            elif opt == "-v":
                cfg.verbose = True
            elif opt in ("-h", "-help"):
                sys.stdout.write(USAGE)
                sys.stdout.flush()
                sys.exit(0)
            elif opt in _IGNORED_WITH_ARG:
                value(opt)
            elif opt in _IGNORED_FLAGS:
                pass
            else:
                raise OptionError(f"{arg}: invalid option")
        finally:
            i += 1
    return cfg


# What creating an object (not parsing its options) reports: qemu-system-x86_64 prints these without
# the -object location.  The others carry it, and two read differently from qemu-img's.
_CREATION_ERRORS = ("Missing 'dir' property value", "Either 'file' or 'data' must be provided",
                    "'file' and 'data' are mutually exclusive", "Unable to ", "Our own certificate ",
                    "username should not be set", "'priority' property is not set", "No secret with id",
                    "Key should be", "IV ", "Length ", "Base64 data", "Object with id")


def _object(cfg: Config, text: str) -> None:
    """``-object``: qemu-img's object rules (:func:`vdkit.cli.main.add_object`), qemu-system's texts."""
    import re

    from vdkit.cli.main import add_object

    try:
        add_object(text, cfg.objects)
    except VdkitError as exc:
        msg = exc.message
        if msg.startswith(_CREATION_ERRORS):
            raise OptionError(msg) from None
        msg = re.sub(r"^Parameter '([^']*)' is unexpected$", r"Invalid parameter '\1'", msg)
        msg = re.sub(r"^attempt to add duplicate property '([^']*)' to object \(type 'container'\)$",
                     r"Duplicate ID '\1' for object", msg)
        raise OptionError(f"-object {text}: {msg}") from None


def _open_drives(machine: DeviceRegistry, texts: list[str]) -> None:
    """Each -drive in turn: its options, its image, then what only an open image tells; then the devices."""
    from vdkit.monitor.block_cmds import open_error

    indexes = DriveIndexes()
    opened: list[tuple[DriveSpec, bool, bool]] = []
    for text in texts:
        try:
            spec = parse_drive(text, indexes)
            if spec.node_name is not None and machine.find_drive(spec.node_name) is not None:
                raise OptionError(f"node-name={spec.node_name} is conflicting with a device id")
            if spec.id in machine.all_node_names():
                raise OptionError(f"Device name '{spec.id}' conflicts with an existing node name")
            if spec.node_name is not None and spec.node_name == spec.id:
                raise OptionError(f"Device name '{spec.id}' conflicts with an existing node name")
            with _drive_scope(spec):
                if spec.options is not None:
                    _interpret_json_drive(spec)
                try:
                    drive = machine.add_drive(spec) if not (spec.leftover and not spec.file) else None
                except VdkitError as exc:
                    err = open_error(exc)
                    hint = (err.hint or exc.hint or "").rstrip("\n")
                    raise OptionError(err.message + (f"\n{hint}" if hint else "")) from None
                if drive is not None and drive.medium is not None and spec.options is not None:
                    _name_json_drive(spec, drive.medium)
            medium = drive.medium if drive is not None else None
            if medium is not None and spec.file is not None:
                from vdkit.block.chain import protocol_of
                from vdkit.protocols.registry import driver_for_prefix

                proto = driver_for_prefix(protocol_of(spec.file))
                if proto is not None:
                    _protocol_opened(machine, spec, medium, proto)
            if medium is not None and spec.format is None and not medium.ro:
                warning = medium.node.driver.probed_open_warning(spec.file or "")
                if warning is not None:
                    sys.stderr.write(warning)
            check_opened(spec, medium.node.format if medium is not None else None)
        except OptionError as exc:
            raise OptionError(f"-drive {text}: {exc}") from None
        assert drive is not None
        opened.append((spec, drive.medium is not None, drive.medium is not None and drive.medium.ro))
    check_devices(opened)


def _drive_scope(spec: DriveSpec) -> contextlib.AbstractContextManager[object]:
    """The open scope a drive given by options is interpreted and opened in
    (:func:`vdkit.devices.option_media.options_scope`: its own options, the process's objects), the
    interpreter's warnings printed under the -drive as QEMU prints them; other drives open in the
    process scope."""
    if spec.options is None:
        return contextlib.nullcontext()
    from vdkit.devices.option_media import options_scope

    def warn(text: str) -> None:
        sys.stderr.write(f"{PROG}: -drive {spec.text}: warning: {text}\n")

    return options_scope(warn)


def _interpret_json_drive(spec: DriveSpec) -> None:
    """The drive's options through the one interpreter (:func:`vdkit.devices.option_media.interpret`): the
    file name and format to open; a curl node at the top makes the drive read-only."""
    from vdkit.devices.option_media import interpret

    assert spec.options is not None and spec.file is not None
    try:
        spec.file, spec.format, top_ro = interpret(spec.file, spec.options)
    except VdkitError as exc:
        raise OptionError(exc.message + (f"\n{exc.hint.rstrip()}" if exc.hint else "")) from None
    spec.readonly = spec.readonly or top_ro


def _name_json_drive(spec: DriveSpec, medium: Medium) -> None:
    """Name the drive's nodes as QEMU does (:func:`vdkit.devices.option_media.name_nodes`)."""
    from vdkit.devices.option_media import name_nodes

    assert spec.options is not None
    name_nodes(medium, spec.options)


def _protocol_opened(machine: DeviceRegistry, spec: DriveSpec, medium: Medium, driver: str) -> None:
    """A protocol drive once open: over a read-only protocol (curl) a writable format other than raw needs
    to write its file (QEMU: ``Block node is read-only``); a json: name once the format is known
    (:func:`protocol_json_name`)."""
    from vdkit.formats.registry import PASSES_PERMISSIONS
    from vdkit.protocols.registry import is_protocol, protocol_module

    fmt = medium.node.format
    top = is_protocol(fmt)  # the protocol node itself is the drive's node (no format layer)
    read_only = getattr(protocol_module(driver), "READ_ONLY", False)
    if read_only and not medium.ro and fmt not in PASSES_PERMISSIONS and not top:
        machine.close_medium(medium)
        raise OptionError("Block node is read-only")
    name = protocol_json_name(spec, fmt)
    if name is not None:
        medium.node.filename = name
        if not top:  # the protocol node below has a json: name of its own
            own = protocol_json_name(spec, fmt, own=True)
            below: object = medium.node.driver.file
            if hasattr(below, "json_filename"):
                below.json_filename = own


def _open_blockdevs(machine: DeviceRegistry, texts: list[str]) -> None:
    """Each -blockdev (JSON or dotted keys), as blockdev-add; errors as QEMU prints them."""
    from vdkit.block import json_name
    from vdkit.monitor import graph_cmds

    for text in texts:
        try:
            if text.lstrip().startswith("{"):
                opts = json_name.loads(text)  # QEMU's JSON texts, as a json: name's
            else:
                opts = graph_cmds.keyval_options(split_opts(text))
            graph_cmds.add_node(machine, opts)
        except (OptionError, VdkitError) as exc:
            hint = exc.hint.rstrip() if isinstance(exc, VdkitError) and exc.hint else ""
            raise OptionError(f"-blockdev {text}: {exc}" + (f"\n{hint}" if hint else "")) from None


class PidfileError(Exception):
    pass


def _open_pidfile(path: str) -> int:
    """Create and lock the pid file as QEMU does: mode 0600, a write lock held while the daemon lives.

    The lock is an OFD lock (it conflicts with QEMU's ``lockf``), so it stays
    with the daemonized child after the fork.  Errors carry QEMU's texts.
    """
    import fcntl

    from vdkit.io.file import _F_OFD_SETLK, flock_bytes

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise PidfileError(f"cannot create PID file: Could not create '{path}': {os.strerror(exc.errno or 0)}") \
            from None
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, flock_bytes(fcntl.F_WRLCK, 0, 0))
    except OSError as exc:
        os.close(fd)
        raise PidfileError(f"cannot create PID file: Cannot lock pid file: {os.strerror(exc.errno or 0)}") \
            from None
    return fd


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def main(argv: list[str] | None = None) -> int:
    """The ``vdkit-daemon`` entry point; with ``argv`` None (the process's own command line) it ends the process.

    Everything is closed and flushed by then (images unlocked, sockets and pid
    file removed); skipping the interpreter's teardown (numpy, asyncio) makes
    the process end as promptly as QEMU after ``quit`` or SIGTERM.
    """
    rc = _main(sys.argv[1:] if argv is None else argv)
    if argv is None:
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc)
    return rc


def _main(args: list[str]) -> int:
    # The stop signals go to the runtime's sigwaitinfo thread (which learns the sender's pid, as QEMU
    # reports it); blocking them first means every thread started from here on (librados' threads as an
    # rbd drive opens, job and NBD threads) inherits the block and none of them can take the signal.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        cfg = parse_args(args)
    except OptionError as exc:
        error_report(str(exc))
        return 1
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.WARNING,
                        format=f"{PROG}: %(name)s: %(message)s")
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = f"vdkit {version('vdkit')}"
    except PackageNotFoundError:
        package = "vdkit"
    # QEMU creates the pid file before it opens drives or monitors (their errors come later)
    pid_fd: int | None = None
    if cfg.pidfile:
        try:
            pid_fd = _open_pidfile(cfg.pidfile)
        except PidfileError as exc:
            error_report(str(exc))
            return 1
        _write_pid(pid_fd)

    def remove_pidfile() -> None:
        if cfg.pidfile and pid_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(cfg.pidfile)

    # --daemonize forks before any drive opens, as QEMU does: librados (an rbd drive) starts threads
    # while it connects, and a child forked after that has none of them (its first request hung).  The
    # child keeps the terminal's stderr until it is ready, so start-up errors still reach it; the
    # parent waits for "ok" (or an error text, or the child's exit) on the pipe.
    ready_fd: int | None = None
    if cfg.daemonize:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid > 0:
            os.close(ready_w)
            if pid_fd is not None:
                os.close(pid_fd)  # the child holds the lock (same open file description)
            msg = os.read(ready_r, 4096)
            os.close(ready_r)
            if msg.startswith(b"ok"):
                return 0
            sys.stderr.write(msg.decode(errors="replace"))
            return 1
        os.close(ready_r)
        os.setsid()
        if pid_fd is not None:
            _write_pid(pid_fd)
        ready_fd = ready_w
    machine = DeviceRegistry(start_paused=cfg.start_paused, package=package)
    try:
        check_monitor_paths(cfg)
        _open_blockdevs(machine, cfg.blockdev_texts)
        _open_drives(machine, cfg.drive_texts)
    except OptionError as exc:
        error_report(str(exc))
        machine.close_all()
        remove_pidfile()  # before the child's exit closes the pipe: the parent returns after this
        return 1
    daemon = Daemon(machine, build_registry(), qmp_addrs=cfg.qmp, hmp_addrs=cfg.hmp, nbd_addrs=cfg.nbd)

    def ready() -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            os.write(ready_fd, b"ok")
            os.close(ready_fd)
            ready_fd = None

    try:
        asyncio.run(daemon.serve(ready))
    except OSError as exc:
        text = f"{PROG}: could not listen: {exc.strerror or exc}\n"
        if ready_fd is not None:
            os.write(ready_fd, text.encode())
        else:
            sys.stderr.write(text)
        machine.close_all()
        return 1
    finally:
        remove_pidfile()
    return 0


if __name__ == "__main__":
    sys.exit(main())
