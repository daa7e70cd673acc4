"""``vdkit-img resize``: change the virtual size of an image.

Argument handling follows qemu-img: the size is always the *last* argument
and is taken off before option parsing, so ``resize img -1G`` works without
``--``; ``+N``/``-N`` are relative to the current size; shrinking needs
``--shrink``.
"""

from __future__ import annotations

from vdkit.cli.main import LongOpt, getopt_long, mutually_exclusive_image_opts, open_args, spec_names, write_out
from vdkit.errors import UsageError, VdkitError

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.node import Node

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("object", True, "object"),
    LongOpt("image-opts", False, "image-opts"),
    LongOpt("preallocation", True, "preallocation"),
    LongOpt("shrink", False, "shrink"),
]

PREALLOC_MODES = ("off", "metadata", "falloc", "full")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise UsageError("Not enough arguments")
    size_text = argv[-1]
    p = getopt_long(argv[:-1], ":f:hq", LONGOPTS)
    if p.has("h"):
        from vdkit.cli.main import HELP

        write_out(HELP)
        return 0
    prealloc = p.last("preallocation") or "off"
    if prealloc not in PREALLOC_MODES:
        raise VdkitError(f"Invalid preallocation mode '{prealloc}'")
    if len(p.args) != 1:
        raise UsageError("Expecting image file name and size")
    mutually_exclusive_image_opts(p, "f")
    relative = 0
    if size_text[:1] == "+":
        relative, size_text = 1, size_text[1:]
    elif size_text[:1] == "-":
        relative, size_text = -1, size_text[1:]
    from vdkit.opts import OptDesc, parse_value

    n = int(parse_value(OptDesc("size", "size", None, "Virtual disk size"), size_text))
    filename, fmt, spec = open_args(p.args[0], p.last("f"), p.has("image-opts"))
    with spec_names((filename, spec)):
        return run(filename, fmt, n, relative, prealloc=prealloc, shrink=p.has("shrink"), quiet=p.has("q"))


def run(filename: str, fmt: str | None, n: int, relative: int, *, prealloc: str, shrink: bool,
        quiet: bool) -> int:
    from vdkit.block.node import open_image
    from vdkit.cli.snapshot_write import warn_if_probed

    with open_image(filename, fmt, readonly=False, share_writes=True, resize=True,
                    on_open=lambda drv: warn_if_probed(drv, fmt, filename)) as node:
        current = node.driver.virtual_size
        total = current + n * relative if relative else n
        if total <= 0:
            raise VdkitError("New image size must be positive")
        if total <= current and prealloc != "off":
            raise VdkitError("Preallocation can only be used for growing images")
        if total < current and not shrink:
            raise VdkitError(
                "Use the --shrink option to perform a shrink operation.",
                hint="\0vdkit-img: warning: Shrinking an image will delete all data beyond the shrunken "
                     "image's end. Before performing such an operation, make sure there is no important "
                     "data there.\n")
        resize_node(node, total, prealloc)
    if not quiet:
        write_out("Image resized.\n")
    return 0


def resize_node(node: Node, size: int, prealloc: str = "off") -> None:
    """Truncate/grow the top image of ``node`` to ``size`` bytes (see :func:`vdkit.block.io.truncate`)."""
    from vdkit.block.io import truncate

    truncate(node, size, prealloc)
