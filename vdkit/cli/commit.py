"""``vdkit-img commit``: write an overlay's changes into its backing file.

Every range some layer above the base allocates is copied into the base
(zeros as zero writes, data as data; :mod:`vdkit.block.commit`); a base
smaller than the overlay is grown first.  Then, unless ``-d`` (or ``-b``, which implies it) is given, the
overlay is emptied so it shows the base again.  The chain is opened by hand:
the overlay and the base writable, intermediate layers read-only, so the
base is never open twice in this process (QEMU's image locks would refuse).
"""

from __future__ import annotations

from vdkit.cli.main import (
    LongOpt,
    check_cache_modes,
    cvtnum,
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
]


def main(argv: list[str]) -> int:
    p = getopt_long(argv, ":f:ht:b:dpqr:", LONGOPTS)
    for key, value in p.opts:
        if key == "r":  # checked as it is parsed; a rate limit changes no byte of the result
            cvtnum("rate limit", value or "")
    if p.has("h"):
        from vdkit.cli.main import HELP

        write_out(HELP)
        return 0
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    check_cache_modes(p, src_cache=None)
    mutually_exclusive_image_opts(p, "f")
    base = p.last("b")
    drop = p.has("d") or base is not None
    quiet = p.has("q")
    filename, fmt, spec = open_args(p.args[0], p.last("f"), p.has("image-opts"))
    with spec_names((filename, spec)):
        return run(filename, fmt, base, drop=drop, quiet=quiet, progress=p.has("p") and not quiet, shown=spec)


def _open_chain(filename: str, fmt: str | None, base: str | None, shown: str | None = None) -> tuple[Node, Node]:
    """Top (writable), intermediates (read-only) and the base (writable, with its own backing).

    ``shown`` is the name messages give the top image (the spec under ``--image-opts``).  A backing
    that ``json:``/``--image-opts`` options give (a ``backing`` object, also below the top) is the
    layer below, as in qemu-img, which commits into it; ``"backing": null`` ends the chain there.
    ``-b`` names a layer as QEMU finds it: below a layer whose backing the options replaced, only by
    that node's file name as given; elsewhere by the name the image stores or its resolved name.
    """
    from vdkit.block.chain import BackingWalk
    from vdkit.block.node import backing_of, open_image
    from vdkit.cli.snapshot_write import warn_if_probed

    walk = BackingWalk()  # the caller's policy, depth limit and loop detection over every layer
    top = open_image(filename, fmt, readonly=False, backing=False, own_backing=True, walk=walk, share_writes=True,
                     on_open=lambda drv: warn_if_probed(drv, fmt, filename))
    try:
        cur, cur_name = top, filename
        depth = 0  # of the layer being opened below the top
        while True:
            # qemu-img opens the whole chain as one open of the top: a layer's error names the top,
            # then says 'Could not open backing file: ' once per level below it
            chain_prefix = f"Could not open '{filename}': " + "Could not open backing file: " * depth
            try:
                below = backing_of(cur, cur_name, walk)
            except VdkitError as exc:
                raise exc.prefixed(chain_prefix) from exc
            if below is None:
                if base is None and cur is top:
                    raise VdkitError("Image does not have a backing file")
                raise VdkitError(f"Did not find '{base}' in the backing chain of '{shown or filename}'")
            name, backing_fmt, overridden = below
            stored = cur.driver.backing_file
            is_base = base is None or name == base or not overridden and stored == base
            depth += 1
            try:
                nxt = open_image(name, backing_fmt, readonly=not is_base, backing=is_base, own_backing=not is_base,
                                 walk=walk, share_writes=True)
            except VdkitError as exc:
                raise _unnamed(exc, name).prefixed(chain_prefix + "Could not open backing file: ") from exc
            cur.backing = nxt
            if is_base:
                return top, nxt
            cur, cur_name = nxt, name
    except BaseException:
        top.close()
        raise


def _unnamed(exc: VdkitError, name: str) -> VdkitError:
    """``exc`` without the "Could not open '<name>': " that :func:`open_image` put in front."""
    inner = exc.__cause__
    if isinstance(inner, VdkitError) and exc.message == f"Could not open '{name}': {inner.message}":
        return inner
    return exc


def run(filename: str, fmt: str | None, base: str | None, *, drop: bool, quiet: bool, progress: bool,
        shown: str | None = None) -> int:
    from vdkit.block.commit import commit
    from vdkit.block.progress import Progress

    prog = Progress(progress, min_skip=1.0)
    top, base_node = _open_chain(filename, fmt, base, shown)
    try:
        prog.set(0.0)
        commit(top, base_node, prog)
        if not drop:
            top.driver.make_empty()
    finally:
        top.close()
    prog.set(100.0)
    prog.end()
    if not quiet:
        write_out("Image committed.\n")
    return 0
