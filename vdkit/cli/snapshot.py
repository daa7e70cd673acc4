"""``vdkit-img snapshot``: list (and, with the write side, create/apply/delete).

Options are qemu-img 7.2's (no ``-f``: the format is always probed), plus one
extension: ``-l --output=json`` prints the snapshots as a pretty JSON array
of ``SnapshotInfo`` objects -- exactly the ``snapshots`` member that
``qemu-img info --output=json`` prints, re-indented to the top level (same
keys, key order and escaping).  With no snapshots it prints an empty array,
``[`` newline ``]``, the way QEMU prints empty lists, where the human form
prints nothing.
"""

from __future__ import annotations

from vdkit.cli.main import LongOpt, getopt_long, open_args, output_format, spec_names, warn, write_out
from vdkit.errors import UsageError

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("force-share", False, "U"),
    LongOpt("image-opts", False, "image-opts"),
    LongOpt("object", True, "object"),
    # vdkit extension (qemu-img 7.2 has no --output for snapshot): -l as JSON.
    LongOpt("output", True, "output"),
]


def main(argv: list[str]) -> int:
    # No -f: qemu-img 7.2's snapshot always probes the format.
    p = getopt_long(argv, ":la:c:d:hqU", LONGOPTS, argv0="snapshot")
    if p.has("h"):
        from vdkit.cli.main import HELP

        write_out(HELP)
        return 0
    actions = [(k, v) for k, v in p.opts if k in "lacd"]
    if len(actions) > 1:
        raise UsageError("Cannot mix '-l', '-a', '-c', '-d'")
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    output = output_format(p.last("output"))
    filename, fmt, spec = open_args(p.args[0], None, p.has("image-opts"))
    action, arg = actions[0] if actions else (None, None)
    with spec_names((filename, spec)):
        if action == "l":
            return _list(filename, fmt, force_share=p.has("U"), output=output)
        from vdkit.cli import snapshot_write

        return snapshot_write.run(action, arg, filename, fmt, force_share=p.has("U"), quiet=p.has("q"))


def _list(filename: str, fmt: str | None, *, force_share: bool, output: str) -> int:
    from vdkit.block.node import open_image

    with open_image(filename, fmt, readonly=True, force_share=force_share, share_writes=True) as node:
        for message, hint in node.warnings():
            warn(message, hint)
        snaps = node.snapshots()
    if output == "json":
        from vdkit.info.render_json import render_pretty

        write_out(render_pretty(snaps))
    else:
        from vdkit.info.render_human import snapshot_list

        write_out(snapshot_list(snaps))
    return 0
