"""``vdkit-img rebase``: point an image at a different backing file.

Unsafe mode (``-u``) only rewrites the backing file name and format in the
header.  Safe mode first makes the image self-sufficient with respect to
the change: for every range the image does not allocate itself, the old
backing chain's content is compared with the new backing file's (zeros past
either one's end), and every 512-byte sector that differs is written into
the image from the old view, so the guest sees exactly the same disk
afterwards.  Only then is the header switched.  ``-b ""`` removes the
backing file (in safe mode: copies everything it provided).
"""

from __future__ import annotations

import errno
import os

from vdkit.cli.main import (
    LongOpt,
    check_cache_modes,
    getopt_long,
    mutually_exclusive_image_opts,
    open_args,
    spec_names,
    write_out,
)
from vdkit.errors import UsageError, VdkitError

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.node import Node
    from vdkit.block.progress import Progress

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("object", True, "object"),
    LongOpt("image-opts", False, "image-opts"),
    LongOpt("force-share", False, "U"),
]


def main(argv: list[str]) -> int:
    p = getopt_long(argv, ":hf:F:b:uqt:T:pU", LONGOPTS)  # no -c: compressed rebase came after 7.2
    if p.has("h"):
        from vdkit.cli.main import HELP

        write_out(HELP)
        return 0
    quiet = p.has("q")
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    unsafe = p.has("u")
    base = p.last("b")
    if not unsafe and base is None:
        raise UsageError("Must specify backing file (-b) or use unsafe mode (-u)")
    check_cache_modes(p)
    mutually_exclusive_image_opts(p, "f")
    filename, fmt, spec = open_args(p.args[0], p.last("f"), p.has("image-opts"))
    with spec_names((filename, spec)):
        return run(filename, fmt, base or "", p.last("F"), unsafe=unsafe, progress=p.has("p") and not quiet)


def run(filename: str, fmt: str | None, base: str, base_fmt: str | None, *, unsafe: bool,
        progress: bool) -> int:
    from vdkit.block.node import open_image
    from vdkit.block.progress import Progress
    from vdkit.cli.snapshot_write import warn_if_probed

    prog = Progress(progress, min_skip=2.0)
    with open_image(filename, fmt, readonly=False, backing=not unsafe, share_writes=True,
                    on_open=lambda drv: warn_if_probed(drv, fmt, filename)) as node:
        if not unsafe:
            _refuse_relative_under_json_name(node, base)
            prog.set(0.0)
            _copy_differences(node, filename, base, base_fmt, prog)
        _change_backing(node, base, base_fmt)
    prog.set(100.0)
    prog.end()
    return 0


def _refuse_relative_under_json_name(node: Node, base: str) -> None:
    """QEMU names an image whose backing ``json:``/``--image-opts`` replaced (``"backing": null`` over a
    backing name, or another node) by its options, ``json:{"backing": ..., "driver": ..., "file": ...}``,
    and a ``json:`` name has no folder to resolve a relative new backing name against."""
    from vdkit.block.chain import has_protocol

    if not base or os.path.isabs(base) or has_protocol(base):
        return
    name = _json_name(node)
    if name is not None:
        raise VdkitError(f"Could not resolve backing filename: Cannot use relative backing file names for '{name}'")


def _json_name(node: Node) -> str | None:
    """The ``json:`` name QEMU gives ``node`` for its replaced backing (None: the plain name stands;
    only images in local files are named here)."""
    from vdkit.block.image_opts import node_description

    desc = node_description(node)
    if desc is None or "backing" not in desc:
        return None
    from vdkit.info.render_json import dumps_compact

    return "json:" + dumps_compact(desc)


def _copy_differences(node: Node, filename: str, base: str, base_fmt: str | None, prog: Progress) -> None:
    from vdkit.block.chain import resolve_backing_name
    from vdkit.block.copy import copy_differences
    from vdkit.block.node import open_image

    new: Node | None = None
    if base:
        path = resolve_backing_name(filename, base) or base
        try:
            new = open_image(path, base_fmt, readonly=True, force_share=True)
        except VdkitError as exc:
            inner = exc.__cause__ if isinstance(exc.__cause__, VdkitError) else exc
            raise VdkitError(f"Could not open new backing file '{path}': {inner.message}") from exc
    try:
        copy_differences(node, new, prog)
    finally:
        if new is not None:
            new.close()


def _change_backing(node: Node, base: str, base_fmt: str | None) -> None:
    try:
        if base and base_fmt is None:
            # qemu-img requires the format of a new backing file whatever the image's format (raw, qed,
            # vmdk...): this is checked before the driver is asked whether it can change it at all
            raise VdkitError("backing format must be specified", errno=errno.EINVAL)
        node.driver.change_backing_file(base or None, base_fmt if base else None)
    except VdkitError as exc:
        raise exc.prefixed(f"Could not change the backing file to '{base}': ") from exc
