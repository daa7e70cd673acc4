"""Format-independent facts about internal snapshots (QEMU's ``block/snapshot.c`` layer).

Every format with internal snapshots (qcow2 today, RBD later) reports them
through QEMU's generic snapshot descriptor, whose fixed-size fields cut long
IDs and names; those limits and the "no icount" marker live here, not in any
one format.
"""

from __future__ import annotations

MAX_SNAPSHOT_ID_LEN = 127
"""Bytes of a snapshot ID that QEMU's descriptor keeps (128-byte field with its NUL)."""
MAX_SNAPSHOT_NAME_LEN = 255
"""Bytes of a snapshot name that QEMU's descriptor keeps (256-byte field with its NUL)."""
ICOUNT_UNUSED = 0xFFFFFFFFFFFFFFFF
"""The instruction counter of a snapshot taken without icount (-1, reported as absent)."""
