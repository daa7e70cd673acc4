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


# The monitor's (QMP) block shapes live in ``monitor_model``: ``vdkit-img`` never builds them, and each
# class costs its share of every start.  They are still importable from here (``__getattr__`` below).
_MONITOR_SHAPES = frozenset(("BlockdevCacheInfo", "BlockDirtyInfo", "BlockDeviceInfo", "BlockInfo",
                             "BlockDeviceStats", "BlockStatsSpecificFile", "BlockStats", "StatusInfo"))
TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.info.monitor_model import BlockdevCacheInfo as BlockdevCacheInfo
    from vdkit.info.monitor_model import BlockDeviceInfo as BlockDeviceInfo
    from vdkit.info.monitor_model import BlockDeviceStats as BlockDeviceStats
    from vdkit.info.monitor_model import BlockDirtyInfo as BlockDirtyInfo
    from vdkit.info.monitor_model import BlockInfo as BlockInfo
    from vdkit.info.monitor_model import BlockStats as BlockStats
    from vdkit.info.monitor_model import BlockStatsSpecificFile as BlockStatsSpecificFile
    from vdkit.info.monitor_model import StatusInfo as StatusInfo


def __getattr__(name: str) -> object:
    """The monitor's shapes, imported on first use."""
    if name in _MONITOR_SHAPES:
        import vdkit.info.monitor_model as shapes

        return getattr(shapes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
