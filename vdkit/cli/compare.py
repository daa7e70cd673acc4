"""``vdkit-img compare``: do two images show the same guest content?

Exit status as qemu-img: 0 identical, 1 different (content, or size/status in
strict mode ``-s``), 2 error (e.g. an image cannot be opened), 3 a block
status query failed, 4 a read failed.  Ranges both chains report as zero are
skipped without reading; a range only one side allocates must read as zeros
on that side; ranges beyond the shorter image must be zero (non-strict).
Mismatch offsets are reported at 512-byte sector granularity, as qemu-img
does.
"""

from __future__ import annotations

from vdkit.cli.main import (
    LongOpt,
    ObjectError,
    check_cache_modes,
    error,
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

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("object", True, "object"),
    LongOpt("image-opts", False, "image-opts"),
    LongOpt("force-share", False, "U"),
]

IO_BUF = 2 * 1024 * 1024
SECTOR = 512


class _Result(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def main(argv: list[str]) -> int:
    try:
        p = getopt_long(argv, ":hf:F:T:pqsU", LONGOPTS)
    except ObjectError as exc:  # qemu-img compare's status for errors, unlike the other commands
        error(exc.message, exc.hint)
        return 2
    if p.has("h"):
        from vdkit.cli.main import HELP

        write_out(HELP)
        return 0
    if len(p.args) != 2:
        raise UsageError("Expecting two image file names")
    try:
        check_cache_modes(p, cache=None)
        mutually_exclusive_image_opts(p, "f", "F")
    except VdkitError as exc:
        error(exc.message, exc.hint)
        return 2
    quiet = p.has("q")
    return run(p.args[0], p.args[1], p.last("f"), p.last("F"), strict=p.has("s"), quiet=quiet,
               progress=p.has("p") and not quiet, force_share=p.has("U"), image_opts=p.has("image-opts"))


def run(file1: str, file2: str, fmt1: str | None, fmt2: str | None, *, strict: bool, quiet: bool,
        progress: bool, force_share: bool, image_opts: bool = False) -> int:
    """Compare ``file1`` and ``file2`` (QemuOpts specs with ``image_opts``); the exit status is the answer."""
    from vdkit.block.node import open_image
    from vdkit.block.progress import Progress

    prog = Progress(progress, min_skip=2.0)
    nodes: list[Node] = []
    code = 2
    names = spec_names()
    try:
        # qemu-img names the arguments as given (the specs) in every message
        for name, fmt in ((file1, fmt1), (file2, fmt2)):
            filename, fmt, spec = open_args(name, fmt, image_opts)
            names = spec_names((filename, spec))
            nodes.append(open_image(filename, fmt, readonly=True, force_share=force_share, share_writes=True))
        code = _compare(nodes[0], nodes[1], file1, file2, strict=strict, quiet=quiet, prog=prog)
    except _Result as r:
        code = r.code
    except VdkitError as exc:
        err = names.rewrite(exc)
        assert isinstance(err, VdkitError)
        error(err.message, err.hint)
        code = 2
    finally:
        for n in nodes:
            n.close()
    prog.end()
    return code


def _strerror(exc: Exception) -> str:
    """strerror of an I/O failure (printing a qcow2 corruption event first, as QEMU does)."""
    from vdkit.block.io import io_error

    err = io_error(exc, "")
    return err.message[2:] if isinstance(err, VdkitError) and err.message.startswith(": ") else str(err)


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        write_out(text)


def _first_nonzero_sector(buf: bytes) -> int:
    """Byte index of the first 512-byte sector holding a non-zero byte, or -1."""
    if not any(buf):
        return -1
    for i in range(0, len(buf), SECTOR):
        if any(buf[i : i + SECTOR]):
            return i
    return -1


def _first_diff(a: bytes, b: bytes) -> int:
    """qemu-img's sector compare: -1 if equal, else the offset where the first run of equal/unequal ends."""
    if a == b:
        return -1
    first = a[:SECTOR] != b[:SECTOR]
    if first:
        return 0
    i = SECTOR
    while i < len(a):
        if (a[i : i + SECTOR] != b[i : i + SECTOR]) != first:
            return i
        i += SECTOR
    return -1


def _check_empty(node: Node, offset: int, length: int, filename: str, quiet: bool) -> None:
    from vdkit.block.io import read

    try:
        buf = read(node, offset, length)
    except (VdkitError, OSError) as exc:
        error(f"Error while reading offset {offset} of {filename}: {_strerror(exc)}")
        raise _Result(4) from exc
    idx = _first_nonzero_sector(buf)
    if idx >= 0:
        _say(quiet, f"Content mismatch at offset {offset + idx}!\n")
        raise _Result(1)


def _status(node: Node, offset: int, length: int, filename: str):  # type: ignore[no-untyped-def]
    from vdkit.block.io import above_status

    try:
        return above_status(node, offset, length)
    except (VdkitError, OSError) as exc:
        _strerror(exc)
        error(f"Sector allocation test failed for {filename}")
        raise _Result(3) from exc


def _compare(n1: Node, n2: Node, file1: str, file2: str, *, strict: bool, quiet: bool, prog) -> int:  # type: ignore[no-untyped-def]
    from vdkit.block.io import ALLOCATED, ZERO, read
    from vdkit.block.progress import f32

    size1, size2 = n1.driver.virtual_size, n2.driver.virtual_size
    total = min(size1, size2)
    base = max(size1, size2)
    def advance(chunk: int) -> None:
        prog.add(f32(f32(f32(chunk) / f32(base)) * f32(100)), 100)

    prog.set(0.0)
    if strict and size1 != size2:
        _say(quiet, "Strict mode: Image size mismatch!\n")
        return 1
    offset = 0
    while offset < total:
        s1 = _status(n1, offset, size1 - offset, file1)
        s2 = _status(n2, offset, size2 - offset, file2)
        a1, a2 = s1.has(ALLOCATED), s2.has(ALLOCATED)
        chunk = min(s1.length, s2.length)
        if strict and s1.flags != s2.flags:
            _say(quiet, f"Strict mode: Offset {offset} block status mismatch!\n")
            return 1
        if s1.has(ZERO) and s2.has(ZERO):
            pass
        elif a1 == a2:
            if a1:
                chunk = min(chunk, IO_BUF)
                try:
                    b1 = read(n1, offset, chunk)
                except (VdkitError, OSError) as exc:
                    error(f"Error while reading offset {offset} of {file1}: {_strerror(exc)}")
                    return 4
                try:
                    b2 = read(n2, offset, chunk)
                except (VdkitError, OSError) as exc:
                    error(f"Error while reading offset {offset} of {file2}: {_strerror(exc)}")
                    return 4
                d = _first_diff(b1, b2)
                if d >= 0:
                    _say(quiet, f"Content mismatch at offset {offset + d}!\n")
                    return 1
        else:
            chunk = min(chunk, IO_BUF)
            if a1:
                _check_empty(n1, offset, chunk, file1, quiet)
            else:
                _check_empty(n2, offset, chunk, file2, quiet)
        offset += chunk
        advance(chunk)
    if size1 != size2:
        _say(quiet, "Warning: Image size mismatch!\n")
        over, fname = (n1, file1) if size1 > size2 else (n2, file2)
        while offset < base:
            st = _status(over, offset, base - offset, fname)
            chunk = st.length
            if st.has(ALLOCATED) and not st.has(ZERO):
                chunk = min(chunk, IO_BUF)
                _check_empty(over, offset, chunk, fname, quiet)
            offset += chunk
            advance(chunk)
    _say(quiet, "Images are identical.\n")
    return 0
