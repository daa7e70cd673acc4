"""The I/O layer: files (``file``), QEMU's image locks (``locks``), table backends, request tracking.

The package itself holds block status: what a byte range of one node is (data, zeros, allocated), as
QEMU's BDRV_BLOCK_*.  Defined at the bottom of the stack because every layer answers it: the file
protocol (holes from SEEK_DATA/SEEK_HOLE), each format for its own layer, and the chain code composing
them for ``map`` and ``convert``.  Here rather than in a module of its own because every user of the
I/O layer imports this package anyway, and each module costs a share of every ``vdkit-img`` start.
"""

from __future__ import annotations

from vdkit.record import record

# Block status flags (the subset of QEMU's BDRV_BLOCK_* that qemu-img shows).
DATA = 1
ZERO = 2
OFFSET_VALID = 4
ALLOCATED = 8
EOF = 16


@record(frozen=True, slots=True)
class BlockStatus:
    """Status of one run of a single layer, starting at the queried offset.

    ``offset`` is where the bytes can be read raw in ``file`` (a file name),
    valid only with ``OFFSET_VALID``.  (:mod:`vdkit.block.io` composes the layers' answers.)
    """

    flags: int
    length: int
    offset: int = 0
    file: str | None = None

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)
