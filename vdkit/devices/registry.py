"""The device registry: drives, their media, the run state and the VM clock.

Everything a monitor command reads or changes lives here, behind ONE lock
(``DeviceRegistry.lock``).  Every command handler runs with that lock held
(the daemon's runtime takes it around each dispatch), so a ``query-block``
never sees half of a ``savevm`` or ``transaction``: queries and snapshot
operations are serialised.  The lock is re-entrant (``vdkit.block.jobs.DeviceLock``) because
handlers run in a worker thread (blocking file I/O must not stall the event
loop) and HMP commands re-enter QMP handlers.

This package sits below the monitor and imports no asyncio: the daemon plugs
its services in through the attributes declared here (``event_sink``, the
NBD ``exports`` service, see :mod:`vdkit.devices.exports`).

Media are opened with :func:`vdkit.block.node.open_image`, which takes the
QEMU-compatible image locks, so a QEMU (or qemu-img) trying to write an image
the daemon has open is refused exactly as it would be by another QEMU.

There is no guest.  A drive with ``if=none`` is an unattached BlockBackend
(``removable`` true, no ``qdev``); any other interface is modelled as
attached to an emulated device of that kind: ``media=cdrom`` gets a tray and
I/O status like ``ide-cd``, a disk gets I/O status and is not removable.
The "VM clock" is the time the daemon has spent in the ``running`` state.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vdkit.devices.graph import Graph
from vdkit.devices.iostats import DriveStats
from vdkit.devices.throttle import ThrottleConfig
from vdkit.errors import VdkitError
from vdkit.info.model import BlockdevCacheInfo

if TYPE_CHECKING:
    from vdkit.block.driver import CorruptionReport
    from vdkit.block.node import Node
    from vdkit.devices.exports import ExportService

# the format of snapshot=on's temporary overlay (QEMU's bdrv_append_temp_snapshot)
TEMP_SNAPSHOT_FORMAT = "qcow2"


@dataclass
class DriveSpec:
    """One ``-drive`` as parsed from the command line."""

    id: str
    file: str | None = None
    interface: str = "none"
    media: str = "disk"
    format: str | None = None
    readonly: bool = False
    cache: BlockdevCacheInfo = field(default_factory=BlockdevCacheInfo)
    detect_zeroes: str = "off"
    node_name: str | None = None
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    group: str | None = None
    text: str = ""  # the option text, for error messages
    force_share: bool = False
    aio: str = "threads"
    index: int = -1  # QEMU's drive index (bus * units per bus + unit)
    bus: int = 0
    # options no -drive level takes: QEMU hands them to the format driver, which refuses them
    leftover: list[str] = field(default_factory=list)
    snapshot: bool = False  # snapshot=on: writes go to a temporary qcow2 overlay
    # file=json:{...}: the name's options under the -drive's own (flattened); the daemon interprets them
    options: dict[str, object] | None = None


@dataclass
class Medium:
    """An inserted image: the open chain and the node names of its format and file nodes."""

    node: Node
    # per chain element (top first): (format node name, file node name)
    names: list[tuple[str, str]]
    ro: bool
    # per chain element: creation serials of (format node, file node); QEMU
    # lists named nodes by creation time
    serials: list[tuple[int, int]] = field(default_factory=list)
    # snapshot=on: the temporary overlay's path (its node's filename is QEMU's json: description)
    overlay_path: str | None = None
    # the chain index of that overlay (external snapshots put nodes above it)
    overlay_index: int = 0
    # snapshot=on's cache flags on a medium without the overlay: None = as the drive's option says (a
    # medium inserted later inherits them), False = its own (a commit pivoted off the overlay)
    snapshot_flags: bool | None = None
    # the top file node's read-only flag when it differs from ``ro`` (auto-read-only: QEMU opens the
    # file read-write under a format that can only be read)
    file_ro: bool | None = None
    # the top node's detect-zeroes when it is not the drive's option (a backup target: QEMU opens it so)
    detect_zeroes: str | None = None

    @property
    def node_name(self) -> str:
        return self.names[0][0]

    @property
    def dead(self) -> bool:
        """A fatal corruption event killed the top node: QEMU then shows the drive as not inserted."""
        return self.node.driver.dead


@dataclass
class Drive:
    spec: DriveSpec
    medium: Medium | None = None
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    group: str | None = None
    tray_open: bool = False
    qdev: str | None = None
    # read-only state of the last medium inserted (the -drive options' before any):
    # what blockdev-change-medium's read-only-mode=retain keeps, also across an eject
    retained_ro: bool = False
    # I/O accounting of the backend (NBD requests), reported by query-blockstats
    stats: DriveStats = field(default_factory=DriveStats)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def has_tray(self) -> bool:
        # an IDE CD-ROM; a virtio disk or a floppy with media=cdrom is only read-only
        return self.qdev is not None and self.spec.media == "cdrom" and self.spec.interface == "ide"

    @property
    def has_io_status(self) -> bool:
        """IDE and virtio devices report an I/O status; floppy and pflash do not (QEMU 7.2)."""
        return self.qdev is not None and self.spec.interface not in ("floppy", "pflash")

    @property
    def removable(self) -> bool:
        return self.qdev is None or self.has_tray or self.spec.interface == "floppy"


class DeviceRegistry:
    """All drives of one daemon, the run state and the VM clock, behind one lock."""

    def __init__(self, *, start_paused: bool = False, package: str = "") -> None:
        from vdkit.block.jobs import DeviceLock

        self.lock = DeviceLock()  # an RLock that tells a running job whether a command waits
        self.drives: list[Drive] = []
        self.package = package
        self.run_state = "prelaunch" if start_paused else "running"
        self._clock_ns = 0
        self._running_since: int | None = None if start_paused else time.monotonic_ns()
        self._name_counter = itertools.count(0)
        self._serial = itertools.count(0)
        self._used_names: set[str] = set()
        self._qdev_counter = itertools.count(16)
        self._virtio_counter = itertools.count(0)
        self.shutdown_requested: str | None = None
        # bumped after every command that may change state (see runtime); keys render caches
        self.generation = 0
        self.render_cache: dict[object, tuple[object, object]] = {}  # drive id or node slot -> (key, rendering)
        # Delivers events raised outside a command (NBD connection threads) to the QMP clients;
        # set by the runtime (thread-safe hand-off to its event loop), None without one.
        self.event_sink: Callable[[list[tuple[str, dict[str, Any] | None]]], None] | None = None
        # The NBD server (the daemon's listener implements ExportService); None without one.
        self.exports: ExportService | None = None
        # monitor-owned nodes (-blockdev, blockdev-add): vdkit.devices.graph
        self.graph = Graph()
        # names of blockdev-add nodes that blockdev-snapshot moved into a drive (still the monitor's)
        self.monitor_owned: set[str] = set()
        # block jobs (vdkit.block.jobs): they share the lock and send events through event_sink
        from vdkit.block.jobs import JobList

        self.jobs = JobList(self.lock, self._job_event)

    def _job_event(self, name: str, data: dict[str, Any] | None) -> None:
        """A job's event, in the order jobs and commands raise them (commands hold the lock meanwhile)."""
        self.generation += 1  # a job's state shows in the queries (its filter node, the chain)
        if self.event_sink is not None:
            self.event_sink([(name, data)])

    # -- run state and clock ----------------------------------------------------
    @property
    def running(self) -> bool:
        return self.run_state == "running"

    def vm_clock_ns(self) -> int:
        extra = 0 if self._running_since is None else time.monotonic_ns() - self._running_since
        return self._clock_ns + extra

    def set_vm_clock_ns(self, value: int) -> None:
        self._clock_ns = value
        if self._running_since is not None:
            self._running_since = time.monotonic_ns()

    def stop(self) -> bool:
        """Pause; True if the state changed from running (a ``STOP`` event is due)."""
        if self.run_state != "running":
            return False
        self._clock_ns = self.vm_clock_ns()
        self._running_since = None
        self.run_state = "paused"
        return True

    def cont(self) -> bool:
        """Resume; True if it was not running (a ``RESUME`` event is due)."""
        if self.run_state == "running":
            return False
        self.run_state = "running"
        self._running_since = time.monotonic_ns()
        return True

    # -- node names -----------------------------------------------------------------
    def _auto_name(self) -> str:
        while True:
            # QEMU's automatic names are "#block" + 3 digits; keep that shape
            n = next(self._name_counter)
            name = f"#block{(n * 137 + 11) % 1000:03d}"
            if n >= 1000:
                name = f"#block{n}"
            if name not in self._used_names:
                self._used_names.add(name)
                return name

    def all_node_names(self) -> set[str]:
        return set(self._used_names)

    def auto_name(self) -> str:
        """A fresh ``#blockNNN`` name (QEMU's automatic node names)."""
        return self._auto_name()

    def claim_name(self, name: str) -> None:
        if name in self._used_names:
            raise VdkitError(f"Duplicate nodes with node-name='{name}'")
        self._used_names.add(name)

    def release_name(self, name: str) -> None:
        self._used_names.discard(name)

    def name_new_node(self, node_name: str | None) -> tuple[tuple[str, str], tuple[int, int]]:
        """Names and creation serials of a new format node and its file node, ``(fmt, file)`` each.

        The file node is created (and named) first, as QEMU opens the child
        before its parent; ``node_name`` (checked by the caller) names the
        format node, else both get automatic names.
        """
        file_serial = self.next_serial()
        fmt_serial = self.next_serial()
        file_name = self.auto_name()
        if node_name is not None:
            self.claim_name(node_name)
            fmt_name = node_name
        else:
            fmt_name = self.auto_name()
        return (fmt_name, file_name), (fmt_serial, file_serial)

    def next_serial(self) -> int:
        """The next creation serial (QEMU lists named nodes newest first)."""
        return next(self._serial)

    # -- drives -----------------------------------------------------------------------
    def add_drive(self, spec: DriveSpec) -> Drive:
        if any(d.id == spec.id for d in self.drives):
            raise VdkitError(f"Duplicate ID '{spec.id}' for drive")
        drive = Drive(spec)
        if spec.interface == "virtio":
            drive.qdev = f"/machine/peripheral-anon/device[{next(self._virtio_counter)}]/virtio-backend"
        elif spec.interface == "pflash":
            drive.qdev = f"/machine/system.flash{spec.index}"
        elif spec.interface != "none":
            drive.qdev = f"/machine/unattached/device[{next(self._qdev_counter)}]"
        drive.retained_ro = ro = spec.readonly or spec.media == "cdrom"
        if spec.file and spec.snapshot:
            drive.medium = self.open_snapshot_medium(spec.file, spec.format, readonly=ro, node_name=spec.node_name,
                                                     force_share=spec.force_share)
        elif spec.file:
            drive.medium = self.open_medium(spec.file, spec.format, readonly=ro, node_name=spec.node_name,
                                            force_share=spec.force_share)
        self.drives.append(drive)
        if spec.throttle.enabled:
            self.set_throttle(drive, spec.throttle, spec.group or spec.id)
        return drive

    def set_throttle(self, drive: Drive, cfg: ThrottleConfig, group: str | None) -> None:
        """Put ``drive`` into throttle ``group`` with limits ``cfg`` (``group`` None: no throttling).

        As in QEMU, a group has ONE configuration: whoever sets limits for a
        group sets them for every member (all members share the same
        ``ThrottleConfig`` object, and the NBD server one set of buckets).
        """
        if group is None or not cfg.enabled:
            drive.throttle = ThrottleConfig()
            drive.group = None
            return
        drive.group = group
        for d in self.drives:
            if d.group == group:
                d.throttle = cfg
        drive.throttle = cfg

    def open_medium(self, filename: str, fmt: str | None, *, readonly: bool,
                    node_name: str | None = None, force_share: bool = False) -> Medium:
        from vdkit.block.node import open_image

        if node_name is not None and node_name in self._used_names:
            raise VdkitError(f"Duplicate nodes with node-name='{node_name}'")
        file_ro: bool | None = None
        try:
            node = open_image(filename, fmt, readonly=readonly, force_share=force_share)
        except VdkitError as exc:
            # auto-read-only (QEMU's default for -drive): a format that can only be read
            # (bochs, cloop, dmg) is opened read-only instead of failing
            if readonly or not exc.message.endswith("Image is read-only"):
                raise
            readonly, file_ro = True, False
            node = open_image(filename, fmt, readonly=True, force_share=force_share)
        names: list[tuple[str, str]] = []
        serials: list[tuple[int, int]] = []
        for i, _ in enumerate(node.chain()):
            file_serial = next(self._serial)
            serials.append((next(self._serial), file_serial))
            fmt_name = node_name if (i == 0 and node_name is not None) else None
            # creation order: the file node is named before its format node
            file_name = self._auto_name()
            if fmt_name is None:
                fmt_name = self._auto_name()
            else:
                self._used_names.add(fmt_name)
            names.append((fmt_name, file_name))
        medium = Medium(node, names, readonly, serials, file_ro=file_ro)
        self._hook_corruption(medium)
        try:
            for layer in node.chain():
                layer.bitmaps  # noqa: B018 - QEMU loads persistent bitmaps at open (a writable image marks them in use)
        except BaseException:
            self.close_medium(medium)
            raise
        return medium

    def push_overlay(self, medium: Medium, overlay: Node, names: tuple[str, str], serials: tuple[int, int]) -> None:
        """An external snapshot: ``overlay`` becomes the medium's top, the old top its read-only backing.

        The Medium object stays the same, so the drive, its NBD exports and
        its throttling follow the new top (QEMU moves every parent of the old
        node onto the overlay).
        """
        from vdkit.devices.graph import set_node_readonly

        old = medium.node
        if not old.readonly:
            old.flush()
        overlay.backing = old
        medium.node = overlay
        medium.names.insert(0, names)
        medium.serials.insert(0, serials)
        if medium.overlay_path is not None:
            medium.overlay_index += 1
        if not (medium.overlay_path is not None and medium.overlay_index == 1):
            set_node_readonly(old, True)  # QEMU leaves a snapshot=on temporary overlay writable
        self._hook_corruption(medium)

    def pop_overlay(self, medium: Medium) -> Node:
        """Undo :meth:`push_overlay` (a failed transaction); returns the detached overlay, still open."""
        from vdkit.devices.graph import set_node_readonly

        overlay = medium.node
        old = overlay.backing
        assert old is not None
        overlay.backing = None
        medium.node = old
        del medium.names[0]
        del medium.serials[0]
        if medium.overlay_path is not None:
            medium.overlay_index -= 1
        set_node_readonly(old, medium.ro)
        self._hook_corruption(medium)
        return overlay

    def _hook_corruption(self, medium: Medium) -> None:
        for i, layer in enumerate(medium.node.chain()):
            layer.driver.corruption_hook = functools.partial(self._corruption, medium, i)

    def open_snapshot_medium(self, filename: str, fmt: str | None, *, readonly: bool = False,
                             node_name: str | None = None, force_share: bool = False) -> Medium:
        """``snapshot=on``: the image read-only under a temporary qcow2 overlay, as QEMU does.

        The overlay (``$TMPDIR`` or ``/var/tmp``, ``vl.XXXXXX``) has the disk's
        size and no backing file in its header: the image is attached as its
        backing in memory, and the file is unlinked once open.  The overlay's
        name is QEMU's ``json:`` description of that arrangement.
        """
        import json
        import os
        import secrets
        import string

        from vdkit.block.node import open_image
        from vdkit.formats.registry import format_module
        from vdkit.opts import CreateOpts, with_file_options

        base = self.open_medium(filename, fmt, readonly=True, node_name=node_name, force_share=force_share)
        try:
            tmpdir = os.environ.get("TMPDIR") or "/var/tmp"
            alphabet = string.ascii_letters + string.digits
            while True:
                path = os.path.join(tmpdir, "vl." + "".join(secrets.choice(alphabet) for _ in range(6)))
                if not os.path.exists(path):
                    break
            fmt_mod = format_module(TEMP_SNAPSHOT_FORMAT)
            opts = CreateOpts(with_file_options(fmt_mod.create_options()))
            opts.set_number("size", base.node.size)
            fmt_mod.create_image(path, opts)
            try:
                top = open_image(path, TEMP_SNAPSHOT_FORMAT, readonly=readonly, backing=False)
            finally:
                os.unlink(path)
        except BaseException:
            self.close_medium(base)
            raise
        top.backing = base.node
        file_ = {"driver": "file", "filename": filename}
        top.filename = "json:" + json.dumps({"backing": {"driver": base.node.format, "file": file_},
                                             "driver": TEMP_SNAPSHOT_FORMAT,
                                             "file": {"driver": "file", "filename": path}})
        file_serial = next(self._serial)
        serials = [(next(self._serial), file_serial), *base.serials]
        file_name = self._auto_name()
        names = [(self._auto_name(), file_name), *base.names]
        medium = Medium(top, names, readonly, serials, overlay_path=path)
        self._hook_corruption(medium)
        return medium

    def _corruption(self, medium: Medium, index: int, report: CorruptionReport) -> None:
        """A corruption event of one layer of ``medium``: QEMU's stderr line and ``BLOCK_IMAGE_CORRUPTED``.

        Called from whatever thread ran the request (an NBD connection, a
        command handler), with the device lock held.  ``device`` is the
        drive's id for the top layer and empty for a backing layer (QEMU
        names only a backend's root); ``offset``/``size`` only when the event
        is about a host range.
        """
        import sys

        sys.stderr.write(report.text + "\n")
        sys.stderr.flush()
        self.generation += 1  # query-block changes (a dead node shows as not inserted)
        device = ""
        if index == 0:
            device = next((d.id for d in self.drives if d.medium is medium), "")
        data: dict[str, Any] = {"device": device, "node-name": medium.names[index][0], "msg": report.message}
        if report.offset >= 0:
            data["offset"] = report.offset
        if report.size >= 0:
            data["size"] = report.size
        data["fatal"] = report.fatal
        if self.event_sink is not None:
            self.event_sink([("BLOCK_IMAGE_CORRUPTED", data)])

    def close_medium(self, medium: Medium) -> None:
        for fmt_name, file_name in medium.names:
            self._used_names.discard(fmt_name)
            self._used_names.discard(file_name)
            self.monitor_owned.discard(fmt_name)
            self.monitor_owned.discard(file_name)
        medium.node.close()

    def find_drive(self, name: str) -> Drive | None:
        for d in self.drives:
            if d.id == name:
                return d
        return None

    def close_all(self) -> None:
        for d in self.drives:
            if d.medium is not None:
                try:
                    self.close_medium(d.medium)
                except OSError:
                    pass
                d.medium = None
        for g in reversed(self.graph.nodes):
            try:
                g.close()
            except OSError:
                pass
        self.graph.nodes.clear()
