"""Every protocol vdkit reaches besides local files, by driver name and name prefix, imported only when used.

A protocol is one module under ``vdkit/protocols/`` named here; front ends
(``--image-opts``, ``-drive``, ``create``) ask this table instead of comparing
names, so adding a protocol is one module plus its lines here.  The module
provides:

``PREFIXES: tuple[str, ...]``
    The ``proto:`` prefixes of the file names it opens (``nbd+unix:...``).
``open_file(name, *, readonly, force_share, fmt) -> (file, node name)``
    Open one of its names as a file-like object the format drivers read
    (``block.node``); a file with ``node_name(format)`` renames the node once
    its format is known (rbd's ``json:{...}``).
``resolve_backing(image, stored) -> str | None`` and ``no_base_directory(image) -> str | None`` (optional)
    A relative backing name below one of its images: resolved against the
    protocol's own directory (a plain URL's), or QEMU's refusal text (NBD
    has no directories); without them the generic "Could not determine".
``open_blockdev(opts, *, readonly, auto_read_only) -> (file, node name, read-only)`` (optional)
    Open a ``blockdev-add``/``-blockdev`` node of this driver from its QAPI-checked options (the
    monitor's schema holds QEMU's members); without it the driver is refused there.
``name_for_options(opts: dict[str, str], driver: str) -> str``
    Check the driver's options (``server.*``, ``url``, ``pool``...; keys
    without the ``file.`` prefix) with QEMU's texts and return the file name
    the node opens under, the options attached to it for that open.
``NODE_FORMAT: str`` (optional)
    The registered format (``vdkit.formats.registry``) a node of this protocol answers info and
    snapshot queries as, when no format sits above it (rbd: object size, its snapshots); without it
    the node reports only its length and allocation (``vdkit.block.protocol_node``).  That format's
    module also gives ``raw_driver(file)``, the raw format over such a node (its snapshots pass up).
``top_options(opts, filename, file_driver) -> dict[str, str]`` (optional)
    What :func:`name_for_options` sees when the protocol is the top node (``driver=nbd`` in
    ``--image-opts``, without the tuning options): by default the options with a given
    ``file.filename`` as ``filename``; nbd keeps ``file.filename``/``file.driver`` as options of its
    own, which it refuses as QEMU does.
``drive_option(key) -> bool``, ``READ_ONLY``, ``KEEPS_FILE_TUNING``, ``FILENAME_OPTION``, ``AUTO_READ_ONLY`` (optional)
    ``-drive`` (``vdkit.daemon.main``): the keys of a top-level ``driver=P`` that are the protocol's;
    a protocol that never writes (curl: the drive becomes read-only); one whose ``file.*`` tuning
    options (``locking``, ``aio``...) are its own to refuse (nbd); the option a file name given
    beside the options becomes (curl's ``url``); the names opened with QEMU's auto-read-only.
``clashes_with_filename(key) -> bool`` (optional)
    Options that a file name given beside them excludes (nbd's address keys).
``json_name(flat, probed_format) -> dict | None`` and ``REPORT_SINK`` (optional)
    The ``json:{...}`` name QEMU gives a node opened with some of the protocol's options (curl's
    cookie, sslverify off), and a list its reports go to while the daemon parses a ``-drive``.
``CREATE_PLACE: str`` with ``create_raw(filename, opts)`` and ``create_for_format(filename, opts)``
    Where ``qemu-img create`` can make an image on this protocol: the raw disk
    itself, or the empty container a format that writes through the protocol
    (``CREATES_ON_PROTOCOLS`` in the format's module) then fills.  Protocols
    without them (curl) are refused before anything is created.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from types import ModuleType

# driver name -> module (QEMU's BlockdevDriver names of the protocols vdkit implements)
PROTOCOLS: dict[str, str] = {
    "nbd": "vdkit.protocols.nbd",
    "http": "vdkit.protocols.http",
    "https": "vdkit.protocols.http",
    "rbd": "vdkit.protocols.rbd",
    "blkdebug": "vdkit.protocols.blkdebug",
}

# file-name prefix -> driver name (kept here so that naming a prefix imports nothing)
PREFIXES: dict[str, str] = {
    "nbd": "nbd",
    "nbd+tcp": "nbd",
    "nbd+unix": "nbd",
    "http": "http",
    "https": "https",
    "rbd": "rbd",
    "blkdebug": "blkdebug",
}

_loaded: dict[str, ModuleType] = {}


def is_protocol(driver: str | None) -> bool:
    """``driver`` is a protocol vdkit implements (not ``file``, not a format)."""
    return driver in PROTOCOLS


def driver_for_prefix(prefix: str | None) -> str | None:
    """The protocol driver that opens ``prefix:...`` names (None: a local file or no protocol of vdkit's)."""
    return PREFIXES.get(prefix or "")


def protocol_module(driver: str) -> ModuleType:
    """The module implementing protocol ``driver`` (KeyError if vdkit has no such protocol)."""
    mod = _loaded.get(driver)
    if mod is None:
        mod = __import__(PROTOCOLS[driver], fromlist=["name_for_options"])
        _loaded[driver] = mod
    return mod


def name_for_options(driver: str, opts: dict[str, str]) -> str:
    """The file name protocol ``driver`` opens for its options ``opts`` (their checks raise QEMU's texts)."""
    name: str = protocol_module(driver).name_for_options(opts, driver)
    return name


def top_name(driver: str, opts: dict[str, str], filename: str | None, file_driver: str | None) -> str:
    """The name protocol ``driver`` opens as the top node, for its options (``file.filename`` given
    as ``filename``, ``file.driver`` as ``file_driver``; their checks raise QEMU's texts)."""
    mod = protocol_module(driver)
    hook = getattr(mod, "top_options", None)
    if hook is not None:
        opts = hook(opts, filename, file_driver)
    elif filename is not None:
        opts = {**opts, "filename": filename}
    name: str = mod.name_for_options(opts, driver)
    return name


def creates_images(driver: str) -> bool:
    """``qemu-img create`` can make an image on this protocol's names."""
    return hasattr(protocol_module(driver), "create_raw")


def node_format(driver: str) -> str | None:
    """The format a bare node of protocol ``driver`` answers queries as (None: a plain protocol node)."""
    fmt: str | None = getattr(protocol_module(driver), "NODE_FORMAT", None)
    return fmt


def open_blockdev(driver: str, opts: dict[str, object], *, readonly: bool,
                  auto_read_only: bool) -> tuple[object, str, bool]:
    """A ``blockdev-add`` node of protocol ``driver``: (file, node name, read-only)."""
    opener = getattr(protocol_module(driver), "open_blockdev", None)
    if opener is None:
        from vdkit.errors import UnsupportedError

        raise UnsupportedError(f"Driver '{driver}' is not supported by vdkit's blockdev-add")
    result: tuple[object, str, bool] = opener(opts, readonly=readonly, auto_read_only=auto_read_only)
    return result


def open_name(driver: str, name: str, *, readonly: bool, force_share: bool) -> tuple[object, str]:
    """Open ``name`` (one of protocol ``driver``'s ``proto:`` names) as a bare node: (file, node name)."""
    result: tuple[object, str] = protocol_module(driver).open_file(name, readonly=readonly, force_share=force_share,
                                                                   fmt=None)
    return result
