"""Fault injection for crash-safety tests: make an image file stop accepting writes.

A process killed at some point has written everything before that point and
nothing after.  ``cut_writes`` models that on an open :class:`ImageFile`:
from the ``cut_after``-th write on, every write fails.  Both write paths of
the file (``pwrite`` and the vectored ``pwritev``) count, so no write can
slip past the cut.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vdkit.block.node import Node, open_image
from vdkit.io.file import ImageFile


class WriteCut(OSError):
    """The injected failure (an EIO, as a dying disk or process would give)."""

    def __init__(self) -> None:
        super().__init__(5, "Input/output error")


def cut_writes(file: ImageFile, cut_after: int | None) -> Callable[[], int]:
    """Patch ``file`` so writes number ``cut_after`` and later fail; return a getter of writes done."""
    real_pwrite, real_pwritev = file.pwrite, file.pwritev
    count = 0

    def allow() -> None:
        nonlocal count
        if cut_after is not None and count >= cut_after:
            raise WriteCut()
        count += 1

    def pwrite(offset: int, data: bytes | bytearray | memoryview) -> None:
        allow()
        real_pwrite(offset, data)

    def pwritev(offset: int, buffers: list[bytes | bytearray | memoryview]) -> None:
        allow()
        real_pwritev(offset, buffers)

    file.pwrite = pwrite  # type: ignore[method-assign]
    file.pwritev = pwritev  # type: ignore[method-assign]
    return lambda: count


def run_cut(path: Path, op: Callable[[Node], object], cut_after: int | None, *,
            errors: tuple[type[Exception], ...], close_errors: tuple[type[Exception], ...] = (OSError,),
            flush: bool = False) -> int:
    """Run ``op`` (then a flush, with ``flush``) on the qcow2 image ``path`` opened read-write, its writes
    failing from number ``cut_after`` on (None: never); the writes done.

    ``op`` may fail with one of ``errors`` only under a cut.  The close after a cut may fail too (with one
    of ``close_errors``): the bare file is closed then, as the dying process leaves it."""
    node = open_image(str(path), "qcow2", readonly=False)
    file = node.driver.file
    writes_done = cut_writes(file, cut_after)
    try:
        op(node)
        if flush:
            node.flush()
    except errors:
        assert cut_after is not None, "operation failed without a fault"
    finally:
        try:
            node.close()
        except close_errors:
            file.close()
    return writes_done()
