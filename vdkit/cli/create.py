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

from vdkit.cli.main import write_out
from vdkit.cli.options import LongOpt, cvtnum, getopt_long
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
        if path is _NBD:
            _create_on_nbd(filename, fmt, opts)
        elif path is _RBD:
            _create_on_rbd(filename, fmt, opts)
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


_NBD = "\0nbd"  # _creatable_path's answer for an NBD name: the export is formatted in place
_RBD = "\0rbd"  # _creatable_path's answer for an rbd name: librbd creates the image


def _creatable_path(filename: str) -> str | None:
    """The local file ``create`` writes for ``filename``; None for a protocol vdkit cannot reach.

    Prefixes are QEMU's: ``file:`` names a local file, unknown prefixes (``json:``
    included) and protocols without image creation fail at once, the others
    (nbd, ssh, iscsi, ...) only when the image would be opened.  An NBD name
    gives :data:`_NBD`: the existing export is opened and formatted.
    """
    from vdkit.block.chain import QEMU_PROTOCOLS, protocol_of

    proto = protocol_of(filename)
    if proto is None:
        return filename
    if proto == "file":
        return filename[len("file:"):]
    if proto not in QEMU_PROTOCOLS or proto == "json":
        raise VdkitError(f"Unknown protocol '{proto}'")
    if proto in _NO_CREATE:
        raise VdkitError(f"Protocol driver '{_NO_CREATE[proto]}' does not support image creation")
    if proto in ("nbd", "nbd+unix", "nbd+tcp"):
        return _NBD
    if proto == "rbd":
        return _RBD
    return None


def _with_protocol_options(own: list[OptDesc], filename: str) -> list[OptDesc]:
    """The format's options, then its protocol's: the rbd driver's for an rbd name, else the file driver's."""
    from vdkit.block.chain import protocol_of

    if protocol_of(filename) == "rbd":
        from vdkit.protocols.rbd import create_options

        names = {d.name for d in own}
        return own + [d for d in create_options() if d.name not in names]
    return with_file_options(own)


def _create_on_rbd(filename: str, fmt: str, opts: CreateOpts) -> None:
    """``create`` on an rbd name: a new RBD image holding the raw disk (``vdkit.protocols.rbd``)."""
    from vdkit.formats import registry
    from vdkit.protocols.rbd import create_image

    if fmt not in ("raw", "rbd", "qcow2"):
        raise UnsupportedError(f"Creating '{fmt}' images on RBD is not supported by vdkit")
    if fmt != "qcow2" and opts.get("encrypt.format") is not None:
        raise UnsupportedError("RBD encryption (encrypt.format) is not supported by vdkit")
    if fmt != "qcow2":
        cluster = opts.get("cluster_size")
        create_image(filename, int(opts.get("size") or 0), int(cluster) if cluster is not None else None)
        return
    # qcow2 on rbd: an empty RBD image that grows as qcow2 writes its clusters, as in QEMU
    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in ("off", "metadata"):
        raise UnsupportedError(f"Preallocation mode '{prealloc}' on RBD is not supported by vdkit")
    if opts.get("data_file") is not None:
        raise UnsupportedError("A qcow2 data file next to an RBD image is not supported by vdkit")
    create_image(filename, 0)
    registry.format_module(fmt).create_image(filename, opts)


def _create_on_nbd(filename: str, fmt: str, opts: CreateOpts) -> None:
    """``create`` on an NBD export, as qemu-img: the nbd driver cannot create images.

    QEMU's fallback opens the export, checks its size and zeroes the first
    sector (:func:`vdkit.protocols.nbd.create_fallback`); a raw image is then
    complete, a qcow2 one is written into the export by its creation code.
    """
    from vdkit.formats import registry
    from vdkit.protocols.nbd import create_fallback

    if fmt not in ("raw", "qcow2", "nbd"):
        raise UnsupportedError(f"Creating '{fmt}' images on NBD exports is not supported by vdkit")
    prealloc = str(opts.get("preallocation", "off"))
    if fmt in ("raw", "nbd"):
        if prealloc != "off":  # QEMU's fallback takes none
            raise VdkitError(f"Unsupported preallocation mode '{prealloc}'")
        # the raw image is the export: it must be as large as the image
        create_fallback(filename, -(-int(opts.get("size") or 0) // 512) * 512)
        return
    if prealloc not in ("off", "metadata"):
        raise UnsupportedError(f"Preallocation mode '{prealloc}' on NBD exports is not supported by vdkit")
    if opts.get("data_file") is not None:
        raise UnsupportedError("A qcow2 data file next to an NBD export is not supported by vdkit")
    create_fallback(filename, 0)  # qcow2 asks the protocol for an empty file: any export size will do
    registry.format_module(fmt).create_image(filename, opts)  # create_file() connects to the export


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


