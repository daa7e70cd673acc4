"""``ClusterType``: a guest cluster classified by its L2 entry (the I/O and map code's vocabulary).

Its own module so that ``layout`` (read by every qcow2 open) does not import ``enum``.
"""

from __future__ import annotations

import enum


class ClusterType(enum.Enum):
    """Classification of a guest cluster (or subcluster) by its L2 entry."""

    UNALLOCATED = "unallocated"
    ZERO_PLAIN = "zero_plain"
    ZERO_ALLOC = "zero_alloc"
    NORMAL = "normal"
    COMPRESSED = "compressed"
