"""VHDX on-disk structures (MS-VHDX): constants, CRC32C, parsing and serialising; no I/O.

All integers are little-endian; GUIDs are stored in Microsoft's mixed-endian
form (``uuid.UUID(bytes_le=...)``).  Checksums are CRC32C (Castagnoli) over the
whole structure with the checksum field taken as zero.
"""

from __future__ import annotations

import struct

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

FILE_ID_SIG = b"vhdxfile"
HEADER1_OFFSET = 64 * KiB
HEADER2_OFFSET = 128 * KiB
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSET = 192 * KiB
REGION_TABLE2_OFFSET = 256 * KiB
REGION_TABLE_SIZE = 64 * KiB
REGION_MAX_ENTRIES = 2047
METADATA_TABLE_SIZE = 64 * KiB
METADATA_MAX_ENTRIES = 2047
LOG_SECTOR = 4 * KiB
MAX_IMAGE_SIZE = 64 * TiB
MIN_BLOCK_SIZE = 1 * MiB
MAX_BLOCK_SIZE = 256 * MiB
DEFAULT_LOG_SIZE = 1 * MiB

# BAT payload block states (bits 0-2 of an entry); the file offset is the entry's bits 20-63.
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
BAT_STATE_MASK = 7
BAT_OFFSET_MASK = ~0xFFFFF & 0xFFFFFFFFFFFFFFFF

# Region and metadata item GUIDs, as the bytes stored in the file.


def guid_bytes(text: str) -> bytes:
    """The on-disk (mixed-endian) bytes of a GUID written as ``XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX``."""
    h = text.replace("-", "")
    raw = bytes.fromhex(h)
    return raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]


BAT_GUID = guid_bytes("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid_bytes("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = guid_bytes("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = guid_bytes("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = guid_bytes("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_GUID = guid_bytes("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_GUID = guid_bytes("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = guid_bytes("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
ZERO_GUID = bytes(16)

# -- CRC32C ---------------------------------------------------------------------------------------

_POLY = 0x82F63B78  # reflected
_TABLE: list[int] = []


def _table() -> list[int]:
    """The byte table of CRC32C.  Feeding a byte is linear (``t[a ^ b] == t[a] ^ t[b]``), so only the
    eight one-bit entries take the bit-by-bit rule; the others are sums of those (an eighth of the work,
    which is most of what a vhdx ``info`` computes)."""
    if not _TABLE:
        single = []
        for k in range(8):
            c = 1 << k
            for _ in range(8):
                c = (c >> 1) ^ _POLY if c & 1 else c >> 1
            single.append(c)
        table = [0] * 256
        for v in range(1, 256):
            low = v & -v
            table[v] = table[v ^ low] ^ single[low.bit_length() - 1]
        _TABLE.extend(table)
    return _TABLE


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C (reflected 0x82F63B78, init and final XOR 0xffffffff), continuing from ``crc``.

    Runs of zero bytes (most of a region table, a header) are skipped with a
    few multiplications (:func:`_zeros`); the work is a table lookup per non-zero byte.
    """
    t = _table()
    c = crc ^ 0xFFFFFFFF
    mv = bytes(data)
    n = len(mv)
    flags = b""  # mv with its non-zero bytes as 1, made when a zero run ends before the end
    i = 0
    while i < n:
        j = mv.find(_ZERO_RUN, i)  # the next zero run worth skipping
        end = n if j < 0 else j
        for b in mv[i:end]:
            c = t[(c ^ b) & 0xFF] ^ (c >> 8)
        if j < 0:
            break
        # where it ends: usually at the end (padding); C-level scans, never a loop over the bytes here
        # (bytes.lstrip with an argument takes ~30 instructions a byte)
        if mv.endswith(bytes(n - j)):
            k = n
        else:
            flags = flags or mv.translate(_NONZERO)
            k = flags.find(b"\1", j)
        c = _zeros(c, k - j)
        i = k
    return c ^ 0xFFFFFFFF


_ZERO_RUN = bytes(64)
_NONZERO = bytes((0,)) + bytes((1,)) * 255  # a translate table: 0 stays 0, any other byte becomes 1


# Feeding zero bytes into the CRC state is multiplying it by a power of x modulo the polynomial (the
# state is linear in them), so a zero run costs a few 32-step multiplications instead of a table
# lookup per byte.  _X2N[k] is x**(2**k) mod P; each is the square of the one before, and the 31st
# is x again, so these 31 cover every power (a test recomputes them).  Both polynomials are in the
# reflected form the state has (bit 31 holds the coefficient of x**0).
_X2N = (0x40000000, 0x20000000, 0x08000000, 0x00800000, 0x00008000, 0x82F63B78, 0x6EA2D55C, 0x18B8EA18,
        0x510AC59A, 0xB82BE955, 0xB8FDB1E7, 0x88E56F72, 0x74C360A4, 0xE4172B16, 0x0D65762A, 0x35D73A62,
        0x28461564, 0xBF455269, 0xE2EA32DC, 0xFE7740E6, 0xF946610B, 0x3C204F8F, 0x538586E3, 0x59726915,
        0x734D5309, 0xBC1AC763, 0x7D0722CC, 0xD289CABE, 0xE94CA9BC, 0x05B74F3F, 0xA51E1F42)
# zero-run length -> x**(8 * length) mod P: the structures of one format repeat their padding lengths
_ZERO_POWERS: dict[int, int] = {}


def _mulmod(a: int, b: int) -> int:
    """``a * b`` modulo the CRC32C polynomial, both reflected."""
    product = 0
    m = 1 << 31
    while a:
        if a & m:
            product ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _zeros(c: int, count: int) -> int:
    """Feed ``count`` zero bytes into the raw CRC state ``c``: ``c * x**(8 * count)``."""
    power = _ZERO_POWERS.get(count)
    if power is None:
        power = 1 << 31  # x**0
        bits = count << 3
        k = 0
        while bits:
            if bits & 1:
                power = _mulmod(_X2N[k % 31], power)
            bits >>= 1
            k += 1
        _ZERO_POWERS[count] = power
    return _mulmod(power, c)


def with_crc(buf: bytearray, crc_offset: int = 4) -> bytearray:
    """Store the CRC32C of ``buf`` (field at ``crc_offset`` taken as zero) into that field."""
    buf[crc_offset : crc_offset + 4] = bytes(4)
    struct.pack_into("<I", buf, crc_offset, crc32c(buf))
    return buf


def crc_ok(buf: bytes | bytearray, crc_offset: int = 4) -> bool:
    stored: int = struct.unpack_from("<I", buf, crc_offset)[0]
    tmp = bytearray(buf)
    tmp[crc_offset : crc_offset + 4] = bytes(4)
    return crc32c(tmp) == stored


# -- header ---------------------------------------------------------------------------------------

_HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")


class Header:
    """One of the two 4 KiB headers."""

    __slots__ = ("signature", "checksum", "sequence", "file_write_guid", "data_write_guid", "log_guid",
                 "log_version", "version", "log_length", "log_offset")

    def __init__(self, sequence: int = 0, file_write_guid: bytes = ZERO_GUID, data_write_guid: bytes = ZERO_GUID,
                 log_guid: bytes = ZERO_GUID, log_version: int = 0, version: int = 1, log_length: int = 0,
                 log_offset: int = 0, signature: bytes = b"head", checksum: int = 0) -> None:
        self.signature = signature
        self.checksum = checksum
        self.sequence = sequence
        self.file_write_guid = file_write_guid
        self.data_write_guid = data_write_guid
        self.log_guid = log_guid
        self.log_version = log_version
        self.version = version
        self.log_length = log_length
        self.log_offset = log_offset

    @classmethod
    def parse(cls, buf: bytes) -> Header:
        v = _HEADER.unpack_from(buf, 0)
        return cls(signature=v[0], checksum=v[1], sequence=v[2], file_write_guid=v[3], data_write_guid=v[4],
                   log_guid=v[5], log_version=v[6], version=v[7], log_length=v[8], log_offset=v[9])

    def pack(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        _HEADER.pack_into(buf, 0, b"head", 0, self.sequence, self.file_write_guid, self.data_write_guid,
                          self.log_guid, self.log_version, self.version, self.log_length, self.log_offset)
        return bytes(with_crc(buf))


# -- region table ---------------------------------------------------------------------------------

def pack_region_table(entries: list[tuple[bytes, int, int, int]]) -> bytes:
    """A 64 KiB region table of ``(guid, offset, length, required)`` entries."""
    buf = bytearray(REGION_TABLE_SIZE)
    struct.pack_into("<4sIII", buf, 0, b"regi", 0, len(entries), 0)
    for i, (guid, off, length, required) in enumerate(entries):
        struct.pack_into("<16sQII", buf, 16 + 32 * i, guid, off, length, required)
    return bytes(with_crc(buf))


# -- log ------------------------------------------------------------------------------------------

LOG_ENTRY_HEADER = struct.Struct("<4sIIIQII16sQQ")  # 64 bytes
LOG_DESCRIPTOR = struct.Struct("<4sIQQQ")  # 32 bytes: sig, trailing/reserved, leading/zero length, offset, seq


def guid_random() -> bytes:
    """A random (version 4) GUID in its on-disk form, as QEMU generates them."""
    import uuid

    return uuid.uuid4().bytes_le


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """Payload blocks described by one sector bitmap block: 2^23 sectors' worth of blocks."""
    return (1 << 23) * logical_sector_size // block_size


def bat_entries(virtual_size: int, block_size: int, logical_sector_size: int, has_parent: bool) -> int:
    """Total BAT entries (payload + interleaved sector bitmap entries), with QEMU's 32-bit arithmetic.

    For an empty disk the "payload blocks - 1" wraps around in 32 bits, as it does in the
    image qemu-img writes for size 0 (a 64 MiB BAT region).
    """
    ratio = chunk_ratio(block_size, logical_sector_size)
    payload = -(-virtual_size // block_size)
    if has_parent:
        bitmaps = -(-payload // ratio)
        return bitmaps * (ratio + 1)
    return payload + (((payload - 1) & 0xFFFFFFFF) // ratio)


def bat_index(block: int, ratio: int) -> int:
    """BAT index of payload block ``block`` (a sector bitmap entry follows every ``ratio`` payload entries)."""
    return block + block // ratio
