"""Node -> image info: the one place that turns driver state into reported info.

The CLI (``info``, ``snapshot -l``), QMP (``query-block``,
``query-snapshots``) and HMP all call these functions, so every front end
reports the same facts.  The counterpart of QEMU's ``block/qapi.c``.
"""

from __future__ import annotations

from vdkit.block import snapshot as L
from vdkit.info.model import ImageInfo, SnapshotInfo

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver
    from vdkit.block.node import Node
    from vdkit.block.snapshot import SnapshotRecord


def _truncate(text: str, max_bytes: int) -> str:
    """The generic snapshot descriptor keeps at most ``max_bytes`` bytes."""
    if text.isascii() and len(text) <= max_bytes:
        return text
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", "surrogateescape")


def _int64(value: int) -> int:
    """QAPI ``int`` members are signed 64-bit: QEMU reports 2^64-1 as -1."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def snapshot_info(entry: SnapshotRecord) -> SnapshotInfo:
    # runs once per snapshot on every ``info``: the common case (short ASCII names, values below
    # 2^63) takes no function calls; positional arguments in SnapshotInfo's field order
    icount: int | None
    sid, name, vm_size, icount = entry.id_str, entry.name, entry.vm_state_size, entry.icount
    if len(sid) > L.MAX_SNAPSHOT_ID_LEN // 4 or not sid.isascii():
        sid = _truncate(sid, L.MAX_SNAPSHOT_ID_LEN)
    if len(name) > L.MAX_SNAPSHOT_NAME_LEN // 4 or not name.isascii():
        name = _truncate(name, L.MAX_SNAPSHOT_NAME_LEN)
    if vm_size >= 1 << 63:
        vm_size = _int64(vm_size)
    if icount == L.ICOUNT_UNUSED:
        icount = None
    elif icount >= 1 << 63:
        icount = _int64(icount)
    clock = entry.vm_clock_nsec
    return SnapshotInfo(sid, name, vm_size, entry.date_sec, entry.date_nsec, clock // 1_000_000_000,
                        clock % 1_000_000_000, icount)


def snapshot_infos(driver: FormatDriver) -> list[SnapshotInfo]:
    """Listed snapshots; none where the driver cannot do snapshots (qcow2 with an
    external data file), as qemu-img treats "not supported" as an empty list."""
    unsupported = getattr(driver, "snapshot_unsupported_reason", None)
    if unsupported is not None and unsupported() is not None:
        return []
    return [snapshot_info(e) for e in driver.snapshots()]


def image_info(node: Node, *, nested: bool = False) -> ImageInfo:
    """Info of one node (``nested``: with ``backing-image`` filled down the chain)."""
    driver = node.driver
    try:
        actual: int | None = driver.allocated_size()
    except OSError:
        actual = None
    info = ImageInfo(
        filename=node.filename,
        format=driver.format_name,
        virtual_size=driver.virtual_size,
        dirty_flag=driver.dirty,
        actual_size=actual,
        cluster_size=driver.cluster_size or None,
        encrypted=True if driver.encrypted else None,
    )
    stored = driver.backing_file
    if stored is not None:
        info.backing_filename = stored
        info.full_backing_filename = node.backing_filename_resolved
        info.backing_filename_format = driver.backing_format
    snaps = snapshot_infos(driver)
    if snaps:
        info.snapshots = snaps
    spec = driver.specific_info()
    if spec is not None:
        info.format_specific = spec
    if nested and node.backing is not None:
        info.backing_image = image_info(node.backing, nested=True)
    return info
