"""``vdkit-img map``: where the guest data of an image (chain) lives.

The walk itself is :func:`vdkit.block.io.map_entries`; this module only
renders entries the way ``qemu-img map`` prints them (cli-output.md §5).
"""

from __future__ import annotations

from vdkit.cli.main import (
    LongOpt,
    cvtnum,
    getopt_long,
    mutually_exclusive_image_opts,
    open_args,
    output_format,
    spec_names,
    write_out,
)
from vdkit.errors import UsageError, VdkitError, hexalt

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("format", True, "f"),
    LongOpt("output", True, "output"),
    LongOpt("object", True, "object"),
    LongOpt("image-opts", False, "image-opts"),
    LongOpt("force-share", False, "U"),
    LongOpt("start-offset", True, "s"),
    LongOpt("max-length", True, "l"),
]


def main(argv: list[str]) -> int:
    p = getopt_long(argv, ":f:s:l:hU", LONGOPTS)
    if p.has("h"):
        from vdkit.cli.main import HELP

        write_out(HELP)
        return 0
    start = 0
    max_length: int | None = None
    for key, value in p.opts:
        assert value is not None or key not in "sl"
        if key == "s":
            start = cvtnum("start offset", value or "")
        elif key == "l":
            max_length = cvtnum("max length", value or "")
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    output = output_format(p.last("output"))
    mutually_exclusive_image_opts(p, "f")
    filename, fmt, spec = open_args(p.args[0], p.last("f"), p.has("image-opts"))
    with spec_names((filename, spec)):
        return run(filename, fmt, output=output, start=start, max_length=max_length, force_share=p.has("U"))


def run(filename: str, fmt: str | None, *, output: str, start: int, max_length: int | None,
        force_share: bool) -> int:
    from vdkit.block.node import open_image

    with open_image(filename, fmt, readonly=True, force_share=force_share, share_writes=True) as node:
        length = node.driver.virtual_size
        if max_length is not None:
            length = min(start + max_length, length)
        if output == "human":
            return _human(node, start, length)
        return _json(node, start, length)


def _human(node, start: int, end: int) -> int:  # type: ignore[no-untyped-def]
    """qemu-img's loop: print data rows; after printing, fold the next entry to "zero" if it is no data."""
    from vdkit.block.io import map_entries

    out = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"]
    cur = None
    for e in _guarded(map_entries(node, start, end), out):
        if cur is not None:
            if cur.mergeable(e):
                cur.length += e.length
                continue
            _dump_human(cur, out)
            if not e.data or e.zero:
                e.data, e.zero = False, True
        cur = e
        if len(out) > 4096:
            write_out("".join(out))
            out.clear()
    if cur is not None:
        _dump_human(cur, out)
    write_out("".join(out))
    return 0


def _dump_human(e, out: list[str]) -> None:  # type: ignore[no-untyped-def]
    if e.data and e.offset is None:
        write_out("".join(out))
        out.clear()
        raise VdkitError("File contains external, encrypted or compressed clusters.")
    if e.data and not e.zero:
        out.append(f"{hexalt(e.start):<16}{hexalt(e.length):<16}{hexalt(e.offset or 0):<16}{e.filename or ''}\n")


def _json(node, start: int, end: int) -> int:  # type: ignore[no-untyped-def]
    from vdkit.block.io import MapEntry, map_entries

    def fmt(e: MapEntry) -> str:
        s = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
             f'"present": {_b(e.present)}, "zero": {_b(e.zero)}, "data": {_b(e.data)}')
        if e.offset is not None:
            s += f', "offset": {e.offset}'
        return s + "}"

    printed: list[bool] = []  # non-empty once an entry is out (read by the error path)
    buf = ["["]
    for e in _guarded(map_entries(node, start, end), buf, lambda: ",\n" if printed else ""):
        if printed:
            buf.append(",\n")
        buf.append(fmt(e))
        if not printed:
            printed.append(True)
        if len(buf) > 4096:
            write_out("".join(buf))
            buf.clear()
    if not printed:
        buf.append(fmt(MapEntry(start, 0, 0, False, False, False, None, None)))
    buf.append("]\n")
    write_out("".join(buf))
    return 0


def _guarded(entries, pending: list[str], tail=None):  # type: ignore[no-untyped-def]
    """Entries until a metadata read fails; then print what is pending and fail like qemu-img.

    ``tail()`` is what follows the printed entries then: qemu-img printed each entry once the
    next one was known, so in JSON every printed entry already has its ``,\n``.
    """
    from vdkit.block.io import io_error

    it = iter(entries)
    while True:
        try:
            e = next(it)
        except StopIteration:
            return
        except (VdkitError, OSError) as exc:
            write_out("".join(pending) + (tail() if tail is not None else ""))
            pending.clear()
            raise io_error(exc, "Could not read file metadata") from exc
        yield e


def _b(v: bool) -> str:
    return "true" if v else "false"
