"""The monitor's (QMP) block shapes (QEMU 7.2 schema): ``query-block``, ``query-blockstats``, ``query-status``.

Kept apart from ``vdkit.info.model`` (which re-exports them) so that ``vdkit-img`` does not build them at
every start.  QAPI 7.2 member order is given by ``__qapi_order__`` where Python needs required members first.
"""

from __future__ import annotations

from vdkit.info.model import ImageInfo
from vdkit.record import field, record


@record
class BlockdevCacheInfo:
    writeback: bool = True
    direct: bool = False
    no_flush: bool = False


@record
class BlockDirtyInfo:
    """One dirty bitmap of a node (``query-block``'s ``dirty-bitmaps``)."""

    count: int
    granularity: int
    recording: bool
    busy: bool
    persistent: bool
    name: str | None = None
    inconsistent: bool | None = None

    __qapi_order__ = ("name", "count", "granularity", "recording", "busy", "persistent", "inconsistent")


@record
class BlockDeviceInfo:
    """One node as ``query-block``'s ``inserted`` and ``query-named-block-nodes`` report it."""

    file: str
    ro: bool
    drv: str
    backing_file_depth: int
    encrypted: bool
    detect_zeroes: str
    image: ImageInfo
    cache: BlockdevCacheInfo
    node_name: str | None = None
    backing_file: str | None = None
    bps: int = 0
    bps_rd: int = 0
    bps_wr: int = 0
    iops: int = 0
    iops_rd: int = 0
    iops_wr: int = 0
    bps_max: int | None = None
    bps_rd_max: int | None = None
    bps_wr_max: int | None = None
    iops_max: int | None = None
    iops_rd_max: int | None = None
    iops_wr_max: int | None = None
    bps_max_length: int | None = None
    bps_rd_max_length: int | None = None
    bps_wr_max_length: int | None = None
    iops_max_length: int | None = None
    iops_rd_max_length: int | None = None
    iops_wr_max_length: int | None = None
    iops_size: int | None = None
    group: str | None = None
    write_threshold: int = 0
    dirty_bitmaps: list[BlockDirtyInfo] | None = None

    __qapi_order__ = (
        "file", "node_name", "ro", "drv", "backing_file", "backing_file_depth", "encrypted",
        "detect_zeroes", "bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr", "image",
        "bps_max", "bps_rd_max", "bps_wr_max", "iops_max", "iops_rd_max", "iops_wr_max",
        "bps_max_length", "bps_rd_max_length", "bps_wr_max_length", "iops_max_length",
        "iops_rd_max_length", "iops_wr_max_length", "iops_size", "group", "cache", "write_threshold",
        "dirty_bitmaps",
    )
    # every member but node-name and dirty-bitmaps is spelled with "_" in the schema
    __qapi_names__ = {n: n for n in __qapi_order__ if n not in ("node_name", "dirty_bitmaps")}


@record
class BlockInfo:
    """One BlockBackend in ``query-block``."""

    device: str
    removable: bool
    locked: bool
    type: str = "unknown"
    qdev: str | None = None
    inserted: BlockDeviceInfo | None = None
    tray_open: bool | None = None
    io_status: str | None = None

    __qapi_order__ = ("device", "qdev", "type", "removable", "locked", "inserted", "tray_open", "io_status")
    __qapi_names__ = {"tray_open": "tray_open"}


@record
class BlockDeviceStats:
    """I/O counters of a backend or node (``query-blockstats``)."""

    rd_bytes: int = 0
    wr_bytes: int = 0
    unmap_bytes: int = 0
    rd_operations: int = 0
    wr_operations: int = 0
    flush_operations: int = 0
    unmap_operations: int = 0
    rd_total_time_ns: int = 0
    wr_total_time_ns: int = 0
    flush_total_time_ns: int = 0
    unmap_total_time_ns: int = 0
    wr_highest_offset: int = 0
    rd_merged: int = 0
    wr_merged: int = 0
    unmap_merged: int = 0
    idle_time_ns: int | None = None
    failed_rd_operations: int = 0
    failed_wr_operations: int = 0
    failed_flush_operations: int = 0
    failed_unmap_operations: int = 0
    invalid_rd_operations: int = 0
    invalid_wr_operations: int = 0
    invalid_flush_operations: int = 0
    invalid_unmap_operations: int = 0
    account_invalid: bool = False
    account_failed: bool = False
    timed_stats: list[object] = field(default_factory=list)

    # all members of BlockDeviceStats are spelled with "_"
    __qapi_names__ = {
        n: n for n in (
            "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations", "flush_operations",
            "unmap_operations", "rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns",
            "unmap_total_time_ns", "wr_highest_offset", "rd_merged", "wr_merged", "unmap_merged", "idle_time_ns",
            "failed_rd_operations", "failed_wr_operations", "failed_flush_operations", "failed_unmap_operations",
            "invalid_rd_operations", "invalid_wr_operations", "invalid_flush_operations",
            "invalid_unmap_operations", "account_invalid", "account_failed", "timed_stats",
        )
    }


@record
class BlockStatsSpecificFile:
    """``driver-specific`` of a ``file`` node (a flat union keyed by ``driver``)."""

    discard_nb_ok: int = 0
    discard_nb_failed: int = 0
    discard_bytes_ok: int = 0
    driver: str = "file"

    __qapi_order__ = ("driver", "discard_nb_ok", "discard_nb_failed", "discard_bytes_ok")


@record
class BlockStats:
    stats: BlockDeviceStats
    device: str | None = None
    qdev: str | None = None
    node_name: str | None = None
    driver_specific: BlockStatsSpecificFile | None = None
    parent: BlockStats | None = None
    backing: BlockStats | None = None

    __qapi_order__ = ("device", "qdev", "node_name", "stats", "driver_specific", "parent", "backing")


@record
class StatusInfo:
    running: bool
    status: str
    singlestep: bool = False

    __qapi_order__ = ("running", "singlestep", "status")
