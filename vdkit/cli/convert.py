"""``vdkit-img convert``: copy the guest view of one or more images into a new image.

The copy walks the source in *iterations* the way qemu-img 7.2 does, because
the iteration boundaries are visible: they decide which areas are skipped as
zero, and the ``-p`` progress lines are printed per iteration.  Each
iteration asks the chain for the status of the next run (data, zero, or —
with ``-B`` — "leave to the backing file"), aligned to the source cluster
size, and data runs are cut into buffers of at most 2 MiB.  Within a data
buffer, stretches of zero sectors of at least ``-S`` bytes are not written
(sparse output); ``-S 0`` writes everything.

This module parses the command line, opens the sources, creates and opens
the target and prints; the copy itself is :mod:`vdkit.block.copy` (the walk
described above) writing through :mod:`vdkit.block.target`.
"""

from __future__ import annotations

from vdkit.cli.main import LongOpt, cvtnum, getopt_long, open_args, spec_names, write_out
from vdkit.errors import UsageError, VdkitError
from vdkit.opts import CACHE_MODES, split_items

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.node import Node
    from vdkit.block.target import Target

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("object", True, "object"),
    LongOpt("image-opts", False, "image-opts"),
    LongOpt("target-image-opts", False, "target-image-opts"),
    LongOpt("salvage", False, "salvage"),
    LongOpt("target-is-zero", False, "target-is-zero"),
    LongOpt("force-share", False, "U"),
    LongOpt("bitmaps", False, "bitmaps"),
    LongOpt("skip-broken-bitmaps", False, "skip-broken-bitmaps"),
]

SECTOR = 512


class ConvertArgs:
    """The parsed command line (a plain class: ``dataclasses`` costs start-up time)."""

    def __init__(self) -> None:
        self.sources: list[str] = []
        self.target = ""
        self.fmt: str | None = None
        self.out_fmt = "raw"
        self.options: list[str] = []
        self.compressed = False
        self.progress = False
        self.quiet = False
        self.backing: str | None = None
        self.backing_fmt: str | None = None
        self.snapshot: str | None = None
        self.min_sparse = 8  # sectors
        self.skip_create = False
        self.force_share = False
        self.target_is_zero = False
        self.cache: str | None = None
        self.out_fmt_given = False  # -O was given (refused next to --target-image-opts)
        self.image_opts = False  # the sources are QemuOpts specs
        self.target_image_opts = False  # the target is a QemuOpts spec (needs -n)
        self.sparse_given = False  # -S was given (refused next to -C)
        self.copy_offload = False  # -C: no effect on the result, but refused with -c/-S/--salvage
        self.salvage = False
        self.src_cache: str | None = None
        self.in_flight: int | None = None  # -m
        self.bitmaps = False  # --bitmaps: the source's persistent bitmaps are copied too
        self.skip_broken_bitmaps = False


def parse(argv: list[str]) -> ConvertArgs:
    p = getopt_long(argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", LONGOPTS)
    a = ConvertArgs()
    for key, value in p.opts:
        if key == "h":
            from vdkit.cli.main import HELP

            write_out(HELP)
            raise _Done(0)
        if key == "f":
            a.fmt = value
        elif key == "O":
            a.out_fmt = value or ""
            a.out_fmt_given = True
        elif key == "B":
            a.backing = value
        elif key == "F":
            a.backing_fmt = value
        elif key == "c":
            a.compressed = True
        elif key == "o":
            if value is not None and value.strip() in ("help", "?"):
                raise VdkitError("option help is not supported by vdkit-img convert")
            a.options.append(value or "")
        elif key == "l":
            a.snapshot = value
        elif key == "S":
            try:
                from vdkit.opts import strtosz

                sval = strtosz(value or "")
            except ValueError:
                sval = -1
            if sval < 0 or sval % SECTOR or sval > 16 * 1024 * 1024:
                raise VdkitError(
                    "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
                    "16777216. Select 0 to disable sparse detection (fully allocates output).")
            a.min_sparse = sval // SECTOR
            a.sparse_given = True
        elif key == "p":
            a.progress = True
        elif key == "q":
            a.quiet = True
        elif key == "n":
            a.skip_create = True
        elif key == "U":
            a.force_share = True
        elif key == "target-is-zero":
            a.target_is_zero = True
        elif key == "m":
            # qemu-img's requests in flight: here the pieces read ahead of the writes
            a.in_flight = _coroutines(value or "")
        elif key == "t":
            if value not in CACHE_MODES:
                raise VdkitError(f"Invalid cache option: {value}")
            a.cache = value
        elif key == "T":
            a.src_cache = value
        elif key == "C":
            a.copy_offload = True
        elif key == "salvage":
            a.salvage = True
        elif key == "r":
            cvtnum("rate limit", value or "")  # validated; a rate limit changes no byte of the result
        elif key == "W":
            pass  # out-of-order writes: no effect on the result
        elif key == "bitmaps":
            a.bitmaps = True
        elif key == "skip-broken-bitmaps":
            a.skip_broken_bitmaps = True
        elif key == "image-opts":
            a.image_opts = True
        elif key == "target-image-opts":
            a.target_image_opts = True
        # --object: created (checked) by getopt_long; objects do not change a copy
    # qemu-img's checks after option parsing, in its order
    if a.skip_broken_bitmaps and not a.bitmaps:
        raise VdkitError("Use of --skip-broken-bitmaps requires --bitmaps")
    if a.quiet:
        a.progress = False
    if a.compressed and a.copy_offload:
        raise VdkitError("Cannot enable copy offloading when -c is used")
    if a.sparse_given and a.copy_offload:
        raise VdkitError("Cannot enable copy offloading when -S is used")
    if a.copy_offload and a.salvage:
        raise VdkitError("Cannot use copy offloading in salvaging mode")
    if a.target_image_opts and not a.skip_create:
        raise VdkitError("--target-image-opts requires use of -n flag")
    if a.skip_create and a.options:
        raise VdkitError("-o has no effect when skipping image creation")
    if a.target_is_zero and not a.skip_create:
        raise VdkitError("--target-is-zero requires use of -n flag")
    if len(p.args) < 2:
        raise VdkitError("Must specify image file name")
    if a.src_cache is not None and a.src_cache not in CACHE_MODES:
        raise VdkitError(f"Invalid source cache option: {a.src_cache}")
    a.sources, a.target = p.args[:-1], p.args[-1]
    return a


class _Done(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def main(argv: list[str]) -> int:
    try:
        a = parse(argv)
    except _Done as d:
        return d.code
    return run(a)


def run(a: ConvertArgs) -> int:
    from vdkit.block.node import open_image
    from vdkit.formats import registry

    if a.snapshot is not None and len(a.sources) > 1:
        raise VdkitError("No support for concatenating multiple snapshot")
    nodes: list[Node] = []
    try:
        for name in a.sources:
            if a.image_opts and a.fmt is not None:
                raise VdkitError("--image-opts and --format are mutually exclusive")
            filename, fmt, spec = open_args(name, a.fmt, a.image_opts)
            with spec_names((filename, spec)):
                nodes.append(open_image(filename, fmt, readonly=True, force_share=a.force_share))
        if a.snapshot is not None:
            _load_snapshot(nodes[0], a.snapshot)
        # under --target-image-opts -O is refused when the target is opened (after the sources)
        if not registry.is_known(a.out_fmt) and not a.target_image_opts:
            raise VdkitError(f"Unknown file format '{a.out_fmt}'")
        if a.bitmaps:
            _check_bitmap_source(nodes, skip_broken=a.skip_broken_bitmaps)
        backing = a.backing or _option_value(a.options, "backing_file")
        if a.target_is_zero and backing:
            # qemu-img says so and stops, but exits with status 0
            from vdkit.cli.main import error

            error("Cannot use --target-is-zero when the destination image has a backing file")
            return 0
        if len(a.sources) > 1 and backing:
            raise VdkitError("Having a backing file for the target makes no sense when concatenating multiple "
                             "input images")
        from vdkit.block.target import SilentFailure

        try:
            return _convert(a, nodes)
        except SilentFailure:
            return 1
    finally:
        for n in nodes:
            n.close()


def _option_value(options: list[str], key: str) -> str | None:
    """The last ``key=value`` among the ``-o`` option strings (QemuOpts: the last one wins)."""
    value = None
    for text in options:
        for item in split_items(text):
            k, eq, v = item.partition("=")
            if eq and k == key:
                value = v
    return value


def _load_snapshot(node: Node, spec: str) -> None:
    snap_id: str | None = None
    snap_name: str | None = None
    exact = spec.startswith("snapshot.")
    if exact:
        for item in split_items(spec):
            key, _, value = item.partition("=")
            if key == "snapshot.id":
                snap_id = value
            elif key == "snapshot.name":
                snap_name = value
            else:
                raise VdkitError(f"Invalid parameter '{key}'",
                                 hint=f"\0vdkit-img: Failed in parsing snapshot param '{spec}'\n")
    try:
        if exact:
            node.driver.snapshot_load_tmp(snap_id, snap_name)
        else:
            node.driver.snapshot_load_tmp(spec, None, fallback_name=True)
    except VdkitError as exc:
        raise exc.prefixed("Failed to load snapshot: ") from exc


def _coroutines(value: str) -> int:
    """``-m``: an integer as C's ``strtol`` with base 0 reads it (0x hex, 0 octal, whole string), 1 to 16."""
    text = value.lstrip(" \t\n\r\f\v")
    digits = text[1:] if text[:1] in ("+", "-") else text
    base = 10
    if digits[:2] in ("0x", "0X") and len(digits) > 2:
        digits, base = digits[2:], 16
    elif digits[:1] == "0" and len(digits) > 1:
        digits, base = digits[1:], 8
    try:
        n = int(digits, base) if digits.isascii() and digits.isalnum() else 0
    except ValueError:
        n = 0
    if text[:1] == "-" or not 1 <= n <= 16:
        raise VdkitError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    return n


def _convert(a: ConvertArgs, nodes: list[Node]) -> int:
    from vdkit.block.copy import SECTOR, convert_copy, sources_of
    from vdkit.block.progress import Progress

    sources = sources_of(nodes)
    total_bytes = sum(s.sectors for s in sources) * SECTOR
    target = _open_target(a, total_bytes)
    copy_bitmaps = None
    if a.bitmaps:
        if not target.node.driver.supports_persistent_bitmaps:
            target.abort()  # (the new file stays, as qemu-img leaves it)
            raise VdkitError(f"Format driver '{target.node.driver.format_name}' does not support bitmaps")

        def copy_bitmaps(dst: Node) -> None:
            _copy_bitmaps(nodes[0], dst, skip_broken=a.skip_broken_bitmaps)
    progress = Progress(a.progress)
    reported: list[BaseException] = []

    def report_first(exc: BaseException) -> None:
        # qemu-img prints the failed write (or read) before closing the target, whose cache flushes
        # may fail as well and report after it
        if isinstance(exc, VdkitError):
            from vdkit.cli.main import report_error

            report_error(exc)
            reported.append(exc)

    try:
        convert_copy(sources, target, progress, has_backing=a.backing is not None, compressed=a.compressed,
                     min_sparse=a.min_sparse, has_zero_init=target.has_zero_init and not a.backing,
                     in_flight=a.in_flight, before_abort=report_first, before_finish=copy_bitmaps)
    except VdkitError as exc:
        if exc in reported:
            return 1
        raise
    progress.set(100.0)
    progress.end()
    return 0


# -- --bitmaps: the single source's persistent bitmaps, checked before the copy, added after it ---

def _check_bitmap_source(nodes: list[Node], *, skip_broken: bool) -> None:
    if len(nodes) > 1:
        raise VdkitError("Copying bitmaps only possible with single source")
    src = nodes[0]
    if not src.driver.supports_persistent_bitmaps:
        raise VdkitError("Source lacks bitmap support")
    if skip_broken:
        return
    for bm in src.bitmaps:  # (QEMU's order: the last one loaded first)
        if bm.persistent and bm.inconsistent:
            from vdkit.cli.main import PROG

            raise VdkitError(f"Cannot copy inconsistent bitmap '{bm.name}'",
                             hint=f"Try --skip-broken-bitmaps, or use '{PROG} bitmap --remove' to delete it")


def _copy_bitmaps(src: Node, dst: Node, *, skip_broken: bool) -> None:
    """Each persistent bitmap of ``src`` as a new persistent bitmap of ``dst`` (same name, granularity and
    enabled state) holding the same bits, once the data is copied; inconsistent ones skipped with a
    warning under ``--skip-broken-bitmaps`` (refused before the copy otherwise)."""
    from vdkit.block.dirty_bitmap import add_bitmap, merge_bitmaps

    for bm in src.bitmaps:
        if not bm.persistent or bm.name is None:
            continue
        if bm.inconsistent and skip_broken:
            from vdkit.cli.main import warn

            warn(f"Skipping inconsistent bitmap '{bm.name}'")
            continue
        try:
            new = add_bitmap(dst, bm.name, granularity=bm.granularity, persistent=True, disabled=not bm.enabled,
                             label=dst.filename)
        except VdkitError as exc:
            raise VdkitError(f"Failed to create bitmap {bm.name}: {exc.message}") from exc
        try:
            merge_bitmaps(new, [bm])
        except VdkitError as exc:
            raise VdkitError(f"Failed to populate bitmap {bm.name}: {exc.message}") from exc


# -- the target: created (unless -n) and opened here, written by vdkit.block.copy -----------------

def _supports_compression(fmt: str) -> bool:
    from vdkit.formats import registry

    return registry.is_known(fmt) and getattr(registry.format_module(fmt), "SUPPORTS_COMPRESSION", False)


def _takes_backing(fmt: str) -> bool:
    """The output format has a ``backing_file`` creation option (qemu-img then insists on ``-F``)."""
    from vdkit.formats import registry

    return (registry.is_known(fmt) and registry.can_create(fmt)
            and any(d.name == "backing_file" for d in registry.format_module(fmt).create_options()))


def _open_target(a: ConvertArgs, size: int) -> Target:
    """Create the output (unless ``-n``) and open it for writing."""
    from vdkit.block.target import target_for

    if a.target_image_opts:  # implies -n (checked while parsing)
        node = _open_target_spec(a)
    else:
        node = _create_and_open(a, size)
    target = target_for(node, size, created=not a.skip_create, target_is_zero=a.target_is_zero,
                        has_backing=a.backing is not None, compressed=a.compressed)
    if target.compressed_only:
        a.compressed = True
    return target


def _no_flushes(a: ConvertArgs, node: Node) -> None:
    if a.cache in (None, "unsafe"):
        # qemu-img convert writes its target with cache=unsafe unless -t says
        # otherwise: a crash mid-convert leaves a useless target either way.
        for f in (node.driver.file, *node.driver.extra_files()):
            f.sync = False


def _open_target_spec(a: ConvertArgs) -> Node:
    """``--target-image-opts``: the existing target named by a QemuOpts spec.

    The driver comes from the spec, so ``-O`` is refused as ``-f`` is next to
    ``--image-opts``; the compression check can only follow the open.
    """
    from vdkit.block.node import open_image
    from vdkit.cli.main import image_opts

    if a.out_fmt_given:
        raise VdkitError("--image-opts and --format are mutually exclusive")
    filename, driver = image_opts(a.target)
    with spec_names((filename, a.target)):
        node = open_image(filename, driver, readonly=False, backing=True, share_writes=True)
    _no_flushes(a, node)
    if a.compressed and not _supports_compression(node.format):
        node.close()
        raise VdkitError("Compression not supported for this file format")
    return node


def _create_and_open(a: ConvertArgs, size: int) -> Node:
    from vdkit.block.node import open_image

    if a.compressed and not _supports_compression(a.out_fmt):
        raise VdkitError("Compression not supported for this file format")
    if not a.skip_create:
        backing = a.backing or _option_value(a.options, "backing_file")
        backing_fmt = a.backing_fmt or _option_value(a.options, "backing_fmt")
        if backing is not None and backing_fmt is None and _takes_backing(a.out_fmt):
            raise VdkitError("Use of backing file requires explicit backing format")
        _create(a, size)
    if a.skip_create and a.target.startswith("json:"):  # -n onto a json: name: its options, as qemu-img
        filename, fmt, spec = open_args(a.target, a.out_fmt, False)
        with spec_names((filename, spec)):
            node = open_image(filename, fmt, readonly=False, backing=True, share_writes=True)
    else:
        node = open_image(a.target, a.out_fmt, readonly=False, backing=True, share_writes=True)
    _no_flushes(a, node)
    return node


def _create(a: ConvertArgs, size: int) -> None:
    from vdkit.cli.create import img_create
    from vdkit.opts import split_options

    items: list[tuple[str, str]] = []
    for text in a.options:
        items += [(k, v) for k, v in split_options(text) if k != "size"]
    options = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in items) or None
    # the format's own errors carry qemu-img convert's prefix; its option checks above do not
    img_create(a.target, a.out_fmt, a.backing, a.backing_fmt, options, size, unsafe=True, quiet=True,
               driver_prefix=f"{a.target}: error while converting {a.out_fmt}: ")


__all__ = ["main", "run", "parse", "ConvertArgs", "UsageError"]
