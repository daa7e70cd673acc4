"""``vdkit-img convert``: copy the guest view of one or more images into a new image.

The copy walks the source in *iterations* the way qemu-img 7.2 does, because
the iteration boundaries are visible: they decide which areas are skipped as
zero, and the ``-p`` progress lines are printed per iteration.  Each
iteration asks the chain for the status of the next run (data, zero, or —
with ``-B`` — "leave to the backing file"), aligned to the source cluster
size, and data runs are cut into buffers of at most 2 MiB.  Within a data
buffer, stretches of zero sectors of at least ``-S`` bytes are not written
(sparse output); ``-S 0`` writes everything.

Sources are read through :mod:`vdkit.block.io`; targets are written through
a small :class:`Target` interface (raw file, or a qcow2 image through
:mod:`vdkit.formats.qcow2.io`).
"""

from __future__ import annotations

import struct

from vdkit.cli.main import write_out
from vdkit.cli.options import CACHE_MODES, LongOpt, SpecNames, cvtnum, getopt_long, open_args, split_qemu_opts
from vdkit.errors import UsageError, VdkitError

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    import queue

    from vdkit.block.node import Node

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("object", True, "object"),
    LongOpt("image-opts", False, "image-opts"),
    LongOpt("target-image-opts", False, "target-image-opts"),
    LongOpt("salvage", False, "salvage"),
    LongOpt("target-is-zero", False, "target-is-zero"),
    LongOpt("force-share", False, "U"),
    LongOpt("bitmaps", False, "bitmaps"),
    LongOpt("skip-broken-bitmaps", False, "skip-broken-bitmaps"),
]

SECTOR = 512
IO_BUF_SECTORS = (2 * 1024 * 1024) // SECTOR
MAX_REQUEST_SECTORS = (2**31 - 1) // SECTOR & ~7  # what one block-status query may cover

BLK_ZERO, BLK_DATA, BLK_BACKING = 1, 2, 3


# qemu-img's cache modes; convert's target default is "unsafe" (no flushes).


class ConvertArgs:
    """The parsed command line (a plain class: ``dataclasses`` costs start-up time)."""

    def __init__(self) -> None:
        self.sources: list[str] = []
        self.target = ""
        self.fmt: str | None = None
        self.out_fmt = "raw"
        self.options: list[str] = []
        self.compressed = False
        self.progress = False
        self.quiet = False
        self.backing: str | None = None
        self.backing_fmt: str | None = None
        self.snapshot: str | None = None
        self.min_sparse = 8  # sectors
        self.skip_create = False
        self.force_share = False
        self.target_is_zero = False
        self.cache: str | None = None
        self.out_fmt_given = False  # -O was given (refused next to --target-image-opts)
        self.image_opts = False  # the sources are QemuOpts specs
        self.target_image_opts = False  # the target is a QemuOpts spec (needs -n)
        self.sparse_given = False  # -S was given (refused next to -C)
        self.copy_offload = False  # -C: no effect on the result, but refused with -c/-S/--salvage
        self.salvage = False
        self.src_cache: str | None = None


def parse(argv: list[str]) -> ConvertArgs:
    p = getopt_long(argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", LONGOPTS)
    a = ConvertArgs()
    for key, value in p.opts:
        if key == "h":
            from vdkit.cli.main import HELP

            write_out(HELP)
            raise _Done(0)
        if key == "f":
            a.fmt = value
        elif key == "O":
            a.out_fmt = value or ""
            a.out_fmt_given = True
        elif key == "B":
            a.backing = value
        elif key == "F":
            a.backing_fmt = value
        elif key == "c":
            a.compressed = True
        elif key == "o":
            if value is not None and value.strip() in ("help", "?"):
                raise VdkitError("option help is not supported by vdkit-img convert")
            a.options.append(value or "")
        elif key == "l":
            a.snapshot = value
        elif key == "S":
            try:
                from vdkit.cli.options import strtosz

                sval = strtosz(value or "")
            except ValueError:
                sval = -1
            if sval < 0 or sval % SECTOR or sval > 16 * 1024 * 1024:
                raise VdkitError(
                    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                    "16777216. Select 0 to disable sparse detection (fully allocates output).")
            a.min_sparse = sval // SECTOR
            a.sparse_given = True
        elif key == "p":
            a.progress = True
        elif key == "q":
            a.quiet = True
        elif key == "n":
            a.skip_create = True
        elif key == "U":
            a.force_share = True
        elif key == "target-is-zero":
            a.target_is_zero = True
        elif key == "m":
            cvtnum("coroutines", value or "")  # validated, not used: vdkit copies sequentially
        elif key == "t":
            if value not in CACHE_MODES:
                raise VdkitError(f"Invalid cache option: {value}")
            a.cache = value
        elif key == "T":
            a.src_cache = value
        elif key == "C":
            a.copy_offload = True
        elif key == "salvage":
            a.salvage = True
        elif key == "r":
            cvtnum("rate limit", value or "")  # validated; a rate limit changes no byte of the result
        elif key in ("W", "bitmaps", "skip-broken-bitmaps"):
            pass  # out-of-order writes, bitmap copying: no effect on the data
        elif key == "image-opts":
            a.image_opts = True
        elif key == "target-image-opts":
            a.target_image_opts = True
        # --object: created (checked) by getopt_long; objects do not change a copy
    if a.quiet:
        a.progress = False
    # qemu-img's checks after option parsing, in its order
    if a.compressed and a.copy_offload:
        raise VdkitError("Cannot enable copy offloading when -c is used")
    if a.sparse_given and a.copy_offload:
        raise VdkitError("Cannot enable copy offloading when -S is used")
    if a.copy_offload and a.salvage:
        raise VdkitError("Cannot use copy offloading in salvaging mode")
    if a.target_image_opts and not a.skip_create:
        raise VdkitError("--target-image-opts requires use of -n flag")
    if a.skip_create and a.options:
        raise VdkitError("-o has no effect when skipping image creation")
    if a.target_is_zero and not a.skip_create:
        raise VdkitError("--target-is-zero requires use of -n flag")
    if len(p.args) < 2:
        raise VdkitError("Must specify image file name")
    if a.src_cache is not None and a.src_cache not in CACHE_MODES:
        raise VdkitError(f"Invalid source cache option: {a.src_cache}")
    a.sources, a.target = p.args[:-1], p.args[-1]
    return a


class _Done(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def main(argv: list[str]) -> int:
    try:
        a = parse(argv)
    except _Done as d:
        return d.code
    return run(a)


# -- progress (qemu-img -p) ----------------------------------------------------------------------

class Progress:
    """qemu-img's ``-p`` lines ``    (NN.NN/100%)\r``, computed in C ``float`` like the original.

    A line is printed when the value moved by more than ``min_skip`` since
    the last line, and always at 0 and 100.  Values are kept as doubles that
    hold float32 numbers; every operation is rounded back to float32, which
    gives exactly the float32 result for the ``+ - * /`` used here (a double
    carries more than twice float32's precision), without importing numpy.
    """

    def __init__(self, enabled: bool, min_skip: float = 1.0) -> None:
        self.enabled = enabled
        self.min_skip = _f32(min_skip)
        self.current = 0.0
        self.last = 0.0

    def set(self, value: float) -> None:
        """Absolute update (``qemu_progress_print(value, 0)``)."""
        self._update(_f32(value))

    def add(self, delta: float, max_: int = 100) -> None:
        """Relative update (``qemu_progress_print(delta, max)``)."""
        self._update(_f32(self.current + _f32(_f32(_f32(delta) / 100.0) * _f32(max_))))

    def _update(self, cur: float) -> None:
        if not self.enabled:
            return
        cur = min(cur, 100.0)
        self.current = cur
        if (cur > _f32(self.last + self.min_skip) or cur < _f32(self.last - self.min_skip)
                or cur == 0 or cur == 100):
            self.last = cur
            write_out(f"    ({cur:3.2f}/100%)\r")
            import sys

            sys.stdout.flush()

    def end(self) -> None:
        if self.enabled:
            write_out("\n")


_F32 = struct.Struct("=f")


def _f32(x: float) -> float:
    """``x`` rounded to the nearest C ``float``."""
    return float(_F32.unpack(_F32.pack(x))[0])


# -- the copy --------------------------------------------------------------------------------------

class _Source:
    __slots__ = ("node", "start", "sectors", "alignment")

    def __init__(self, node: Node, start: int, sectors: int, alignment: int) -> None:
        self.node = node
        self.start = start  # first sector in the concatenation
        self.sectors = sectors
        self.alignment = alignment  # sectors


class Copier:
    """qemu-img's iteration over the (concatenated) sources."""

    def __init__(self, sources: list[_Source], *, target_has_backing: bool, compressed: bool,
                 min_sparse: int, cluster_sectors: int, alignment: int) -> None:
        self.sources = sources
        self.total = sum(s.sectors for s in sources)
        self.target_has_backing = target_has_backing
        self.compressed = compressed
        self.min_sparse = min_sparse
        self.cluster_sectors = cluster_sectors
        self.alignment = alignment
        self.buf_sectors = max(IO_BUF_SECTORS, min_sparse) if not compressed else IO_BUF_SECTORS
        self.next_status = 0
        self.status = BLK_DATA
        self.target_backing_sectors = -1  # with -B: zeros past the new backing's end need no write

    def _source_at(self, sector: int) -> _Source:
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
            from vdkit.block.io import DATA, ZERO, chain_status, layer_status

            offset = (sector - src.start) * SECTOR
            count = n * SECTOR
            node = src.node
            try:
                if self.target_has_backing:
                    st = layer_status(node, offset, count)
                    flags, count = st.flags, st.length
                else:
                    e = chain_status(node, offset, count)
                    flags = (DATA if e.data else 0) | (ZERO if e.zero else 0)
                    count = e.length
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
        if self.status == BLK_DATA:
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

    def readinto(self, sector: int, n: int, view: memoryview) -> None:
        """Guest bytes of the concatenation into ``view`` (pieces never span two sources)."""
        from vdkit.block.io import readinto
        from vdkit.io.file import zero_fill

        src = self._source_at(sector)
        offset = (sector - src.start) * SECTOR
        length = n * SECTOR
        size = src.node.driver.virtual_size
        part = max(0, min(length, size - offset))
        try:
            if part:
                readinto(src.node, offset, view[:part])
        except (VdkitError, OSError) as exc:
            raise IOFailure(exc, f"error while reading at byte {sector * SECTOR}") from exc
        if part < length:
            zero_fill(view[part:length])


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
    """Zero-sector maps of buffers up to ``size`` bytes (owns the zero buffer it compares with)."""

    def __init__(self, size: int) -> None:
        self.zeros = memoryview(bytes(size))  # calloc'd: costs no memory until compared with
        self.ones = b"\x01" * (size // SECTOR)

    def is_zero(self, buf: bytearray, length: int) -> bool:
        return buf.startswith(self.zeros[:length])

    def sectors(self, buf: bytearray, n: int) -> bytes:
        """One byte per sector of ``buf[:n*512]``: 1 where the sector is all zeros."""
        end = n * SECTOR
        heads = memoryview(buf)[:end].cast("Q")[:: SECTOR // 8].tobytes()  # word 0 of every sector
        p = heads.find(_Z8)
        if p < 0:
            return bytes(n)
        if p == 0 and buf.startswith(self.zeros[:end]):
            return self.ones[:n]
        flags = bytearray(n)
        stretches = 0
        while p >= 0:
            if p % 8:  # a zero word across two sectors' heads: realign (earlier aligned ones were seen)
                p = heads.find(_Z8, p + 8 - p % 8)
                continue
            stretches += 1
            if stretches > _MAX_STRETCHES:
                return _zero_sectors_numpy(buf, n)
            s = p // 8
            # sectors from s whose first word is zero (the first non-zero byte of heads ends them):
            # usually exactly the zero stretch, confirmed with one comparison
            e = (len(heads) - len(heads[p:].lstrip(b"\x00"))) // 8
            if buf.startswith(self.zeros[: (e - s) * SECTOR], s * SECTOR):
                k = e - s
            else:
                k = self._zero_run(buf, s, e)
            flags[s : s + k] = self.ones[:k]
            p = heads.find(_Z8, (s + max(k, 1)) * 8)
        return bytes(flags)

    def _zero_run(self, buf: bytearray, s: int, n: int) -> int:
        """How many all-zero sectors start at sector ``s``, up to ``n`` (gallop up, then halve)."""
        pos, step = s, 1
        zeros = self.zeros
        while pos < n:
            k = min(step, n - pos)
            if buf.startswith(zeros[: k * SECTOR], pos * SECTOR):
                pos += k
                step *= 2
            elif k == 1:
                break
            else:
                step = k // 2
        return pos - s


def _zero_sectors_numpy(buf: bytearray, n: int) -> bytes:
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


def run(a: ConvertArgs) -> int:
    from vdkit.block.node import open_image
    from vdkit.formats import registry

    if a.snapshot is not None and len(a.sources) > 1:
        raise VdkitError("No support for concatenating multiple snapshot")
    nodes: list[Node] = []
    try:
        for name in a.sources:
            if a.image_opts and a.fmt is not None:
                raise VdkitError("--image-opts and --format are mutually exclusive")
            filename, fmt, spec = open_args(name, a.fmt, a.image_opts)
            with SpecNames((filename, spec)):
                nodes.append(open_image(filename, fmt, readonly=True, force_share=a.force_share))
        if a.snapshot is not None:
            _load_snapshot(nodes[0], a.snapshot)
        # under --target-image-opts -O is refused when the target is opened (after the sources)
        if not registry.is_known(a.out_fmt) and not a.target_image_opts:
            raise VdkitError(f"Unknown file format '{a.out_fmt}'")
        backing = a.backing or _option_value(a.options, "backing_file")
        if a.target_is_zero and backing:
            # qemu-img says so and stops, but exits with status 0
            from vdkit.cli.main import error

            error("Cannot use --target-is-zero when the destination image has a backing file")
            return 0
        if len(a.sources) > 1 and backing:
            raise VdkitError("Having a backing file for the target makes no sense when concatenating multiple "
                             "input images")
        from vdkit.cli.convert_target import SilentFailure

        try:
            return _convert(a, nodes)
        except SilentFailure:
            return 1
    finally:
        for n in nodes:
            n.close()


def _option_value(options: list[str], key: str) -> str | None:
    """The last ``key=value`` among the ``-o`` option strings (QemuOpts: the last one wins)."""
    value = None
    for text in options:
        for item in split_qemu_opts(text):
            k, eq, v = item.partition("=")
            if eq and k == key:
                value = v
    return value


def _load_snapshot(node: Node, spec: str) -> None:
    from vdkit.formats.qcow2.io import load_snapshot_tmp

    snap_id: str | None = None
    snap_name: str | None = None
    exact = spec.startswith("snapshot.")
    if exact:
        for item in split_qemu_opts(spec):
            key, _, value = item.partition("=")
            if key == "snapshot.id":
                snap_id = value
            elif key == "snapshot.name":
                snap_name = value
            else:
                raise VdkitError(f"Invalid parameter '{key}'",
                                 hint=f"\0vdkit-img: Failed in parsing snapshot param '{spec}'\n")
    try:
        if exact:
            load_snapshot_tmp(node, snap_id, snap_name)
        else:
            load_snapshot_tmp(node, spec, None, fallback_name=True)
    except VdkitError as exc:
        raise exc.prefixed("Failed to load snapshot: ") from exc


def _convert(a: ConvertArgs, nodes: list[Node]) -> int:
    from vdkit.cli.convert_target import open_target

    sources: list[_Source] = []
    start = 0
    for node in nodes:
        sectors = (node.driver.virtual_size + SECTOR - 1) // SECTOR
        cs = node.driver.cluster_size or SECTOR
        sources.append(_Source(node, start, sectors, max(1, cs // SECTOR)))
        start += sectors
    total_bytes = start * SECTOR
    target = open_target(a, total_bytes)
    try:
        copier = Copier(sources, target_has_backing=a.backing is not None, compressed=a.compressed,
                        min_sparse=a.min_sparse, cluster_sectors=max(1, target.cluster_size // SECTOR),
                        alignment=_pow2floor(max(a.min_sparse, 1)))
        if a.backing is not None:
            copier.target_backing_sectors = target.backing_sectors()
        progress = Progress(a.progress)
        progress.set(0.0)
        try:
            allocated = copier.allocated_sectors() if a.progress else 0
        except IOFailure as f:
            raise f.report() from f.exc
        has_zero_init = target.has_zero_init and not a.backing
        zmap = ZeroMap(copier.buf_sectors * SECTOR)
        # Everything alive now (modules, numpy, the open images) lives until the end: keep
        # the collector from traversing it again and again while the copy allocates.
        import gc

        gc.freeze()  # undone below: a long-lived caller's later garbage must stay collectable
        done = 0
        with ReadAhead(copier, zmap, sparse=bool(a.min_sparse) and not a.compressed) as pieces:
            for piece in pieces:
                if isinstance(piece, IOFailure):
                    raise piece.report() from piece.exc
                sector, n, status, buf, zero = piece
                data: bytes | memoryview | None = None
                if status == BLK_DATA:
                    assert buf is not None
                    data = memoryview(buf)[: n * SECTOR]
                elif status == BLK_ZERO and not a.min_sparse:
                    status, data = BLK_DATA, bytes(n * SECTOR)
                try:
                    _write(target, copier, zmap, status, sector, n, buf, data, zero, has_zero_init)
                except (VdkitError, OSError) as exc:
                    from vdkit.block.io import io_error

                    raise io_error(exc, f"error while writing at byte {sector * SECTOR}") from exc
                finally:
                    if buf is not None:
                        pieces.release(buf)
                if status == BLK_DATA:
                    done += n
                    if allocated:
                        progress.set(100.0 * done / allocated)
        target.finish()
    except BaseException:
        target.abort()
        raise
    finally:
        import gc

        gc.unfreeze()
    progress.set(100.0)
    progress.end()
    return 0


Piece = tuple[int, int, int, "bytearray | None", "bytes | None"]


class ReadAhead:
    """Runs the source side of the copy in a thread, a few buffers ahead of the writes.

    The thread walks qemu-img's iterations (block status), reads data pieces
    into pooled buffers and maps their zero sectors; the caller writes the
    pieces in order and hands each buffer back with :meth:`release`.  The
    system calls on both sides release the GIL, so reading the next pieces
    overlaps writing this one (qemu-img overlaps them with 8 coroutines).
    Only the thread touches the source nodes and only the caller the target,
    so neither needs locking.  A failed piece is passed on as an
    :class:`IOFailure` and ends the walk.
    """

    DEPTH = 4

    def __init__(self, copier: Copier, zmap: ZeroMap, *, sparse: bool) -> None:
        import queue
        import threading

        self.copier = copier
        self.zmap = zmap
        self.sparse = sparse
        self._pool: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for _ in range(self.DEPTH):
            self._pool.put(bytearray(copier.buf_sectors * SECTOR))
        self._out: queue.SimpleQueue[Piece | IOFailure | None] = queue.SimpleQueue()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="vdkit-convert-read", daemon=True)

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._pool.put(None)  # wakes the thread if it waits for a buffer
        self._thread.join()

    def __iter__(self):  # type: ignore[no-untyped-def]
        while True:
            piece = self._out.get()
            if piece is None:
                return
            yield piece

    def release(self, buf: bytearray) -> None:
        self._pool.put(buf)

    def _run(self) -> None:
        c = self.copier
        out = self._out
        sector = 0
        try:
            while sector < c.total and not self._stop:
                n = c.step(sector)
                status = c.status
                if status != BLK_DATA:
                    out.put((sector, n, status, None, None))
                    sector += n
                    continue
                buf = self._pool.get()
                if buf is None or self._stop:
                    return
                c.readinto(sector, n, memoryview(buf))
                zero = self.zmap.sectors(buf, n) if self.sparse else None
                out.put((sector, n, status, buf, zero))
                sector += n
        except IOFailure as f:
            out.put(f)
        except BaseException as exc:  # a bug: surface it in the caller rather than hang
            out.put(IOFailure(exc, "error while reading"))
        finally:
            out.put(None)


def _write(target, copier: Copier, zmap: ZeroMap, status: int, sector: int, n: int,  # type: ignore[no-untyped-def]
           buf: bytearray | None, data: bytes | memoryview | None, zero: bytes | None,
           has_zero_init: bool) -> None:
    if status == BLK_BACKING:
        return
    if status == BLK_ZERO:
        if not has_zero_init:
            target.write_zeroes(sector * SECTOR, n * SECTOR)
        return
    assert data is not None
    if not copier.min_sparse:
        target.write(sector * SECTOR, data, compressed=copier.compressed)
        return
    if copier.compressed:
        if buf is None or not zmap.is_zero(buf, n * SECTOR):
            target.write(sector * SECTOR, data, compressed=True)
        elif not has_zero_init:
            target.write_zeroes(sector * SECTOR, n * SECTOR)
        return
    assert zero is not None
    i = 0
    while i < n:
        k, is_data = data_extent(zero, i, n - i, copier.min_sparse, sector + i, copier.alignment)
        if is_data:
            target.write((sector + i) * SECTOR, data[i * SECTOR : (i + k) * SECTOR], compressed=False)
        elif not has_zero_init:
            target.write_zeroes((sector + i) * SECTOR, k * SECTOR)
        i += k


def _pow2floor(v: int) -> int:
    return 1 << (v.bit_length() - 1)


__all__ = ["main", "run", "parse", "ConvertArgs", "UsageError"]
