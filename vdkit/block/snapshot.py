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
    from collections.abc import Iterable
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

MAX_SNAPSHOT_ID_LEN = 127
"""Bytes of a snapshot ID that QEMU's descriptor keeps (128-byte field with its NUL)."""
MAX_SNAPSHOT_NAME_LEN = 255
"""Bytes of a snapshot name that QEMU's descriptor keeps (256-byte field with its NUL)."""
ICOUNT_UNUSED = 0xFFFFFFFFFFFFFFFF
"""The instruction counter of a snapshot taken without icount (-1, reported as absent)."""


# -- lookup: what QEMU's generic snapshot layer compares (the truncated descriptor fields) --------

def _trunc(text: str, max_bytes: int) -> str:
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
