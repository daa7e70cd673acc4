"""vdkit: know, at runtime, exactly what is inside a disk image and its snapshots.

The public entry point is :func:`open`; everything else is imported lazily so
that ``vdkit-img`` starts quickly: ``vdkit.info.render_human`` (any submodule,
at any depth) works after a bare ``import vdkit`` and is loaded on first use.
"""

from __future__ import annotations

import os

from vdkit.errors import VdkitError

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from vdkit.block.chain import OpenPolicy
    from vdkit.block.inspect import Verdict
    from vdkit.block.node import Node
    from vdkit.info.model import ImageInfo

__all__ = ["open", "image_info", "inspect", "VdkitError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``vdkit.<submodule>`` imported on first use (PEP 562), so ``import vdkit`` stays cheap."""
    return _submodule(__name__, name)


def _submodule(package: str, name: str) -> object:
    """The submodule ``package.name``, imported now; AttributeError when there is none.

    Each subpackage's module ``__getattr__`` calls this, which makes documented chains such as
    ``vdkit.info.render_human.image_info`` work without importing every module up front.
    """
    if name.startswith("_"):  # dunder probes (copy, pickle, doctest...) must not import anything
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    import sys

    full = f"{package}.{name}"
    try:
        __import__(full)
    except ModuleNotFoundError as exc:
        if exc.name != full:
            raise  # the submodule exists but something it imports is missing: say so
        raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    return sys.modules[full]


def open(  # noqa: A001 - mirrors io.open / qemu's bdrv_open naming on purpose
    path: str | os.PathLike[str] | None = None,
    fmt: str | None = None,
    *,
    options: Mapping[str, object] | str | None = None,
    secrets: Mapping[str, bytes | str] | None = None,
    objects: Sequence[str] | Mapping[str, Mapping[str, str]] | None = None,
    backing: bool = True,
    force_share: bool = False,
    readonly: bool = True,
    policy: OpenPolicy | None = None,
) -> Node:
    """Open an image read-only (by default) with its backing chain.

    ``path`` is what ``vdkit-img`` takes for a file: a local path, an NBD or
    HTTP(S) URL, an ``rbd:`` name, or a ``json:{...}`` name.  ``options`` are
    a node's options as ``json:`` and ``-blockdev`` write them (nested
    objects or dotted keys: ``{"driver": "qcow2", "file": {"driver": "nbd",
    "server": {...}, "export": "e"}, "backing": None}``) or an
    ``--image-opts`` string; with both, ``path`` is the file the options'
    format reads.  ``fmt`` forces the format (any name ``qemu-img -f``
    takes); ``None`` probes.  ``secrets`` (id -> passphrase or key) are what
    ``--object secret`` gives: luks's ``key-secret``, rbd's ``key-secret``, a
    TLS key's ``passwordid``; ``objects`` are ``--object`` definitions
    (``["tls-creds-x509,id=tls0,dir=...,endpoint=client"]``, or id ->
    ``{"qom-type": ..., key: value}``), created with qemu-img's checks:
    NBD's TLS credentials, secrets from files.  Both exist only for this call: two opens in one process
    (or thread) never see each other's.  ``policy``
    (:class:`vdkit.block.chain.OpenPolicy`) limits which backing and data
    files an untrusted image may make vdkit open.  Errors are
    :class:`VdkitError` with qemu-img's texts.
    """
    from vdkit.block.image_opts import open_with_options

    name = None if path is None else os.fspath(path)
    return open_with_options(name, fmt, options, secrets=secrets, objects=objects, readonly=readonly,
                             force_share=force_share, backing=backing, policy=policy)


def image_info(node: Node, *, nested: bool = False) -> ImageInfo:
    """What ``qemu-img info`` reports of an open node (``nested``: ``backing_image`` filled down the
    chain, as QMP's ``query-block`` does).

    A function of the facade rather than a method of :class:`~vdkit.block.node.Node`: the block
    layer does not know the info layer above it (``vdkit.info.collect`` builds the record).
    """
    from vdkit.info.collect import image_info as collect

    return collect(node, nested=nested)


def inspect(path: str | os.PathLike[str], fmt: str | None = None, *,
            max_virtual_size: int | None = None) -> Verdict:
    """Judge whether an untrusted image is safe to hand to QEMU, without following anything it names.

    ``fmt`` is the format the uploader declared (a different content is a
    reason); the :class:`~vdkit.block.inspect.Verdict` lists every reason
    (backing or data files, extents leaving the image's folder, corrupt or
    overlapping metadata, encryption, a size above ``max_virtual_size``).
    """
    from vdkit.block.inspect import inspect_image

    return inspect_image(path, fmt=fmt, max_virtual_size=max_virtual_size)
