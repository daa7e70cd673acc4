"""Byte surgery on image files: big-endian fields read and written in place.

Tests damage or tweak images the real tools made; these are the one set of
patchers they share (``tests.data.generate`` re-exports them).
"""

from __future__ import annotations

import struct
from pathlib import Path


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
        return int.from_bytes(f.read(4), "big")


def get_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(8), "big")
