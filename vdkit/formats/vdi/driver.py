"""VirtualBox VDI images (version 1.1, static and dynamic): header, block map, I/O, check, create.

Layout (little-endian): a 64-byte text, then the header at 0x40; the block
map (one u32 per 1 MiB block: the block's index in the data area,
``0xffffffff`` unallocated, ``0xfffffffe`` discarded) at the block map offset;
block ``n`` of the data area at ``data offset + n MiB``.  New blocks are
appended at index "blocks allocated" and written whole (the guest data in a
block of zeros), as QEMU 7.2 does.

Header checks and their order are QEMU 7.2's as observed on patched files
(reference other-formats §5).  The block map is read only as far as the file
holds it (entries past the end of the file read as 0, as QEMU's read of
them does), so memory is bounded by the file, not by a header field.
"""

from __future__ import annotations

import errno
import struct

from vdkit.block.driver import DATA, OFFSET_VALID, ZERO, BlockStatus, CheckResult, FormatDriver
from vdkit.errors import OpenError, UnsupportedError, VdkitError
from vdkit.io import tables
from vdkit.io.file import zero_fill

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from vdkit.block.driver import CheckReport
    from vdkit.io.file import ImageFile
    from vdkit.io.tables import Table
    from vdkit.opts import CreateOpts

SIGNATURE = 0xBEDA107F
VERSION = 0x00010001
BLOCK_SIZE = 1 << 20
MAX_SIZE = 0x1FFFFF8000000
MAX_BLOCKS = 0x1FFFFF80
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
STATIC = 2
TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
# signature, version, header size, type, flags, description, bmap offset, data offset,
# cylinders, heads, sectors, sector size, unused, disk size, block size, block extra,
# blocks in image, blocks allocated, image/last snapshot/link/parent UUIDs
HEADER = struct.Struct("<IIIII256sIIIIIIIQIIII16s16s16s16s")


def _entries(data: bytes) -> Table:
    return tables.decode(data, 4, "little")


class VdiDriver(FormatDriver):
    format_name = "vdi"
    plain_data = True

    def __init__(self, file: ImageFile) -> None:
        super().__init__(file)
        head = file.pread(0x40, HEADER.size)
        (sig, version, _hsize, self.image_type, _flags, _desc, self.bmap_offset, self.data_offset, _c, _h, _s,
         sector_size, _unused, self.disk_size, block_size, _extra, self.blocks, self.blocks_allocated,
         _uuid, _snap, link, parent) = HEADER.unpack(head)
        if sig != SIGNATURE:
            raise OpenError(f"Image not in VDI format (bad signature {sig:08x})")
        if version != VERSION:
            raise OpenError(f"unsupported VDI image (version {version >> 16}.{version & 0xFFFF})")
        if self.disk_size > MAX_SIZE:
            raise OpenError(f"Unsupported VDI image size (size is {self.disk_size:#x}, "
                            f"max supported is {MAX_SIZE:#x})")
        self.disk_size = -(-self.disk_size // 512) * 512  # whole sectors from here on (QEMU's texts show it)
        if self.bmap_offset % 512:
            raise OpenError(f"unsupported VDI image (unaligned block map offset {self.bmap_offset:#x})")
        if self.data_offset % 512:
            raise OpenError(f"unsupported VDI image (unaligned data offset {self.data_offset:#x})")
        if sector_size != 512:
            raise OpenError(f"unsupported VDI image (sector size {sector_size} is not 512)")
        if block_size != BLOCK_SIZE:
            raise OpenError(f"unsupported VDI image (block size {block_size} is not {BLOCK_SIZE})")
        if self.disk_size > self.blocks * BLOCK_SIZE:
            raise OpenError(f"unsupported VDI image (disk size {self.disk_size}, "
                            f"image bitmap has room for {self.blocks * BLOCK_SIZE})")
        if any(link):
            raise OpenError("unsupported VDI image (non-NULL link UUID)")
        if any(parent):
            raise OpenError("unsupported VDI image (non-NULL parent UUID)")
        if self.blocks > MAX_BLOCKS:
            raise OpenError(f"unsupported VDI image (too many blocks {self.blocks}, max is {MAX_BLOCKS})")
        # The entries the disk needs, as far as the file holds them (the rest read as 0).
        need = -(-self.disk_size // BLOCK_SIZE) * 4
        held = max(0, min(need, -(-(file.size() - self.bmap_offset) // 4) * 4))  # a partial entry: zero-filled
        self.bmap = _entries(file.pread(self.bmap_offset, held))

    # -- geometry and state -------------------------------------------------------------------
    @property
    def virtual_size(self) -> int:
        return -(-int(self.disk_size) // 512) * 512

    @property
    def cluster_size(self) -> int | None:
        return BLOCK_SIZE

    def _entry(self, idx: int) -> int:
        return self.bmap[idx] if idx < len(self.bmap) else 0

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int | None]]:
        """``(guest offset, length, host offset or None)`` per block touched."""
        end = offset + length
        while offset < end:
            idx, within = divmod(offset, BLOCK_SIZE)
            n = min(end - offset, BLOCK_SIZE - within)
            e = self._entry(idx)
            yield offset, n, None if e >= DISCARDED else self.data_offset + e * BLOCK_SIZE + within
            offset += n

    # -- data ---------------------------------------------------------------------------------
    def read(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None) -> bytes:
        out = bytearray(length)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def readinto(self, offset: int, view: memoryview, backing: Callable[[int, int], bytes] | None = None) -> None:
        """Guest bytes into ``view``: blocks that follow each other in the file are read with one
        request, unallocated ones zero-filled in place (no copies)."""
        run_at = run_host = run_len = 0  # the pending host-contiguous read
        for guest, n, host in self._pieces(offset, len(view)):
            at = guest - offset
            if run_len and host == run_host + run_len:
                run_len += n
                continue
            if run_len:
                self.file.readinto(run_host, view[run_at : run_at + run_len])
                run_len = 0
            if host is None:
                zero_fill(view[at : at + n])
            else:
                run_at, run_host, run_len = at, host, n
        if run_len:
            self.file.readinto(run_host, view[run_at : run_at + run_len])

    def block_status(self, offset: int, length: int) -> BlockStatus:
        _, n, host = next(self._pieces(offset, length))
        if host is None:
            return BlockStatus(ZERO, n)
        name = self.file.filename
        if self.image_type != STATIC:
            return BlockStatus(DATA | OFFSET_VALID, n, host, name)
        # static images: QEMU asks the file too (holes are "zero" data; runs end where the file's do)
        total = (self.file.size() + 511) // 512 * 512
        if host >= total:
            return BlockStatus(DATA | ZERO | OFFSET_VALID, n, host, name)
        st = self.file.block_status(host, min(n, total - host))
        return BlockStatus(DATA | OFFSET_VALID | (st.flags & ZERO), st.length, host, name)

    def write(self, offset: int, data: bytes, backing: Callable[[int, int], bytes] | None = None) -> None:
        view = memoryview(data)
        for guest, n, host in self._pieces(offset, len(data)):
            part = view[guest - offset : guest - offset + n]
            if host is None:
                self._allocate(guest, part)
            else:
                self.file.pwrite(host, part)

    def _allocate(self, guest: int, part: memoryview) -> None:
        """A new block at index "blocks allocated": written whole, then the map entry and the header."""
        idx, within = divmod(guest, BLOCK_SIZE)
        new = self.blocks_allocated
        block = bytearray(BLOCK_SIZE)
        block[within : within + len(part)] = part
        self.file.pwrite(self.data_offset + new * BLOCK_SIZE, block)
        if idx >= len(self.bmap):
            self.bmap.extend([0] * (idx + 1 - len(self.bmap)))
        self.bmap[idx] = new
        self.file.pwrite(self.bmap_offset + 4 * idx, struct.pack("<I", new))
        self.blocks_allocated = (new + 1) & 0xFFFFFFFF
        self.file.pwrite(0x184, struct.pack("<I", self.blocks_allocated))

    def flush(self) -> None:
        self.file.flush()

    # -- inspection (vdkit-img inspect) --------------------------------------------------------
    def inspect_issues(self) -> list[tuple[str, str]]:
        """What ``check`` finds (map entries out of range or shared, a wrong allocated count), the
        block map or data blocks overlapping the header or each other, and data past the end of the file."""
        issues: list[tuple[str, str]] = []
        found: list[str] = []
        size = self.file.size()
        bmap_end = self.bmap_offset + 4 * self.blocks
        # a map reaching far past the file is reported as such, not walked (its tail reads as "block 0")
        result = self.check(None, found.append) if bmap_end <= size + (1 << 20) else CheckResult()
        if result.corruptions:
            first = "; ".join(line.removeprefix("ERROR: ") for line in found[:3])
            issues.append(("corrupt-metadata", f"{result.corruptions} corruptions ({first})"))
        if self.bmap_offset < 512:
            issues.append(("overlapping-metadata", "the block map overlaps the header"))
        if self.data_offset < max(512, bmap_end) and any(e < DISCARDED for e in self.bmap):
            issues.append(("overlapping-metadata", "the data area overlaps the header or the block map"))
        if bmap_end > size:
            issues.append(("truncated", "the block map lies past the end of the file"))
        used = [e for e in self.bmap if e < DISCARDED]
        if used and self.data_offset + (max(used) + 1) * BLOCK_SIZE > size and self.image_type != STATIC:
            issues.append(("truncated", "a block's data lies past the end of the file"))
        return issues

    # -- check --------------------------------------------------------------------------------
    def check(self, repair: str | None, report: CheckReport) -> CheckResult:
        """Every map entry below the block count, each data block used once, the allocated count."""
        if repair is not None:
            raise UnsupportedError("This image format does not support checks", errno=errno.ENOTSUP)
        result = CheckResult()
        used = bytearray((self.blocks + 7) // 8)
        count = 0
        size = self.file.size()
        chunk = 1 << 18
        for first in range(0, self.blocks, chunk):
            n = min(chunk, self.blocks - first)
            at = self.bmap_offset + 4 * first
            held = max(0, min(4 * n, -(-(size - at) // 4) * 4))
            entries = _entries(self.file.pread(at, held))
            if len(entries) < n:
                entries.extend([0] * (n - len(entries)))
            for i, e in enumerate(entries, first):
                if e >= DISCARDED:
                    continue
                if e >= self.blocks:
                    report(f"ERROR: block index {i} too large, is {e}")
                    result.corruptions += 1
                    continue
                if used[e >> 3] & (1 << (e & 7)):
                    report(f"ERROR: block index {e} also used by {e}")
                    result.corruptions += 1
                else:
                    used[e >> 3] |= 1 << (e & 7)
                count += 1
        if count != self.blocks_allocated:
            report(f"ERROR: allocated blocks mismatch, is {count}, should be {self.blocks_allocated}")
            result.corruptions += 1
        return result


# -- create ---------------------------------------------------------------------------------------

def create_from_options(filename: str, opts: CreateOpts) -> None:
    """QEMU 7.2's order: preallocation mode, the file emptied, the size; then the header and map."""
    import os
    import uuid

    from vdkit.formats.raw import create_file
    from vdkit.io.file import ImageFile

    create_file(filename, opts)  # the protocol's file, emptied (the preallocation option checked)
    size = -(-int(opts.get("size") or 0) // 512) * 512
    if size > MAX_SIZE:
        raise VdkitError(f"Unsupported VDI image size (size is {size:#x}, max supported is {MAX_SIZE:#x})")
    static = bool(opts.get("static", False))
    blocks = -(-size // BLOCK_SIZE)
    bmap_len = -(-blocks * 4 // 512) * 512
    data_offset = 512 + bmap_len
    header = bytearray(512)
    header[: len(TEXT)] = TEXT
    HEADER.pack_into(header, 0x40, SIGNATURE, VERSION, 0x180, STATIC if static else 1, 0, b"", 512, data_offset,
                     0, 0, 0, 512, 0, size, BLOCK_SIZE, 0, blocks, blocks if static else 0,
                     uuid.uuid4().bytes, uuid.uuid4().bytes, b"", b"")
    with ImageFile(filename, readonly=False) as f:
        f.pwrite(0, header)
        step = 1 << 18  # entries per write: the map of a 2 PiB disk is 2 GiB
        for first in range(0, blocks, step):
            n = min(step, blocks - first)
            if static:
                f.pwrite(512 + 4 * first, tables.encode(range(first, first + n), 4, "little"))
            else:
                f.pwrite(512 + 4 * first, b"\xff" * (4 * n))
        if bmap_len > blocks * 4:
            f.pwrite(512 + blocks * 4, bytes(bmap_len - blocks * 4))
        if static:
            try:
                os.ftruncate(f.fd, data_offset + blocks * BLOCK_SIZE)
            except OSError as exc:
                raise VdkitError(os.strerror(exc.errno or errno.EIO), errno=exc.errno) from exc
        f.flush()
