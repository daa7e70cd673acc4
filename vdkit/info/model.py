"""Typed QAPI shapes for image and snapshot info (QEMU 7.2 schema).

Field names are the QAPI member names with ``-`` written as ``_``; fields are
declared in the schema's order because QEMU's JSON key order depends on the
order members are inserted (see ``render_json``).  Optional members are
``None`` when absent.  These classes hold no behaviour: the collector fills
them, the renderers print them, and the CLI, QMP and HMP share all three.
"""

from __future__ import annotations

from vdkit.record import field, record


@record
class SnapshotInfo:
    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_sec: int
    vm_clock_nsec: int
    icount: int | None = None


@record
class Qcow2BitmapInfo:
    name: str
    granularity: int
    flags: list[str] = field(default_factory=list)


@record
class LuksSlotInfo:
    active: bool
    key_offset: int
    iters: int | None = None
    stripes: int | None = None

    # schema order: active, iters, stripes, key-offset
    __qapi_order__ = ("active", "iters", "stripes", "key_offset")


@record
class LuksInfo:
    """``ImageInfoSpecificQCow2Encryption`` with format ``luks`` (flat union)."""

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    hash_alg: str
    payload_offset: int
    master_key_iters: int
    uuid: str
    slots: list[LuksSlotInfo]
    ivgen_hash_alg: str | None = None
    format: str = "luks"

    __qapi_order__ = (
        "format", "cipher_alg", "cipher_mode", "ivgen_alg", "ivgen_hash_alg", "hash_alg",
        "payload_offset", "master_key_iters", "uuid", "slots",
    )


@record
class AesEncryptionInfo:
    format: str = "aes"


@record
class ImageInfoSpecificQcow2:
    compat: str
    refcount_bits: int
    compression_type: str
    data_file: str | None = None
    data_file_raw: bool | None = None
    extended_l2: bool | None = None
    lazy_refcounts: bool | None = None
    corrupt: bool | None = None
    encrypt: LuksInfo | AesEncryptionInfo | None = None
    bitmaps: list[Qcow2BitmapInfo] | None = None

    __qapi_order__ = (
        "compat", "data_file", "data_file_raw", "extended_l2", "lazy_refcounts", "corrupt",
        "refcount_bits", "encrypt", "bitmaps", "compression_type",
    )


@record
class ImageInfoSpecific:
    """The ``ImageInfoSpecific`` union: ``{"type": ..., "data": ...}``."""

    type: str
    data: ImageInfoSpecificQcow2


@record
class ImageInfo:
    filename: str
    format: str
    virtual_size: int
    dirty_flag: bool | None = None
    actual_size: int | None = None
    cluster_size: int | None = None
    encrypted: bool | None = None
    compressed: bool | None = None
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_filename_format: str | None = None
    snapshots: list[SnapshotInfo] | None = None
    backing_image: ImageInfo | None = None
    format_specific: ImageInfoSpecific | None = None

    __qapi_order__ = (
        "filename", "format", "dirty_flag", "actual_size", "virtual_size", "cluster_size",
        "encrypted", "compressed", "backing_filename", "full_backing_filename",
        "backing_filename_format", "snapshots", "backing_image", "format_specific",
    )


# --------------------------------------------------------------------------
# Monitor (QMP) block shapes.  Appended for the storage daemon; QAPI 7.2
# member order given by ``__qapi_order__`` where Python needs required
# members first.
# --------------------------------------------------------------------------


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


@record
class ImageCheck:
    """``qemu-img check`` result (QAPI ``ImageCheck``); counters are present only when non-zero."""

    filename: str
    format: str
    check_errors: int
    image_end_offset: int | None = None
    corruptions: int | None = None
    leaks: int | None = None
    corruptions_fixed: int | None = None
    leaks_fixed: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
