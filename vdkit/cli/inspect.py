"""``vdkit-img inspect``: a safety verdict for an untrusted image (a vdkit extension).

Exit status: 0 safe, 2 unsafe (every reason printed), 1 when the file cannot
be read at all.  The engine is :mod:`vdkit.block.inspect`; this module only
parses arguments and prints.
"""

from __future__ import annotations

from vdkit.cli.main import LongOpt, cvtnum, getopt_long, output_format, write_out
from vdkit.errors import UsageError

LONGOPTS = [
    LongOpt("help", False, "h"),
    LongOpt("format", True, "f"),
    LongOpt("output", True, "output"),
    LongOpt("max-size", True, "max-size"),
]

EXIT_SAFE, EXIT_UNREADABLE, EXIT_UNSAFE = 0, 1, 2


def main(argv: list[str]) -> int:
    p = getopt_long(argv, ":f:h", LONGOPTS, argv0="inspect")
    if p.has("h"):
        from vdkit.cli.main import HELP

        write_out(HELP)
        return 0
    if len(p.args) != 1:
        raise UsageError("Expecting one image file name")
    output = output_format(p.last("output"))
    limit = p.last("max-size")
    max_size = cvtnum("maximum size", limit) if limit is not None else None
    from vdkit.block.inspect import inspect_image

    verdict = inspect_image(p.args[0], fmt=p.last("f"), max_virtual_size=max_size)
    if output == "json":
        import json

        doc = {
            "filename": verdict.filename,
            "format": verdict.format,
            "virtual-size": verdict.virtual_size,
            "verdict": verdict.verdict,
            "reasons": [{"kind": r.kind, "detail": r.detail} for r in verdict.reasons],
        }
        write_out(json.dumps(doc, indent=4) + "\n")
    else:
        lines = [f"image: {verdict.filename}", f"file format: {verdict.format or 'unknown'}"]
        if verdict.virtual_size is not None:
            lines.append(f"virtual size: {verdict.virtual_size} bytes")
        lines.append(f"verdict: {verdict.verdict}")
        lines += [f"  {r.kind}: {r.detail}" for r in verdict.reasons]
        write_out("\n".join(lines) + "\n")
    return EXIT_SAFE if verdict.safe else EXIT_UNSAFE
