"""What one open's options hand to the drivers below: secrets, per-image options, names' presets.

qemu-img creates each ``--object`` when it parses it and a format driver
finds a secret by id when it opens an image; an option (``key-secret``,
``backing: null``, an NBD address given as options) is attached to the file
name the option interpreter returns and found by that name when the image
opens.  All of it lives in an :class:`OpenScope`.  A front end owns its
process and uses :data:`PROCESS`, as QEMU's object tree; the library's
``vdkit.open`` fills a fresh scope for each call and makes it current while
that open runs, so two opens in one process (or in two threads) never see
each other's secrets, options or presets.  The current scope is a
:class:`contextvars.ContextVar`: threads and asyncio tasks keep theirs apart.

Everything here is looked up while an image opens; an open node keeps what
it needs (a luks key, an RBD connection, NBD credentials) and never asks
again.
"""

from __future__ import annotations

from contextvars import ContextVar

from vdkit.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from contextvars import Token
    from typing import Any


class OpenScope:
    """Secrets by id, options by (file name, key), and the named tables the protocol and format modules
    keep for names their option parsers made (:meth:`table`).

    ``warn`` receives the warnings the option interpreter gives (QEMU's deprecation texts): the
    command line prints them as ``vdkit-img: warning: ...``; None gives them to :mod:`warnings`.
    Use as a context manager to make the scope current (nestable).
    """

    def __init__(self, secrets: dict[str, bytes] | None = None) -> None:
        self.secrets: dict[str, bytes] = dict(secrets or {})
        self.options: dict[tuple[str, str], str] = {}
        self.tables: dict[str, dict[Any, Any]] = {}
        self.warn: Callable[[str], None] | None = None
        self._tokens: list[Token[OpenScope]] = []

    def table(self, kind: str) -> dict[Any, Any]:
        """The scope's table ``kind`` (a module's presets by name), made empty on first use."""
        found = self.tables.get(kind)
        if found is None:
            found = self.tables[kind] = {}
        return found

    def warning(self, text: str) -> None:
        if self.warn is not None:
            self.warn(text)
        else:
            import warnings

            warnings.warn(text, stacklevel=3)

    def __enter__(self) -> OpenScope:
        self._tokens.append(_CURRENT.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self._tokens.pop())


PROCESS = OpenScope()
"""The scope of a front end that owns its process (``vdkit-img``, ``vdkit-daemon``): current by default."""

_CURRENT: ContextVar[OpenScope] = ContextVar("vdkit_open_scope", default=PROCESS)


def current() -> OpenScope:
    """The scope opens and option parsers use now (:data:`PROCESS` unless a caller made another current)."""
    return _CURRENT.get()


def table(kind: str) -> dict[Any, Any]:
    """The current scope's table ``kind`` (see :meth:`OpenScope.table`)."""
    return _CURRENT.get().table(kind)


def register_secret(secret_id: str, data: bytes) -> None:
    _CURRENT.get().secrets[secret_id] = data


def lookup_secret(secret_id: str) -> bytes:
    """The secret's bytes, or QEMU's "No secret with id" error."""
    data = _CURRENT.get().secrets.get(secret_id)
    if data is None:
        from vdkit.errors import OpenError

        raise OpenError(f"No secret with id '{secret_id}'")
    return data


def set_open_option(filename: str, key: str, value: str) -> None:
    """Remember ``key=value`` for the next opens of ``filename`` (``--image-opts``, ``json:``)."""
    _CURRENT.get().options[(filename, key)] = value


def open_option(filename: str, key: str) -> str | None:
    return _CURRENT.get().options.get((filename, key))


def forget_backing(name: str) -> None:
    """A plain file name: a ``backing`` options gave the same name earlier in this scope does not apply to it."""
    scope = _CURRENT.get()
    scope.table("backing").pop(name, None)
    if scope.options.get((name, "backing")) is not None:
        scope.options[(name, "backing")] = ""


@record(frozen=True)
class BackingOverride:
    """What ``json:``/``--image-opts`` said about a node's ``backing`` child besides ``null``.

    QEMU takes a ``backing`` member (an object, dotted ``backing.*`` keys, a node-name string, or any
    other scalar) only where it opens the backing child: a command that opens images without their
    backing (``info``, ``bitmap``, ``rebase -u``) leaves the member unused and refuses it by its first
    key in QDict order (``unused``).  Where the backing is opened, ``kind`` says how: ``"node"``
    opens what ``open(image's resolved backing name or None, image's backing format)`` answers (the
    option interpreter lives with the front end); unless the object gives ``file.filename``
    (``explicit``) the image's backing name is still resolved first, so its errors (no base
    directory over NBD) stay; ``"ref"`` names a node that a qemu-img process never has;
    ``"default"`` (a number, a boolean, an empty object) changes nothing where the image has a
    backing file and is unused where it has none; ``"unused"`` is always left over.
    """

    kind: str
    unused: str
    ref: str | None = None
    open: Callable[[str | None, str | None], tuple[str, str | None]] | None = None
    explicit: bool = False
