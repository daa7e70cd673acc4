"""Model objects to the text qemu-img and HMP print.

Renderers are pure functions returning strings; the caller decides where the
text goes and which line terminator to use (qemu-img writes ``\\n``; the
monitor turns it into ``\\r\\n``).  The snapshot table has exactly one
renderer, used by ``info``, ``snapshot -l`` and HMP ``info snapshots``.
"""

from __future__ import annotations

import time

from vdkit.info import qdict_order, to_qobject
from vdkit.record import replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from vdkit.info.model import ImageInfo, SnapshotInfo

_PREFIXES = {0: "", 10: "Ki", 20: "Mi", 30: "Gi", 40: "Ti", 50: "Pi", 60: "Ei"}


def size_to_str(value: int) -> str:
    """Human size: 3 significant digits and an IEC prefix, like QEMU's size_to_str."""
    # frexp()'s exponent without importing math: for |x| >= 1 it is the bit length of int(x); below 1
    # any exponent (<= 0) makes i 0
    e = int(value / (1000.0 / 1024.0)).bit_length()
    i = int((e - 1) / 10) * 10  # C division truncates toward zero
    i = max(0, min(i, 60))
    return f"{value / float(1 << i):0.3g} {_PREFIXES[i]}B"


SNAPSHOT_TABLE_HEADER = f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"


def _vm_clock(sec: int, nsec: int) -> str:
    total = sec * 1_000_000_000 + nsec
    secs = total // 1_000_000_000
    return "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60, (total // 1_000_000) % 1000)


def _ljust_bytes(text: str, width: int) -> str:
    """Left-justify like C ``%-*s``: the field width counts UTF-8 bytes, not characters."""
    n = len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))
    return text + " " * (width - n) if n < width else text


class _RowMemo:
    """Formatted dates, sizes and clocks shared by the rows of one table (they repeat a lot)."""

    __slots__ = ("dates", "sizes", "clocks")

    def __init__(self) -> None:
        self.dates: dict[int, str] = {}
        self.sizes: dict[int, str] = {}
        self.clocks: dict[int, str] = {}


def snapshot_row(sn: SnapshotInfo, memo: _RowMemo | None = None) -> str:
    """One table row; ``info`` prints one per snapshot, hence the memo and the ASCII fast paths."""
    if memo is None:
        memo = _RowMemo()
    date = memo.dates.get(sn.date_sec)
    if date is None:
        date = memo.dates[sn.date_sec] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn.date_sec))
    vm_size = memo.sizes.get(sn.vm_state_size)
    if vm_size is None:
        vm_size = memo.sizes[sn.vm_state_size] = size_to_str(sn.vm_state_size & 0xFFFFFFFFFFFFFFFF)  # unsigned
    clock_ns = sn.vm_clock_sec * 1_000_000_000 + sn.vm_clock_nsec
    clock = memo.clocks.get(clock_ns)
    if clock is None:
        clock = memo.clocks[clock_ns] = _vm_clock(sn.vm_clock_sec, sn.vm_clock_nsec)
    icount = "" if sn.icount is None else str(sn.icount)
    sid = sn.id.ljust(9) if sn.id.isascii() else _ljust_bytes(sn.id, 9)
    name = sn.name.ljust(16) if sn.name.isascii() else _ljust_bytes(sn.name, 16)
    return f"{sid} {name} {vm_size:>8}{date:>20}{clock:>13}{icount:>11}"


def snapshot_table(snapshots: Iterable[SnapshotInfo]) -> str:
    """Header plus one row per snapshot, each line ending in ``\\n``."""
    memo = _RowMemo()
    lines = [SNAPSHOT_TABLE_HEADER]
    lines.extend(snapshot_row(sn, memo) for sn in snapshots)
    return "\n".join(lines) + "\n"


def snapshot_list(snapshots: list[SnapshotInfo]) -> str:
    """``qemu-img snapshot -l``: nothing at all when there are no snapshots."""
    if not snapshots:
        return ""
    return "Snapshot list:\n" + snapshot_table(snapshots)


def _dump_value(indent: int, value: Any, out: list[str]) -> None:
    if isinstance(value, dict):
        for key in qdict_order(list(value)):
            _dump_member(indent, f"{key.replace('-', ' ')}:", value[key], out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _dump_member(indent, f"[{i}]:", item, out)
    elif value is True or value is False:
        out.append(("true" if value else "false") + "\n")
    else:
        out.append(f"{value}\n")


def _dump_member(indent: int, label: str, value: Any, out: list[str]) -> None:
    out.append(" " * (indent * 4) + label)
    out.append("\n" if isinstance(value, dict | list) else " ")
    _dump_value(indent + 1, value, out)


def format_specific(data: Any, indent: int = 1) -> str:
    """The "Format specific information" dump of a model's ``data`` member."""
    out: list[str] = []
    _dump_value(indent, to_qobject(data), out)
    return "".join(out)


def image_info(info: ImageInfo) -> str:
    """One image in ``qemu-img info`` human form, every line ending in ``\\n``."""
    out = [
        f"image: {info.filename}\n",
        f"file format: {info.format}\n",
        f"virtual size: {size_to_str(info.virtual_size)} ({info.virtual_size} bytes)\n",
        "disk size: "
        + (size_to_str(info.actual_size) if info.actual_size is not None else "unavailable")
        + "\n",
    ]
    if info.encrypted:
        out.append("encrypted: yes\n")
    if info.cluster_size is not None:
        out.append(f"cluster_size: {info.cluster_size}\n")
    if info.dirty_flag:
        out.append("cleanly shut down: no\n")
    if info.backing_filename is not None:
        line = f"backing file: {info.backing_filename}"
        if info.full_backing_filename is None:
            line += " (cannot determine actual path)"
        elif info.full_backing_filename != info.backing_filename:
            line += f" (actual path: {info.full_backing_filename})"
        out.append(line + "\n")
        if info.backing_filename_format is not None:
            out.append(f"backing file format: {info.backing_filename_format}\n")
    if info.snapshots:
        out.append("Snapshot list:\n")
        out.append(snapshot_table(info.snapshots))
    if info.format_specific is not None:
        out.append("Format specific information:\n")
        out.append(format_specific(info.format_specific.data))
    return "".join(out)


def image_info_list(infos: list[ImageInfo]) -> str:
    """``--backing-chain``: images separated by one empty line."""
    return "\n".join(image_info(i) for i in infos)


# --------------------------------------------------------------------------
# Monitor (HMP) renderers, appended for the storage daemon.
# --------------------------------------------------------------------------


def block_entry(name: str, inserted: Any, *, qdev: str | None = None, io_status: str | None = None,
                removable: bool = False, locked: bool = False, tray_open: bool | None = None,
                verbose: bool = False) -> str:
    """One ``info block`` entry (a backend, or with only ``name``/``inserted`` a node).

    ``inserted`` is a :class:`~vdkit.info.model.BlockDeviceInfo` or None.
    Lines end in ``\\n``.
    """
    out = [name]
    if inserted is not None:
        flags = (", read-only" if inserted.ro else "") + (", encrypted" if inserted.encrypted else "")
        out.append(f": {inserted.file} ({inserted.drv}{flags})\n")
    else:
        out.append(": [not inserted]\n")
    if qdev is not None:
        out.append(f"    Attached to:      {qdev}\n")
    if io_status is not None and io_status != "ok":
        out.append(f"    I/O status:       {io_status}\n")
    if removable:
        lock_text = "locked" if locked else "not locked"
        out.append(f"    Removable device: {lock_text}, tray {'open' if tray_open else 'closed'}\n")
    if inserted is None:
        return "".join(out)
    c = inserted.cache
    out.append(f"    Cache mode:       {'writeback' if c.writeback else 'writethrough'}"
               f"{', direct' if c.direct else ''}{', ignore flushes' if c.no_flush else ''}\n")
    if inserted.backing_file is not None:
        out.append(f"    Backing file:     {inserted.backing_file} (chain depth: {inserted.backing_file_depth})\n")
    if inserted.detect_zeroes != "off":
        out.append(f"    Detect zeroes:    {inserted.detect_zeroes}\n")
    i = inserted
    if i.bps or i.bps_rd or i.bps_wr or i.iops or i.iops_rd or i.iops_wr:
        def v(x: int | None) -> int:
            return x or 0

        out.append(
            f"    I/O throttling:   bps={i.bps} bps_rd={i.bps_rd} bps_wr={i.bps_wr} bps_max={v(i.bps_max)} "
            f"bps_rd_max={v(i.bps_rd_max)} bps_wr_max={v(i.bps_wr_max)} iops={i.iops} iops_rd={i.iops_rd} "
            f"iops_wr={i.iops_wr} iops_max={v(i.iops_max)} iops_rd_max={v(i.iops_rd_max)} "
            f"iops_wr_max={v(i.iops_wr_max)} iops_size={v(i.iops_size)} group={i.group}\n"
        )
    if verbose:
        out.append("\nImages:\n")
        img: ImageInfo | None = inserted.image
        while img is not None:
            out.append(image_info(img))
            img = img.backing_image
    return "".join(out)


def info_snapshots(vmstate_disk: bool, global_snapshots: list[SnapshotInfo],
                   partial: list[tuple[str, list[SnapshotInfo]]], *, any_snapshots: bool) -> str:
    """HMP ``info snapshots`` (``qmp-hmp.md`` §5.2); lines end in ``\\n``."""
    if not vmstate_disk:
        return "no block device can store vmstate for snapshot\n"
    if not any_snapshots:
        return "There is no snapshot available.\n"
    out = ["List of snapshots present on all disks:\n"]
    if global_snapshots:
        out.append(snapshot_table(replace(s, id="--") for s in global_snapshots))
    else:
        out.append("None\n")
    for device, snaps in partial:
        if snaps:
            out.append(f"\nList of partial (non-loadable) snapshots on '{device}':\n")
            out.append(snapshot_table(snaps))
    return "".join(out)
