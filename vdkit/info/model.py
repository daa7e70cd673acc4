"""Typed QAPI shapes for image and snapshot info (QEMU 7.2 schema).

Field names are the QAPI member names with ``-`` written as ``_``; fields are
declared in the schema's order because QEMU's JSON key order depends on the
order members are inserted (see ``render_json``).  Optional members are
``None`` when absent.  These classes hold no behaviour: the collector fills
them, the renderers print them, and the CLI, QMP and HMP share all three.
"""

from __future__ import annotations

from vdkit.record import record


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


# Shapes that ``info`` of a plain image never builds live in other modules, because each record class
# costs its share of every start (about a three-hundredth of a bare interpreter each): the monitor's
# (QMP) block shapes in ``monitor_model``, qcow2's bitmap and encryption info and the check result in
# ``extra_model``.  They are still importable from here (``__getattr__`` below).
_MONITOR_SHAPES = frozenset(("BlockdevCacheInfo", "BlockDirtyInfo", "BlockDeviceInfo", "BlockInfo",
                             "BlockDeviceStats", "BlockStatsSpecificFile", "BlockStats", "StatusInfo"))
_EXTRA_SHAPES = frozenset(("Qcow2BitmapInfo", "LuksSlotInfo", "LuksInfo", "AesEncryptionInfo", "ImageCheck"))
TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.info.extra_model import AesEncryptionInfo as AesEncryptionInfo
    from vdkit.info.extra_model import ImageCheck as ImageCheck
    from vdkit.info.extra_model import LuksInfo as LuksInfo
    from vdkit.info.extra_model import LuksSlotInfo as LuksSlotInfo
    from vdkit.info.extra_model import Qcow2BitmapInfo as Qcow2BitmapInfo
    from vdkit.info.monitor_model import BlockdevCacheInfo as BlockdevCacheInfo
    from vdkit.info.monitor_model import BlockDeviceInfo as BlockDeviceInfo
    from vdkit.info.monitor_model import BlockDeviceStats as BlockDeviceStats
    from vdkit.info.monitor_model import BlockDirtyInfo as BlockDirtyInfo
    from vdkit.info.monitor_model import BlockInfo as BlockInfo
    from vdkit.info.monitor_model import BlockStats as BlockStats
    from vdkit.info.monitor_model import BlockStatsSpecificFile as BlockStatsSpecificFile
    from vdkit.info.monitor_model import StatusInfo as StatusInfo


def __getattr__(name: str) -> object:
    """The monitor's and the extra shapes, imported on first use."""
    if name in _MONITOR_SHAPES:
        import vdkit.info.monitor_model as shapes

        return getattr(shapes, name)
    if name in _EXTRA_SHAPES:
        import vdkit.info.extra_model as extra

        return getattr(extra, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
