"""Secrets (``--object secret``) and per-image open options that carry them (``key-secret``).

qemu-img creates each ``--object`` when it parses it and a format driver
finds a secret by id when it opens an image.  vdkit's front ends register
secrets and the ``--image-opts`` key options here; drivers look them up by
the file name they open.  Process-wide, like QEMU's object tree: a front end
owns its process.
"""

from __future__ import annotations

_secrets: dict[str, bytes] = {}
_open_options: dict[tuple[str, str], str] = {}


def register_secret(secret_id: str, data: bytes) -> None:
    _secrets[secret_id] = data


def lookup_secret(secret_id: str) -> bytes:
    """The secret's bytes, or QEMU's "No secret with id" error."""
    data = _secrets.get(secret_id)
    if data is None:
        from vdkit.errors import OpenError

        raise OpenError(f"No secret with id '{secret_id}'")
    return data


def set_open_option(filename: str, key: str, value: str) -> None:
    """Remember ``key=value`` for the next opens of ``filename`` (``--image-opts``)."""
    _open_options[(filename, key)] = value


def open_option(filename: str, key: str) -> str | None:
    return _open_options.get((filename, key))
