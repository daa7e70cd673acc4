"""Format-independent facts about internal snapshots (QEMU's ``block/snapshot.c`` layer).

Every format with internal snapshots (qcow2 today, RBD later) reports them
through QEMU's generic snapshot descriptor, whose fixed-size fields cut long
IDs and names; those limits, the "no icount" marker, the record every
driver's entries provide (``SnapshotRecord``, a typing protocol) and the
lookups by ID and name live here, not in any one format.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Protocol, TypeVar

    class _Snapshot(Protocol):
        @property
        def id_str(self) -> str: ...
        @property
        def name(self) -> str: ...

    class SnapshotRecord(_Snapshot, Protocol):
        """What every format's snapshot entries provide (``driver.snapshots()``), whatever their
        on-disk shape (qcow2's is ``formats.qcow2.snapshot.SnapshotEntry``): QEMU's generic
        ``QEMUSnapshotInfo`` fields, untruncated (``id_of``/``name_of`` cut them as QEMU does).
        Generic code (the driver table, nodes, the monitor) speaks of snapshots in these terms;
        a driver gets back the entries it listed."""

        @property
        def date_sec(self) -> int: ...
        @property
        def date_nsec(self) -> int: ...
        @property
        def vm_clock_nsec(self) -> int: ...
        @property
        def vm_state_size(self) -> int: ...
        @property
        def icount(self) -> int: ...  # ICOUNT_UNUSED without one

    S = TypeVar("S", bound=_Snapshot)

    from vdkit.block.driver import FormatDriver
    from vdkit.info.model import SnapshotInfo

MAX_SNAPSHOT_ID_LEN = 127
"""Bytes of a snapshot ID that QEMU's descriptor keeps (128-byte field with its NUL)."""
MAX_SNAPSHOT_NAME_LEN = 255
"""Bytes of a snapshot name that QEMU's descriptor keeps (256-byte field with its NUL)."""
ICOUNT_UNUSED = 0xFFFFFFFFFFFFFFFF
"""The instruction counter of a snapshot taken without icount (-1, reported as absent)."""


# -- lookup: what QEMU's generic snapshot layer compares (the truncated descriptor fields) --------

def _trunc(text: str, max_bytes: int) -> str:
    """The descriptor keeps at most ``max_bytes`` bytes of the UTF-8 text."""
    if text.isascii() and len(text) <= max_bytes:
        return text
    raw = text.encode("utf-8", "surrogateescape")
    return text if len(raw) <= max_bytes else raw[:max_bytes].decode("utf-8", "surrogateescape")


def id_of(e: _Snapshot) -> str:
    """The ID as QEMU's generic snapshot descriptor holds it (truncated to 127 bytes)."""
    return _trunc(e.id_str, MAX_SNAPSHOT_ID_LEN)


def name_of(e: _Snapshot) -> str:
    """The name as the generic descriptor holds it (truncated to 255 bytes); lookups compare this."""
    return _trunc(e.name, MAX_SNAPSHOT_NAME_LEN)


def find_by_name(entries: Iterable[S], name: str) -> S | None:
    """First entry (table order) whose name is ``name``; IDs are never consulted."""
    return next((e for e in entries if name_of(e) == name), None)


def find_by_id_and_name(entries: Iterable[S], snapshot_id: str | None, name: str | None) -> S | None:
    """Exact pair match: both given → both must match one entry; one given → that field."""
    if snapshot_id is None and name is None:
        return None
    for e in entries:
        if snapshot_id is not None and id_of(e) != snapshot_id:
            continue
        if name is not None and name_of(e) != name:
            continue
        return e
    return None


def find_id_then_name(entries: Iterable[S], s: str) -> S | None:
    """Try ``s`` as an ID, then as a name (what revert, ``loadvm`` and ``convert -l X`` use)."""
    entries = list(entries)
    return find_by_id_and_name(entries, s, None) or find_by_id_and_name(entries, None, s)


# -- the descriptor as QAPI reports it (SnapshotInfo) ------------------------------------------------

def _int64(value: int) -> int:
    """QAPI ``int`` members are signed 64-bit: QEMU reports 2^64-1 as -1."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def snapshot_info(entry: SnapshotRecord) -> SnapshotInfo:
    """One entry as every front end reports it (``SnapshotInfo``: the descriptor's cut ID and name,
    signed 64-bit numbers, no icount when unused).  Here rather than in ``info.collect`` so that
    :meth:`vdkit.block.node.Node.snapshots` lists without reaching up into the info layer."""
    # runs once per snapshot on every ``info``: the common case (short ASCII names, values below
    # 2^63) takes no function calls; positional arguments in SnapshotInfo's field order
    from vdkit.info.model import SnapshotInfo

    icount: int | None
    sid, name, vm_size, icount = entry.id_str, entry.name, entry.vm_state_size, entry.icount
    if len(sid) > MAX_SNAPSHOT_ID_LEN // 4 or not sid.isascii():
        sid = _trunc(sid, MAX_SNAPSHOT_ID_LEN)
    if len(name) > MAX_SNAPSHOT_NAME_LEN // 4 or not name.isascii():
        name = _trunc(name, MAX_SNAPSHOT_NAME_LEN)
    if vm_size >= 1 << 63:
        vm_size = _int64(vm_size)
    if icount == ICOUNT_UNUSED:
        icount = None
    elif icount >= 1 << 63:
        icount = _int64(icount)
    clock = entry.vm_clock_nsec
    return SnapshotInfo(sid, name, vm_size, entry.date_sec, entry.date_nsec, clock // 1_000_000_000,
                        clock % 1_000_000_000, icount)


def snapshot_infos(driver: FormatDriver, entries: Sequence[SnapshotRecord] | None = None) -> list[SnapshotInfo]:
    """Listed snapshots (``entries``: what ``driver.snapshots()`` just gave, not asked again); none
    where the driver cannot do snapshots (qcow2 with an external data file), as qemu-img treats "not
    supported" as an empty list."""
    unsupported = getattr(driver, "snapshot_unsupported_reason", None)
    if unsupported is not None and unsupported() is not None:
        return []
    return [snapshot_info(e) for e in (driver.snapshots() if entries is None else entries)]
