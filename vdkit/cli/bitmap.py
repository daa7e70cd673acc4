"""``vdkit-img bitmap``: add, remove, clear, enable, disable or merge a persistent bitmap of an image.

qemu-img's syntax and texts: the actions run in the order given, each as the
QMP command of the same name would on the image's node (``--add`` makes a
persistent bitmap, disabled if ``--disable`` is among the actions); a failed
action ends the command with ``Operation OP on bitmap NAME failed: ...``.
The image is opened read-write without its backing file; its bitmaps are
loaded (marked in use on disk) and stored again when it closes, also after a
failed action, so the file is what qemu-img leaves.
"""

from __future__ import annotations

from vdkit.cli.main import LongOpt, cvtnum, getopt_long, mutually_exclusive_image_opts, open_args, spec_names, write_out
from vdkit.errors import VdkitError

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.node import Node

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("object", True, "object"),
    LongOpt("image-opts", False, "image-opts"),
    LongOpt("add", False, "add"),
    LongOpt("remove", False, "remove"),
    LongOpt("clear", False, "clear"),
    LongOpt("enable", False, "enable"),
    LongOpt("disable", False, "disable"),
    LongOpt("merge", True, "merge"),
    LongOpt("granularity", True, "g"),
    LongOpt("source-file", True, "b"),
    LongOpt("source-format", True, "F"),
]
ACTIONS = ("add", "remove", "clear", "enable", "disable", "merge")


def main(argv: list[str]) -> int:
    p = getopt_long(argv, ":b:f:F:g:h", LONGOPTS)
    if p.has("h"):
        from vdkit.cli.main import HELP

        write_out(HELP)
        return 0
    granularity = 0
    for key, value in p.opts:
        if key == "g":
            assert value is not None
            granularity = cvtnum("granularity", value)
    actions = [(k, v) for k, v in p.opts if k in ACTIONS]
    if not actions:
        raise VdkitError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
    src_file, src_fmt = p.last("b"), p.last("F")
    if granularity and not p.has("add"):
        raise VdkitError("granularity only supported with --add")
    if src_fmt is not None and src_file is None:
        raise VdkitError("-F only supported with -b")
    if src_file is not None and not p.has("merge"):
        raise VdkitError("Merge bitmap source file only supported with --merge")
    if len(p.args) != 2:
        raise VdkitError("Expecting filename and bitmap name")
    mutually_exclusive_image_opts(p, "f")
    filename, fmt, spec = open_args(p.args[0], p.last("f"), p.has("image-opts"))
    with spec_names((filename, spec)):
        return run(filename, fmt, p.args[1], actions, granularity=granularity or None,
                   add_disabled=p.has("disable"), src_file=src_file, src_fmt=src_fmt)


def run(filename: str, fmt: str | None, name: str, actions: list[tuple[str, str | None]], *,
        granularity: int | None, add_disabled: bool, src_file: str | None, src_fmt: str | None) -> int:
    from vdkit.block.node import open_image

    node = open_image(filename, fmt, readonly=False, backing=False)
    try:
        warning = node.driver.probed_open_warning(filename) if fmt is None else None
        if warning is not None:  # a probed raw image opened for writing: QEMU's warning
            from vdkit.cli.main import write_err

            write_err(warning)
        node.bitmaps  # noqa: B018 - loaded at open, as QEMU does: they are stored again at close whatever happens
        src = node if src_file is None else open_image(src_file, src_fmt, readonly=True, backing=False)
        try:
            label = node.filename  # qemu-img's node has an automatic name; vdkit names the file
            for op, value in actions:
                try:
                    _apply(node, src, name, op, value, granularity=granularity, add_disabled=add_disabled,
                           label=label)
                except VdkitError as exc:
                    raise VdkitError(f"Operation {op} on bitmap {name} failed: {exc.message}",
                                     hint=exc.hint) from exc
        finally:
            if src is not node:
                src.close()
    finally:
        node.close()  # the bitmaps are stored here, also after a failed action (as qemu-img's blk_unref)
    return 0


def _apply(node: Node, src: Node, name: str, op: str, value: str | None, *, granularity: int | None,
           add_disabled: bool, label: str) -> None:
    from vdkit.block.dirty_bitmap import CHECK_ALLOW_RO, CHECK_DEFAULT, add_bitmap, merge_bitmaps, remove_bitmap

    if op == "add":
        add_bitmap(node, name, granularity=granularity, persistent=True, disabled=add_disabled, label=label)
        return
    bm = node.find_bitmap(name)
    if bm is None:
        raise VdkitError(f"Dirty bitmap '{name}' not found")
    if op == "remove":
        remove_bitmap(node, bm)
    elif op == "clear":
        bm.check(CHECK_DEFAULT)
        bm.clear()
    elif op in ("enable", "disable"):
        bm.check(CHECK_ALLOW_RO)
        bm.enabled = op == "enable"
    else:
        assert value is not None
        source = src.find_bitmap(value)
        if source is None:
            raise VdkitError(f"Dirty bitmap '{value}' not found")
        merge_bitmaps(bm, [source])
