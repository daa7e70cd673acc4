"""Every image format vdkit knows, by name, imported only when used.

A format is one module (or package) named here.  Adding a format is one new
folder under ``vdkit/formats/`` plus one line in :data:`FORMATS`.  The module
provides these entry points (only ``probe`` and ``open_driver`` are required):

``FORMAT_NAME: str``
    The name qemu-img uses (``-f``/``-O``).
``probe(head: bytes, filename: str) -> int``
    A score from 0 (not this format) to 100, from the file's first
    :data:`PROBE_SIZE` bytes and its name, as QEMU's ``bdrv_probe``.  It must be
    cheap to import: every ``vdkit-img info`` probes with all formats.
``open_driver(file: ImageFile, ctx: OpenContext) -> FormatDriver``
    Open the image on ``file``; import the heavy code here, not at module level.
``create_options() -> list[OptDesc]`` and ``create_image(filename: str, opts: CreateOpts) -> None``
    Image creation (``qemu-img create`` / ``convert -O``); a format without
    them is refused with QEMU's "does not support image creation".  (Not
    ``create``: importing a submodule ``<fmt>/create.py`` would rebind that
    name in the package.)
``NAME_REQUIRED: str``
    A protocol opened as the top node (``-f nbd``, ``-f rbd``) opens only that
    protocol's names; this is the error for any other name.
``RUNTIME_OPTIONS: frozenset[str]``
    The format's own open options (QEMU's ``runtime_opts``) that ``-drive``,
    ``--image-opts`` and ``json:`` names may carry and vdkit accepts without
    effect (cache sizes, discard passing...).  Any other option a layer does
    not take is refused with QEMU's "does not support the option".
``window_name(opts) -> (name, top format, file prefix) | None``, ``WINDOW_OPTIONS: tuple[str, ...]`` and
``open_window(name, readonly, force_share) -> file | None``
    A format whose options make its node a window into the file below (raw's
    ``offset``/``size``), named ``json:{...}`` by them as QEMU names it.
    ``window_name`` reads the flattened ``--image-opts``/``json:``/``-drive``
    options of a node chain whose top (``driver``) or file child
    (``file.driver``) is this format, takes the options it uses out of them and
    returns the name the chain opens under (None: no window here);
    ``WINDOW_OPTIONS`` are the ``-drive`` keys that make a drive of this format
    a window; ``open_window`` opens such a name as a file the format above
    reads.  Front ends ask :func:`window_name`, :func:`window_options` and
    :func:`open_window` here, never the format by name.

Formats QEMU detects but vdkit does not implement yet are still recognised by
their magic (:data:`_NOT_IMPLEMENTED`) and refused by name, instead of being
read as raw data.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from types import ModuleType

    from vdkit.block.driver import FormatDriver, OpenContext
    from vdkit.io.file import ImageFile

PROBE_SIZE = 2048

# name -> module; probing asks them in this order and the first highest score wins (QEMU's rule).
FORMATS: dict[str, str] = {
    "raw": "vdkit.formats.raw",
    "qcow2": "vdkit.formats.qcow2",
    "vhdx": "vdkit.formats.vhdx",
    "vpc": "vdkit.formats.vpc",
    "vdi": "vdkit.formats.vdi",
    "qed": "vdkit.formats.qed",
    "parallels": "vdkit.formats.parallels",
    "bochs": "vdkit.formats.bochs",
    "cloop": "vdkit.formats.cloop",
    "dmg": "vdkit.formats.dmg",
    "luks": "vdkit.formats.luks",
    "vmdk": "vdkit.formats.vmdk",
    "nbd": "vdkit.formats.nbd",  # the nbd protocol as the top node (no format layer); never probed
    "http": "vdkit.formats.http",  # the curl protocols as the top node (no format layer); never probed
    "https": "vdkit.formats.http",
    "rbd": "vdkit.formats.rbd",  # the rbd protocol as the top node (no format layer); never probed
    "blkdebug": "vdkit.formats.blkdebug",  # error injection as the top node (no format layer); never probed
}

# What a format's first bytes (or its file name) must show for its probe to score at all, so that probing
# imports only the modules that can answer: importing all of them costs a third of a bare interpreter
# start, paid by every ``vdkit-img info``.  ``(offset, prefixes)``: one of the byte strings at that offset;
# a string: the file name's suffix; None: never probed (protocols, and raw: the answer when nothing scores).
# A format missing here is always asked.  tests/unit/test_probe_gates.py holds every gate to its probe.
PROBE_GATES: dict[str, tuple[int, tuple[bytes, ...]] | str | None] = {
    "raw": None,
    "qcow2": (0, (b"QFI\xfb",)),
    "vhdx": (0, (b"vhdxfile",)),
    "vpc": (0, (b"conectix",)),
    "vdi": (0x40, (b"\x7f\x10\xda\xbe",)),
    "qed": (0, (b"QED\0",)),
    "parallels": (0, (b"WithoutFreeSpace", b"WithouFreSpacExt")),
    "bochs": (0, (b"Bochs Virtual HD Image\0",)),
    "cloop": (0, (b"#!/bin/sh\n",)),
    "dmg": ".dmg",
    "luks": (0, (b"LUKS\xba\xbe",)),
    "vmdk": (0, (b"KDMV", b"COWD", b"#", b" ", b"version=")),  # sparse magics; a descriptor's first line
    "nbd": None,
    "http": None,
    "https": None,
    "rbd": None,
    "blkdebug": None,
}

# QEMU's strong runtime options: open options that change what the image reads as (keys, size rules), so a
# node opened with them is named ``json:{...}`` with them, and an option naming one without ``driver`` makes
# the format be probed (another format refuses it).  Kept here, not in the format modules, so that
# ``--image-opts`` learns which format owns a key without importing every format.
STRONG_OPTIONS: dict[str, tuple[str, ...]] = {
    "qcow2": ("encrypt.key-secret",),
    "luks": ("key-secret",),
    "vpc": ("force_size_calc",),
}

# Formats recognised by their magic only, so that they are refused by name rather than read as raw.
_NOT_IMPLEMENTED: tuple[tuple[bytes, str], ...] = (
)

_loaded: dict[str, ModuleType] = {}


# Formats whose file is the guest data as-is (QEMU's raw, whose file child is filter-like): the file's
# lock takes the user's permissions unchanged.  Every other format keeps metadata in its file and refuses
# others' writes and resizes while open (vdkit.io.file.LockMode.for_image), writes it at open (so needs a
# writable file) and makes a resize of its file a permission conflict (monitor.graph_cmds asks these).
PASSES_PERMISSIONS = frozenset({"raw"})


def format_names() -> tuple[str, ...]:
    """The formats vdkit can open, in registration order."""
    return tuple(FORMATS)


def is_known(name: str) -> bool:
    return name in FORMATS


def format_module(name: str) -> ModuleType:
    """The module implementing ``name`` (KeyError if vdkit has no such format)."""
    mod = _loaded.get(name)
    if mod is None:
        path = FORMATS[name]
        mod = __import__(path, fromlist=["probe"])
        _loaded[name] = mod
    return mod


PROBE_FALLBACK = "raw"
"""What probing answers when no format scores (QEMU's rule): a guess, not a recognised signature."""


def probe_format(head: bytes, filename: str = "") -> str:
    """Name of the format of an image whose first bytes are ``head`` (highest score wins)."""
    best, best_score = PROBE_FALLBACK, 0
    for name in FORMATS:
        if not may_probe(name, head, filename):
            continue
        score = format_module(name).probe(head, filename)
        if score > best_score:
            best, best_score = name, score
    if best == PROBE_FALLBACK:
        if head[:4] == b"QFI\xfb" and int.from_bytes(head[4:8], "big") == 1:
            return "qcow"
        for magic, other in _NOT_IMPLEMENTED:
            if other not in FORMATS and head.startswith(magic):
                return other
        if "vdi" not in FORMATS and head[0x40:0x44] == b"\x7f\x10\xda\xbe":
            return "vdi"
    return best


def may_probe(name: str, head: bytes, filename: str) -> bool:
    """False when asking format ``name``'s probe cannot change what probing answers (``PROBE_GATES``)."""
    gate = PROBE_GATES.get(name, (0, (b"",)))
    if gate is None:
        return False
    if isinstance(gate, str):
        return filename.endswith(gate)
    offset, prefixes = gate
    return head.startswith(prefixes, offset)


def open_driver(name: str, file: ImageFile, ctx: OpenContext) -> FormatDriver:
    """Open ``file`` as format ``name``."""
    from vdkit.errors import UnsupportedError

    if name not in FORMATS:
        raise UnsupportedError(f"Image format '{name}' is not supported by vdkit")
    driver: FormatDriver = format_module(name).open_driver(file, ctx)
    return driver


def runtime_options(name: str) -> frozenset[str]:
    """The open options format ``name`` accepts beyond the common ones (empty: none, or no such format)."""
    if name not in FORMATS:
        return frozenset()
    options: frozenset[str] = getattr(format_module(name), "RUNTIME_OPTIONS", frozenset())
    return options


def can_create(name: str) -> bool:
    return hasattr(format_module(name), "create_image")


def _window_owners() -> dict[str, str]:
    """A name :func:`window_name` gave -> the format that made it, in the current open scope
    (:mod:`vdkit.block.secrets`)."""
    from vdkit.block.secrets import table

    return table("window-owners")


def window_name(opts: dict[str, object]) -> tuple[str, str, str, str] | None:
    """The window a node chain's flattened options describe (the ``window_name`` slot), asked of the top
    node's format, then of its ``file`` child's (QEMU opens the top first): ``(name, top format, key
    prefix of the file node's options, the windowing format)``, or None when neither has a window
    there.  Only named, registered formats are imported."""
    for key in ("driver", "file.driver"):
        name = opts.get(key)
        if not isinstance(name, str) or name not in FORMATS:
            continue
        slot = getattr(format_module(name), "window_name", None)
        if slot is None:
            continue
        window: tuple[str, str, str] | None = slot(opts)
        if window is None:
            return None
        _window_owners()[window[0]] = name
        return (*window, name)
    return None


def window_options(name: str | None) -> tuple[str, ...]:
    """The ``-drive`` keys that make a drive of format ``name`` a window (empty: none, or no such format)."""
    if name is None or name not in FORMATS:
        return ()
    keys: tuple[str, ...] = getattr(format_module(name), "WINDOW_OPTIONS", ())
    return keys


def open_window(name: str, readonly: bool, force_share: bool) -> object | None:
    """The file a name :func:`window_name` gave opens as (the windowing format's ``open_window``);
    None for any other name."""
    owner = _window_owners().get(name)
    if owner is None:
        return None
    file: object | None = format_module(owner).open_window(name, readonly, force_share)
    return file
