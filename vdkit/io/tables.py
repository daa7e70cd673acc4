"""Tables of fixed-width integers as images store them: lists for small tables, ``array`` for big ones.

Importing ``array`` imports ``collections`` (the module registers its type as a MutableSequence): about
a quarter of a bare interpreter start, paid by every ``vdkit-img`` run that opens a VDI, VHD, QED or
Parallels image, for tables of a few hundred entries.  ``struct`` decodes a small table into a list at
C speed with no import; from :data:`ARRAY_MIN` entries on, the compact array (4 or 8 bytes an entry
instead of ~36 for a list of ints) is worth its import.  Both kinds index, slice, iterate, assign and
``extend`` alike, so the formats' code does not care which one it holds.
"""

from __future__ import annotations

import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from array import array
    from collections.abc import Iterable

    Table = list[int] | array[int]

ARRAY_MIN = 1 << 16  # entries: below this a table is a list
_CODES = {4: "I", 8: "Q"}


def decode(data: bytes | bytearray | memoryview, width: int, order: str) -> Table:
    """The ``width``-byte unsigned integers of ``data`` (``order``: "little" or "big"); a partial tail is ignored."""
    n = len(data) // width
    if n < ARRAY_MIN:
        return list(struct.unpack(f"{'<' if order == 'little' else '>'}{n}{_CODES[width]}", data[: n * width]))
    from array import array

    table = array(_CODES[width], bytes(data[: n * width]))
    if table.itemsize != width:  # pragma: no cover - 'I' is 4 bytes on every platform vdkit runs on
        raise ValueError(f"no {width}-byte array type")
    if sys.byteorder != order:
        table.byteswap()
    return table


def encode(values: Iterable[int], width: int, order: str) -> bytes:
    """``values`` as ``width``-byte unsigned integers in byte order ``order``."""
    if not isinstance(values, list) and not hasattr(values, "tobytes"):  # a range, a generator...
        values = list(values)
    if isinstance(values, list) and len(values) < ARRAY_MIN:
        return struct.pack(f"{'<' if order == 'little' else '>'}{len(values)}{_CODES[width]}", *values)
    from array import array

    table = array(_CODES[width], values)  # a copy: the caller's table keeps its byte order
    if sys.byteorder != order:
        table.byteswap()
    return table.tobytes()
