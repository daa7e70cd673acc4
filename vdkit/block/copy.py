"""The copy engine: qemu-img convert's walk over one or more sources, zero detection, read-ahead.

The copy walks the source in *iterations* the way qemu-img 7.2 does, because
the iteration boundaries are visible: they decide which areas are skipped as
zero, and the ``-p`` progress lines are printed per iteration.  Each
iteration asks the chain for the status of the next run (data, zero, or —
with a backing file on the target — "leave to the backing file"), aligned to
the source cluster size, and data runs are cut into buffers of at most
2 MiB.  Within a data buffer, stretches of zero sectors of at least
``min_sparse`` sectors are not written (sparse output); 0 writes everything.

Sources are read through :mod:`vdkit.block.io`; targets are written through
the small interface of :mod:`vdkit.block.target`.  The engine lives in the
block layer (not in ``cli/convert.py``) so that the daemon's block jobs can
run on it; front ends only parse arguments and print.
"""

from __future__ import annotations

from vdkit.block.target import WriteFailed
from vdkit.errors import VdkitError
from vdkit.io.file import find_aligned

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    import mmap
    import queue
    from collections import deque
    from collections.abc import Callable, Generator, Iterator

    from vdkit.block.node import Node
    from vdkit.block.progress import Progress
    from vdkit.block.target import Target
    from vdkit.io.file import ImageFile
    from vdkit.protocols import AsyncFile

SECTOR = 512
IO_BUF_SECTORS = (2 * 1024 * 1024) // SECTOR
MAX_REQUEST_SECTORS = (2**31 - 1) // SECTOR & ~7  # what one block-status query may cover

BLK_ZERO, BLK_DATA, BLK_BACKING = 1, 2, 3


# -- the walk --------------------------------------------------------------------------------------

class Source:
    """One source image and where it starts in the concatenation (sectors)."""


    __slots__ = ("node", "start", "sectors", "alignment", "size")

    def __init__(self, node: Node, start: int, sectors: int, alignment: int, size: int) -> None:
        self.node = node
        self.start = start  # first sector in the concatenation
        self.sectors = sectors
        self.alignment = alignment  # sectors
        # bytes, as the copy started: a source is open for the whole copy, locked against resizing
        # unless force-shared, and qemu-img too takes each size once (a raw file's size is an fstat:
        # three per piece released and retook the GIL as many times in the read-ahead thread)
        self.size = size


class Copier:
    """qemu-img's iteration over the (concatenated) sources."""

    def __init__(self, sources: list[Source], *, target_has_backing: bool, compressed: bool,
                 min_sparse: int, cluster_sectors: int, alignment: int) -> None:
        self.sources = sources
        self.total = sum(s.sectors for s in sources)
        self.target_has_backing = target_has_backing
        self.compressed = compressed
        self.min_sparse = min_sparse
        self.cluster_sectors = cluster_sectors
        self.alignment = alignment
        # -c copies one target cluster per piece (visible in -p's steps), as qemu-img
        self.buf_sectors = cluster_sectors if compressed else max(IO_BUF_SECTORS, min_sparse)
        self.next_status = 0
        self.status = BLK_DATA
        self.target_backing_sectors = -1  # with -B: zeros past the new backing's end need no write
        # where the current status run's bytes lie plainly in a host file: (layer depth, file name,
        # host offset - guest offset), or None (see host_extent)
        self._host: tuple[int, str, int] | None = None
        # or, for a data run at no known offset, the layer depth to ask (FormatDriver.data_location)
        self._locate: int | None = None
        self._plain: dict[tuple[int, int, str], tuple[ImageFile, int] | None] = {}

    def _source_at(self, sector: int) -> Source:
        for s in self.sources:
            if sector < s.start + s.sectors:
                return s
        return self.sources[-1]

    def step(self, sector: int) -> int:
        """Length (sectors) of the next piece at ``sector``; sets :attr:`status`."""
        src = self._source_at(sector)
        n = min(self.total - sector, MAX_REQUEST_SECTORS)
        # a piece never crosses into the next source
        n = min(n, src.start + src.sectors - sector)
        post_backing_zero = False
        if self.target_backing_sectors >= 0:
            if sector >= self.target_backing_sectors:
                post_backing_zero = True
            elif sector + n > self.target_backing_sectors:
                n = self.target_backing_sectors - sector
        if self.next_status <= sector:
            from vdkit.block.driver import OFFSET_VALID
            from vdkit.block.io import DATA, ZERO, chain_status, layer_status

            offset = (sector - src.start) * SECTOR
            count = n * SECTOR
            node = src.node
            try:
                self._host = self._locate = None
                if self.target_has_backing:
                    st = layer_status(node, offset, count)
                    flags, count = st.flags, st.length
                    if st.flags & OFFSET_VALID and st.file is not None:
                        self._host = (0, st.file, st.offset - offset)
                else:
                    e = chain_status(node, offset, count, src.size)
                    flags = (DATA if e.data else 0) | (ZERO if e.zero else 0)
                    count = e.length
                    if e.offset is not None and e.filename is not None:
                        self._host = (e.depth, e.filename, e.offset - offset)
                    elif e.data and not e.zero:
                        self._locate = e.depth
            except (VdkitError, OSError) as exc:
                raise IOFailure(exc, f"error while reading block status at offset {offset}") from exc
            n = (count + SECTOR - 1) // SECTOR
            tail = (sector - src.start + n) % src.alignment
            if n > tail:
                n -= tail
            if flags & ZERO:
                self.status = BLK_BACKING if post_backing_zero else BLK_ZERO
            elif flags & DATA:
                self.status = BLK_DATA
            else:
                self.status = BLK_BACKING if self.target_has_backing else BLK_DATA
            self.next_status = sector + n
        n = min(n, self.next_status - sector)
        if self.status == BLK_DATA or (not self.min_sparse and self.status == BLK_ZERO):
            # with -S 0 zeros are written as data, a buffer at a time (-p's steps show it)
            n = min(n, self.buf_sectors)
        if self.compressed:
            if n < self.cluster_sectors:
                n = min(self.cluster_sectors, self.total - sector)
                self.status = BLK_DATA
            else:
                n -= n % self.cluster_sectors
        return n

    def allocated_sectors(self) -> int:
        """First pass: how many sectors will be copied (the progress denominator)."""
        count = 0
        sector = 0
        while sector < self.total:
            n = self.step(sector)
            if self.status == BLK_DATA or (not self.min_sparse and self.status == BLK_ZERO):
                count += n
            sector += n
        self.next_status = 0
        return count

    def host_extent(self, sector: int, n: int) -> tuple[ImageFile, int] | None:
        """The local file and offset holding the piece's guest bytes as they are, or None.

        Only for the current status run (just returned by :meth:`step`), when the layer that
        answered stores plain data (``FormatDriver.plain_data``, unencrypted) in a plain local file
        (its own or a qcow2 external data file) that this process holds locked against resizing
        (so the range mapped stays inside the file: no ``-U``) and that is long enough.
        """
        src = self._source_at(sector)
        offset = (sector - src.start) * SECTOR
        length = n * SECTOR
        if offset + length > src.size:
            return None
        if self._host is not None:
            depth, filename, delta = self._host
        elif self._locate is not None:  # asked per piece: a run's bytes need not follow each other
            depth = self._locate
            layer = layer_at(src.node, depth)
            try:
                where = None if layer is None else layer.driver.data_location(offset, length)
            except (VdkitError, OSError):
                where = None  # (then read, which reports what it must)
            if where is None or where[2] < length:
                return None
            filename, delta = where[0], where[1] - offset
        else:
            return None
        key = (id(src.node), depth, filename)
        if key not in self._plain:
            f = plain_file(src.node, filename, depth, locked=True)
            self._plain[key] = None if f is None else (f, f.size())
        found = self._plain[key]
        if found is None:
            return None
        file, size = found
        host = offset + delta
        if host < 0 or host + length > size:
            return None
        return file, host

    def async_extent(self, sector: int, n: int) -> tuple[AsyncFile, int] | None:
        """The protocol file and offset holding the piece's guest bytes as they are, when that file
        can have several reads in flight (``start_readinto``: RBD), or None.

        Only for the current status run (just returned by :meth:`step`), when the layer that
        answered stores plain data (unencrypted) in that file and the piece lies inside the image.
        """
        if self._host is None:
            return None
        depth, filename, delta = self._host
        src = self._source_at(sector)
        offset = (sector - src.start) * SECTOR
        if offset + n * SECTOR > src.size or offset + delta < 0:
            return None
        key = (id(src.node), depth, "async:" + filename)
        if key not in self._plain:
            self._plain[key] = async_file(src.node, filename, depth)  # type: ignore[assignment]
        found: AsyncFile | None = self._plain[key]  # type: ignore[assignment]
        return None if found is None else (found, offset + delta)

    def readinto(self, sector: int, n: int, view: memoryview) -> None:
        """Guest bytes of the concatenation into ``view`` (pieces never span two sources)."""
        from vdkit.block.io import readinto
        from vdkit.io.file import zero_fill

        src = self._source_at(sector)
        offset = (sector - src.start) * SECTOR
        length = n * SECTOR
        size = src.size
        part = max(0, min(length, size - offset))
        try:
            if part:
                readinto(src.node, offset, view[:part])
        except (VdkitError, OSError) as exc:
            raise IOFailure(exc, f"error while reading at byte {sector * SECTOR}") from exc
        if part < length:
            zero_fill(view[part:length])


def plain_file(node: Node, filename: str, depth: int | None = None, *, locked: bool = False) -> ImageFile | None:
    """The local file named ``filename`` that holds guest bytes of ``node``'s chain as they are.

    Block status gives a data run's host offset and file *name*; this finds the open file
    behind it, in the layer ``depth`` below ``node`` (any layer when None), if that layer's
    driver has ``plain_data`` and is unencrypted (bytes stored plainly) and the file is a
    regular local one.
    ``locked``: also require this process to hold it locked against resizing (for mappings,
    whose pages must not vanish).
    """
    from vdkit.io.file import ImageFile, Perm

    layer: Node | None = node
    level = 0
    while layer is not None:
        if depth is None or level == depth:
            drv = layer.driver
            if drv.plain_data and not drv.encrypted:
                for f in (getattr(drv, "file", None), getattr(drv, "data_file", None)):
                    if (type(f) is ImageFile and f.filename == filename and f.fd >= 0 and not f.is_device
                            and (not locked or f.lock is not None and f.lock.mode.unshared & Perm.RESIZE)):
                        return f
            if depth is not None:
                return None
        layer = layer.backing
        level += 1
    return None


def layer_at(node: Node, depth: int) -> Node | None:
    """The layer ``depth`` below ``node`` in its backing chain (None past its end)."""
    layer: Node | None = node
    for _ in range(depth):
        layer = layer.backing if layer is not None else None
    return layer


def async_file(node: Node, filename: str, depth: int) -> AsyncFile | None:
    """The file named ``filename`` in the layer ``depth`` below ``node`` if that layer stores plain,
    unencrypted data in it and the file takes reads in flight (a protocol's ``start_readinto``)."""
    layer = layer_at(node, depth)
    if layer is None:
        return None
    drv = layer.driver
    if not drv.plain_data or drv.encrypted:
        return None
    f = getattr(drv, "file", None)
    if getattr(f, "filename", None) == filename and hasattr(f, "start_readinto"):
        return f
    return None


class IOFailure(Exception):
    """A source read failed; the copy reports it (``io_error``) when it reaches that piece.

    Reads run ahead of writes in another thread, so the error message (and a
    qcow2 corruption report on stderr) must wait until everything before the
    failed piece has been written, as in a sequential copy.
    """

    def __init__(self, exc: BaseException, what: str) -> None:
        super().__init__(what)
        self.exc = exc
        self.what = what

    def report(self) -> BaseException:
        from vdkit.block.io import io_error

        return io_error(self.exc, self.what) if isinstance(self.exc, Exception) else self.exc


# -- zero detection ---------------------------------------------------------------------------------
#
# qemu-img skips sectors of zeros inside data (``-S``), so every data buffer
# is searched for all-zero sectors, at C speed and without numpy: the first
# 8 bytes of every sector are gathered with a strided memoryview (one cache
# line per sector is touched, like qemu's early-exit ``buffer_is_zero``) and
# searched for a zero word; ordinary data has none.  From a candidate, the
# sectors whose first words are all zero are confirmed with one comparison
# against a zero buffer (``startswith``, a memcmp without copying), or, when
# some of them hold data further in, measured by comparing doubling lengths.
# Only data with many scattered candidates falls back to numpy.

_Z8 = bytes(8)
_MAX_STRETCHES = 64  # candidates (zero first words) per buffer before numpy does the rest


class ZeroMap:
    """Zero-sector maps of buffers up to ``size`` bytes (owns the zero buffer it compares with).

    A buffer is a ``bytearray`` the source was read into or a view of a mapped source file;
    ranges are compared as ``zeros.startswith(view)`` (a ``memcmp`` without copying, which
    ``memoryview`` comparisons are not: they go element by element).
    """

    def __init__(self, size: int) -> None:
        self.zeros = bytes(size)  # calloc'd: costs no memory until compared with
        self.ones = b"\x01" * (size // SECTOR)

    def is_zero(self, buf: bytearray | memoryview, length: int) -> bool:
        return self.zeros.startswith(memoryview(buf)[:length])

    def all_data(self, buf: bytearray | memoryview, n: int, first: int, step: int) -> bool:
        """Whether ``buf[:n*512]`` is sure to be written whole: sector 0 and every ``step``-th
        sector from ``first`` start with a non-zero word.

        With ``step`` the walk's alignment (``-S``'s power of two, ``first`` the piece's first
        aligned sector), that is enough for :func:`data_extent` to take the piece as one data
        run: a zero stretch it skips inside a piece is ``-S`` sectors or more and so holds an
        aligned sector, a shorter one after data is swallowed up to the next aligned sector, and
        only a piece that is zeros throughout is skipped whatever its length (hence sector 0).
        At the default ``-S 4k`` this reads one word per 4 KiB instead of one per sector (each
        in its own cache line, mostly not cached); anything else gets :meth:`sectors`.
        """
        words = memoryview(buf)[: n * SECTOR].cast("Q")
        per = SECTOR // 8
        if not words[0]:
            return False
        return find_aligned(words[first * per :: step * per].tobytes(), _Z8) < 0

    def sectors(self, buf: bytearray | memoryview, n: int) -> bytes:
        """One byte per sector of ``buf[:n*512]``: 1 where the sector is all zeros."""
        end = n * SECTOR
        mv = memoryview(buf)[:end]
        heads = mv.cast("Q")[:: SECTOR // 8].tobytes()  # word 0 of every sector
        p = find_aligned(heads, _Z8)
        if p < 0:
            return bytes(n)
        zeros = self.zeros
        if p == 0 and zeros.startswith(mv):
            return self.ones[:n]
        flags = bytearray(n)
        hv = memoryview(heads)
        stretches = 0
        while p >= 0:
            if p % 8:  # a zero word across two sectors' heads (the call only then: one per stretch costs)
                p = find_aligned(heads, _Z8, p)
                continue
            stretches += 1
            if stretches > _MAX_STRETCHES:
                return _zero_sectors_numpy(mv, n)
            s = p // 8
            # sectors from s whose first word is zero (the first non-zero byte of heads ends them):
            # usually exactly the zero stretch, confirmed with one comparison
            e = s + _zero_prefix(zeros, hv[p:]) // 8
            if zeros.startswith(mv[s * SECTOR : e * SECTOR]):
                k = e - s
            else:
                k = self._zero_run(mv, s, e)
            flags[s : s + k] = self.ones[:k]
            p = heads.find(_Z8, (s + max(k, 1)) * 8)
        return bytes(flags)

    def _zero_run(self, mv: memoryview, s: int, n: int) -> int:
        """How many all-zero sectors start at sector ``s``, up to ``n`` (gallop up, then halve)."""
        pos, step = s, 1
        zeros = self.zeros
        while pos < n:
            k = min(step, n - pos)
            if zeros.startswith(mv[pos * SECTOR : (pos + k) * SECTOR]):
                pos += k
                step *= 2
            elif k == 1:
                break
            else:
                step = k // 2
        return pos - s


def _zero_prefix(zeros: bytes, view: memoryview) -> int:
    """How many leading bytes of ``view`` are zero (``len(zeros) >= len(view)``).

    Doubling then halving ``startswith`` comparisons: each a ``memcmp`` that stops at the first
    difference, where ``bytes.lstrip(b"\\x00")`` calls ``memchr`` once per byte it strips.
    """
    n = len(view)
    if zeros.startswith(view):
        return n
    lo, step = 0, 64  # view[:lo] is known zero
    while lo + step < n and zeros.startswith(view[lo : lo + step]):
        lo += step
        step *= 2
    hi = min(n, lo + step)  # view[lo:hi] holds a non-zero byte
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if zeros.startswith(view[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo


def _zero_sectors_numpy(buf: bytearray | memoryview, n: int) -> bytes:
    import numpy as np

    arr = np.frombuffer(buf, dtype=np.uint64, count=n * SECTOR // 8).reshape(n, SECTOR // 8)
    return (~arr.any(axis=1)).astype(np.uint8).tobytes()


def _allocated_prefix(zero: bytes, start: int, n: int, sector: int, alignment: int) -> tuple[int, bool]:
    """Length of the leading same-kind stretch of ``zero[start:start+n]``, end aligned like qemu-img."""
    first = zero[start]
    change = zero.find(b"\x00" if first else b"\x01", start + 1, start + n)
    i = n if change < 0 else change - start
    if i == n:
        return i, not first
    is_zero = first
    tail = (sector + i) & (alignment - 1)
    if tail:
        if is_zero and i <= tail:
            is_zero = False
        if not is_zero:
            i = min(i + alignment - tail, n)
        else:
            i -= tail
    return i, not is_zero


def data_extent(zero: bytes, start: int, n: int, min_sparse: int, sector: int, alignment: int) -> tuple[int, bool]:
    """How many sectors to handle next and whether to write them (else they are zeros to skip).

    A data stretch swallows following short zero gaps: only a zero stretch
    of at least ``min_sparse`` sectors ends it.
    """
    lim = min(min_sparse, n)
    used, data = _allocated_prefix(zero, start, n, sector, alignment)
    if not data:
        return used, False
    checked = used
    while checked < n:
        k, d = _allocated_prefix(zero, start + checked, n - checked, sector + checked, alignment)
        checked += k
        if d:
            used = checked
        elif k >= lim:
            break
    return used, True


def sources_of(nodes: list[Node]) -> list[Source]:
    """The nodes as one concatenation (each padded to whole sectors, aligned to its cluster size)."""
    sources: list[Source] = []
    start = 0
    for node in nodes:
        size = node.driver.virtual_size
        sectors = (size + SECTOR - 1) // SECTOR
        cs = node.driver.cluster_size or SECTOR
        sources.append(Source(node, start, sectors, max(1, cs // SECTOR), size))
        start += sectors
    return sources


def convert_copy(sources: list[Source], target: Target, progress: Progress, *, has_backing: bool,
                 compressed: bool, min_sparse: int, has_zero_init: bool | None = None,
                 in_flight: int | None = None,
                 before_abort: Callable[[BaseException], None] | None = None,
                 before_finish: Callable[[Node], None] | None = None) -> None:
    """Copy the concatenated ``sources`` into ``target`` as qemu-img convert does, then finish it.

    ``has_backing``: the target has a backing file (ranges the sources leave
    to their backing files are not written); ``min_sparse`` is ``-S`` in
    sectors; ``has_zero_init`` says whether unwritten ranges read as zeros
    (default: the target's answer, unless it has a backing file).  Progress
    goes to ``progress`` (0 before, per piece after; the caller prints 100).
    On any failure the target is aborted (closed), after ``before_abort`` got the exception: qemu-img
    reports a failed copy before it closes the target, whose cache flushes may report more.
    ``in_flight`` bounds the pieces read ahead of the writes (qemu-img's ``-m``; default
    :attr:`ReadAhead.DEPTH`).  ``before_finish`` gets the target's node once every write is done and
    before it is finished (``convert --bitmaps`` adds the source's bitmaps there).
    """
    try:
        copier = Copier(sources, target_has_backing=has_backing, compressed=compressed,
                        min_sparse=min_sparse, cluster_sectors=max(1, target.cluster_size // SECTOR),
                        alignment=pow2floor(max(min_sparse, 1)))
        if has_backing:
            copier.target_backing_sectors = target.backing_sectors()
        progress.set(0.0)
        try:
            allocated = copier.allocated_sectors() if progress.enabled else 0
        except IOFailure as f:
            raise f.report() from f.exc
        if has_zero_init is None:
            has_zero_init = target.has_zero_init and not has_backing
        zmap = ZeroMap(copier.buf_sectors * SECTOR)
        # Everything alive now (modules, numpy, the open images) lives until the end: keep
        # the collector from traversing it again and again while the copy allocates.
        import gc

        gc.freeze()  # undone below: a long-lived caller's later garbage must stay collectable
        done = 0
        mapping = not compressed and target.maps_sources
        with ReadAhead(copier, zmap, sparse=bool(min_sparse) and not compressed, mapping=mapping,
                       depth=in_flight, zeros_written=not (has_zero_init and min_sparse),
                       threaded=not target.writes_behind) as pieces:
            for piece in pieces:
                if isinstance(piece, IOFailure):
                    raise piece.report() from piece.exc
                sector, n, status, buf, zero, mapped = piece
                data: bytes | memoryview | None = None
                if mapped is not None:
                    data = mapped.view
                elif status == BLK_DATA:
                    assert buf is not None
                    data = memoryview(buf)[: n * SECTOR]
                elif status == BLK_ZERO and not min_sparse:
                    status, data = BLK_DATA, bytes(n * SECTOR)
                try:
                    write_piece(target, copier, zmap, status, sector, n, buf, data, zero, has_zero_init,
                                mapped)
                except WriteFailed as wf:  # an earlier piece's write, which was in flight
                    raise _write_error(wf.exc, wf.offset) from wf.exc
                except (VdkitError, OSError) as exc:
                    raise _write_error(exc, sector * SECTOR) from exc
                finally:
                    data = None  # no view of a mapping outlives its piece
                    if buf is not None:
                        # back to the reader once the target's writes from it are done (the reader unmaps
                        # a mapped piece: munmap's cost off this thread)
                        target.after_writes(lambda b=buf, m=mapped: pieces.release(b, m))  # type: ignore[misc]
                if status == BLK_DATA:
                    done += n
                    if allocated:
                        progress.set(100.0 * done / allocated)
            try:
                target.wait()
            except WriteFailed as wf:
                raise _write_error(wf.exc, wf.offset) from wf.exc
        if before_finish is not None:  # (every write is done: convert --bitmaps adds the bitmaps here)
            before_finish(target.node)
        target.finish()
    except BaseException as exc:
        if before_abort is not None:
            before_abort(exc)
        target.abort()
        raise
    finally:
        import gc

        gc.unfreeze()


def _write_error(exc: BaseException, offset: int) -> BaseException:
    from vdkit.block.io import io_error

    return io_error(exc, f"error while writing at byte {offset}") if isinstance(exc, Exception) else exc


_MADV_DONTNEED = 4
_FAULT_AROUND = 64 << 10  # Linux's default fault_around_bytes: a read fault maps this much around it
_MADV_POPULATE_READ = 22  # Linux 5.14+: fault a range in, as MAP_POPULATE does at mmap time
_madvise_fn: object = False  # not looked up yet


def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise(address, length, advice)`` through ctypes, or None (then no windows).

    CPython's ``mmap.mmap`` keeps the GIL through the ``mmap`` system call, so ``MAP_POPULATE``
    (the page-table work for every page of a piece) stopped the writing thread whenever it came
    back from ``copy_file_range`` while the read-ahead thread was mapping the next piece (5 ms
    waits on the GIL in strace).  ``madvise(MADV_POPULATE_READ)`` through ctypes does that work
    with the GIL released, and on a range of a mapping made once per :class:`MapWindow` instead
    of once per piece (a mapping and unmapping per 1 MiB piece cost about three times the page
    work itself).  None where libc's ``madvise`` cannot be had, or once the kernel has refused
    the advice (older than 5.14): pieces are then mapped one by one with ``MAP_POPULATE``.
    """
    global _madvise_fn
    if _madvise_fn is False:
        _madvise_fn = None
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError, ImportError):
            return None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise_fn = fn
    return _madvise_fn  # type: ignore[return-value]


class MapWindow:
    """A stretch of a source file mapped once; the pieces inside it are views of it.

    The mapping is private (copy-on-write): the same page-cache pages as a shared one, nothing
    this process might write reaches the file, and ctypes can take its address.  It is unmapped
    once it is no longer the current window and the last piece in it is closed.
    """

    SIZE = 32 << 20

    __slots__ = ("mm", "file", "start", "end", "address", "users", "retired")

    def __init__(self, file: ImageFile, start: int, end: int) -> None:
        import ctypes
        import mmap

        self.mm = mmap.mmap(file.fd, end - start, access=mmap.ACCESS_COPY, offset=start)
        anchor = ctypes.c_char.from_buffer(self.mm)  # an export of the mapping, for its address only
        self.address = ctypes.addressof(anchor)
        del anchor  # released at once: the mapping can be closed as before
        self.file = file
        self.start = start
        self.end = end
        self.users = 0
        self.retired = False

    def advise(self, offset: int, length: int, advice: int) -> bool:
        """``madvise`` over the pages holding file bytes ``[offset, offset+length)``; False if refused."""
        import mmap

        madvise = _madvise()
        if madvise is None:
            return False
        first = (self.address + offset - self.start) & ~(mmap.PAGESIZE - 1)
        last = self.address + offset - self.start + length
        return madvise(first, last - first, advice) == 0

    def release(self, retire: bool = False) -> None:
        """One piece less (or, with ``retire``, no more pieces to come): unmap once both hold."""
        if retire:
            self.retired = True
        else:
            self.users -= 1
        if self.retired and self.users == 0:
            try:
                self.mm.close()
            except BufferError:  # a view still referenced somewhere: unmapped when that goes
                pass


class MapWindows:
    """The read-ahead thread's current :class:`MapWindow` (pieces of a copy come in file order)."""

    def __init__(self) -> None:
        self.current: MapWindow | None = None

    def window_for(self, file: ImageFile, offset: int, length: int) -> MapWindow:
        import mmap
        import os

        w = self.current
        if w is not None and w.file is file and w.start <= offset and offset + length <= w.end:
            return w
        self.close()
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        end = min(os.fstat(file.fd).st_size, max(start + MapWindow.SIZE, offset + length))
        self.current = MapWindow(file, start, end)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.release(retire=True)
            self.current = None


def next_hole(fd: int, offset: int) -> int:
    """Where the first hole of the file ``fd`` at or after ``offset`` starts (``SEEK_HOLE``; the end
    of the file is one); ``offset`` on any error (nothing known)."""
    import os

    try:
        return os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError:
        return offset


def file_holes(fd: int, offset: int, length: int, min_sectors: int) -> list[tuple[int, int]]:
    """Sector ranges ``(first, end)`` of ``[offset, offset+length)`` of the file ``fd`` that are holes
    (``SEEK_HOLE``/``SEEK_DATA``), counted from ``offset``, each at least ``min_sectors`` long.

    Why: a format's block status says where a data run lies in its file, not whether the file
    stores all of it.  qemu-img's VHD (vpc) writer leaves the unwritten part of every block a hole
    of the file; mapping it had the kernel zero-fill page-cache pages only for the zero scan to
    find zeros.  A hole reads as zeros, so its sectors are zero sectors without being read, and the
    zero map (so what is written) is the same.  Nothing on a file system that cannot tell (all
    data then) or on any error.
    """
    from vdkit.io.file import seek_extent  # (loaded with the files the copy reads)

    end = offset + length
    holes: list[tuple[int, int]] = []
    pos = offset
    try:
        while pos < end:
            data, stop = seek_extent(fd, pos)
            if not data:
                first = -(-(pos - offset) // SECTOR)  # whole sectors inside the hole only
                last = (min(end, stop) - offset) // SECTOR
                if last - first >= max(1, min_sectors):
                    holes.append((first, last))
            pos = stop
    except OSError:
        return []
    return holes


def zero_sectors_around(zmap: ZeroMap, view: memoryview, n: int, holes: list[tuple[int, int]]) -> bytes:
    """:meth:`ZeroMap.sectors` of ``view[:n*512]`` whose sectors in ``holes`` are known zeros: those
    are not read, the rest is scanned sector by sector (the whole-piece shortcut of
    :meth:`ZeroMap.all_data` does not hold for a part of a piece)."""
    flags = bytearray(n)
    pos = 0
    for first, last in holes:
        if first > pos:
            flags[pos:first] = zmap.sectors(view[pos * SECTOR : first * SECTOR], first - pos)
        flags[first:last] = zmap.ones[: last - first]
        pos = last
    if pos < n:
        flags[pos:n] = zmap.sectors(view[pos * SECTOR : n * SECTOR], n - pos)
    return bytes(flags)


class Mapped:
    """A data piece read in place: the source file's pages mapped read-only, not copied.

    The zero-sector scan reads the mapping, and the target takes the bytes from it (a raw
    file target has the kernel copy them with ``copy_file_range``, or share them where the
    file system reflinks).  Only ranges inside a file this process holds locked against
    resizing are mapped (:meth:`Copier.host_extent`), so no page of the view can vanish.
    With ``windows`` the piece is a view of a shared :class:`MapWindow`, its pages faulted in
    by ``madvise`` without the GIL and dropped again when it is closed (the process's resident
    set stays that of the pieces in flight); otherwise it is a mapping of its own.
    ``populate=False`` leaves the faulting to the first reader of the pages: the zero scan at
    the default ``-S`` reads a word of every page, and each of its faults maps the pages around
    (the kernel's fault-around, 64 KiB), which costs half of what ``MADV_POPULATE_READ``'s walk
    over every page does; a ``copy_file_range`` target never needs the pages mapped at all.
    """

    __slots__ = ("mm", "view", "file", "offset", "window", "length", "holes")

    def __init__(self, file: ImageFile, offset: int, length: int, windows: MapWindows | None = None, *,
                 populate: bool = True) -> None:
        import mmap

        self.file = file
        self.offset = offset
        self.length = length
        self.holes: list[tuple[int, int]] = []  # sectors of the piece that are holes of the file (file_holes)
        self.window: MapWindow | None = None
        self.mm: mmap.mmap | None = None
        if windows is not None and _madvise() is not None:
            w = self.window = windows.window_for(file, offset, length)
            w.users += 1
            self.view = memoryview(w.mm)[offset - w.start : offset - w.start + length]
            if populate and not w.advise(offset, length, _MADV_POPULATE_READ):
                global _madvise_fn
                _madvise_fn = None  # an older kernel: this piece faults in as it is read, the next are mapped
            return
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        # one fault-in instead of one per page
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self.mm = mmap.mmap(file.fd, offset - start + length, flags, mmap.PROT_READ, offset=start)
        self.view = memoryview(self.mm)[offset - start :]

    def populate_around(self, holes: list[tuple[int, int]]) -> None:
        """Fault in the piece's pages except the holes' (:func:`file_holes`: never read)."""
        w = self.window
        if w is None:
            return
        pos = 0
        for first, last in [*holes, (self.length // SECTOR, self.length // SECTOR)]:
            if first * SECTOR > pos and not w.advise(self.offset + pos, first * SECTOR - pos, _MADV_POPULATE_READ):
                return  # (refused: the pages fault in as they are read)
            pos = last * SECTOR

    def close(self) -> None:
        self.view.release()
        if self.window is not None:
            self.window.advise(self.offset, self.length, _MADV_DONTNEED)  # (a page shared with the next
            self.window.release()  # piece is faulted in again from the page cache if it is read)
            return
        assert self.mm is not None
        try:
            self.mm.close()
        except BufferError:  # a slice still referenced somewhere: unmapped when that goes
            pass


Piece = tuple[int, int, int, "bytearray | None", "bytes | None", "Mapped | None"]


class ReadAhead:
    """Runs the source side of the copy in a thread, a few buffers ahead of the writes.

    The thread walks qemu-img's iterations (block status), reads data pieces
    into pooled buffers (or maps them, see :class:`Mapped`) and maps their zero
    sectors; the caller writes the pieces in order and hands each buffer back
    with :meth:`release`.  A mapped piece also holds a pool buffer, so at most
    ``DEPTH`` pieces are in flight either way.  The system calls on both sides
    release the GIL, so reading the next pieces overlaps writing this one
    (qemu-img overlaps them with 8 coroutines).  Only the thread touches the
    source nodes and only the caller the target, so neither needs locking.  A
    failed piece is passed on as an :class:`IOFailure` and ends the walk.

    ``threaded=False`` walks in the caller's thread instead, for a target whose writes run in a
    thread of their own (:attr:`Target.writes_behind`): reading the next piece overlaps the writes
    in flight already, and a thread less is fewer GIL hand-offs per piece (a 2 GiB raw -> qcow2
    convert made 18.6k futex calls with the read-ahead thread, 6.7k without).  The pool bounds the
    pieces in flight the same way: a buffer comes back once the target's writes from it are done.
    """

    DEPTH = 4

    def __init__(self, copier: Copier, zmap: ZeroMap, *, sparse: bool, mapping: bool = False,
                 depth: int | None = None, zeros_written: bool = True, threaded: bool = True) -> None:
        import queue
        import threading
        from collections import deque  # (queue imports it already)

        self.copier = copier
        self.zmap = zmap
        self.sparse = sparse
        self.mapping = mapping
        # False: the writer does nothing with a zero piece (the target reads as zeros, -S is not 0),
        # so neither it nor a backing piece (never written) is queued: one hand-off less per hole
        self.zeros_written = zeros_written
        # buffers (each with the mapped piece last written from it, to unmap) or None: stop
        self._pool: queue.SimpleQueue[tuple[bytearray, Mapped | None] | None] = queue.SimpleQueue()
        # empty until a piece is read into it (see _sized): a mapped piece only needs the token, and
        # zero-filling DEPTH buffers of 2 MiB up front cost 13 ms of page faults per convert
        for _ in range(max(1, depth or self.DEPTH)):
            self._pool.put((bytearray(), None))
        self._out: queue.SimpleQueue[Piece | IOFailure | None] = queue.SimpleQueue()
        self.depth = max(1, depth or self.DEPTH)
        # pieces walked but not yet passed on, in order: (piece, file, read) with the read still in
        # flight into the piece's buffer, or (piece, None, None) for a zero/backing piece behind one
        self._pending: deque[tuple[Piece, AsyncFile | None, object]] = deque()
        self._reads = 0  # reads in flight (protocol files that take several: Copier.async_extent)
        self._stop = False
        self._windows = MapWindows() if mapping else None  # the reader thread's (see Mapped)
        # (file, start, end): a range of a mapped source file known to hold no hole (see _map)
        self._hole_free: tuple[ImageFile | None, int, int] = (None, 0, 0)
        # the zero scan (ZeroMap.all_data) reads a word every `alignment` sectors: when that is within
        # the kernel's fault-around, its faults map every page and populating first is wasted work
        self._populate = not (sparse and copier.alignment * SECTOR <= _FAULT_AROUND)
        self._thread = threading.Thread(target=self._run, name="vdkit-convert-read", daemon=True) if threaded else None
        self._walker: Generator[Piece | IOFailure, None, None] | None = None  # (without the thread)

    def __enter__(self) -> ReadAhead:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._pool.put(None)  # wakes the thread if it waits for a buffer
        if self._thread is not None:
            self._thread.join()
        elif self._walker is not None:
            self._walker.close()  # (its reads still in flight end first: _walk's finally)
        while True:  # pieces mapped ahead and never written (a failure): unmap them now
            try:
                piece = self._out.get_nowait()
            except Exception:  # queue.Empty
                break
            if isinstance(piece, tuple) and piece[5] is not None:
                piece[5].close()
        while True:
            try:
                item = self._pool.get_nowait()
            except Exception:  # queue.Empty
                break
            if item is not None and item[1] is not None:
                item[1].close()
        if self._windows is not None:
            self._windows.close()  # unmapped now that no piece is left in it

    def __iter__(self) -> Iterator[Piece | IOFailure]:
        if self._thread is None:
            self._walker = self._walk()
            yield from self._walker
            return
        while True:
            piece = self._out.get()
            if piece is None:
                return
            yield piece

    def release(self, buf: bytearray, mapped: Mapped | None = None) -> None:
        self._pool.put((buf, mapped))

    def _map(self, sector: int, n: int) -> Mapped | None:
        host = self.copier.host_extent(sector, n)
        if host is None:
            return None
        # holes of the file inside the piece are zeros the scan need not read (-S 0 writes them: read)
        holes: list[tuple[int, int]] = []
        if self.sparse:
            file, offset = host
            end = offset + n * SECTOR
            if file is not self._hole_free[0] or not self._hole_free[1] <= offset < end <= self._hole_free[2]:
                # one SEEK_HOLE tells how far the file has no hole: the next pieces up to there ask nothing
                self._hole_free = (file, offset, next_hole(file.fd, offset))
            if end > self._hole_free[2]:
                holes = file_holes(file.fd, offset, n * SECTOR, self.copier.min_sparse)
        try:
            m = Mapped(host[0], host[1], n * SECTOR, self._windows, populate=self._populate and not holes)
        except (OSError, ValueError, OverflowError):  # cannot be mapped: read it instead
            return None
        if holes:
            m.holes = holes
            if self._populate:
                m.populate_around(holes)
        return m

    def _run(self) -> None:
        """The read-ahead thread: the walk's pieces into the queue the caller takes them from."""
        out = self._out
        try:
            for piece in self._walk():
                out.put(piece)
        except BaseException as exc:  # a bug: surface it in the caller rather than hang
            out.put(IOFailure(exc, "error while reading"))
        finally:
            out.put(None)

    def _walk(self) -> Generator[Piece | IOFailure, None, None]:
        """qemu-img's iterations as pieces, in order; a failed read ends it with an :class:`IOFailure`."""
        c = self.copier
        pending = self._pending
        sector = 0
        try:
            while sector < c.total and not self._stop:
                n = c.step(sector)
                status = c.status
                if status != BLK_DATA:
                    if status == BLK_BACKING or not self.zeros_written:
                        sector += n
                        continue
                    piece: Piece = (sector, n, status, None, None, None)
                    if pending:
                        pending.append((piece, None, None))
                    else:
                        yield piece
                    sector += n
                    continue
                while pending and self._pool.empty():
                    # the writes may hold every other buffer: the oldest read goes on, to be written
                    yield self._emit()
                buf = self._buffer()
                if buf is None:
                    return
                remote = c.async_extent(sector, n)
                if remote is not None:
                    buf = self._sized(buf)
                    try:
                        read = remote[0].start_readinto(remote[1], memoryview(buf)[: n * SECTOR])
                    except (VdkitError, OSError) as exc:
                        while pending:  # the pieces before it are written first, as in a sequential copy
                            yield self._emit()
                        raise IOFailure(exc, f"error while reading at byte {sector * SECTOR}") from exc
                    pending.append(((sector, n, status, buf, None, None), remote[0], read))
                    self._reads += 1
                    while self._reads >= self.depth:
                        yield self._emit()
                    sector += n
                    continue
                while pending:  # a piece read here: those in flight go first
                    yield self._emit()
                mapped = self._map(sector, n) if self.mapping else None
                if mapped is None:
                    buf = self._sized(buf)
                    c.readinto(sector, n, memoryview(buf))
                if mapped is not None and mapped.holes:
                    zero: bytes | None = zero_sectors_around(self.zmap, mapped.view, n, mapped.holes)
                else:
                    zero = self._zeros(buf if mapped is None else mapped.view, sector, n)
                yield (sector, n, status, buf, zero, mapped)
                sector += n
            while pending and not self._stop:
                yield self._emit()
        except IOFailure as f:
            yield f
        finally:
            self._release_pending()  # no read may still be filling a buffer once the walk ends

    def _zeros(self, buf: bytearray | memoryview, sector: int, n: int) -> bytes | None:
        """The piece's zero-sector map for :func:`data_extent` (None when nothing is skipped)."""
        if not self.sparse:
            return None
        a = self.copier.alignment
        if self.zmap.all_data(buf, n, -sector % a, a):
            return bytes(n)
        return self.zmap.sectors(buf, n)

    def _sized(self, buf: bytearray) -> bytearray:
        """``buf``, or a buffer of a whole piece in place of an empty one (the pool starts with those)."""
        return buf if buf else bytearray(self.copier.buf_sectors * SECTOR)

    def _buffer(self) -> bytearray | None:
        """A free buffer, waiting for one (None: stop).  The walk first passes on the reads in flight
        while none is free: their buffers come back once written, and the writes may hold the rest."""
        item = self._pool.get()
        if item is None or self._stop:
            return None
        buf, done = item
        if done is not None:
            done.close()
        return buf

    def _emit(self) -> Piece:
        """The oldest pending piece, to pass on once its read is done (its zero sectors mapped)."""
        piece, file, read = self._pending.popleft()
        if file is not None:
            self._reads -= 1
            sector, n, status, buf, _, _ = piece
            try:
                file.finish_read(read)
            except (VdkitError, OSError) as exc:
                raise IOFailure(exc, f"error while reading at byte {sector * SECTOR}") from exc
            assert buf is not None
            zero = self._zeros(buf, sector, n)
            piece = (sector, n, status, buf, zero, None)
        return piece

    def _release_pending(self) -> None:
        """Wait for every read still in flight (their buffers are librbd's until then); drop the pieces."""
        while self._pending:
            _, file, read = self._pending.popleft()
            if file is not None:
                self._reads -= 1
                try:
                    file.finish_read(read)
                except (VdkitError, OSError):
                    pass


def write_piece(target: Target, copier: Copier, zmap: ZeroMap, status: int, sector: int, n: int,
                buf: bytearray | None, data: bytes | memoryview | None, zero: bytes | None,
                has_zero_init: bool, mapped: Mapped | None = None) -> None:
    """Write one piece of the walk: data (minus ``-S`` zero stretches), zeros, or nothing (backing)."""
    if status == BLK_BACKING:
        return
    if status == BLK_ZERO:
        if not has_zero_init:
            _write_zeroes(target, sector * SECTOR, n * SECTOR)
        return
    assert data is not None
    if not copier.min_sparse:
        _write(target, sector * SECTOR, data, mapped, 0, compressed=copier.compressed)
        return
    if copier.compressed:
        # one cluster at a time, as qemu-img: an all-zero cluster is skipped (or zeroed), not compressed
        cs = copier.cluster_sectors
        for i in range(0, n, cs):
            k = min(cs, n - i)
            if not zmap.zeros.startswith(data[i * SECTOR:(i + k) * SECTOR]):
                _write(target, (sector + i) * SECTOR, data[i * SECTOR:(i + k) * SECTOR], None, 0, compressed=True)
            elif not has_zero_init:
                _write_zeroes(target, (sector + i) * SECTOR, k * SECTOR)
        return
    assert zero is not None
    i = 0
    while i < n:
        k, is_data = data_extent(zero, i, n - i, copier.min_sparse, sector + i, copier.alignment)
        if is_data:
            _write(target, (sector + i) * SECTOR, data[i * SECTOR : (i + k) * SECTOR], mapped, i * SECTOR)
        elif not has_zero_init:
            _write_zeroes(target, (sector + i) * SECTOR, k * SECTOR)
        i += k


def _write(target: Target, offset: int, data: bytes | memoryview, mapped: Mapped | None, at: int, *,
           compressed: bool = False) -> None:
    """``data`` to ``target`` at ``offset``; bytes of a mapped piece (``at`` into it) may go file to file."""
    if mapped is not None and not compressed and isinstance(data, memoryview):
        target.write_from_file(offset, data, mapped.file.fd, mapped.offset + at)
    else:
        target.write(offset, data, compressed=compressed)
    target.written(offset, len(data))


def _write_zeroes(target: Target, offset: int, length: int) -> None:
    target.write_zeroes(offset, length)
    target.written(offset, length)


def pow2floor(v: int) -> int:
    """The largest power of two not above ``v`` (``v`` >= 1)."""
    return 1 << (v.bit_length() - 1)


# -- rebase: make an image independent of a change of its backing file ------------------------------

IO_BUF = 2 * 1024 * 1024


def copy_differences(node: Node, new: Node | None, progress: Progress) -> None:
    """Write into ``node`` every sector where its current backing chain and ``new`` differ.

    Only ranges ``node`` does not allocate itself are compared (zeros past
    either chain's end; ``new`` None is no backing at all); differing
    sectors are written from the old view, so the guest sees the same disk
    once the backing file is switched (``qemu-img rebase`` in safe mode).
    Progress advances by one step per 2 MiB chunk.
    """
    from vdkit.block.io import ALLOCATED, io_error, layer_status, read, write, write_zeroes

    old = node.backing
    size = node.driver.virtual_size
    old_size = old.driver.virtual_size if old is not None else 0
    new_size = new.driver.virtual_size if new is not None else 0
    step = 100.0 / (size / min(size, IO_BUF)) if size else 100.0
    offset = 0
    while offset < size:
        n = min(IO_BUF, size - offset)
        try:
            st = layer_status(node, offset, n)
        except (OSError, VdkitError) as exc:
            raise io_error(exc, "error while reading image metadata") from exc
        n = st.length
        if st.flags & ALLOCATED:
            offset += n
            continue
        old_zero = offset >= old_size
        if old_zero:
            buf_old = bytes(n)
        else:
            n = min(n, old_size - offset)
            assert old is not None
            buf_old = read(old, offset, n)
        if new is None or offset >= new_size:
            buf_new = bytes(n)
        else:
            n = min(n, new_size - offset)
            buf_new = read(new, offset, n)
            buf_old = buf_old[:n]
        done = 0
        while done < n:
            differ, k = _same_run(buf_old, buf_new, done, n)
            if differ:
                try:
                    if old_zero:
                        write_zeroes(node, offset + done, k)
                    else:
                        write(node, offset + done, buf_old[done : done + k])
                except (OSError, VdkitError) as exc:
                    raise io_error(exc, "Error while writing to COW image") from exc
            done += k
        offset += n
        progress.add(step, 100)
    try:
        node.driver.flush()  # the copies are durable before the header names the new backing file
    except OSError as exc:  # (qemu-img goes on and reports the cache at close; its image then lies)
        raise io_error(exc, "Error while writing to COW image") from exc


def _same_run(a: bytes, b: bytes, start: int, end: int) -> tuple[bool, int]:
    """Whether the sector at ``start`` differs, and how far (in bytes) that stays so."""
    first = a[start : start + SECTOR] != b[start : start + SECTOR]
    i = min(end, start + SECTOR)
    while i < end:
        j = min(end, i + SECTOR)
        if (a[i:j] != b[i:j]) != first:
            break
        i = j
    return first, i - start
