"""``ClusterType``: a guest cluster classified by its L2 entry (the I/O and map code's vocabulary).

A ``str`` subclass with one constant per kind rather than an ``enum.Enum``: ``enum`` costs several
milliseconds of every process that reads qcow2 data (``map``, ``convert``, ``compare``), and the kinds
need only their identity and a name.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar


class ClusterType(str):
    """Classification of a guest cluster (or subcluster) by its L2 entry."""

    __slots__ = ()

    UNALLOCATED: ClassVar[ClusterType]
    ZERO_PLAIN: ClassVar[ClusterType]
    ZERO_ALLOC: ClassVar[ClusterType]
    NORMAL: ClassVar[ClusterType]
    COMPRESSED: ClassVar[ClusterType]

    @property
    def name(self) -> str:
        return self.upper()

    @property
    def value(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"ClusterType.{self.name}"


ClusterType.UNALLOCATED = ClusterType("unallocated")
ClusterType.ZERO_PLAIN = ClusterType("zero_plain")
ClusterType.ZERO_ALLOC = ClusterType("zero_alloc")
ClusterType.NORMAL = ClusterType("normal")
ClusterType.COMPRESSED = ClusterType("compressed")
