"""``vdkit-img check``: run the qcow2 check, print the summary, return qemu-img's exit code.

Exit codes come from the result, not from exceptions: 0 clean, 2 corruptions
left, 3 only leaks left, 1 when the check could not complete, 63 when the
format has no check.  Per-problem diagnostics go to stderr as they are found.
"""

from __future__ import annotations

import os

from vdkit.cli.main import (
    PROG,
    LongOpt,
    check_cache_modes,
    getopt_long,
    mutually_exclusive_image_opts,
    open_args,
    output_format,
    spec_names,
    write_err,
    write_out,
)
from vdkit.errors import OpenError, UsageError

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.driver import CheckResult, FormatDriver
    from vdkit.info.extra_model import ImageCheck

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("format", True, "f"),
    LongOpt("repair", True, "r"),
    LongOpt("output", True, "output"),
    LongOpt("object", True, "object"),
    LongOpt("image-opts", False, "image-opts"),
    LongOpt("force-share", False, "U"),
]


def _report(line: str) -> None:
    if line.startswith("\0"):
        write_err(f"{PROG}: {line[1:]}\n")
    else:
        write_err(line + "\n")


def main(argv: list[str]) -> int:
    p = getopt_long(argv, ":hf:r:T:qU", LONGOPTS)
    repair: str | None = None
    output = "human"
    for key, value in p.opts:
        if key == "h":
            from vdkit.cli.main import HELP

            write_out(HELP)
            return 0
        if key == "r":
            if value not in ("leaks", "all"):
                raise UsageError(f"Unknown option value for -r (expecting 'leaks' or 'all'): {value}")
            repair = value
        if key == "output":
            output = output_format(value)
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    check_cache_modes(p, cache=None)
    mutually_exclusive_image_opts(p, "f")
    filename, fmt, spec = open_args(p.args[0], p.last("f"), p.has("image-opts"))
    quiet = p.has("q")
    force_share = p.has("U")
    if force_share and repair:
        raise OpenError(f"Could not open '{spec or filename}': force-share=on can only be used with read-only images")
    from vdkit.block.node import open_image
    from vdkit.errors import UnsupportedError

    def warn_if_probed(drv: FormatDriver) -> None:  # repairs only: the module is not loaded otherwise
        from vdkit.cli.snapshot_write import warn_if_probed

        warn_if_probed(drv, fmt, filename)

    preamble = ""
    with spec_names((filename, spec)), open_image(
        filename, fmt, readonly=repair is None, force_share=force_share, check_mode=True, share_writes=True,
        on_open=None if repair is None else warn_if_probed,  # opened writable
    ) as node:
        driver = node.driver
        for message, hint in node.warnings():  # open-time warnings (warn_report in QEMU)
            from vdkit.cli.main import warn

            warn(message, hint)
        try:
            result = driver.check(repair, _report)
        except UnsupportedError as exc:
            write_err(f"{PROG}: {exc.message}\n")
            return 63
        fmt_name = node.format
        if result.error == 0 and (result.corruptions_fixed or result.leaks_fixed):
            if output == "human" and not quiet:
                # Held back like qemu-img's buffered stdout, which appears after
                # the second pass's diagnostics when both streams are merged.
                preamble = _repaired_preamble(result.leaks_fixed, result.corruptions_fixed)
            second = driver.check(None, _report)
            second.leaks_fixed = result.leaks_fixed
            second.corruptions_fixed = result.corruptions_fixed
            result = second
    failed = bool(result.error or result.check_errors)
    if failed:
        # qemu-img reports this before its buffered stdout reaches a pipe.
        msg = "Check failed" + (f": {os.strerror(-result.error)}" if result.error else "")
        write_err(f"{PROG}: {msg}\n")
    if preamble:
        write_out(preamble)
    if result.error == 0 and not quiet:
        if output == "json":
            from vdkit.info.render_json import render_pretty

            write_out(render_pretty(_model(spec or filename, fmt_name, result)))
        else:
            write_out(_human(result))
    if failed:
        return 1
    if result.corruptions:
        return 2
    if result.leaks:
        return 3
    return 0


def _human(r: CheckResult) -> str:
    """qemu-img's human summary (the "repaired" preamble apart).  Written from the result, not the
    QAPI model, so a human check loads neither the model nor the info renderers (start-up cost)."""
    out: list[str] = []
    if not r.corruptions and not r.leaks and not r.check_errors:
        out.append("No errors were found on the image.\n")
    else:
        if r.corruptions:
            out.append(
                f"\n{r.corruptions} errors were found on the image.\n"
                "Data may be corrupted, or further writes to the image may corrupt it.\n"
            )
        if r.leaks:
            out.append(
                f"\n{r.leaks} leaked clusters were found on the image.\n"
                "This means waste of disk space, but no harm to data.\n"
            )
        if r.check_errors:
            out.append(f"\n{r.check_errors} internal errors have occurred during the check.\n")
    total, allocated = r.total_clusters, r.allocated_clusters
    if total and allocated:
        out.append(
            f"{allocated}/{total} = {allocated * 100.0 / total:0.2f}% allocated, "
            f"{r.fragmented_clusters * 100.0 / allocated:0.2f}% fragmented, "
            f"{r.compressed_clusters * 100.0 / allocated:0.2f}% compressed clusters\n"
        )
    if r.image_end_offset:
        out.append(f"Image end offset: {r.image_end_offset}\n")
    return "".join(out)


def _repaired_preamble(leaks_fixed: int, corruptions_fixed: int) -> str:
    return (
        "The following inconsistencies were found and repaired:\n\n"
        f"    {leaks_fixed} leaked clusters\n"
        f"    {corruptions_fixed} corruptions\n\n"
        "Double checking the fixed image now...\n"
    )


def _model(filename: str, fmt: str, r: CheckResult) -> ImageCheck:
    from vdkit.info.extra_model import ImageCheck

    def nz(v: int) -> int | None:
        return v or None

    return ImageCheck(
        filename=filename,
        format=fmt,
        check_errors=r.check_errors,
        image_end_offset=nz(r.image_end_offset),
        corruptions=nz(r.corruptions),
        leaks=nz(r.leaks),
        corruptions_fixed=nz(r.corruptions_fixed),
        leaks_fixed=nz(r.leaks_fixed),
        total_clusters=nz(r.total_clusters),
        allocated_clusters=nz(r.allocated_clusters),
        fragmented_clusters=nz(r.fragmented_clusters),
        compressed_clusters=nz(r.compressed_clusters),
    )
