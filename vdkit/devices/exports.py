"""The export service the monitor's NBD commands talk to, and the socket address they pass it.

The QMP handlers (``nbd-server-*``, ``block-export-*``, in
:mod:`vdkit.monitor.nbd_cmds`) validate arguments and resolve drives; what
needs sockets and threads (binding a listener, hanging up clients) is the
daemon's NBD listener (:class:`vdkit.daemon.nbd_export.NbdService`), which
implements this protocol and is handed to the machine as
``DeviceRegistry.exports``.  Nothing here imports asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vdkit.errors import VdkitError
from vdkit.opts import inet_port

if TYPE_CHECKING:
    from vdkit.block.dirty_bitmap import DirtyBitmap
    from vdkit.devices.registry import Drive, Medium


@dataclass(frozen=True)
class Address:
    """``unix:PATH`` or ``tcp:HOST:PORT``."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"

    @classmethod
    def from_qapi(cls, addr: dict[str, Any]) -> Address:
        """A listening address from QAPI's ``SocketAddress`` (what ``nbd-server-start`` takes and
        :func:`vdkit.opts.parse_socket_address` makes of a text); unix and inet only."""
        kind, data = addr["type"], addr["data"]
        if kind == "unix":
            return cls("unix", path=data["path"])
        if kind == "inet":
            return cls("tcp", host=data["host"], port=inet_port(data["host"], data["port"]))
        raise VdkitError(f"Socket address type '{kind}' is not supported by vdkit-daemon")


@dataclass(frozen=True)
class ExportEntry:
    """One export as ``query-block-exports`` lists it."""

    id: str
    name: str
    node_name: str
    node: object = None  # the exported node (a job's filter above it is what QEMU's export then uses)


@dataclass(frozen=True)
class RemovedExport:
    """An export that was removed; ``busy``: clients were connected (QEMU then sends
    ``BLOCK_EXPORT_DELETED`` only after the command's answer, once they are gone)."""

    id: str
    busy: bool


class ExportService(Protocol):
    """The daemon's NBD server as the monitor sees it.  Errors are VdkitErrors with QEMU's texts."""

    @property
    def running(self) -> bool:
        """A listener is bound (``nbd-server-start`` succeeded, no ``nbd-server-stop`` since)."""
        ...

    def start(self, addr: Address) -> None:
        """Bind the listener (bind errors are the command's) and start accepting clients."""
        ...

    def stop(self) -> list[RemovedExport]:
        """Remove every export and close the listener ("NBD server not running" without one)."""
        ...

    def check_name(self, name: str, description: str = "") -> None:
        """Refuse a new export's name or description (too long, taken) or a server not running."""
        ...

    def add(self, *, id: str, medium: Medium, name: str, writable: bool, description: str = "",
            on_eject_drive: str | None = None, backend: Drive | None = None,
            bitmaps: list[DirtyBitmap] | None = None, allocation_depth: bool = False) -> None:
        """Export ``medium`` as ``name``; ``on_eject_drive``: removed when that drive's medium goes;
        ``backend``: the unnamed backend of a ``-blockdev`` node's export (no drive has its medium);
        ``bitmaps``: served as ``qemu:dirty-bitmap:NAME`` contexts, busy until the export goes;
        ``allocation_depth``: the ``qemu:allocation-depth`` context is served."""
        ...

    def remove(self, id: str, mode: str) -> RemovedExport:
        """Remove export ``id``; ``mode`` "safe" refuses while clients are connected, "hard" hangs up."""
        ...

    def remove_for_medium(self, drive_id: str, medium: Medium) -> list[RemovedExport]:
        """``medium`` left drive ``drive_id``: remove the exports made to go with it (QEMU's on-eject rule)."""
        ...

    def list_exports(self) -> list[ExportEntry]:
        """The exports in creation order."""
        ...
