"""Chain-level data access: reads through the backing chain and block status.

A format driver only knows its own layer.  This module composes layers the
way QEMU's generic block layer does:

* a read of a range the top layer does not allocate falls through to the
  backing node at the same guest offset; bytes beyond the end of a shorter
  backing file read as zeros;
* a layer's block status gains ``ALLOCATED`` when the layer itself provides
  data or zeros, and ``ZERO`` (without ``ALLOCATED``) for unallocated ranges
  that have nothing below them (no backing file, or beyond its end);
* :func:`map_entries` yields what ``qemu-img map``'s top-down walk per
  position (:func:`chain_status`) gives, as merged :class:`MapEntry` records
  with the ``depth`` of the layer that answered; it walks each layer's runs
  once instead of asking every layer again at every position.
"""

from __future__ import annotations

import errno
import os

# The status flags and BlockStatus live with the operations table (formats return them);
# they are re-exported here for callers of this module.
# ALLOCATED, DATA, ZERO and BlockStatus are re-exported: callers take the status flags from here
from vdkit.block.driver import ALLOCATED as ALLOCATED
from vdkit.block.driver import DATA as DATA
from vdkit.block.driver import EOF, OFFSET_VALID
from vdkit.block.driver import ZERO as ZERO
from vdkit.block.driver import BlockStatus as BlockStatus
from vdkit.io.file import zero_fill

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Iterator

    from vdkit.block.node import Node


def layer_status(node: Node, offset: int, length: int, size: int | None = None) -> BlockStatus:
    """Block status of ``node`` alone at ``offset`` (``bdrv_block_status`` of one layer).

    ``length`` is clipped to the node's size (``size`` when the caller knows it); a query at or
    past the end returns a zero-length status.
    """
    if size is None:
        size = node.driver.virtual_size
    if offset >= size:
        return BlockStatus(0, 0)
    st = node.driver.block_status(offset, min(length, size - offset))
    flags = st.flags
    if flags & (DATA | ZERO):
        flags |= ALLOCATED
    elif node.driver.supports_backing and (node.backing is None or offset >= node.backing.driver.virtual_size):
        flags |= ZERO
    return BlockStatus(flags, st.length, st.offset, st.file)


class MapEntry:
    """One ``qemu-img map`` record (a plain slotted class: ``dataclasses`` costs start-up time)."""

    __slots__ = ("start", "length", "depth", "present", "zero", "data", "offset", "filename")

    def __init__(self, start: int, length: int, depth: int, present: bool, zero: bool, data: bool,
                 offset: int | None, filename: str | None) -> None:
        self.start = start
        self.length = length
        self.depth = depth
        self.present = present
        self.zero = zero
        self.data = data
        self.offset = offset
        self.filename = filename

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"MapEntry({inner})"

    def mergeable(self, nxt: MapEntry) -> bool:
        """qemu-img map's rule for extending this entry by ``nxt``."""
        if self.length == 0:
            return False
        if (self.zero, self.data, self.depth, self.present) != (nxt.zero, nxt.data, nxt.depth, nxt.present):
            return False
        if (self.filename is None) != (nxt.filename is None) or (self.offset is None) != (nxt.offset is None):
            return False
        if self.filename is not None and self.filename != nxt.filename:
            return False
        return self.offset is None or self.offset + self.length == nxt.offset


def chain_status(node: Node, offset: int, length: int, size: int | None = None) -> MapEntry:
    """One map entry at ``offset``: the first layer (top-down) that reports data or zeros
    (``size``: the top node's, when the caller knows it)."""
    depth = 0
    cur: Node | None = node
    st = BlockStatus(0, length)
    while cur is not None:
        st = layer_status(cur, offset, length, size)
        size = None
        if st.length == 0:  # beyond this layer's end (cannot happen for the top)
            st = BlockStatus(ZERO | ALLOCATED, length)
            break
        length = st.length
        if st.flags & (ZERO | DATA):
            break
        if cur.backing is None:
            st = BlockStatus(0, length)
            break
        cur = cur.backing
        depth += 1
    has_off = st.has(OFFSET_VALID)
    return MapEntry(
        start=offset, length=st.length, depth=depth, present=st.has(ALLOCATED), zero=st.has(ZERO),
        data=st.has(DATA), offset=st.offset if has_off else None,
        filename=st.file if has_off else None,
    )


def map_entries(node: Node, start: int, end: int) -> Iterator[MapEntry]:
    """Merged entries covering ``[start, end)`` (``qemu-img map``'s loop, output-agnostic)."""
    cur: MapEntry | None = None
    for nxt in _chain_entries(node, start, end, 0):
        if cur is not None and cur.mergeable(nxt):
            cur.length += nxt.length
            continue
        if cur is not None:
            yield cur
        cur = nxt
    if cur is not None:
        yield cur


def _chain_entries(node: Node, start: int, end: int, depth: int) -> Iterator[MapEntry]:
    """What :func:`chain_status` answers at each position of ``[start, end)``, from the layers' runs.

    Each layer is walked once in order (:meth:`FormatDriver.status_runs`) and a
    range it leaves unallocated is walked in its backing node, instead of asking
    every layer again at every position (qemu-img map's loop, which cost a 1 TiB
    map ten calls per run).  The answers are the same: a layer's status asked
    inside one of its runs is the rest of that run.
    """
    drv = node.driver
    backing = node.backing
    bsize = backing.driver.virtual_size if backing is not None else 0
    pos = start
    for st in drv.status_runs(start, end):
        n, flags = st.length, st.flags
        if flags & (DATA | ZERO):
            yield _entry(pos, n, depth, flags | ALLOCATED, st)
        elif backing is None:
            if drv.supports_backing:  # nothing below: reads as zeros
                yield _entry(pos, n, depth, flags | ZERO, st)
            else:
                yield MapEntry(pos, n, depth, False, False, False, None, None)
        elif pos >= bsize:  # past the end of a shorter backing node: zeros of this layer
            yield _entry(pos, n, depth, flags | ZERO, st)
        else:
            below = min(pos + n, bsize)
            yield from _chain_entries(backing, pos, below, depth + 1)
            p = below
            while p < pos + n:  # the rest of the run lies past the backing's end: asked again there
                rest = layer_status(node, p, pos + n - p)
                yield _entry(p, rest.length, depth, rest.flags, rest)
                p += rest.length
        pos += n


def _entry(start: int, length: int, depth: int, flags: int, st: BlockStatus) -> MapEntry:
    has_off = flags & OFFSET_VALID
    return MapEntry(start, length, depth, bool(flags & ALLOCATED), bool(flags & ZERO), bool(flags & DATA),
                    st.offset if has_off else None, st.file if has_off else None)


def above_status(node: Node, offset: int, length: int) -> BlockStatus:
    """Status of the whole chain at ``offset`` (``bdrv_block_status_above`` down to the bottom).

    Unlike :func:`chain_status`, a layer reporting "zero because nothing is
    below" does not stop the walk: the first *allocating* layer answers, a
    layer shorter than the offset counts as allocated zeros, and a range no
    layer allocates keeps the bottom layer's flags.  ``EOF`` is set when the
    run ends at the end of ``node``.
    """
    top_size = node.driver.virtual_size
    cur: Node | None = node
    st = BlockStatus(0, 0)
    first = True
    while cur is not None:
        st = layer_status(cur, offset, length)
        if st.length == 0:
            if first:
                return st
            st = BlockStatus(ZERO | ALLOCATED, length)
            break
        first = False
        length = st.length
        if st.flags & ALLOCATED:
            break
        cur = cur.backing
    flags = st.flags
    if offset + st.length == top_size:
        flags |= EOF
    return BlockStatus(flags, st.length, st.offset, st.file)


def io_error(exc: Exception, what: str) -> Exception:
    """Turn a failure below an I/O request into qemu-img's ``<what>: <strerror>`` error.

    A qcow2 corruption event that no hook took (see
    ``Qcow2Driver.signal_corruption``) is first printed on stderr, the way
    QEMU reports it: this is qemu-img's printer, placed here because the CLI
    maps every I/O failure through this function (and must print the event
    only when the copy reaches the failed piece, not when a read-ahead
    thread met it).  Errors that are not I/O errors (EIO/OSError) pass
    unchanged.
    """
    import sys

    from vdkit.errors import VdkitError, take_corruption_report

    report = take_corruption_report(exc)  # printed once, however often the error is mapped
    if report is not None:
        sys.stdout.flush()
        sys.stderr.write(report + "\n")
        sys.stderr.flush()
    if isinstance(exc, OSError):
        return VdkitError(f"{what}: {os.strerror(exc.errno or errno.EIO)}", errno=exc.errno or errno.EIO)
    if isinstance(exc, VdkitError) and exc.errno:
        return VdkitError(f"{what}: {os.strerror(exc.errno)}", errno=exc.errno)
    return exc


# -- reading ------------------------------------------------------------------------------------

def read(node: Node, offset: int, length: int) -> bytes:
    """Guest bytes of ``node`` through its whole backing chain."""
    if length <= 0:
        return b""
    return node.driver.read(offset, length, backing=_backing_reader(node))


def readinto(node: Node, offset: int, view: memoryview) -> None:
    """Fill ``view`` with guest bytes of ``node`` at ``offset``, through its whole backing chain.

    The bulk path of ``convert``: data goes from the host file straight into
    the caller's (reused) buffer.  Allocating a fresh multi-megabyte object
    per request costs a page fault per 4 KiB (glibc hands such blocks out as
    new mappings), which made copying several times slower than the copy.
    """
    length = len(view)
    if length <= 0:
        return
    node.driver.readinto_filled(offset, view, _backing_filler(node))


def _backing_filler(node: Node):  # type: ignore[no-untyped-def]
    """``(offset, view) -> None`` filling from the backing chain of ``node`` (None without one)."""
    below = node.backing
    if below is None:
        return None

    def backing_into(offset: int, view: memoryview) -> None:
        size = below.driver.virtual_size
        part = max(0, min(len(view), size - offset))
        if part:
            readinto(below, offset, view[:part])
        if part < len(view):
            zero_fill(view[part:])

    return backing_into


def _backing_reader(node: Node):  # type: ignore[no-untyped-def]
    below = node.backing
    if below is None:
        return None

    def backing_read(offset: int, length: int) -> bytes:
        size = below.driver.virtual_size
        if offset >= size:
            return bytes(length)
        part = min(length, size - offset)
        data = read(below, offset, part)
        return data if part == length else data + bytes(length - part)

    return backing_read




# -- writing ------------------------------------------------------------------------------------

def _require_writes(node: Node) -> None:
    if node.readonly:
        from vdkit.errors import VdkitError

        raise VdkitError(f"Image '{node.filename}' is opened read-only")


def _before_write(node: Node, offset: int, length: int) -> None:
    """Copy-before-write hooks (a backup job saving the old data) run before the write lands."""
    for fn in node.before_write:
        fn(offset, length)


def _written(node: Node, offset: int, length: int) -> None:
    """Every recording dirty bitmap of the node marks the range (QEMU marks after the write)."""
    bitmaps = node.bitmaps
    if bitmaps:
        from vdkit.block.dirty_bitmap import mark_write

        mark_write(bitmaps, offset, length)


def _after_write(node: Node, offset: int, length: int) -> None:
    """Hooks that need the write landed (a write-blocking mirror copying it to its target)."""
    for fn in node.after_write:
        fn(offset, length)


def write(node: Node, offset: int, data: bytes) -> None:
    """Guest write to the top of a chain (copy-on-write reads come from the backing chain)."""
    _require_writes(node)
    _before_write(node, offset, len(data))
    try:
        node.driver.write(offset, data, backing=_backing_reader(node))
    finally:
        _written(node, offset, len(data))
    if node.after_write:
        _after_write(node, offset, len(data))


def write_zeroes(node: Node, offset: int, length: int, *, unmap: bool = False) -> None:
    _require_writes(node)
    _before_write(node, offset, length)
    try:
        node.driver.write_zeroes(offset, length, backing=_backing_reader(node), unmap=unmap)
    finally:
        _written(node, offset, length)
    if node.after_write:
        _after_write(node, offset, length)


def discard(node: Node, offset: int, length: int) -> None:
    _require_writes(node)
    _before_write(node, offset, length)
    try:
        node.driver.discard(offset, length, has_backing=node.backing is not None)
    finally:
        _written(node, offset, length)
    if node.after_write:
        _after_write(node, offset, length)


def truncate(node: Node, size: int, prealloc: str = "off") -> None:
    """Truncate/grow the top image of ``node`` to ``size`` bytes (``qemu-img resize``, commit's base).

    The backing chain is handed down: QEMU's block layer zeroes a grown area
    that a longer backing file would otherwise show through, and copy-on-write
    of a partly new cluster reads through the chain.
    """
    below = node.backing
    backing_size = below.driver.virtual_size if below is not None else 0
    node.driver.truncate(size, prealloc, backing=_backing_reader(node), backing_size=backing_size)
    for bm in node.driver.dirty_bitmaps or []:  # QEMU resizes every bitmap of the node with it
        bm.resize(node.driver.virtual_size)


def flush(node: Node) -> None:
    node.driver.flush()
