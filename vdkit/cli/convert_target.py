"""Targets of ``vdkit-img convert``: create (unless ``-n``) and write the output image.

A target offers ``write``, ``write_zeroes``, ``finish`` and ``abort``; the
copier does not know the format.  A raw target is a plain file; zero ranges
are punched out (the file stays sparse).  A qcow2 target is a writable
qcow2 node written through :mod:`vdkit.formats.qcow2.io`.
"""

from __future__ import annotations

from vdkit.block.io import punch_hole
from vdkit.errors import UnsupportedError, VdkitError

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.node import Node
    from vdkit.cli.convert import ConvertArgs
    from vdkit.io.file import ImageFile

class SilentFailure(Exception):
    """The conversion failed in a way qemu-img reports only through the exit status."""


class RawTarget:
    cluster_size = 512

    def __init__(self, node: Node, *, has_zero_init: bool) -> None:
        self.node = node
        self.file: ImageFile = node.driver.file
        self.has_zero_init = has_zero_init

    def write(self, offset: int, data: bytes, *, compressed: bool = False) -> None:
        self.file.pwrite(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        punch_hole(self.file, offset, length)

    def finish(self) -> None:
        self.file.flush()
        self.node.close()

    def abort(self) -> None:
        self.node.close()


class Qcow2Target:
    """A qcow2 image opened writable; data goes through the qcow2 write engine."""

    def __init__(self, node: Node, *, has_zero_init: bool) -> None:
        self.node = node
        self.io = node.driver.io  # type: ignore[attr-defined]
        self.cluster_size = node.driver.cluster_size or 65536
        self.has_zero_init = has_zero_init
        self.compressed = False

    def write(self, offset: int, data: bytes, *, compressed: bool = False) -> None:
        if compressed:
            self.compressed = True
            cs = self.cluster_size
            for pos in range(0, len(data), cs):
                self.io.write_compressed(offset + pos, data[pos : pos + cs])
        else:
            self.io.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.io.write_zeroes(offset, length, unmap=True)

    def backing_sectors(self) -> int:
        below = self.node.backing
        return -1 if below is None else (below.driver.virtual_size + 511) // 512

    def finish(self) -> None:
        self.node.driver.flush()
        if self.compressed:
            if self.node.driver.header.has_data_file:  # type: ignore[attr-defined]
                # qemu-img's final "align the end" compressed write fails (ENOTSUP) without a message
                self.node.close()
                raise SilentFailure()
            self.io.align_file_end()
        self.node.close()

    def abort(self) -> None:
        self.node.close()


class DriverTarget:
    """Any other format: data goes through the format driver's own write slots."""

    def __init__(self, node: Node, *, has_zero_init: bool) -> None:
        self.node = node
        self.cluster_size = node.driver.cluster_size or 512
        self.has_zero_init = has_zero_init

    def write(self, offset: int, data: bytes, *, compressed: bool = False) -> None:
        if compressed:
            self.node.driver.write_compressed(offset, data)
        else:
            self.node.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.node.write_zeroes(offset, length, unmap=True)

    def backing_sectors(self) -> int:
        below = self.node.backing
        return -1 if below is None else (below.driver.virtual_size + 511) // 512

    def finish(self) -> None:
        self.node.driver.flush()
        self.node.close()

    def abort(self) -> None:
        self.node.close()


def _supports_compression(fmt: str) -> bool:
    from vdkit.formats import registry

    return registry.is_known(fmt) and getattr(registry.format_module(fmt), "SUPPORTS_COMPRESSION", False)


def open_target(a: ConvertArgs, size: int):  # type: ignore[no-untyped-def]
    """Create the output (unless ``-n``) and open it for writing."""
    if a.target_image_opts:  # implies -n (checked while parsing)
        node = _open_target_spec(a)
    else:
        node = _create_and_open(a, size)
    if a.skip_create and node.driver.virtual_size < size:
        node.close()
        raise VdkitError("output file is smaller than input file")
    zero_init = a.target_is_zero or not a.skip_create
    if node.format == "raw":
        # a device is not zeroed by its "creation" (it keeps its old bytes): zeros are written
        # (discarded where the device can) unless --target-is-zero says they are there
        return RawTarget(node, has_zero_init=a.target_is_zero or zero_init and not node.driver.file.is_device)
    if node.driver.encrypted:
        node.close()
        raise UnsupportedError("Writing encrypted qcow2 images is not supported by vdkit")
    if not zero_init or a.backing is not None:
        zero_init = a.target_is_zero and a.backing is None
    if node.format != "qcow2":
        if getattr(node.driver, "needs_compressed_writes", False):
            a.compressed = True  # as qemu-img: a target that only takes compressed writes (streamOptimized)
        return DriverTarget(node, has_zero_init=zero_init)
    target = Qcow2Target(node, has_zero_init=zero_init)
    target.compressed = a.compressed  # qemu-img aligns the file end after any -c conversion
    return target


def _no_flushes(a: ConvertArgs, node: Node) -> None:
    if a.cache in (None, "unsafe"):
        # qemu-img convert writes its target with cache=unsafe unless -t says
        # otherwise: a crash mid-convert leaves a useless target either way.
        for f in (node.driver.file, *node.driver.extra_files()):
            f.sync = False


def _open_target_spec(a: ConvertArgs) -> Node:
    """``--target-image-opts``: the existing target named by a QemuOpts spec.

    The driver comes from the spec, so ``-O`` is refused as ``-f`` is next to
    ``--image-opts``; the compression check can only follow the open.
    """
    from vdkit.block.node import open_image
    from vdkit.cli.options import SpecNames, image_opts

    if a.out_fmt_given:
        raise VdkitError("--image-opts and --format are mutually exclusive")
    filename, driver = image_opts(a.target)
    with SpecNames((filename, a.target)):
        node = open_image(filename, driver, readonly=False, backing=True)
    _no_flushes(a, node)
    if a.compressed and not _supports_compression(node.format):
        node.close()
        raise VdkitError("Compression not supported for this file format")
    return node


def _create_and_open(a: ConvertArgs, size: int) -> Node:
    from vdkit.block.node import open_image

    if a.compressed and not _supports_compression(a.out_fmt):
        raise VdkitError("Compression not supported for this file format")
    if not a.skip_create:
        from vdkit.cli.convert import _option_value

        backing = a.backing or _option_value(a.options, "backing_file")
        backing_fmt = a.backing_fmt or _option_value(a.options, "backing_fmt")
        if backing is not None and a.out_fmt == "qcow2" and backing_fmt is None:
            raise VdkitError("Use of backing file requires explicit backing format")
        _create(a, size)
    node = open_image(a.target, a.out_fmt, readonly=False, backing=True)
    _no_flushes(a, node)
    return node


def _create(a: ConvertArgs, size: int) -> None:
    from vdkit.cli.create import img_create
    from vdkit.opts import split_options

    items: list[tuple[str, str]] = []
    for text in a.options:
        items += [(k, v) for k, v in split_options(text) if k != "size"]
    options = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in items) or None
    # the format's own errors carry qemu-img convert's prefix; its option checks above do not
    img_create(a.target, a.out_fmt, a.backing, a.backing_fmt, options, size, unsafe=True, quiet=True,
               driver_prefix=f"{a.target}: error while converting {a.out_fmt}: ")
