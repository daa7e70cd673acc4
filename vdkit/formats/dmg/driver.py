"""Reading Apple UDIF (dmg) images.

Layout (big-endian): a 512-byte ``koly`` trailer near the end of the file
gives the data fork offset, the resource fork and XML plist locations and
the disk's sector count.  The plist's ``<data>`` elements hold base64
``mish`` block tables: a 204-byte header (first sector, data offset) and
40-byte chunk entries (type, first sector, sector count, offset, length).
Chunks are zero-fill, raw, ignored (read as zeros), zlib or bzip2; comment
and terminator entries carry nothing.

QEMU 7.2's behaviour, observed with qemu-img: the trailer is searched for in
the 1 KiB that ends at the file size rounded up to 512; the plist is read as
a C string; chunk tables are searched by bisection in table order, after the
chunk read last; unknown chunk types (ADC, lzfse here) are left out with one
warning; sector counts (raw/zlib/bzip2) and lengths are bounded at open.
Every size is bounded before memory is allocated.
"""

from __future__ import annotations

import errno
import struct

from vdkit.block.driver import DATA, BlockStatus, FormatDriver
from vdkit.errors import OpenError, VdkitError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.driver import OpenContext
    from vdkit.io.file import ImageFile

SECTOR = 512
ZERO, RAW, IGNORE, ADC, ZLIB, BZIP2, LZFSE = 0, 1, 2, 0x80000004, 0x80000005, 0x80000006, 0x80000007
COMMENT, TERMINATOR = 0x7FFFFFFE, 0xFFFFFFFF
MAX_SECTORS_PER_CHUNK = 131072  # 64 MiB of data
MAX_CHUNK_LENGTH = 64 << 20
MAX_XML = 256 << 20  # vdkit's bound on the plist it reads (QEMU has none; real ones are KiBs)
BDRV_MAX_LENGTH = (1 << 63) - (1 << 30)
_B64 = bytes(range(256)).translate(None, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def _report(message: str) -> None:
    """A line on stderr while opening, as QEMU's error_report/warn_report print them."""
    import sys

    prog = "vdkit-daemon" if "vdkit.daemon.runtime" in sys.modules else "vdkit-img"
    sys.stdout.flush()
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()


def _b64decode(text: bytes) -> bytes:
    """Lenient base64 (as glib's): characters outside the alphabet are skipped, a partial group dropped."""
    import binascii

    chars = text.translate(None, _B64)
    extra = len(chars) % 4
    if extra == 1:
        chars = chars[:-1]
    elif extra:
        chars += b"=" * (4 - extra)
    return binascii.a2b_base64(chars)


class Chunk:
    __slots__ = ("type", "start", "count", "offset", "length")

    def __init__(self, type_: int, start: int, count: int, offset: int, length: int) -> None:
        self.type = type_
        self.start = start
        self.count = count
        self.offset = offset
        self.length = length


class DmgDriver(FormatDriver):
    format_name = "dmg"

    def __init__(self, file: ImageFile, *, sectors: int, chunks: list[Chunk]) -> None:
        super().__init__(file)
        self.sectors = sectors
        self.chunks = chunks
        self.starts = [c.start for c in chunks]
        self._current: Chunk | None = None
        self.filename = file.filename
        self._buf = bytearray()  # the chunk read last (QEMU keeps one buffer: short raw reads keep old bytes)

    @classmethod
    def open(cls, file: ImageFile, ctx: OpenContext) -> DmgDriver:
        if not ctx.readonly:
            raise OpenError("Image is read-only")
        invalid = OpenError(f"Could not open '{ctx.filename}': Invalid argument", errno=errno.EINVAL)
        size = file.size()
        window = max(0, -(-size // SECTOR) * SECTOR - 2 * SECTOR)
        at = file.pread(window, 2 * SECTOR).find(b"koly")
        if at < 0:
            raise OpenError("Could not locate UDIF trailer in dmg file")
        koly_at = window + at
        koly = file.pread(koly_at, SECTOR)
        data_fork = struct.unpack_from(">Q", koly, 24)[0]
        rsrc_len = struct.unpack_from(">Q", koly, 48)[0]
        xml_off, xml_len = struct.unpack_from(">QQ", koly, 216)
        sectors = struct.unpack_from(">Q", koly, 492)[0]
        if rsrc_len:
            # resource-fork tables (images older than the XML plist): not read by vdkit
            raise invalid
        if not xml_len or xml_off > koly_at or xml_len > koly_at - xml_off or xml_len > MAX_XML:
            raise invalid
        xml = file.pread(xml_off, xml_len)
        nul = xml.find(b"\0")
        if nul >= 0:
            xml = xml[:nul]
        chunks: list[Chunk] = []
        warned: set[str] = set()
        index = 0
        pos = 0
        while True:
            begin = xml.find(b"<data>", pos)
            if begin < 0:
                break
            end = xml.find(b"</data>", begin + 6)
            if end < 0:
                raise invalid
            pos = end + 7
            block = _b64decode(xml[begin + 6:end])
            if len(block) < 204 or block[:4] != b"mish":
                continue
            first, _count, base = struct.unpack_from(">QQQ", block, 8)
            for c in range((len(block) - 204) // 40):
                type_, _comment, start, count, offset, length = struct.unpack_from(">IIQQQQ", block, 204 + 40 * c)
                if type_ in (COMMENT, TERMINATOR):
                    continue
                if type_ not in (ZERO, RAW, IGNORE, ZLIB, BZIP2):
                    kind = "lzfse" if type_ == LZFSE else "unknown"
                    if kind not in warned:
                        warned.add(kind)
                        _report("warning: dmg-lzfse module is missing, accessing lzfse compressed blocks will "
                                "result in I/O errors" if kind == "lzfse" else
                                f"warning: Image contains chunks of unknown type {type_:x}, accessing them will "
                                "result in I/O errors")
                    continue
                if type_ in (RAW, ZLIB, BZIP2) and count > MAX_SECTORS_PER_CHUNK:
                    _report(f"sector count {count} for chunk {index} is larger than max ({MAX_SECTORS_PER_CHUNK})")
                    raise invalid
                if length > MAX_CHUNK_LENGTH:
                    _report(f"length {length} for chunk {index} is larger than max ({MAX_CHUNK_LENGTH})")
                    raise invalid
                chunks.append(Chunk(type_, first + start, count, data_fork + base + offset, length))
                index += 1
        if sectors >= 1 << 63:
            raise invalid
        length = (sectors * SECTOR) & ((1 << 64) - 1)
        if length > BDRV_MAX_LENGTH:
            raise OpenError("Could not refresh total sector count: File too large", errno=errno.EFBIG)
        drv = cls(file, sectors=sectors, chunks=chunks)
        drv.filename = ctx.filename
        return drv

    @property
    def virtual_size(self) -> int:
        if self.sectors * SECTOR > BDRV_MAX_LENGTH:
            # QEMU opens this (its byte count wrapped below the limit) and fails when the size is asked for
            raise VdkitError(f"Can't get image size '{self.filename}': File too large", errno=errno.EFBIG)
        return self.sectors * SECTOR

    @property
    def dirty(self) -> bool | None:
        return None  # QEMU's driver has no info callback: no dirty-flag key

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """No block status in QEMU's driver: the whole disk is data (map shows one entry)."""
        return BlockStatus(DATA, length)

    def _find(self, sector: int) -> Chunk | None:
        """The chunk read last if it holds ``sector``, else QEMU's bisection over the table as stored."""
        cur = self._current
        if cur is not None and cur.start <= sector < cur.start + cur.count:
            return cur
        # QEMU's bounds are 0..n inclusive; the probe one past the table finds nothing
        n = len(self.chunks)
        lo, hi = 0, n
        while lo <= hi:
            mid = (lo + hi) // 2
            if mid >= n:
                return None
            c = self.chunks[mid]
            if sector < c.start:
                hi = mid - 1
            elif sector >= c.start + c.count:
                lo = mid + 1
            else:
                return c
        return None

    def _load(self, c: Chunk) -> None:
        """Make ``c`` the current chunk, its data in the buffer (zero and ignored chunks need none)."""
        if c is self._current:
            return
        if c.type in (RAW, ZLIB, BZIP2):
            need = c.count * SECTOR
            if len(self._buf) < need:
                self._buf.extend(bytes(need - len(self._buf)))
            raw = self.file.pread(c.offset, c.length)
            if c.type == RAW:
                self._buf[:len(raw)] = raw  # a short raw chunk leaves the rest of the buffer as it was
            else:
                self._buf[:need] = self._inflate(c, raw, need)
        self._current = c

    @staticmethod
    def _inflate(c: Chunk, raw: bytes, need: int) -> bytes:
        """Exactly ``need`` bytes from one complete stream (bytes after its end are ignored), else EIO."""
        import zlib

        try:
            if c.type == ZLIB:
                d = zlib.decompressobj()
                out = d.decompress(raw, need)
                ok = d.eof and len(out) == need
            else:
                import bz2

                b = bz2.BZ2Decompressor()
                out = b.decompress(raw, need)
                ok = b.eof and len(out) == need
        except (zlib.error, OSError, ValueError, EOFError):
            ok, out = False, b""
        if not ok:
            raise VdkitError("Input/output error", errno=errno.EIO)
        return out

    def read(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None) -> bytes:
        out = bytearray(length)
        pos, end = offset, offset + length
        while pos < end:
            sector, within = divmod(pos, SECTOR)
            c = self._find(sector)
            if c is None:
                raise VdkitError("Input/output error", errno=errno.EIO)
            self._load(c)
            stop = min(end, (c.start + c.count) * SECTOR)
            if c.type in (RAW, ZLIB, BZIP2):
                at = pos - c.start * SECTOR
                out[pos - offset:stop - offset] = self._buf[at:at + stop - pos]
            pos = stop
        return bytes(out)
