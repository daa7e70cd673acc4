"""The VHDX metadata log (MS-VHDX 2.3): finding the active sequence, replaying it, writing entries.

The log is a circular buffer of 4 KiB sectors at ``log_offset``.  An entry is
a 64-byte header (``loge``), 32-byte descriptors (``desc`` for a 4 KiB data
sector, ``zero`` for a zeroed range) padded to 4 KiB, then one data sector per
``desc`` (``data``, the sequence number's high half, 4084 bytes, its low half;
the sector's first 8 and last 4 bytes live in the descriptor).  The CRC32C
covers the whole entry.  An entry belongs to the current log only if its log
GUID is the current header's.
"""

from __future__ import annotations

import struct

from vdkit.formats.vhdx import layout as L

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.io.file import ImageFile

# A log is never read beyond this (QEMU's writer uses 1 MiB; the field is 32 bits).
MAX_LOG_READ = 64 * L.MiB


class Entry:
    __slots__ = ("offset", "length", "tail", "seq", "descs", "flushed", "last")

    def __init__(self, offset: int, length: int, tail: int, seq: int, descs: list[tuple[str, int, bytes | int]],
                 flushed: int, last: int) -> None:
        self.offset = offset
        self.length = length
        self.tail = tail
        self.seq = seq
        self.descs = descs  # ("data", file offset, 4 KiB sector) or ("zero", file offset, length)
        self.flushed = flushed
        self.last = last


def _read_circular(buf: bytes, offset: int, length: int) -> bytes:
    n = len(buf)
    if offset + length <= n:
        return buf[offset : offset + length]
    first = buf[offset:]
    return first + buf[: length - len(first)]


class LogError(Exception):
    """The log is damaged in a way QEMU refuses the image for (EINVAL), not just an invalid entry."""


def _parse(buf: bytes, offset: int, guid: bytes, n: int) -> Entry | None:
    """The valid entry at ``offset`` of the log buffer (of a log ``n`` bytes long), or None.

    What makes an entry invalid (skipped) and what makes the whole log unusable (:class:`LogError`)
    follows qemu-img 7.2 as observed: a bad signature, length, checksum, GUID or a zero sequence number
    skip the entry; a descriptor of an unknown kind, of another sequence number, at an unaligned file
    offset or zeroing an unaligned length fail the open.  The data sectors' own signature is not looked
    at; their sequence numbers are checked when replaying.
    """
    if offset >= len(buf):
        return None
    head = buf[offset : offset + 64]
    if head[:4] != b"loge" or len(head) < 64:
        return None
    sig, _crc, length, tail, seq, count, _r, eguid, flushed, last = L.LOG_ENTRY_HEADER.unpack(head)
    if length % L.LOG_SECTOR or length < L.LOG_SECTOR or length > n or eguid != guid or seq == 0:
        return None
    desc_sectors = -(-(64 + 32 * count) // L.LOG_SECTOR)
    if desc_sectors * L.LOG_SECTOR > length:
        return None
    if (offset + length > len(buf)) and (len(buf) < n or offset + length - n > len(buf)):
        return None  # part of it lies past the end of the file
    raw = _read_circular(buf, offset, length)
    if not L.crc_ok(raw):
        return None
    descs: list[tuple[str, int, bytes | int]] = []
    data_at = desc_sectors * L.LOG_SECTOR
    data_count = 0
    for i in range(count):
        dsig = raw[64 + 32 * i : 68 + 32 * i]
        if dsig == b"desc":
            data_count += 1
    if (desc_sectors + data_count) * L.LOG_SECTOR > length:
        return None
    for i in range(count):
        dsig, trailing, leading, file_off, dseq = L.LOG_DESCRIPTOR.unpack_from(raw, 64 + 32 * i)
        if dsig not in (b"desc", b"zero") or dseq != seq or file_off % L.LOG_SECTOR:
            raise LogError()
        if dsig == b"zero":
            if leading % L.LOG_SECTOR:
                raise LogError()
            descs.append(("zero", file_off, leading))
        else:
            sector = raw[data_at : data_at + L.LOG_SECTOR]
            high = struct.unpack_from("<I", sector, 4)[0]
            low = struct.unpack_from("<I", sector, L.LOG_SECTOR - 4)[0]
            data = leading.to_bytes(8, "little") + sector[8 : L.LOG_SECTOR - 4] + trailing.to_bytes(4, "little")
            descs.append(("data", file_off, data if (high << 32 | low) == seq else b""))
            data_at += L.LOG_SECTOR
    return Entry(offset, length, tail, seq, descs, flushed, last)


def active_sequence(file: ImageFile, header: L.Header) -> list[Entry]:
    """The entries to replay, oldest first (empty when nothing in the log belongs to this header).

    Every sector boundary may start a sequence; a sequence continues with the entry right after it
    carrying the next sequence number.  The sequence reaching the highest sequence number wins (the
    longest of those).  qemu-img 7.2 was seen to accept entries whose tail names another entry, so the
    tail field is not used to cut the sequence.  Raises :class:`LogError` for a log QEMU refuses.
    """
    length = min(header.log_length, MAX_LOG_READ)
    # Only the part of the log inside the file is read; entries reaching past it are not valid.
    in_file = max(0, min(length, file.size() - header.log_offset))
    buf = file.pread(header.log_offset, in_file) if in_file else b""
    guid = header.log_guid
    best: list[Entry] = []
    cache: dict[int, Entry | None] = {}

    def entry_at(off: int) -> Entry | None:
        if off not in cache:
            cache[off] = _parse(buf, off, guid, length)
        return cache[off]

    for start in range(0, len(buf), L.LOG_SECTOR):
        first = entry_at(start)
        if first is None:
            continue
        seq = [first]
        seen = {start}
        while True:
            nxt_off = (seq[-1].offset + seq[-1].length) % length
            if nxt_off in seen:
                break
            nxt = entry_at(nxt_off)
            if nxt is None or nxt.seq != seq[-1].seq + 1:
                break
            seq.append(nxt)
            seen.add(nxt_off)
        if not best or seq[-1].seq > best[-1].seq or (seq[-1].seq == best[-1].seq and len(seq) > len(best)):
            best = seq
    return best


def replay(file: ImageFile, entries: list[Entry]) -> None:
    """Apply the entries' sectors and zero ranges to the file.

    Refused (:class:`LogError`) before anything is written when an entry says the file was flushed
    further than it reaches, or a data sector's sequence number is not its entry's.
    """
    size = file.size()
    for e in entries:
        if e.flushed > size or any(kind == "data" and not payload for kind, _off, payload in e.descs):
            raise LogError()
    for e in entries:
        for kind, off, payload in e.descs:
            if kind == "data":
                assert isinstance(payload, bytes)
                file.pwrite(off, payload)
            else:
                assert isinstance(payload, int)
                pos = 0
                while pos < payload:
                    k = min(L.MiB, payload - pos)
                    file.pwrite(off + pos, bytes(k))
                    pos += k
    file.flush()


def write_entry(file: ImageFile, header: L.Header, pos: int, seq: int, guid: bytes,
                sectors: list[tuple[int, bytes]], *, flushed: int, last: int) -> int:
    """Write one log entry with a data descriptor per 4 KiB ``sectors`` item at log position ``pos``.

    Its tail is itself (QEMU replays and empties the log after every entry).
    Returns the entry's length.
    """
    desc_sectors = -(-(64 + 32 * len(sectors)) // L.LOG_SECTOR)
    length = (desc_sectors + len(sectors)) * L.LOG_SECTOR
    buf = bytearray(length)
    L.LOG_ENTRY_HEADER.pack_into(buf, 0, b"loge", 0, length, pos, seq, len(sectors), 0, guid, flushed, last)
    at = desc_sectors * L.LOG_SECTOR
    for i, (file_off, sector) in enumerate(sectors):
        leading = int.from_bytes(sector[:8], "little")
        trailing = int.from_bytes(sector[-4:], "little")
        L.LOG_DESCRIPTOR.pack_into(buf, 64 + 32 * i, b"desc", trailing, leading, file_off, seq)
        struct.pack_into("<4sI", buf, at, b"data", seq >> 32)
        buf[at + 8 : at + L.LOG_SECTOR - 4] = sector[8:-4]
        struct.pack_into("<I", buf, at + L.LOG_SECTOR - 4, seq & 0xFFFFFFFF)
        at += L.LOG_SECTOR
    L.with_crc(buf)
    log_len = header.log_length
    for k in range(0, length, L.LOG_SECTOR):
        file.pwrite(header.log_offset + (pos + k) % log_len, buf[k : k + L.LOG_SECTOR])
    return length
