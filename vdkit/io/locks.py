"""QEMU-compatible image locking with open file description (OFD) locks.

QEMU's file-posix driver expresses block-layer permissions as shared byte
locks on the image file: byte ``100 + i`` is held by every process that *uses*
permission *i*, byte ``200 + i`` by every process that *refuses to share* it.
A process may take a permission when nobody locks ``200 + i``, and may refuse
to share one when nobody locks ``100 + i``.  Observed on QEMU 7.2:

* read-write user: holds 100 (consistent read), 101 (write), 103 (resize) and
  refuses 201 (write) and 203 (resize);
* read-only user (``qemu-img check`` of a qcow2 image): holds 100, refuses 201 and 203;
* ``-U``/``force-share``: holds 100 only;
* a raw image refuses what its user refuses, and ``qemu-img info`` reads no
  data (:meth:`LockMode.for_image` has the whole rule).

We take exactly the same bytes so QEMU and vdkit see each other.
"""

from __future__ import annotations

import fcntl
import os
import struct

from vdkit.errors import LockError
from vdkit.record import record

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200


class Perm:
    """Permission bits (QEMU's BLK_PERM_*), plain ints: an ``enum.IntFlag`` would import ``enum`` at start-up."""

    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8


PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}
ALL_PERMS = list(PERM_NAMES)

# struct flock on Linux/x86_64 and aarch64: short, short, off_t, off_t, pid_t (+pad)
_FLOCK = struct.Struct("@hhqqi4x")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


@record(frozen=True)
class LockMode:
    perms: int  # Perm bits used
    unshared: int  # Perm bits refused to others

    @classmethod
    def for_open(cls, *, readonly: bool, force_share: bool) -> LockMode:
        if force_share:
            return cls(Perm.CONSISTENT_READ, 0)
        if readonly:
            return cls(Perm.CONSISTENT_READ, Perm.WRITE | Perm.RESIZE)
        return cls(Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, Perm.WRITE | Perm.RESIZE)

    @classmethod
    def for_image(cls, *, readonly: bool, force_share: bool, no_io: bool, passes_permissions: bool,
                  share_writes: bool, resize: bool) -> LockMode:
        """The bytes qemu-img 7.2 takes on an image's file once the format is known (observed with strace).

        * Consistent read unless the image is opened for its metadata only (``info``: no guest data read).
        * Write when writable; resize when writable and the format may grow its file (any format with
          metadata), or when the user resizes (``resize``).
        * A format with metadata refuses others' writes and resizes (its tables must not change under
          it); a format whose file is the guest data as-is (``passes_permissions``: raw) passes on what
          its user shares: qemu-img's commands share writes (``share_writes``), except convert, whose
          sources refuse them.  ``-U`` (``force_share``) refuses nothing.
        """
        perms = 0 if no_io and readonly else Perm.CONSISTENT_READ
        if not readonly:
            perms |= Perm.WRITE
            if resize or not passes_permissions:
                perms |= Perm.RESIZE
        refuses = not force_share and not (passes_permissions and share_writes)
        return cls(perms, Perm.WRITE | Perm.RESIZE if refuses else 0)


def _bit_index(p: int) -> int:
    return p.bit_length() - 1


class ImageLock:
    """The lock bytes one open file description holds on one image."""

    def __init__(self, fd: int, filename: str, mode: LockMode) -> None:
        self.fd = fd
        self.filename = filename
        self.mode = mode

    def _setlk(self, ltype: int, byte: int) -> None:
        fcntl.fcntl(self.fd, _F_OFD_SETLK, _FLOCK.pack(ltype, os.SEEK_SET, byte, 1, 0))

    def _conflicts(self, byte: int) -> bool:
        """True if another file description holds a lock on ``byte``."""
        res = fcntl.fcntl(self.fd, _F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return bool(_FLOCK.unpack(res)[0] != fcntl.F_UNLCK)

    def _hint(self) -> str:
        return f"Is another process using the image [{self.filename}]?"

    def acquire(self) -> None:
        """Take our lock bytes, then verify nobody conflicts (QEMU's order)."""
        try:
            for p in ALL_PERMS:
                if p & self.mode.perms:
                    self._setlk(fcntl.F_RDLCK, LOCK_PERM_BASE + _bit_index(p))
                if p & self.mode.unshared:
                    self._setlk(fcntl.F_RDLCK, LOCK_SHARED_BASE + _bit_index(p))
        except OSError as exc:
            # Filesystems without OFD lock support: QEMU falls back to no locking
            # with a warning only when explicitly asked; we refuse quietly like
            # the "auto" mode does on such file systems, i.e. carry on unlocked.
            if exc.errno in (22, 95):  # EINVAL/EOPNOTSUPP
                return
            raise LockError(f"Failed to lock byte: {os.strerror(exc.errno or 0)}", hint=self._hint()) from exc
        for p in ALL_PERMS:
            if p & self.mode.perms and self._conflicts(LOCK_SHARED_BASE + _bit_index(p)):
                self.release()
                raise LockError(f'Failed to get "{PERM_NAMES[p]}" lock', hint=self._hint())
        for p in ALL_PERMS:
            if p & self.mode.unshared and self._conflicts(LOCK_PERM_BASE + _bit_index(p)):
                self.release()
                raise LockError(f'Failed to get shared "{PERM_NAMES[p]}" lock', hint=self._hint())

    def release(self) -> None:
        try:
            fcntl.fcntl(self.fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
        except OSError:
            pass

    def switch(self, mode: LockMode) -> None:
        """Hold ``mode``'s bytes instead (QEMU updates a node's permissions in place while it is open);
        if another process refuses them, the old bytes are taken again and the error raised."""
        old = self.mode
        self.release()
        self.mode = mode
        try:
            self.acquire()
        except LockError:
            self.mode = old
            self.acquire()
            raise
