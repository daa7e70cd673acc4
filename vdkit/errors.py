"""The single exception hierarchy of vdkit.

Every error vdkit raises on purpose is a :class:`VdkitError`.  It carries the
text QEMU would print (``message``), optional extra lines printed after it
without a prefix (``hint``), and the QMP error class a monitor should report.
Layers add context on the way up with :meth:`VdkitError.prefixed`, the way
QEMU's ``error_prepend`` does, so the CLI can print one line that reads exactly
like qemu-img's.  Anything that is not a ``VdkitError`` escaping to a front end
is a bug in vdkit, not in the input.
"""

from __future__ import annotations

import errno as _errno
import os


class VdkitError(Exception):
    """Base of all deliberate errors.

    ``errno`` is set where QEMU's message depends on an errno value (e.g.
    ``-22 (Invalid argument)``), so front ends can format it their way.
    """

    qmp_class = "GenericError"

    def __init__(self, message: str, *, hint: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.errno = errno

    def __str__(self) -> str:
        return self.message

    def prefixed(self, prefix: str) -> VdkitError:
        """Return a copy of this error whose message starts with ``prefix``."""
        err = type(self).__new__(type(self))
        err.__dict__.update(self.__dict__)
        err.message = prefix + self.message
        err.args = (err.message,)
        err.__cause__ = self
        return err


class UsageError(VdkitError):
    """The command line is wrong; the CLI adds the "Try ... --help" line."""


class OpenError(VdkitError):
    """An image, backing file or data file could not be opened."""


class CorruptImageError(VdkitError):
    """Image metadata is inconsistent or points outside sane bounds."""


class UnsupportedError(VdkitError):
    """The image uses a feature or the format lacks an operation."""


class PolicyError(VdkitError):
    """The untrusted-image policy refused to follow a reference or a size."""


class LockError(VdkitError):
    """Another process holds a conflicting QEMU image lock."""


class SnapshotNotFoundError(VdkitError):
    """No snapshot matched the lookup."""


class DeviceNotFoundError(VdkitError):
    qmp_class = "DeviceNotFound"


class CommandNotFoundError(VdkitError):
    qmp_class = "CommandNotFound"


def os_error_message(exc: OSError) -> str:
    """strerror text as glibc prints it (QEMU shows this after a colon)."""
    if exc.errno is not None:
        return os.strerror(exc.errno)
    return str(exc)


def take_corruption_report(exc: BaseException) -> str | None:
    """The text of a qcow2 corruption event riding on ``exc`` or on an error behind it, taken once.

    The library never prints; the front end that reports the error prints this line first, as QEMU
    prints the event when it happens.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        report = getattr(cur, "report", None)
        if report is not None:
            cur.report = None  # type: ignore[attr-defined]
            return str(report.text)
        cur = cur.__cause__ or cur.__context__
    return None


def hexalt(value: int) -> str:
    """C's ``%#x``, as QEMU's messages and ``qemu-img map`` print numbers: ``0x`` prefix except for zero."""
    return f"{value:#x}" if value else "0"


def errno_text(err: int) -> str:
    """QEMU's ``-N (strerror)`` rendering of a negative errno."""
    return f"-{err} ({os.strerror(err)})"


EINVAL = _errno.EINVAL
ENOENT = _errno.ENOENT
ENOTSUP = _errno.ENOTSUP
EFBIG = _errno.EFBIG
EIO = _errno.EIO
