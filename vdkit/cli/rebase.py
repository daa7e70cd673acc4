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

from typing import TYPE_CHECKING

from vdkit.cli.main import write_out
from vdkit.cli.options import (
    LongOpt,
    SpecNames,
    check_cache_modes,
    getopt_long,
    mutually_exclusive_image_opts,
    open_args,
)
from vdkit.errors import UsageError, VdkitError

if TYPE_CHECKING:
    from vdkit.block.node import Node

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("object", True, "object"),
    LongOpt("image-opts", False, "image-opts"),
    LongOpt("force-share", False, "U"),
]

IO_BUF = 2 * 1024 * 1024
SECTOR = 512


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
    with SpecNames((filename, spec)):
        return run(filename, fmt, base or "", p.last("F"), unsafe=unsafe, progress=p.has("p") and not quiet)


def run(filename: str, fmt: str | None, base: str, base_fmt: str | None, *, unsafe: bool,
        progress: bool) -> int:
    from vdkit.block.node import open_image
    from vdkit.cli.convert import Progress

    prog = Progress(progress, min_skip=2.0)
    with open_image(filename, fmt, readonly=False, backing=not unsafe) as node:
        if not unsafe:
            prog.set(0.0)
            _copy_differences(node, filename, base, base_fmt, prog)
        _change_backing(node, base, base_fmt)
    prog.set(100.0)
    prog.end()
    return 0


def _copy_differences(node: Node, filename: str, base: str, base_fmt: str | None, prog) -> None:  # type: ignore[no-untyped-def]
    from vdkit.block.chain import resolve_backing_name
    from vdkit.block.io import ALLOCATED, io_error, layer_status, read, write, write_zeroes
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
        old = node.backing
        size = node.driver.virtual_size
        old_size = old.driver.virtual_size if old is not None else 0
        new_size = new.driver.virtual_size if new is not None else 0
        step = 100.0 / (size / min(size, IO_BUF)) if size else 100.0
        offset = 0
        while offset < size:
            n = min(IO_BUF, size - offset)
            try:
                st = layer_status(node, offset, n)
            except (OSError, VdkitError) as exc:
                raise io_error(exc, "error while reading image metadata") from exc
            n = st.length
            if st.flags & ALLOCATED:
                offset += n
                continue
            old_zero = offset >= old_size
            if old_zero:
                buf_old = bytes(n)
            else:
                n = min(n, old_size - offset)
                assert old is not None
                buf_old = read(old, offset, n)
            if new is None or offset >= new_size:
                buf_new = bytes(n)
            else:
                n = min(n, new_size - offset)
                buf_new = read(new, offset, n)
                buf_old = buf_old[:n]
            done = 0
            while done < n:
                differ, k = _same_run(buf_old, buf_new, done, n)
                if differ:
                    try:
                        if old_zero:
                            write_zeroes(node, offset + done, k)
                        else:
                            write(node, offset + done, buf_old[done : done + k])
                    except (OSError, VdkitError) as exc:
                        raise io_error(exc, "Error while writing to COW image") from exc
                done += k
            offset += n
            prog.add(step, 100)
        node.driver.flush()
    finally:
        if new is not None:
            new.close()


def _same_run(a: bytes, b: bytes, start: int, end: int) -> tuple[bool, int]:
    """Whether the sector at ``start`` differs, and how far (in bytes) that stays so."""
    first = a[start : start + SECTOR] != b[start : start + SECTOR]
    i = min(end, start + SECTOR)
    while i < end:
        j = min(end, i + SECTOR)
        if (a[i:j] != b[i:j]) != first:
            break
        i = j
    return first, i - start


def _change_backing(node: Node, base: str, base_fmt: str | None) -> None:
    try:
        node.driver.change_backing_file(base or None, base_fmt if base else None)
    except VdkitError as exc:
        raise exc.prefixed(f"Could not change the backing file to '{base}': ") from exc
