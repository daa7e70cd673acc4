"""``vdkit-daemon``: command line parsing (QEMU's option syntax) and process setup.

Supported options (a subset of ``qemu-system-x86_64``'s, same syntax)::

    -drive file=...,id=...,if=none|ide|virtio|scsi,media=disk|cdrom,format=...,
           readonly=on,cache=writeback|none|writethrough|directsync|unsafe,
           cache.direct=on,cache.no-flush=on,detect-zeroes=off|on|unmap,node-name=...,
           bps=...,bps_rd=...,bps_wr=...,iops=...,iops_rd=...,iops_wr=...,
           bps_max=...,...,bps_max_length=...,...,iops_size=...,group=...
           (and the equivalent throttling.bps-total=... spellings)
    -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off   (repeatable)
    -monitor unix:PATH,server=on,wait=off | tcp:...     (HMP, line mode)
    -nbd unix:PATH | tcp:HOST:PORT   NBD server exporting every drive by its id
    -S                  start in the "prelaunch" state (otherwise "running")
    --pidfile FILE, --daemonize
    -machine/-display/-nodefaults/-name are accepted and ignored (there is no guest)

Drives are opened before daemonizing, so an unusable image is reported on
the terminal with exit status 1, as QEMU does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field

from vdkit.daemon.devices import THROTTLE_KEYS, DeviceRegistry, DriveSpec, ThrottleConfig
from vdkit.daemon.runtime import Address, Daemon
from vdkit.errors import VdkitError
from vdkit.info.model import BlockdevCacheInfo

PROG = "vdkit-daemon"


class OptionError(Exception):
    pass


def split_opts(text: str) -> list[tuple[str, str]]:
    """QEMU's ``key=value,key=value`` with ``,,`` as an escaped comma."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    out = []
    for p in parts:
        if not p:
            continue
        key, sep, value = p.partition("=")
        out.append((key, value if sep else "on"))
    return out


def parse_bool(key: str, value: str) -> bool:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise OptionError(f"Parameter '{key}' expects a number") from None


_CACHE_MODES = {
    "writeback": BlockdevCacheInfo(True, False, False),
    "none": BlockdevCacheInfo(True, True, False),
    "writethrough": BlockdevCacheInfo(False, False, False),
    "directsync": BlockdevCacheInfo(False, True, False),
    "unsafe": BlockdevCacheInfo(True, False, True),
}

# throttling.* spellings -> legacy -drive names
_THROTTLE_ALIASES = {
    "throttling.bps-total": "bps", "throttling.bps-read": "bps_rd", "throttling.bps-write": "bps_wr",
    "throttling.iops-total": "iops", "throttling.iops-read": "iops_rd", "throttling.iops-write": "iops_wr",
    "throttling.bps-total-max": "bps_max", "throttling.bps-read-max": "bps_rd_max",
    "throttling.bps-write-max": "bps_wr_max", "throttling.iops-total-max": "iops_max",
    "throttling.iops-read-max": "iops_rd_max", "throttling.iops-write-max": "iops_wr_max",
    "throttling.bps-total-max-length": "bps_max_length", "throttling.bps-read-max-length": "bps_rd_max_length",
    "throttling.bps-write-max-length": "bps_wr_max_length", "throttling.iops-total-max-length": "iops_max_length",
    "throttling.iops-read-max-length": "iops_rd_max_length",
    "throttling.iops-write-max-length": "iops_wr_max_length",
    "throttling.iops-size": "iops_size", "throttling.group": "group",
}


def parse_drive(text: str, index: int) -> DriveSpec:
    spec = DriveSpec(id="", text=text)
    cache: BlockdevCacheInfo | None = None
    direct = no_flush = None
    throttle = ThrottleConfig()
    for key, value in split_opts(text):
        key = _THROTTLE_ALIASES.get(key, key)
        if key == "file":
            spec.file = value
        elif key == "id":
            spec.id = value
        elif key == "if":
            if value not in ("none", "ide", "virtio", "scsi", "floppy", "sd", "pflash", "mtd", "xen"):
                raise OptionError(f"unsupported bus type '{value}'")
            spec.interface = value
        elif key == "media":
            if value not in ("disk", "cdrom"):
                raise OptionError(f"'{value}' invalid media")
            spec.media = value
        elif key == "format":
            spec.format = value
        elif key in ("readonly", "read-only"):
            spec.readonly = parse_bool(key, value)
        elif key == "cache":
            if value not in _CACHE_MODES:
                raise OptionError("invalid cache option")
            cache = _CACHE_MODES[value]
        elif key == "cache.direct":
            direct = parse_bool(key, value)
        elif key == "cache.no-flush":
            no_flush = parse_bool(key, value)
        elif key == "cache.writeback":
            cache = BlockdevCacheInfo(parse_bool(key, value), False, False)
        elif key == "detect-zeroes":
            if value not in ("off", "on", "unmap"):
                raise OptionError(f"Parameter 'detect-zeroes' does not accept value '{value}'")
            spec.detect_zeroes = value
        elif key == "node-name":
            spec.node_name = value
        elif key == "discard":
            if value not in ("ignore", "off", "unmap", "on"):
                raise OptionError("Invalid discard option")
        elif key in ("aio", "werror", "rerror"):
            pass  # I/O policies: accepted for command-line compatibility, nothing to configure yet
        elif key in THROTTLE_KEYS:
            throttle.avg[key] = _parse_int(key, value)
        elif key.endswith("_max") and key[:-4] in THROTTLE_KEYS:
            throttle.max[key[:-4]] = _parse_int(key, value)
        elif key.endswith("_max_length") and key[:-11] in THROTTLE_KEYS:
            throttle.length[key[:-11]] = _parse_int(key, value)
        elif key == "iops_size":
            throttle.iops_size = _parse_int(key, value)
        elif key == "group":
            spec.group = value
        else:
            raise OptionError(f"Invalid parameter '{key}'")
    if cache is None:
        cache = BlockdevCacheInfo()
    spec.cache = BlockdevCacheInfo(cache.writeback, cache.direct if direct is None else direct,
                                   cache.no_flush if no_flush is None else no_flush)
    try:
        throttle.validate()
    except VdkitError as exc:
        raise OptionError(exc.message) from exc
    spec.throttle = throttle
    if not spec.id:
        if spec.interface == "none":
            spec.id = f"none{index}"
        elif spec.interface == "ide":
            spec.id = f"ide{index // 2}-{'cd' if spec.media == 'cdrom' else 'hd'}{index % 2}"
        else:
            spec.id = f"{spec.interface}{index}"
    if spec.media == "cdrom" and spec.interface == "virtio":
        raise OptionError("virtio doesn't support media=cdrom")
    return spec


def parse_address(text: str) -> Address:
    target = text.split(",", 1)[0]
    for key, value in split_opts(text)[1:]:
        if key == "server" and not parse_bool(key, value):
            raise OptionError("vdkit-daemon monitors are always servers (server=on)")
        if key not in ("server", "wait", "nowait", "nodelay", "id"):
            raise OptionError(f"Invalid parameter '{key}'")
    if target.startswith("unix:"):
        return Address("unix", path=target[5:])
    if target.startswith("tcp:"):
        host, _, port = target[4:].rpartition(":")
        try:
            return Address("tcp", host=host or "127.0.0.1", port=int(port))
        except ValueError:
            raise OptionError(f"invalid port '{port}'") from None
    raise OptionError(f"'{target}' is not a supported monitor address (unix:PATH or tcp:HOST:PORT)")


@dataclass
class Config:
    drives: list[DriveSpec] = field(default_factory=list)
    qmp: list[Address] = field(default_factory=list)
    hmp: list[Address] = field(default_factory=list)
    nbd: list[Address] = field(default_factory=list)
    pidfile: str | None = None
    daemonize: bool = False
    start_paused: bool = False
    verbose: bool = False


_IGNORED_WITH_ARG = ("-machine", "-M", "-display", "-name", "-accel", "-m")
_IGNORED_FLAGS = ("-nodefaults", "-nographic")


def parse_args(argv: list[str]) -> Config:
    cfg = Config()
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
                v = value(opt)
                try:
                    cfg.drives.append(parse_drive(v, len(cfg.drives)))
                except OptionError as exc:
                    raise OptionError(f"-drive {v}: {exc}") from None
            elif opt == "-qmp":
                cfg.qmp.append(parse_address(value(opt)))
            elif opt == "-monitor":
                cfg.hmp.append(parse_address(value(opt)))
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
                print(__doc__)
                sys.exit(0)
            elif opt in _IGNORED_WITH_ARG:
                value(opt)
            elif opt in _IGNORED_FLAGS:
                pass
            else:
                raise OptionError(f"{arg}: invalid option")
        finally:
            i += 1
    ids = [d.id for d in cfg.drives]
    for d in cfg.drives:
        if ids.count(d.id) > 1:
            raise OptionError(f"-drive id={d.id}: Duplicate ID '{d.id}' for drive")
    return cfg


def _err(msg: str) -> None:
    sys.stderr.write(f"{PROG}: {msg}\n")


class PidfileError(Exception):
    pass


def _open_pidfile(path: str) -> int:
    """Create and lock the pid file as QEMU does: mode 0600, a write lock held while the daemon lives.

    The lock is an OFD lock (it conflicts with QEMU's ``lockf``), so it stays
    with the daemonized child after the fork.  Errors carry QEMU's texts.
    """
    import fcntl

    from vdkit.io.locks import _F_OFD_SETLK, _FLOCK

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise PidfileError(f"cannot create PID file: Could not create '{path}': {os.strerror(exc.errno or 0)}") \
            from None
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
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
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no linear algebra here: no BLAS thread pool
    try:
        cfg = parse_args(args)
    except OptionError as exc:
        _err(str(exc))
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
            _err(str(exc))
            return 1
        _write_pid(pid_fd)

    def remove_pidfile() -> None:
        if cfg.pidfile and pid_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(cfg.pidfile)

    machine = DeviceRegistry(start_paused=cfg.start_paused, package=package)
    for spec in cfg.drives:
        try:
            machine.add_drive(spec)
        except VdkitError as exc:
            from vdkit.monitor.block_cmds import open_error

            _err(f"-drive {spec.text}: {open_error(exc).message}")
            machine.close_all()
            remove_pidfile()
            return 1
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
        ready_fd: int | None = ready_w
    else:
        ready_fd = None
    daemon = Daemon(machine, qmp_addrs=cfg.qmp, hmp_addrs=cfg.hmp, nbd_addrs=cfg.nbd)

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
