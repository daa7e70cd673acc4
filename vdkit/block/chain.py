"""Backing-file resolution and the untrusted-image policy.

An image names other files (its backing file, its external data file).  An
image is untrusted input, so following such a name is a decision: the policy
says whether to follow at all and, optionally, which folders are allowed.
Names resolve the way QEMU resolves them: an absolute name is used as is, a
relative one is joined to the folder part of the referring image's name *as
given*, without normalisation (so ``sub/t.qcow2`` + ``../b.qcow2`` is
``sub/../b.qcow2``, exactly what qemu-img prints).
"""

from __future__ import annotations

import os

from vdkit.errors import PolicyError
from vdkit.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

# Characters of a "protocol:" prefix (nbd:, http:, json:...) as QEMU's path_has_protocol sees it.
_PROTOCOL_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+.-")

DEFAULT_MAX_CHAIN_DEPTH = 256


def has_protocol(name: str) -> bool:
    colon = name.find(":")
    return colon > 0 and _PROTOCOL_CHARS.issuperset(name[:colon])


# Protocol prefixes QEMU 7.2 knows (others are "Unknown protocol").  vdkit
# itself opens only plain files, so of these it accepts just "file:".
QEMU_PROTOCOLS = frozenset({
    "file", "host_device", "host_cdrom", "nbd", "nbd+tcp", "nbd+unix", "http", "https", "ftp", "ftps", "ssh",
    "iscsi", "iser", "gluster", "gluster+tcp", "gluster+unix", "gluster+rdma", "nfs", "rbd", "blkdebug",
    "blkverify", "fat", "null-co", "null-aio", "nvme", "json",
})


def protocol_of(name: str) -> str | None:
    """The ``proto`` of a ``proto:rest`` name (QEMU's rule: a colon before any slash), else None."""
    if not has_protocol(name):
        return None
    return name[: name.index(":")]


def resolve_backing_name(image_filename: str, stored: str) -> str | None:
    """The name QEMU opens for ``stored`` referenced from ``image_filename``.

    ``None`` when it cannot be determined (the referring image has a
    protocol or ``json:`` name).
    """
    if stored.startswith("/") or has_protocol(stored):
        return stored
    if has_protocol(image_filename):
        return None
    slash = image_filename.rfind("/")
    if slash < 0:
        return stored
    return image_filename[: slash + 1] + stored


@record(frozen=True)
class OpenPolicy:
    """What an image may make vdkit open besides itself.

    ``allowed_dirs=None`` allows any folder; otherwise a referenced file must
    resolve (symlinks followed) inside one of the folders.
    """

    follow_backing: bool = True
    follow_data_file: bool = True
    allowed_dirs: tuple[Path, ...] | None = None
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH

    @classmethod
    def restricted_to(cls, *dirs: str | os.PathLike[str], **kw: object) -> OpenPolicy:
        from pathlib import Path

        return cls(allowed_dirs=tuple(Path(d).resolve() for d in dirs), **kw)  # type: ignore[arg-type]

    def check(self, kind: str, name: str, resolved: str) -> None:
        """Raise :class:`PolicyError` unless ``resolved`` may be opened as ``kind``."""
        follow = self.follow_backing if kind == "backing file" else self.follow_data_file
        if not follow:
            raise PolicyError(f"{kind.capitalize()} '{name}' not opened: following {kind}s is disabled")
        proto = protocol_of(resolved)
        if proto == "file":
            resolved = resolved[len("file:"):]
        elif proto in QEMU_PROTOCOLS:
            raise PolicyError(f"{kind.capitalize()} '{name}' uses a protocol, which is not allowed")
        elif proto is not None:
            return  # opening it fails with QEMU's "Unknown protocol" error
        if self.allowed_dirs is None:
            return
        from pathlib import Path

        real = Path(resolved).resolve()
        for d in self.allowed_dirs:
            if real == d or d in real.parents:
                return
        raise PolicyError(f"{kind.capitalize()} '{name}' ({real}) is outside the allowed folders")


DEFAULT_POLICY = OpenPolicy()
_process_default = DEFAULT_POLICY


def default_policy() -> OpenPolicy:
    """The policy used when a caller names none (``vdkit-img --allow-dir`` sets it)."""
    return _process_default


def set_default_policy(policy: OpenPolicy) -> None:
    """Set the process-wide default; meant for front ends, which own the whole process."""
    global _process_default
    _process_default = policy
