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

from vdkit.errors import OpenError, PolicyError
from vdkit.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from vdkit.block.secrets import BackingOverride  # (the option store's record: loaded with options only)

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


def _same_server_kind(image: str, backing: str) -> bool:
    """A backing name on the same kind of server as its image, for a protocol with directories (a URL's:
    its module resolves relative names, ``resolve_backing``), so not a way out to another protocol."""
    from vdkit.protocols.registry import PROTOCOLS, driver_for_prefix, protocol_module

    a, b = driver_for_prefix(protocol_of(image)), driver_for_prefix(protocol_of(backing))
    if a is None or b is None or PROTOCOLS[a] != PROTOCOLS[b]:
        return False
    return hasattr(protocol_module(a), "resolve_backing")


def resolve_backing_name(image_filename: str, stored: str) -> str | None:
    """The name QEMU opens for ``stored`` referenced from ``image_filename``.

    ``None`` when it cannot be determined (the referring image has a
    protocol or ``json:`` name).
    """
    if stored.startswith("/") or has_protocol(stored):
        return stored
    if has_protocol(image_filename):  # a protocol's own directories (a plain URL has one, §3.5), or none
        from vdkit.protocols.registry import driver_for_prefix, protocol_module

        driver = driver_for_prefix(protocol_of(image_filename))
        resolve = None if driver is None else getattr(protocol_module(driver), "resolve_backing", None)
        return None if resolve is None else resolve(image_filename, stored)
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
        elif proto == "json":  # the opener checks what its options name (check_json)
            return
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


def check_json(policy: OpenPolicy, kind: str, name: str, flat: dict[str, object]) -> None:
    """Raise :class:`PolicyError` unless every file a ``json:{...}`` name stored in an image (its flat
    options) names may be opened as ``kind``: each ``*filename`` as a plainly named one, and no driver of
    a protocol (the file's nested ``backing`` and ``data-file`` included: the image chose them)."""
    for key, value in flat.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "driver" and isinstance(value, str) and value != "file" and value in QEMU_PROTOCOLS:
            raise PolicyError(f"{kind.capitalize()} '{name}' uses a protocol, which is not allowed")
        if leaf == "filename":
            policy.check(kind, name, str(value))


DEFAULT_POLICY = OpenPolicy()
_process_default = DEFAULT_POLICY


def default_policy() -> OpenPolicy:
    """The policy used when a caller names none (``vdkit-img --allow-dir`` sets it)."""
    return _process_default


def set_default_policy(policy: OpenPolicy) -> None:
    """Set the process-wide default; meant for front ends, which own the whole process."""
    global _process_default
    _process_default = policy


class BackingWalk:
    """The one backing-chain walker: every way of following backing files goes through it.

    Opening a chain (:func:`vdkit.block.node.open_image`), ``info
    --backing-chain`` (each image opened on its own), ``commit`` (layers opened
    in different modes) and the daemon all follow a chain one image at a time;
    this object carries what must hold along the whole walk: the caller's
    policy, the depth limit, and loop detection by file identity (device and
    inode, so a symlink or hard link cannot hide a loop).
    """

    def __init__(self, policy: OpenPolicy | None = None, *, names_only: bool = False) -> None:
        self.policy = policy or default_policy()
        self.depth = 0
        self._seen: set[tuple[int, int] | str] = set()
        # ``qemu-img info --backing-chain`` opens one image at a time and closes it before the next,
        # and finds loops by name alone; a loop through growing relative names ends when the name
        # is too long for the file system.  That walk is bounded without a depth limit, so this
        # mode reproduces it exactly (the policy still applies to every image).
        self.names_only = names_only
        self._names: set[str] = set()

    def enter(self, name: str) -> None:
        """Before opening ``name`` (names-only walks): a name met before is qemu-img's loop error."""
        if self.names_only:
            if name in self._names:
                raise OpenError(f"Backing file '{name}' creates an infinite loop.")
            self._names.add(name)

    def visit(self, name: str, fd: int) -> None:
        """Record an image opened on ``fd``; meeting the same file again is QEMU's loop error.

        A node that is not a local file (``fd`` -1: an NBD export) is known by its name."""
        if self.names_only:
            return
        if fd < 0:
            ident: tuple[int, int] | str = name
        else:
            st = os.fstat(fd)
            ident = (st.st_dev, st.st_ino)
        if ident in self._seen:
            raise OpenError(f"Backing file '{name}' creates an infinite loop.")
        self._seen.add(ident)

    def backing_of(self, filename: str, stored: str | None) -> str | None:
        """The name to open below the image ``filename`` whose header stores ``stored``.

        ``None`` at the end of the chain.  Raises QEMU's errors for a name that
        cannot be resolved, a chain deeper than the limit, and a file the
        policy does not allow (before anything is opened).
        """
        if stored is None:
            return None
        resolved = resolve_backing_name(filename, stored)
        if resolved is None and not self.names_only and has_protocol(filename):
            from vdkit.protocols.registry import driver_for_prefix, protocol_module

            driver = driver_for_prefix(protocol_of(filename))
            no_dir = None if driver is None else getattr(protocol_module(driver), "no_base_directory", None)
            text = None if no_dir is None else no_dir(filename)
            if text is not None:  # the protocol's own refusal (QEMU's bdrv_dirname)
                raise OpenError(text)
        if resolved is None:
            raise OpenError(
                f"Could not determine absolute backing filename, but backing filename '{stored}' present"
            )
        if not self.names_only and self.depth + 1 >= self.policy.max_chain_depth:
            raise OpenError(f"Backing chain is deeper than {self.policy.max_chain_depth} images")
        if has_protocol(filename) and has_protocol(resolved) and _same_server_kind(filename, resolved):
            if not self.policy.follow_backing:  # a remote image's backing file on the same kind of server
                self.policy.check("backing file", stored, resolved)
        else:
            self.policy.check("backing file", stored, resolved)
        self.depth += 1
        return resolved


def given_option(filename: str, key: str) -> str | None:
    """The option ``key`` that options attached to ``filename`` in the current open scope
    (:func:`vdkit.block.secrets.open_option`), without importing the store where nothing could be in it:
    opening a plain name stays as cheap as before options existed."""
    import sys

    store = sys.modules.get("vdkit.block.secrets")
    if store is None:
        return None
    found: str | None = store.open_option(filename, key)
    return found


def backing_override(filename: str) -> BackingOverride | None:
    """What the options said about the backing of the image opened as ``filename`` (the name the option
    interpreter, :mod:`vdkit.block.image_opts`, returned), in the current open scope
    (:mod:`vdkit.block.secrets`); None when no options were given or the store was never used."""
    import sys

    store = sys.modules.get("vdkit.block.secrets")  # a plain name's open does not import the store
    if store is None:
        return None
    found: BackingOverride | None = store.table("backing").get(filename)
    return found
