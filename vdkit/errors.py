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

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable


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


# (The monitor's own error classes, DeviceNotFound and CommandNotFound, are vdkit.monitor.commands':
# every class here is created by every vdkit-img start.)


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


def reprefix_open_error(exc: Exception, filename: str, spec: str) -> Exception:
    """Name ``spec`` instead of ``filename`` in a top-level "Could not open" error, as qemu-img does."""
    if not isinstance(exc, VdkitError):
        return exc
    prefix = f"Could not open '{filename}': "
    if exc.message.startswith(prefix):
        inner = exc.__cause__ if isinstance(exc.__cause__, VdkitError) else None
        if inner is not None and inner.message == exc.message[len(prefix):]:
            return inner.prefixed(f"Could not open '{spec}': ")
        err = exc.prefixed("")
        err.message = f"Could not open '{spec}': " + exc.message[len(prefix):]
        err.args = (err.message,)
        return err
    return exc


class SpecNames:
    """Context manager: an open error naming a file opened from a spec names the spec, as QEMU's do.

    The block layer opens file names; qemu-img and ``vdkit.open`` were given
    the spec (``--image-opts`` string, ``json:`` name, options), and their
    top-level "Could not open" names it.  ``pairs`` are the (file name, spec)
    of the images opened inside the block (spec None: a plain name, nothing to
    rename).  ``explain`` may replace a renamed error with one that says more
    (given that error and its spec): the command line's word on what vdkit-img
    cannot do.  It lives here, not in the block layer, because every command
    enters it, and one opening a plain name must import no more than it needs.
    """

    def __init__(self, *pairs: tuple[str, str | None],
                 explain: Callable[[Exception, str], Exception] | None = None) -> None:
        self.pairs = [(f, s) for f, s in pairs if s is not None]
        self.explain = explain

    def rewrite(self, exc: Exception) -> Exception:
        """``exc`` as the spec's error, or ``exc`` itself when it names none of the files."""
        for filename, spec in self.pairs:
            new = reprefix_open_error(exc, filename, spec)
            if new is not exc:
                return new if self.explain is None else self.explain(new, spec)
        return exc

    def __enter__(self) -> SpecNames:
        return self

    def __exit__(self, tp: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, Exception) and self.pairs:
            new = self.rewrite(exc)
            if new is not exc:
                raise new from exc


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
