"""``vdkit-img info``: collect first, then render (as qemu-img's img_info)."""

from __future__ import annotations

from vdkit.cli.main import warn, write_out
from vdkit.cli.options import LongOpt, getopt_long, image_opts, output_format, reprefix_open_error
from vdkit.errors import OpenError, UsageError, VdkitError

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("format", True, "f"),
    LongOpt("output", True, "output"),
    LongOpt("backing-chain", False, "backing-chain"),
    LongOpt("force-share", False, "U"),
    LongOpt("image-opts", False, "image-opts"),
    # Accepted for compatibility (secrets for LUKS); info needs no key material.
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
    filename, fmt, spec = p.args[0], p.last("f"), None
    if p.has("image-opts"):
        if fmt is not None:
            raise VdkitError("--image-opts and --format are mutually exclusive")
        spec = filename
        filename, fmt = image_opts(spec)
    output = output_format(p.last("output"))
    try:
        infos = collect_image_info_list(filename, fmt, chain=p.has("backing-chain"), force_share=p.has("U"))
    except VdkitError as exc:
        if spec is None:
            raise
        raise reprefix_open_error(exc, filename, spec) from exc
    if output == "json":
        from vdkit.info.render_json import render_pretty

        write_out(render_pretty(infos if p.has("backing-chain") else infos[0]))
    else:
        from vdkit.info.render_human import image_info_list

        write_out(image_info_list(infos))
    return 0


def collect_image_info_list(filename: str, fmt: str | None, *, chain: bool, force_share: bool) -> list:
    """Open each image of the chain on its own, without its backing file."""
    from vdkit.block.node import open_image

    infos = []
    seen: set[str] = set()
    name: str | None = filename
    while name is not None:
        if name in seen:
            raise OpenError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        with open_image(name, fmt, readonly=True, force_share=force_share, backing=False, no_io=True) as node:
            for message, hint in node.warnings():
                warn(message, hint)
            info = node.info()
        infos.append(info)
        if not chain:
            break
        fmt = info.backing_filename_format
        if info.full_backing_filename is not None:
            from vdkit.block.chain import default_policy

            # Each image is opened on its own, so the policy is applied here,
            # where the chain is followed.
            default_policy().check("backing file", info.backing_filename or "", info.full_backing_filename)
            name = info.full_backing_filename
        elif info.backing_filename is not None:
            raise OpenError(
                "Could not determine absolute backing filename, but backing filename "
                f"'{info.backing_filename}' present"
            )
        else:
            name = None
    return infos
