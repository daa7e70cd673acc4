"""The raw format: the file is the disk."""

from __future__ import annotations

from vdkit.block.driver import FormatDriver

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import BlockStatus, OpenContext
    from vdkit.block.node import Node
    from vdkit.block.target import Target
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, OptDesc

FORMAT_NAME = "raw"


def probe(head: bytes, filename: str) -> int:
    """Anything is raw data: the lowest score, so every real format wins over it (as in QEMU)."""
    return 1


def open_driver(file: ImageFile, ctx: OpenContext) -> RawDriver:
    guest_data = getattr(file, "guest_data_only", None)
    if guest_data is not None:  # a filter telling guest data from metadata (blkdebug): here it all is
        guest_data()
    proto = getattr(file, "protocol_driver", None)
    if proto is not None:  # raw over a protocol whose node answers as a format (RBD): its snapshots pass up
        from vdkit.protocols.registry import is_protocol, node_format

        fmt = node_format(proto) if is_protocol(proto) else None
        if fmt is not None:
            from vdkit.formats.registry import format_module

            driver: RawDriver = format_module(fmt).raw_driver(file)
            return driver
    return RawDriver(file)


def create_options() -> list[OptDesc]:
    from vdkit.opts import OptDesc

    return [OptDesc("size", "size", None, "Virtual disk size")]


def create_image(filename: str, opts: CreateOpts) -> None:
    from vdkit.opts import refuse_encryption

    refuse_encryption(opts)
    create_file(filename, opts, int(opts.get("size") or 0))


def create_file(filename: str, opts: CreateOpts, size: int = 0) -> None:
    """The file protocol's part of creating any image: the ``preallocation`` option checked, then
    the file created (or emptied) at ``size`` with it, before the format writes its own structures.

    A value that is not a preallocation mode at all is refused before the file is touched;
    ``metadata`` is a mode, which a file cannot do: :func:`create_raw` refuses it once the file
    is emptied, as QEMU does.
    """
    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in ("off", "metadata", "falloc", "full"):
        from vdkit.errors import VdkitError

        raise VdkitError(f"invalid parameter value: {prealloc}")
    create_raw(filename, size, prealloc)


_PROBED_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, "
    "write operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
)


class RawDriver(FormatDriver):
    format_name = "raw"
    slow_allocated_zeroes = True
    plain_data = True

    def probed_open_warning(self, name: str) -> str | None:
        """QEMU's raw driver warns as it opens a probed image writable: a guest could write a header
        that makes the next probe see another format.  It names the protocol node: the given name,
        except for protocols that name their nodes themselves (``node_name``: an rbd image's ``json:``)."""
        file = self.file
        return _PROBED_WARNING.format(file.filename if hasattr(file, "node_name") else name)

    @property
    def virtual_size(self) -> int:
        # The block layer counts whole 512-byte sectors, so a 1000-byte file
        # is a 1024-byte disk (the tail reads as zeros).
        return (self.file.size() + 511) // 512 * 512

    @property
    def dirty(self) -> bool | None:
        """QEMU asks the protocol node: a local file answers (not dirty), an NBD export does not."""
        return False if getattr(self.file, "has_info", True) else None

    def read(self, offset: int, length: int, backing: object = None) -> bytes:
        return self.file.pread(offset, length)

    def readinto(self, offset: int, view: memoryview, backing: object = None) -> None:
        self.file.readinto(offset, view)

    def write(self, offset: int, data: bytes, backing: object = None) -> None:
        self.file.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int, backing: object = None, *, unmap: bool = False) -> None:
        zero = getattr(self.file, "write_zeroes", None)
        if zero is not None:  # an NBD export: the server zeroes, trimming only when allowed to
            zero(offset, length, unmap=unmap)
            return
        self.file.punch_hole(offset, length)

    def copy_target(self, node: Node, *, created: bool, target_is_zero: bool, has_backing: bool,
                    compressed: bool) -> Target:
        """The file itself: data written (or copied file to file) as it is, zero ranges punched out.
        A device is not zeroed by its "creation" (it keeps its old bytes), nor is an NBD export
        (``NbdFile.creates_zeroed``): zeros are written there unless ``--target-is-zero`` says so."""
        from vdkit.block.target import RawTarget

        fresh = not self.file.is_device and getattr(self.file, "creates_zeroed", True)
        return RawTarget(node, has_zero_init=target_is_zero or created and fresh)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """Data or hole at ``offset``, from SEEK_DATA/SEEK_HOLE as QEMU's file driver asks."""
        return self.file.block_status(offset, length)

    def truncate(self, size: int, prealloc: str = "off", *, backing: object = None, backing_size: int = 0) -> None:
        """The file is the disk: set its length (QEMU's file driver: off, falloc and full only)."""
        import os

        from vdkit.errors import VdkitError

        f = self.file
        exact = getattr(f, "truncate_exact", None)
        if exact is not None:  # an NBD export: "Cannot resize NBD nodes" unless the size stays
            exact(size)
            return
        if f.is_device:
            # a device has the size it has: only "resizing" to that size succeeds (QEMU's texts)
            if prealloc != "off":
                raise VdkitError(f"Preallocation mode '{prealloc}' unsupported for this non-regular file")
            if size != f.size():
                import errno

                raise VdkitError("Cannot resize device files", errno=errno.ENOTSUP)
            return
        if prealloc == "metadata":
            raise VdkitError("Unsupported preallocation mode: metadata")
        old = f.size()
        if prealloc == "falloc" and size > old:
            os.posix_fallocate(f.fd, old, size - old)
        elif prealloc == "full" and size > old:
            pos = old
            chunk = bytes(1 << 20)
            while pos < size:
                n = min(len(chunk), size - pos)
                f.pwrite(pos, chunk[:n])
                pos += n
        f.truncate(size)


def create_raw(filename: str, size: int, preallocation: str = "off") -> None:
    """Create (or truncate) ``filename`` as a raw image of ``size`` bytes, rounded up to 512.

    Like qemu-img, a failed raw creation leaves the (emptied) file behind;
    a size the file system refuses is reported as "too large" by the caller
    (``errno`` is EFBIG on the error).
    """
    import os

    from vdkit.errors import VdkitError, os_error_message
    from vdkit.io.file import ImageFile

    size = -(-size // 512) * 512
    try:
        os.close(os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as exc:
        raise VdkitError(f"Could not create '{filename}': {os_error_message(exc)}", errno=exc.errno) from exc
    with ImageFile(filename, readonly=False) as f:  # the write lock, before anything is changed
        fd = f.fd
        if f.is_device:
            # a block or character device is written in place, never truncated: it must be large
            # enough already, and nothing can be preallocated on it (QEMU's texts)
            if preallocation != "off":
                raise VdkitError(f"Unsupported preallocation mode '{preallocation}'")
            f.truncate(size)  # "Cannot grow device files" when the device is too small
            if size:
                # QEMU zeroes the first sector of a device (4 KiB of a new file), whatever the
                # device's block size (observed with 512- and 4096-byte loop devices)
                f.pwrite(0, bytes(min(size, 512)))
            return
        os.ftruncate(fd, 0)
        if preallocation not in ("off", "falloc", "full"):
            raise VdkitError(f"Unsupported preallocation mode: {preallocation}")
        try:
            if preallocation == "falloc" and size:
                os.posix_fallocate(fd, 0, size)
            elif preallocation == "full" and size:
                chunk = bytes(1 << 20)
                pos = 0
                while pos < size:
                    pos += os.pwrite(fd, chunk[: min(len(chunk), size - pos)], pos)
            os.ftruncate(fd, size)
            if size and preallocation != "full":
                # Like QEMU, allocate the first block with real zeros: block-status
                # users (map, convert) then see data there, and the host file
                # system's alignment can be probed on it.
                os.pwrite(fd, bytes(min(size, 4096)), 0)
        except OSError as exc:
            raise VdkitError(f"Could not resize file: {os_error_message(exc)}", errno=exc.errno) from exc


# -- raw's offset/size options: a window into the file below (the registry's window slots) ---------

WINDOW_OPTIONS = ("offset", "size")
"""The ``-drive`` options that make a raw drive a window (``registry.window_options``)."""

def _windows() -> dict[str, tuple[str, list[tuple[int, int | None, str]]]]:
    """The name a windowed raw node gets (QEMU's ``json:{...}``) -> (the file's name, the windows from the
    file up: (offset, size or None, the raw node's own name)), in the current open scope
    (:mod:`vdkit.block.secrets`).  :func:`window_name` fills it from the options; :func:`open_window`
    opens such a name (``vdkit.block.node`` asks ``registry.open_window``)."""
    from vdkit.block.secrets import table

    return table("raw-windows")


def _size_option(key: str, value: object) -> int:
    """A size option as QEMU's visitor takes it: a JSON integer, or a string with QEMU's size syntax."""
    from vdkit.errors import OpenError
    from vdkit.opts import _SIZE_HINT, strtosz

    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64:
        return value
    if isinstance(value, str):
        try:
            return strtosz(value)
        except ValueError:
            pass
    raise OpenError(f"Parameter '{key}' expects a non-negative number below 2^64", hint=_SIZE_HINT)


def window_name(opts: dict[str, object]) -> tuple[str, str, str] | None:
    """Raw nodes with ``offset``/``size`` (or stacked raw nodes) in flattened options -> (name, format, prefix).

    The registry's ``window_name`` slot (asked by ``--image-opts``, ``json:`` names and ``-drive``
    through ``registry.window_name``).  Each ``raw`` node down the ``file`` chain from the top (or
    from a format's ``file`` child) is a window into the one below.  Returns None when no raw node
    has a windowed meaning; else the ``json:{...}`` name QEMU gives the top node (keys as given,
    values with their types), its format and the key prefix of the file node's options
    (``file.file.``...).  The options used are removed from ``opts``.  Errors are QEMU's texts.
    :func:`_windows` remembers how to open the name (:class:`RawWindow`, one per raw node).
    """
    from vdkit.errors import OpenError, UnsupportedError

    top = opts.get("driver")
    prefix = "" if top == FORMAT_NAME else "file."
    if opts.get(prefix + "driver") != FORMAT_NAME:
        return None
    levels: list[tuple[str, dict[str, object]]] = []
    while opts.get(prefix + "driver") == FORMAT_NAME:
        strong = {k: opts[prefix + k] for k in WINDOW_OPTIONS if prefix + k in opts}
        levels.append((prefix, strong))
        prefix += "file."
    if len(levels) == 1 and not levels[0][1] and top == FORMAT_NAME:
        return None  # a plain raw node
    if not isinstance(top, str):
        raise UnsupportedError("A raw file child under a probed format is not supported by vdkit")
    below = opts.get(prefix + "driver", "file")
    if below != "file":
        raise UnsupportedError(f"A raw node over '{below}' is not supported by vdkit")
    filename = opts.get(prefix + "filename")
    if not isinstance(filename, str):
        raise OpenError("The 'file' block driver requires a file name")
    from vdkit.info.render_json import dumps_compact

    windows: list[tuple[int, int | None, str]] = []
    desc: dict[str, object] = {"driver": "file", "filename": filename}
    for level_prefix, strong in reversed(levels):
        offset = _size_option("offset", strong["offset"]) if "offset" in strong else 0
        size = _size_option("size", strong["size"]) if "size" in strong else None
        node: dict[str, object] = {}
        if "offset" in strong:
            node["offset"] = strong["offset"]
        node["driver"] = FORMAT_NAME
        if "size" in strong:
            node["size"] = strong["size"]
        node["file"] = desc
        desc = node
        windows.append((offset, size, "json:" + dumps_compact(desc)))
        for k in ("driver", *WINDOW_OPTIONS):
            opts.pop(level_prefix + k, None)
    for k in ("driver", "filename"):
        opts.pop(prefix + k, None)
    if top != FORMAT_NAME:
        desc = {"driver": top, "file": desc}
        opts.pop("driver", None)
    name = "json:" + dumps_compact(desc)
    _windows()[name] = (filename, windows)
    return name, top, prefix


class RawWindow:
    """``[offset, offset+size)`` of the file below, seen as a whole file (raw's offset/size options).

    Everything a format driver or the copy engine asks of a file goes through here; what this
    class does not define (locks, flags) is the file's.
    """

    def __init__(self, inner: object, offset: int, size: int | None, name: str) -> None:
        from vdkit.errors import OpenError

        self.inner = inner
        self.filename = name  # a format above names its file child so (qcow2's map File column)
        self.offset = offset
        self.fixed = size
        length = inner.size()  # type: ignore[attr-defined]
        if offset > length:
            inner.close()  # type: ignore[attr-defined]
            raise OpenError(f"Offset ({offset}) cannot be greater than size of the containing file ({length})")
        if size is not None and offset + size > length:
            inner.close()  # type: ignore[attr-defined]
            raise OpenError(f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the "
                            f" actual size of the containing file ({length})")
        if size is not None and size % 512:
            inner.close()  # type: ignore[attr-defined]
            raise OpenError("Specified size is not multiple of 512")

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def size(self) -> int:
        if self.fixed is not None:
            return self.fixed
        return max(0, int(self.inner.size()) - self.offset)  # type: ignore[attr-defined]

    def _inside(self, offset: int, length: int) -> int:
        return max(0, min(length, self.size() - offset))

    def pread(self, offset: int, length: int) -> bytes:
        n = self._inside(offset, length)
        data = self.inner.pread(self.offset + offset, n) if n else b""  # type: ignore[attr-defined]
        return bytes(data) + bytes(length - len(data))

    def readinto(self, offset: int, view: memoryview) -> None:
        n = self._inside(offset, len(view))
        if n:
            self.inner.readinto(self.offset + offset, view[:n])  # type: ignore[attr-defined]
        if n < len(view):
            view[n:] = bytes(len(view) - n)

    def _check_write(self, offset: int, length: int) -> None:
        if self.fixed is not None and offset + length > self.fixed:
            import errno
            import os

            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_write(offset, len(data))
        self.inner.pwrite(self.offset + offset, data)  # type: ignore[attr-defined]

    def pwritev(self, offset: int, buffers: list[bytes | bytearray | memoryview]) -> None:
        self._check_write(offset, sum(len(b) for b in buffers))
        self.inner.pwritev(self.offset + offset, buffers)  # type: ignore[attr-defined]

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """The file's status at the same bytes (host offsets are the file's, as QEMU's map shows)."""
        from vdkit.io import OFFSET_VALID, ZERO, BlockStatus

        n = self._inside(offset, length)
        if n <= 0:
            return BlockStatus(ZERO | OFFSET_VALID, length, self.offset + offset, self.inner.filename)  # type: ignore[attr-defined]
        bs: BlockStatus = self.inner.block_status(self.offset + offset, n)  # type: ignore[attr-defined]
        if bs.length > n:
            bs = BlockStatus(bs.flags, n, bs.offset, bs.file)
        return bs

    def punch_hole(self, offset: int, length: int, *, extend: bool = True) -> None:
        n = self._inside(offset, length) if self.fixed is not None else length
        if n > 0:
            self.inner.punch_hole(self.offset + offset, n, extend=extend)  # type: ignore[attr-defined]

    def truncate(self, size: int) -> None:
        from vdkit.errors import VdkitError

        if self.fixed is not None:
            import errno

            raise VdkitError("Cannot resize fixed-size raw disks", errno=errno.ENOTSUP)
        self.inner.truncate(self.offset + size)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.inner.close()  # type: ignore[attr-defined]

    def __enter__(self) -> RawWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_window(name: str, readonly: bool, force_share: bool) -> RawWindow | None:
    """The file of a windowed raw name (:func:`_windows`), every window applied from the file up;
    None for any other name."""
    from vdkit.io.file import ImageFile

    found = _windows().get(name)
    if found is None:
        return None
    filename, windows = found
    f: object = ImageFile(filename, readonly=readonly, force_share=force_share)
    top_is_raw = name.startswith('json:{"offset"') or name.startswith('json:{"driver": "raw"')
    for i, (offset, size, own) in enumerate(windows):
        below = str(getattr(f, "filename", ""))
        # the top raw node's window is that node itself: the node under it is its file child
        f = RawWindow(f, offset, size, below if top_is_raw and i == len(windows) - 1 else own)
    assert isinstance(f, RawWindow)
    return f
