"""The VMDK text descriptor: parsed with the quirks of QEMU 7.2's reader.

QEMU reads the descriptor as a C string with ``strstr``/``sscanf``, and the
observable results (which CID is found, which lines are extents, duplicated
extents after an empty line) follow from that; this module reproduces those
results from the observed behaviour so ``info`` matches byte for byte.
"""

from __future__ import annotations

from vdkit.errors import OpenError

MAX_DESC_SIZE = (1 << 20) - 1  # longer descriptor files are read up to this size
U32 = 0xFFFFFFFF
_WS = b" \t\n\v\f\r"

# createType values a descriptor file may have (a monolithicSparse descriptor is only embedded)
DESC_FILE_TYPES = ("monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse", "vmfs", "vmfsSparse",
                   "seSparse")


class ExtentLine:
    __slots__ = ("access", "sectors", "type", "filename", "offset", "line")

    def __init__(self, access: str, sectors: int, type_: str, filename: str, offset: int, line: str) -> None:
        self.access = access
        self.sectors = sectors
        self.type = type_
        self.filename = filename
        self.offset = offset
        self.line = line


def c_string(raw: bytes) -> bytes:
    """The text up to the first NUL (QEMU handles the descriptor as a C string)."""
    nul = raw.find(b"\0")
    return raw if nul < 0 else raw[:nul]


def scan_hex(text: bytes, pos: int) -> int | None:
    """``sscanf("%x")`` into an unsigned 32-bit value: None when no digit matches."""
    n = len(text)
    while pos < n and text[pos] in _WS:
        pos += 1
    neg = False
    if pos < n and text[pos] in b"+-":
        neg = text[pos] == 0x2D
        pos += 1
    if text[pos:pos + 2] in (b"0x", b"0X") and pos + 2 < n and chr(text[pos + 2]) in "0123456789abcdefABCDEF":
        pos += 2
    start = pos
    while pos < n and chr(text[pos]) in "0123456789abcdefABCDEF":
        pos += 1
    if pos == start:
        return None
    value = int(text[start:pos], 16)
    if value >= 1 << 64:
        value = (1 << 64) - 1
    elif neg:
        value = -value % (1 << 64)
    return value & U32


def read_cid(desc: bytes, parent: bool) -> int | None:
    """``CID``/``parentCID`` as QEMU finds them: the first occurrence of the key anywhere."""
    key = b"parentCID" if parent else b"CID"
    i = desc.find(key)
    if i < 0 or desc[i + len(key):i + len(key) + 1] != b"=":
        return None
    return scan_hex(desc, i + len(key) + 1)


def quoted_value(desc: bytes, key: bytes) -> str | None:
    """``key="value"``: the key anywhere, two characters skipped, the value up to the next quote."""
    i = desc.find(key)
    if i < 0:
        return None
    start = i + len(key) + 2
    end = desc.find(b'"', start)
    if end < 0 or start > len(desc):
        return None
    return desc[start:end].decode("utf-8", "surrogateescape")


def _scan_string(text: bytes, pos: int, width: int) -> tuple[bytes, int] | None:
    n = len(text)
    while pos < n and text[pos] in _WS:
        pos += 1
    start = pos
    while pos < n and pos - start < width and text[pos] not in _WS:
        pos += 1
    if pos == start:
        return None
    return text[start:pos], pos


def _scan_int64(text: bytes, pos: int) -> tuple[int, int] | None:
    n = len(text)
    while pos < n and text[pos] in _WS:
        pos += 1
    start = pos
    if pos < n and text[pos] in b"+-":
        pos += 1
    digits = pos
    while pos < n and 0x30 <= text[pos] <= 0x39:
        pos += 1
    if pos == digits:
        return None
    value = int(text[start:pos])
    value = max(-(1 << 63), min(value, (1 << 63) - 1))  # strtoll saturates
    return value, pos


def scan_extent(text: bytes, pos: int) -> tuple[int, list[object]]:
    """``sscanf(p, "%10s %ld %10s \\"%511[^\\n\\r\\"]\\" %ld")``: (matches, values)."""
    vals: list[object] = []
    r = _scan_string(text, pos, 10)
    if r is None:
        return 0, vals
    vals.append(r[0])
    r2 = _scan_int64(text, r[1])
    if r2 is None:
        return 1, vals
    vals.append(r2[0])
    r = _scan_string(text, r2[1], 10)
    if r is None:
        return 2, vals
    vals.append(r[0])
    pos = r[1]
    n = len(text)
    while pos < n and text[pos] in _WS:
        pos += 1
    if pos >= n or text[pos] != 0x22:
        return 3, vals
    pos += 1
    start = pos
    while pos < n and pos - start < 511 and text[pos] not in b'\n\r"':
        pos += 1
    if pos == start:
        return 3, vals
    vals.append(text[start:pos])
    if pos >= n or text[pos] != 0x22:
        return 4, vals
    r2 = _scan_int64(text, pos + 1)
    if r2 is None:
        return 4, vals
    vals.append(r2[0])
    return 5, vals


def parse_extents(desc: bytes) -> list[ExtentLine]:
    """Every extent line, in order, with QEMU's matching rules (see module docstring)."""
    out: list[ExtentLine] = []
    pos = 0
    n = len(desc)
    while pos < n:
        eol = desc.find(b"\n", pos)
        nxt = n if eol < 0 else eol + 1
        matches, vals = scan_extent(desc, pos)
        if matches >= 4 and vals[0] == b"RW":
            access, sectors, type_, fname = vals[0], vals[1], vals[2], vals[3]
            offset = vals[4] if matches == 5 else 0
            assert isinstance(sectors, int) and isinstance(offset, int)
            assert isinstance(type_, bytes) and isinstance(fname, bytes) and isinstance(access, bytes)
            line = desc[pos:n if eol < 0 else eol].decode("utf-8", "surrogateescape")
            bad = False
            if type_ == b"FLAT":
                bad = matches != 5 or offset < 0
            elif type_ == b"VMFS":
                bad = matches != 4
            elif matches != 4:
                bad = True
            if bad:
                raise OpenError(f"Invalid extent line: {line}")
            if sectors > 0 and type_ in (b"FLAT", b"SPARSE", b"VMFS", b"VMFSSPARSE", b"SESPARSE"):
                out.append(ExtentLine(access.decode("latin-1"), sectors, type_.decode("latin-1"),
                                      fname.decode("utf-8", "surrogateescape"), offset, line))
        pos = nxt
    return out


def rewrite_cid(desc: bytes, cid: int) -> bytes:
    """The descriptor with its ``CID=`` value replaced (what a first write after an open stores)."""
    i = desc.find(b"CID=")
    if i < 0:
        return desc
    j = i + 4
    while j < len(desc) and desc[j] not in b"\r\n":
        j += 1
    return desc[:i] + b"CID=%x" % cid + desc[j:]
