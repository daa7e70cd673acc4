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
from dataclasses import dataclass

from vdkit.cli.main import write_out
from vdkit.cli.options import LongOpt, SizeRangeError, cvtnum, getopt_long, strtosz
from vdkit.errors import UnsupportedError, UsageError, VdkitError

LONGOPTS = [LongOpt("help", False, "h"), LongOpt("object", True, "object")]


@dataclass(frozen=True)
class OptDesc:
    name: str
    type: str  # "string" | "bool" | "size" | "number"
    default: str | None = None
    help: str = ""


_ENCRYPT = [
    OptDesc("encryption", "bool",
            help="Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    OptDesc("encrypt.format", "string", help="Encrypt the image, format choices: 'aes', 'luks'"),
    OptDesc("encrypt.key-secret", "string", help="ID of secret providing qcow AES key or LUKS passphrase"),
    OptDesc("encrypt.cipher-alg", "string", help="Name of encryption cipher algorithm"),
    OptDesc("encrypt.cipher-mode", "string", help="Name of encryption cipher mode"),
    OptDesc("encrypt.ivgen-alg", "string", help="Name of IV generator algorithm"),
    OptDesc("encrypt.ivgen-hash-alg", "string", help="Name of IV generator hash algorithm"),
    OptDesc("encrypt.hash-alg", "string", help="Name of encryption hash algorithm"),
    OptDesc("encrypt.iter-time", "number", help="Time to spend in PBKDF in milliseconds"),
]
# The file protocol's options, appended after the format's own (duplicates merged).
_FILE_OPTS = [
    OptDesc("size", "size", help="Virtual disk size"),
    OptDesc("nocow", "bool", help="Turn off copy-on-write (valid only on btrfs)"),
    OptDesc("preallocation", "string", help="Preallocation mode (allowed values: off, falloc, full)"),
    OptDesc("extent_size_hint", "size", help="Extent size hint for the image file, 0 to disable"),
]
QCOW2_OPTS = _ENCRYPT + [
    OptDesc("cluster_size", "size", "65536", "qcow2 cluster size"),
    OptDesc("extended_l2", "bool", "off", "Extended L2 tables"),
    OptDesc("preallocation", "string", None, "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    OptDesc("compression_type", "string", "zlib", "Compression method used for image cluster compression"),
    OptDesc("size", "size", None, "Virtual disk size"),
    OptDesc("compat", "string", None, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc("backing_file", "string", None, "File name of a base image"),
    OptDesc("backing_fmt", "string", None, "Image format of the base image"),
    OptDesc("data_file", "string", None, "File name of an external data file"),
    OptDesc("data_file_raw", "bool", None, "The external data file must stay valid as a raw image"),
    OptDesc("lazy_refcounts", "bool", "off", "Postpone refcount updates"),
    OptDesc("refcount_bits", "number", "16", "Width of a reference count entry in bits"),
]
RAW_OPTS = [OptDesc("size", "size", None, "Virtual disk size")]


def option_table(fmt: str) -> list[OptDesc]:
    own = QCOW2_OPTS if fmt == "qcow2" else RAW_OPTS
    names = {d.name for d in own}
    return own + [d for d in _FILE_OPTS if d.name not in names]


class CreateOpts:
    """The parsed ``-o`` list: last value wins, printed in declaration order."""

    def __init__(self, table: list[OptDesc]) -> None:
        self.table = table
        self.by_name = {d.name: d for d in table}
        self.raw: dict[str, str] = {}
        self.value: dict[str, int | bool | str] = {}

    def set(self, name: str, text: str) -> None:
        desc = self.by_name.get(name)
        if desc is None:
            raise VdkitError(f"Invalid parameter '{name}'")
        self.value[name] = parse_value(desc, text)
        self.raw[name] = text

    def set_number(self, name: str, value: int) -> None:
        self.value[name] = value
        self.raw[name] = str(value)

    def get(self, name: str, default: int | bool | str | None = None) -> int | bool | str | None:
        if name in self.value:
            return self.value[name]
        desc = self.by_name.get(name)
        if desc is not None and desc.default is not None:
            return parse_value(desc, desc.default)
        return default

    def has(self, name: str) -> bool:
        return name in self.value

    def printed(self) -> str:
        parts = []
        for d in self.table:
            given = d.name in self.value
            text = self.raw[d.name] if given else d.default
            if text is None:
                continue
            if d.type == "string":
                parts.append(f"{d.name}={text.replace(',', ',,')}")
            elif d.type in ("size", "number") and given:
                v = int(self.value[d.name])
                parts.append(f"{d.name}={v - 2**64 if v >= 2**63 else v}")
            else:
                parts.append(f"{d.name}={text}")
        return " ".join(parts)


_SIZE_HINT = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n"
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def parse_value(desc: OptDesc, text: str) -> int | bool | str:
    if desc.type == "bool":
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise VdkitError(f"Parameter '{desc.name}' expects 'on' or 'off'")
    if desc.type == "size":
        try:
            return strtosz(text)
        except SizeRangeError:
            raise VdkitError(f"Value '{text}' is out of range for parameter '{desc.name}'") from None
        except ValueError:
            raise VdkitError(
                f"Parameter '{desc.name}' expects a non-negative number below 2^64", hint=_SIZE_HINT
            ) from None
    if desc.type == "number":
        try:
            value = int(text.strip(), 0)
        except ValueError:
            raise VdkitError(f"Parameter '{desc.name}' expects a number") from None
        if not 0 <= value < 2**64:
            raise VdkitError(f"Value '{text}' is out of range for parameter '{desc.name}'")
        return value
    return text


def split_options(text: str) -> list[tuple[str, str]]:
    """``a=b,c=d`` with ``,,`` standing for a literal comma inside a value."""
    out: list[tuple[str, str]] = []
    i = 0
    n = len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        name = text[i:j]
        if j < n and text[j] == "=":
            j += 1
            buf = []
            while j < n:
                if text[j] == ",":
                    if text[j + 1 : j + 2] == ",":
                        buf.append(",")
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            value = "".join(buf)
        else:
            value = "off" if name.startswith("no") else "on"
            name = name[2:] if name.startswith("no") else name
        out.append((name, value))
        i = j + 1
    return out


def _valid_option_list(text: str) -> bool:
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


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
            if not _valid_option_list(value):
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
    from vdkit.formats.probe import SUPPORTED_FORMATS

    if fmt not in SUPPORTED_FORMATS:
        raise VdkitError(f"Unknown file format '{fmt}'")
    table = option_table(fmt) if filename is not None else (QCOW2_OPTS if fmt == "qcow2" else RAW_OPTS)
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
) -> None:
    """Everything after argument parsing; errors get the ``<filename>: `` prefix from the caller."""
    from vdkit.formats.probe import SUPPORTED_FORMATS

    if fmt not in SUPPORTED_FORMATS:
        raise VdkitError(f"Unknown file format '{fmt}'")
    path = _creatable_path(filename)
    opts = CreateOpts(option_table(fmt))
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
        if fmt == "qcow2":
            _create_qcow2(path, opts)
        else:
            from vdkit.formats.raw import create_raw

            _no_encryption(opts)
            create_raw(path, int(opts.get("size") or 0), str(opts.get("preallocation", "off")))
    except VdkitError as exc:
        if exc.errno == errno.EFBIG:
            hint = " (try using a larger cluster size)" if opts.get("cluster_size") else ""
            raise VdkitError(f"The image size is too large for file format '{fmt}'{hint}") from exc
        raise


# Protocol drivers of QEMU 7.2 that cannot create images at all (refused before the
# "Formatting" line), by prefix, with the driver name QEMU's message gives.
_NO_CREATE = {"http": "http", "https": "https", "ftp": "ftp", "ftps": "ftps", "blkdebug": "blkdebug",
              "blkverify": "blkverify", "fat": "vvfat", "null-co": "null-co", "null-aio": "null-aio"}


def _creatable_path(filename: str) -> str | None:
    """The local file ``create`` writes for ``filename``; None for a protocol vdkit cannot reach.

    Prefixes are QEMU's: ``file:`` names a local file, unknown prefixes (``json:``
    included) and protocols without image creation fail at once, the others
    (nbd, ssh, iscsi, ...) only when the image would be opened.
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
    return None


def _open_backing(filename: str, backing_file: str, backing_fmt: str | None) -> int:
    """Open the backing image (read-only, shared) to check it and learn its size."""
    from vdkit.block.chain import resolve_backing_name
    from vdkit.block.node import open_image

    full = resolve_backing_name(filename, backing_file) or backing_file
    try:
        with open_image(full, backing_fmt, readonly=True, force_share=True) as node:
            detected = node.format
            length = node.driver.virtual_size
    except VdkitError as exc:
        inner = exc.__cause__ if isinstance(exc.__cause__, VdkitError) else exc
        hint = ((inner.hint + "\n") if inner.hint else "") + "Could not open backing image."
        raise VdkitError(inner.message, hint=hint, errno=inner.errno) from exc
    if backing_fmt is None:
        raise VdkitError("Backing file specified without backing format", hint=f"\0Detected format of {detected}.")
    return length


def _no_encryption(opts: CreateOpts) -> None:
    if any(name.startswith("encrypt") and opts.value[name] is not False for name in opts.value):
        raise VdkitError("Creating encrypted images is not supported by vdkit")


_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


def _create_qcow2(filename: str, opts: CreateOpts) -> None:
    import os

    from vdkit.formats.qcow2.create import Qcow2CreateOptions, create_file, create_qcow2

    # qemu-img creates (and locks) the file before it validates the options,
    # and removes it again when they are refused; a locked file stays as it is.
    file = create_file(filename)
    try:
        _no_encryption(opts)
        compat = opts.get("compat")
        if compat is not None and compat not in _VERSIONS:
            raise VdkitError(f"Parameter 'version' does not accept value '{compat}'")
        prealloc = str(opts.get("preallocation", "off"))
        if prealloc not in ("off", "metadata", "falloc", "full"):
            raise VdkitError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
        compression = str(opts.get("compression_type"))
        if compression not in ("zlib", "zstd"):
            raise VdkitError(f"Parameter 'compression-type' does not accept value '{compression}'")
        backing = opts.get("backing_file")
        backing_fmt = opts.get("backing_fmt")
        data_file = opts.get("data_file")
        o = Qcow2CreateOptions(
            size=int(opts.get("size") or 0),
            version=_VERSIONS[str(compat)] if compat is not None else 3,
            cluster_size=int(opts.get("cluster_size") or 0),
            refcount_bits=int(opts.get("refcount_bits") or 0),
            lazy_refcounts=bool(opts.get("lazy_refcounts")),
            extended_l2=bool(opts.get("extended_l2")),
            compression_type=compression,
            preallocation=prealloc,
            backing_file=str(backing) if backing is not None else None,
            backing_fmt=str(backing_fmt) if backing_fmt is not None else None,
            data_file=str(data_file) if data_file is not None else None,
            data_file_raw=bool(opts.get("data_file_raw", False)),
        )
    except VdkitError:
        file.close()
        try:
            os.unlink(filename)
        except OSError:
            pass
        raise
    create_qcow2(filename, o, file)
