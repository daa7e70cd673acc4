"""Protocol nodes: where image bytes come from when they are not a local file (NBD, HTTP(S), RBD)."""

from __future__ import annotations

import errno as _errno
import os

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any, Protocol

    class AsyncFile(Protocol):
        """A protocol file that takes several reads in flight (the copy engine's read-ahead uses it)."""

        filename: str

        def start_readinto(self, offset: int, view: memoryview) -> Any:
            """Start filling ``view`` from ``offset``; the buffer is the file's until :meth:`finish_read`."""

        def finish_read(self, read: Any) -> None:
            """Wait for a started read (zeros past the end); raises ``OSError`` once the buffer is free."""


class RemoteFile:
    """What every protocol file shares: no local descriptor, no device, and ``pread`` built on the
    protocol's own ``readinto`` (which reads straight into the caller's buffer, zeros past the end)."""

    fd = -1
    is_device = False

    def readinto(self, offset: int, view: memoryview) -> None:
        raise NotImplementedError

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise OSError(_errno.EIO, os.strerror(_errno.EIO))
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)



_HEX = frozenset("0123456789abcdefABCDEF")


def unquote(text: str) -> str:
    """``%XX`` escapes decoded exactly as :func:`urllib.parse.unquote` decodes them (each run of ASCII
    characters on its own, as UTF-8, invalid sequences replaced; other characters kept), without
    importing :mod:`urllib.parse`: it pulls in ``ipaddress`` and ``re``, about as much start-up as the
    rest of an ``info`` over NBD."""
    if "%" not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ascii_run = text[i] < "\x80"
        j = i + 1
        while j < n and (text[j] < "\x80") == ascii_run:
            j += 1
        run = text[i:j]
        out.append(_unquote_ascii(run) if ascii_run and "%" in run else run)
        i = j
    return "".join(out)


def _unquote_ascii(run: str) -> str:
    parts = run.split("%")
    buf = bytearray(parts[0].encode("ascii"))
    for part in parts[1:]:
        if len(part) >= 2 and part[0] in _HEX and part[1] in _HEX:
            buf.append(int(part[:2], 16))
            buf += part[2:].encode("ascii")
        else:
            buf += b"%" + part.encode("ascii")
    return buf.decode("utf-8", "replace")
