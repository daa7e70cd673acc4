"""The commit engine: write the layers above a base into the base (``qemu-img commit``, later QMP's
``block-commit``).

Every range some layer above the base allocates is copied into the base
(zeros as zero writes, data as data); a base smaller than the top is grown
first.  Emptying the top afterwards (``make_empty``) is left to the caller,
which decides whether to keep it (``qemu-img commit -d``).  Opening the
chain (top and base writable, the layers between read-only) is the caller's
business too.
"""

from __future__ import annotations

from vdkit.errors import VdkitError

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.node import Node
    from vdkit.block.progress import Progress

CHUNK = 2 * 1024 * 1024


def commit(top: Node, base: Node, progress: Progress) -> None:
    """Copy what the layers from ``top`` down to (not including) ``base`` allocate into ``base``.

    Progress is reported per chunk; an I/O failure becomes QEMU's "Block job failed".
    """
    from vdkit.block import io as bio

    size = top.driver.virtual_size
    if base.driver.virtual_size < size:
        bio.truncate(base, size)
    offset = 0
    try:
        while offset < size:
            allocated, n = allocated_above(top, base, offset, min(CHUNK, size - offset))
            if allocated:
                st = bio.above_status(top, offset, n)
                n = st.length
                if st.flags & bio.ZERO:
                    bio.write_zeroes(base, offset, n)
                else:
                    bio.write(base, offset, bio.read(top, offset, n))
            offset += n
            progress.set(100.0 * offset / size)
        bio.flush(base)
    except (OSError, VdkitError) as exc:  # qemu-img runs the copy as a block job
        raise bio.io_error(exc, "Block job failed") from exc


def allocated_above(top: Node, base: Node, offset: int, length: int) -> tuple[bool, int]:
    """Does a layer above ``base`` allocate ``offset``?  And for how many bytes that answer holds."""
    from vdkit.block.io import ALLOCATED, layer_status

    cur: Node | None = top
    n = length
    while cur is not None and cur is not base:
        size = cur.driver.virtual_size
        if offset >= size:  # a shorter intermediate reads zeros there: that counts as allocated
            return True, n
        st = layer_status(cur, offset, n)
        if st.flags & ALLOCATED:
            return True, st.length
        n = st.length
        cur = cur.backing
    return False, n
