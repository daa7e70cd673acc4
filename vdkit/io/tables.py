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


# -- table backends: one algorithm, two representations ---------------------------------------------------
#
# The qcow2 allocator (refcount.py, create.py, snapshot_ops.py) works on whole tables of cluster
# indices and refcounts.  numpy does that vectorised, but importing it costs about ten bare interpreter
# starts, more than the whole operation on an image whose tables fit in a few MiB.  The algorithms are
# therefore written once against a *backend* (vdkit/io/table_backends.py, loaded on first use):
# :data:`SMALL` keeps tables as ``list[int]``, :data:`NUMPY` as numpy arrays.  :func:`backend_for`
# picks one by how many bytes of tables an operation holds.

NUMPY_MIN_BYTES = 3 << 20  # tables from this size on are worth numpy's import (measured crossovers: 2-4 MiB)

# "small" or "numpy" forces one backend everywhere (tests run the suites both ways); read once.
FORCE: str | None = None


def _read_force() -> str | None:
    import os

    value = os.environ.get("VDKIT_TABLES", "").strip().lower()
    return value if value in ("small", "numpy") else None


FORCE = _read_force()

if TYPE_CHECKING:
    from typing import Any, TypeAlias

    from vdkit.io.table_backends import NUMPY as NUMPY
    from vdkit.io.table_backends import SMALL as SMALL
    from vdkit.io.table_backends import Backend as Backend
    from vdkit.io.table_backends import Deltas as Deltas

    Tab: TypeAlias = Any  # list[int] (SMALL) or a numpy array (NUMPY): each backend takes its own

_LAZY = ("SMALL", "NUMPY", "Backend", "Deltas")


def __getattr__(name: str) -> object:
    """``SMALL``, ``NUMPY``, ``Backend``, ``Deltas`` from :mod:`vdkit.io.table_backends`, imported when first asked."""
    if name in _LAZY:
        from vdkit.io import table_backends

        for n in _LAZY:
            globals()[n] = getattr(table_backends, n)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def of(t: Tab) -> Backend:
    """The backend a table belongs to."""
    from vdkit.io.table_backends import NUMPY, SMALL

    return SMALL if isinstance(t, list) else NUMPY


def backend_for(nbytes: int) -> Backend:
    """The backend for an operation holding ``nbytes`` of tables (:data:`FORCE` overrides)."""
    from vdkit.io.table_backends import NUMPY, SMALL

    if FORCE == "small":
        return SMALL
    if FORCE == "numpy":
        return NUMPY
    return NUMPY if nbytes >= NUMPY_MIN_BYTES else SMALL
