"""Byte surgery on image files: big-endian fields read and written in place.

Tests damage or tweak images the real tools made; these are the one set of
patchers they share (``tests.data.generate`` re-exports them).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_u8(path: Path, offset: int, value: int) -> None:
    patch(path, offset, struct.pack(">B", value))


def set_u16(path: Path, offset: int, value: int) -> None:
    patch(path, offset, struct.pack(">H", value))


def set_u32(path: Path, offset: int, value: int) -> None:
    patch(path, offset, struct.pack(">I", value))


def set_u64(path: Path, offset: int, value: int) -> None:
    patch(path, offset, struct.pack(">Q", value))


def get_u32(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return u32_of(f.read(4), 0)


def get_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return u64_of(f.read(8), 0)


def u32_of(data: bytes | bytearray, offset: int) -> int:
    """The field at ``offset`` of a buffer; bytes past its end read as zeros (as the image's reader sees a file
    cut short), so a field a damaged file cuts in half is still a number and never an exception."""
    return int.from_bytes(bytes(data[offset : offset + 4]).ljust(4, b"\0"), "big")


def u64_of(data: bytes | bytearray, offset: int) -> int:
    """As :func:`u32_of`, eight bytes."""
    return int.from_bytes(bytes(data[offset : offset + 8]).ljust(8, b"\0"), "big")


def damage_at(d: bytearray, rng: random.Random, off: int, values: Callable[[int], Sequence[int]],
              byteorder: Literal["big", "little"] | None) -> str:
    """One random change at ``off`` of ``d``, as the damage sweeps make them: a random byte, one bit flipped,
    or the u32/u64 field holding ``off`` (aligned down) set to one of ``values(width)`` (boundary values of
    the format, built when asked so that their random members draw from ``rng`` in turn) in ``byteorder``
    (None: either, drawn after the value).  Its description, ``kind@offset``.

    The draws from ``rng`` come in a fixed order, so a seed names the same damage in every run."""
    kind = rng.choice(("byte", "flip", "u32", "u64"))
    if kind == "byte":
        d[off] = rng.randrange(256)
    elif kind == "flip":
        d[off] ^= 1 << rng.randrange(8)
    else:
        width = 4 if kind == "u32" else 8
        off -= off % width
        val = rng.choice(values(width))
        d[off:off + width] = val.to_bytes(width, byteorder or rng.choice(("big", "little")))
    return f"{kind}@{off:#x}"


Field = tuple[int, str, Any]
"""(offset, struct format, value or tuple of values) of one field; a negative offset counts from the end."""


def pack_fields(data: bytearray, fields: Iterable[Field]) -> bytearray:
    """Write each field into ``data`` (in place); ``data``."""
    for off, fmt, val in fields:
        struct.pack_into(fmt, data, off if off >= 0 else len(data) + off, *(val if isinstance(val, tuple) else (val,)))
    return data


def patched_copy(src: Path, dst: Path, fields: Iterable[Field], *, size: int | None = None) -> None:
    """``dst``: a copy of ``src`` with ``fields`` written, cut or zero-extended to ``size`` if given."""
    data = pack_fields(bytearray(src.read_bytes()), fields)
    if size is not None:
        data = data[:size] + bytes(max(0, size - len(data)))
    dst.write_bytes(bytes(data))


def set_bitmap_in_use(img: Path, name: str) -> None:
    """Set the in_use flag of bitmap ``name`` in the directory (what a crashed writer leaves)."""
    raw = bytearray(img.read_bytes())
    hdr_len = struct.unpack_from(">I", raw, 100)[0]
    off = hdr_len
    while True:
        t, n = struct.unpack_from(">II", raw, off)
        if t == 0x23852875:
            _, _, dsize, doff = struct.unpack_from(">IIQQ", raw, off + 8)
            break
        assert t != 0
        off += 8 + ((n + 7) & ~7)
    p = doff
    while p < doff + dsize:
        _, _, flags, _, _, nsize, esize = struct.unpack_from(">QIIBBHI", raw, p)
        if raw[p + 24 : p + 24 + nsize] == name.encode():
            struct.pack_into(">I", raw, p + 12, flags | 1)
        p += (24 + nsize + esize + 7) & ~7
    img.write_bytes(bytes(raw))
