"""Per-drive I/O accounting for ``query-blockstats`` (QEMU's ``BlockAcctStats``).

The NBD export is this daemon's "guest": every NBD request is accounted to
the backend (drive) whose medium it reached, as a device model does in QEMU.
Times are ``time.monotonic_ns()`` (QEMU's ``QEMU_CLOCK_REALTIME``-based
accounting), ``idle_time_ns`` is reported only once I/O happened, and
``wr_highest_offset`` is the end of the highest guest write.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from vdkit.info.model import BlockDeviceStats
from vdkit.record import replace

READ, WRITE, FLUSH, UNMAP = "rd", "wr", "flush", "unmap"


@dataclass
class DriveStats:
    stats: BlockDeviceStats = field(
        default_factory=lambda: BlockDeviceStats(account_invalid=True, account_failed=True))
    last_access_ns: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def done(self, kind: str, nbytes: int, start_ns: int, *, ok: bool = True, end_offset: int = 0) -> None:
        """Account one finished request of ``kind`` that started at ``start_ns``."""
        now = time.monotonic_ns()
        s = self.stats
        with self._lock:
            self.last_access_ns = now
            if not ok:
                setattr(s, f"failed_{kind}_operations", getattr(s, f"failed_{kind}_operations") + 1)
                return
            setattr(s, f"{kind}_operations", getattr(s, f"{kind}_operations") + 1)
            setattr(s, f"{kind}_total_time_ns", getattr(s, f"{kind}_total_time_ns") + now - start_ns)
            if kind != FLUSH:
                setattr(s, f"{kind}_bytes", getattr(s, f"{kind}_bytes") + nbytes)
            if kind == WRITE and end_offset > s.wr_highest_offset:
                s.wr_highest_offset = end_offset

    def invalid(self, kind: str) -> None:
        with self._lock:
            self.last_access_ns = time.monotonic_ns()
            name = f"invalid_{kind}_operations"
            setattr(self.stats, name, getattr(self.stats, name) + 1)

    def to_model(self) -> BlockDeviceStats:
        """A snapshot for ``query-blockstats`` (``idle_time_ns`` computed now)."""
        with self._lock:
            out = replace(self.stats, timed_stats=[])
            if self.last_access_ns is not None:
                out.idle_time_ns = time.monotonic_ns() - self.last_access_ns
            return out
