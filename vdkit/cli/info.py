"""``vdkit-img info``: collect first, then render (as qemu-img's img_info)."""

from __future__ import annotations

from vdkit.cli.main import (
    LongOpt,
    getopt_long,
    mutually_exclusive_image_opts,
    open_args,
    output_format,
    spec_names,
    warn,
    write_out,
)
from vdkit.errors import UsageError

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.info.model import ImageInfo

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("format", True, "f"),
    LongOpt("output", True, "output"),
    LongOpt("backing-chain", False, "backing-chain"),
    LongOpt("force-share", False, "U"),
    LongOpt("image-opts", False, "image-opts"),
    # Created and checked by getopt_long as qemu-img does; info needs no key material.
    LongOpt("object", True, "object"),
]


def main(argv: list[str]) -> int:
    p = getopt_long(argv, ":f:hU", LONGOPTS, argv0="info")
    if p.has("h"):
        from vdkit.cli.main import HELP

        write_out(HELP)
        return 0
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    mutually_exclusive_image_opts(p, "f")
    filename, fmt, spec = open_args(p.args[0], p.last("f"), p.has("image-opts"))
    output = output_format(p.last("output"))
    with spec_names((filename, spec)):
        infos = collect_image_info_list(filename, fmt, chain=p.has("backing-chain"), force_share=p.has("U"))
    shown = None
    if spec is not None:
        from vdkit.block.image_opts import image_opts_name

        shown = image_opts_name(spec)
    if shown is not None:
        from vdkit.record import replace

        infos[0] = replace(infos[0], filename=shown)
    if output == "json":
        from vdkit.info.render_json import render_pretty

        write_out(render_pretty(infos if p.has("backing-chain") else infos[0]))
    else:
        from vdkit.info.render_human import image_info_list

        write_out(image_info_list(infos))
    return 0


def collect_image_info_list(filename: str, fmt: str | None, *, chain: bool, force_share: bool) -> list[ImageInfo]:
    """Open each image of the chain on its own, without its backing file (as qemu-img's info)."""
    from vdkit.block.chain import BackingWalk
    from vdkit.block.node import open_image
    from vdkit.info.collect import image_info

    infos: list[ImageInfo] = []
    walk = BackingWalk(names_only=True)
    name: str | None = filename
    while name is not None:
        spec = None
        if infos and name.startswith("json:"):  # a header's json: backing name: the node it describes
            from vdkit.block import json_name
            from vdkit.block.chain import check_json
            from vdkit.block.image_opts import image_opts

            flat = json_name.parse(name)
            check_json(walk.policy, "backing file", name, flat)
            spec, (name, driver) = name, image_opts(name, flat)
            walk.policy.check("backing file", spec, name)
            fmt = driver or fmt
        walk.enter(name)
        with spec_names((name, spec)):  # a json: backing name: its open errors name it, as qemu-img's
            node = open_image(name, fmt, readonly=True, force_share=force_share, backing=False, no_io=True,
                              walk=walk, share_writes=True)
        with node:
            for message, hint in node.warnings():
                warn(message, hint)
            info = image_info(node)
        infos.append(info)
        if not chain:
            break
        fmt = info.backing_filename_format
        name = walk.backing_of(node.filename, info.backing_filename)
    return infos
