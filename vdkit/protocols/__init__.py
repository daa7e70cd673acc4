"""Protocol nodes: where image bytes come from when they are not a local file (NBD, HTTP(S), RBD)."""

from __future__ import annotations

import errno as _errno
import os


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
