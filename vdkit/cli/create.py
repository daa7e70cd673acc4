"""``vdkit-img create``: qemu-img's option handling, ``Formatting`` line and errors.

The flow follows qemu-img 7.2 step by step because the observable output
depends on it: generic problems (unknown format or parameter, missing size,
backing file checks) are reported *before* the ``Formatting '...'`` line,
driver-level validation *after* it, each error prefixed with the file name.
``-o`` values are parsed by type as QEMU's option parser does, and printed
back in the driver's declaration order, given or default.
"""

from __future__ import annotations

import errno

from vdkit.cli.main import LongOpt, cvtnum, getopt_long, write_out
from vdkit.errors import UnsupportedError, UsageError, VdkitError
from vdkit.opts import CreateOpts, OptDesc, split_options, valid_option_list, with_file_options

LONGOPTS = [LongOpt("help", False, "h"), LongOpt("object", True, "object")]


def main(argv: list[str]) -> int:
    p = getopt_long(argv, ":F:b:f:ho:qu", LONGOPTS)
    options: str | None = None
    for key, value in p.opts:
        if key == "h":
            from vdkit.cli.main import HELP

            write_out(HELP)
            return 0
        if key == "o":
            assert value is not None
            if not valid_option_list(value):
                raise VdkitError(f"Invalid option list: {value}")
            options = value if options is None else f"{options},{value}"
    fmt = p.last("f") or "raw"
    if options is not None and any(n in ("help", "?") for n, _ in split_options(options)):
        write_out(_option_help(fmt, p.args[0] if p.args else None))
        return 0
    if not p.args:
        raise UsageError("Expecting image file name")
    filename = p.args[0]
    img_size: int | None = None
    if len(p.args) > 1:
        img_size = cvtnum("image size", p.args[1])
    if len(p.args) > 2:
        raise UsageError(f"Unexpected argument: {p.args[2]}")
    try:
        img_create(filename, fmt, p.last("b"), p.last("F"), options, img_size,
                   unsafe=p.has("u"), quiet=p.has("q"))
    except VdkitError as exc:
        raise exc.prefixed(f"{filename}: ") from exc
    return 0


def _option_help(fmt: str, filename: str | None) -> str:
    """``-o help``: the options sorted by name; without a file name only the format's own."""
    own = _format_options(fmt)
    table = _with_protocol_options(own, filename) if filename is not None else own
    lines = ["Supported options:" if filename is not None else f"Supported {fmt} options:"]
    for d in sorted(table, key=lambda d: d.name):
        kind = {"string": "str", "size": "size", "number": "num", "bool": "bool (on/off)"}[d.type]
        text = f"  {d.name}=<{kind}>"
        if d.help:
            text = f"{text:<24} - {d.help}"
        lines.append(text)
    if filename is None:
        lines += ["", "The protocol level may support further options.",
                  "Specify the target filename to include those options."]
    return "\n".join(lines) + "\n"


def _format_options(fmt: str) -> list[OptDesc]:
    """The format's own creation options; QEMU's errors for unknown or non-creating formats."""
    from vdkit.formats import registry

    if not registry.is_known(fmt):
        raise VdkitError(f"Unknown file format '{fmt}'")
    if not registry.can_create(fmt):
        raise VdkitError(f"Format driver '{fmt}' does not support image creation")
    own: list[OptDesc] = registry.format_module(fmt).create_options()
    return own


def img_create(
    filename: str,
    fmt: str,
    base_filename: str | None,
    base_fmt: str | None,
    options: str | None,
    img_size: int | None,
    *,
    unsafe: bool,
    quiet: bool,
    driver_prefix: str = "",
) -> None:
    """Everything after argument parsing; errors get the ``<filename>: `` prefix from the caller.

    ``driver_prefix`` goes before the errors of the format's own creation (those after the
    ``Formatting`` line): convert's ``<target>: error while converting <fmt>: ``.
    """
    from vdkit.formats import registry

    own = _format_options(fmt)
    path = _creatable_path(filename)
    opts = CreateOpts(_with_protocol_options(own, filename))
    if options is not None:
        for name, value in split_options(options):
            opts.set(name, value)
    if not opts.has("size"):
        if img_size is not None:
            opts.set_number("size", img_size)
    elif img_size is not None:
        raise VdkitError("The image size must be specified only once")
    if base_filename is not None:
        if "backing_file" not in opts.by_name:
            raise VdkitError(f"Backing file not supported for file format '{fmt}'")
        opts.set("backing_file", base_filename)
    if base_fmt is not None:
        if "backing_fmt" not in opts.by_name:
            raise VdkitError(f"Backing file format not supported for file format '{fmt}'")
        opts.set("backing_fmt", base_fmt)
    backing_file = opts.get("backing_file")
    if isinstance(backing_file, str):
        if backing_file == filename:
            raise VdkitError("Error: Trying to create an image with the same filename as the backing file")
        if backing_file == "":
            raise VdkitError("Expected backing file name, got empty string")
    backing_fmt = opts.get("backing_fmt")
    size = opts.get("size")
    if isinstance(backing_file, str) and not unsafe:
        backing_size = _open_backing(filename, backing_file, backing_fmt if isinstance(backing_fmt, str) else None)
        if size is None:
            size = backing_size
            opts.set_number("size", backing_size)
    elif isinstance(backing_file, str) and backing_fmt is None:
        raise VdkitError("Backing file specified without backing format")
    if size is None:
        raise VdkitError("Image creation needs a size parameter")
    if not quiet:
        write_out(f"Formatting '{filename}', fmt={fmt} {opts.printed()}\n")
    try:
        if path is None:  # a protocol QEMU creates images on by opening them; vdkit opens none
            raise UnsupportedError(f"Protocol '{filename.split(':', 1)[0]}' is not supported by vdkit")
        if path.startswith(_ON_PROTOCOL):
            _create_on_protocol(path[len(_ON_PROTOCOL):], filename, fmt, opts)
        else:
            registry.format_module(fmt).create_image(path, opts)
    except VdkitError as exc:
        if exc.errno == errno.EFBIG:
            hint = " (try using a larger cluster size)" if opts.get("cluster_size") else ""
            exc = VdkitError(f"The image size is too large for file format '{fmt}'{hint}")
        raise exc.prefixed(driver_prefix) from exc


# Protocol drivers of QEMU 7.2 that cannot create images at all (refused before the
# "Formatting" line), by prefix, with the driver name QEMU's message gives.
_NO_CREATE = {"http": "http", "https": "https", "ftp": "ftp", "ftps": "ftps", "blkdebug": "blkdebug",
              "blkverify": "blkverify", "fat": "vvfat", "null-co": "null-co", "null-aio": "null-aio"}


# _creatable_path's answer for a name of a protocol that creates images (+ its driver): an NBD export is
# formatted in place, librbd creates an RBD image (vdkit.protocols.registry's creation entry points)
_ON_PROTOCOL = "\0"


def _creatable_path(filename: str) -> str | None:
    """The local file ``create`` writes for ``filename``; None for a protocol vdkit cannot reach.

    Prefixes are QEMU's: ``file:`` names a local file, unknown prefixes (``json:``
    included) and protocols without image creation fail at once, the others
    (nbd, ssh, iscsi, ...) only when the image would be opened.  The name of
    a protocol vdkit creates images on (an NBD export, an RBD image) gives
    :data:`_ON_PROTOCOL` and the protocol's driver.
    """
    from vdkit.block.chain import QEMU_PROTOCOLS, protocol_of
    from vdkit.protocols import registry as protocols

    proto = protocol_of(filename)
    if proto is None:
        return filename
    if proto == "file":
        return filename[len("file:"):]
    if proto not in QEMU_PROTOCOLS or proto == "json":
        raise VdkitError(f"Unknown protocol '{proto}'")
    if proto in _NO_CREATE:
        raise VdkitError(f"Protocol driver '{_NO_CREATE[proto]}' does not support image creation")
    driver = protocols.driver_for_prefix(proto)
    if driver is not None and protocols.creates_images(driver):
        return _ON_PROTOCOL + driver
    return None


def _with_protocol_options(own: list[OptDesc], filename: str) -> list[OptDesc]:
    """The format's options, then its protocol's: those of a protocol with creation options (rbd), else the
    file driver's."""
    from vdkit.block.chain import protocol_of
    from vdkit.protocols import registry as protocols

    driver = protocols.driver_for_prefix(protocol_of(filename))
    module = None if driver is None else protocols.protocol_module(driver)
    if module is not None and hasattr(module, "create_options"):
        names = {d.name for d in own}
        return own + [d for d in module.create_options() if d.name not in names]
    return with_file_options(own)


def _create_on_protocol(driver: str, filename: str, fmt: str, opts: CreateOpts) -> None:
    """``create`` on a protocol's name: the raw disk is the protocol's own image (raw, or the protocol
    as the top node); a format that writes through protocols (qcow2) gets an empty one and fills it."""
    from vdkit.formats import registry
    from vdkit.protocols import registry as protocols

    proto = protocols.protocol_module(driver)
    if fmt in registry.PASSES_PERMISSIONS or fmt == driver:
        proto.create_raw(filename, opts)
        return
    module = registry.format_module(fmt)
    if not getattr(module, "CREATES_ON_PROTOCOLS", False):
        raise UnsupportedError(f"Creating '{fmt}' images on {proto.CREATE_PLACE} is not supported by vdkit")
    proto.create_for_format(filename, opts)
    module.create_image(filename, opts)  # its create_file() reaches the protocol's image


def _open_backing(filename: str, backing_file: str, backing_fmt: str | None) -> int:
    """Open the backing image (read-only, shared) to check it and learn its size."""
    from vdkit.block.chain import resolve_backing_name
    from vdkit.block.node import open_image

    full = resolve_backing_name(filename, backing_file) or backing_file
    try:
        with open_image(full, backing_fmt, readonly=True, force_share=True, no_io=True) as node:
            detected = node.format
            length = node.driver.virtual_size
    except VdkitError as exc:
        inner = exc.__cause__ if isinstance(exc.__cause__, VdkitError) else exc
        hint = ((inner.hint + "\n") if inner.hint else "") + "Could not open backing image."
        raise VdkitError(inner.message, hint=hint, errno=inner.errno) from exc
    if backing_fmt is None:
        raise VdkitError("Backing file specified without backing format", hint=f"\0Detected format of {detected}.")
    return length


