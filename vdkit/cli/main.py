"""vdkit-img: the qemu-img compatible command line.

This module is the only place where errors become exit codes and stderr
lines.  Subcommands live in their own modules and are imported only when
used, so that starting the program stays cheap.
"""

from __future__ import annotations

import os
import sys

from vdkit.errors import UsageError, VdkitError, take_corruption_report

TYPE_CHECKING = False  # typing and collections.abc are not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

PROG = "vdkit-img"

# subcommand -> module under vdkit.cli
COMMANDS = {
    "info": "info",
    "snapshot": "snapshot",
    "create": "create",
    "check": "check",
    "map": "map",
    "convert": "convert",
    "compare": "compare",
    "resize": "resize",
    "rebase": "rebase",
    "commit": "commit",
    "inspect": "inspect",
    "bitmap": "bitmap",
}

# Exit code a subcommand returns through this exception (e.g. check's 2/3/63).
class Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def write_out(text: str) -> None:
    """Write to stdout keeping undecodable bytes of image names as they were."""
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))


def write_err(text: str) -> None:
    sys.stdout.flush()
    sys.stderr.buffer.write(text.encode("utf-8", "surrogateescape"))
    sys.stderr.flush()


def error(message: str, hint: str | None = None) -> None:
    """``vdkit-img: <message>`` plus unprefixed hint lines, as error_report does."""
    text = f"{PROG}: {message}\n"
    if hint:
        text += hint if hint.endswith("\n") or hint.startswith("\0") else hint + "\n"
    write_err(text.replace("\0", ""))


def report_error(exc: VdkitError) -> None:
    """A command's failure as the top level prints it: a qcow2 corruption report first, then the error."""
    report = take_corruption_report(exc)
    if report is not None:
        write_err(report + "\n")
    error(exc.message, exc.hint)


def warn(message: str, hint: str | None = None) -> None:
    """``vdkit-img: warning: <message>``, as warn_report prints it."""
    error(f"warning: {message}", hint)


def usage_error(message: str) -> int:
    error(message, f"Try '{PROG} --help' for more information")
    return 1


HELP = f"""{PROG} version 0.1.0 (qemu-img 7.2 compatible)
usage: {PROG} [standard options] command [command options]

Standard options (vdkit extensions):
  --allow-dir DIR   follow backing and data files only inside DIR (repeatable); for untrusted images

Command syntax:
  bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]]
         [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap
  check [--object objectdef] [--image-opts] [--output=human|json] [-f fmt] [-q] [-r [leaks | all]] [-U] filename
  commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-b base] [-d] [-p] filename
  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
  convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [-U] [-c] [-p] [-q] [-n]
          [-f fmt] [-t cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param]
          [-S sparse_size] filename [filename2 [...]] output_filename
  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  inspect [-f declared_fmt] [--output=human|json] [--max-size=size] filename   (vdkit extension: safety verdict)
  info [--object objectdef] [--image-opts] [-f fmt] [--output=human|json] [--backing-chain] [-U] filename
  map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=human|json]
      [-U] filename
  rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-p] [-u] -b backing_file [-F backing_fmt] filename
  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size
  snapshot [--object objectdef] [--image-opts] [-U] [-q] [--output=human|json] [-l | -a snapshot | -c snapshot |
           -d snapshot] filename

Options qemu-img accepts that cannot change the result are accepted and checked but have no effect:
convert -T/-C/-W/-r/--salvage/--bitmaps, commit -t/-r, rebase -t/-T, check/compare -T.  (convert -m N
sets how many pieces are read ahead of the writes.)
"""


def run(argv: list[str]) -> int:
    allowed: list[str] = []
    while argv and (argv[0] == "--allow-dir" or argv[0].startswith("--allow-dir=")):
        if argv[0] == "--allow-dir":
            if len(argv) < 2:
                return usage_error("missing argument for option '--allow-dir'")
            allowed.append(argv[1])
            argv = argv[2:]
        else:
            allowed.append(argv[0].partition("=")[2])
            argv = argv[1:]
    if allowed:
        from vdkit.block.chain import OpenPolicy, set_default_policy

        set_default_policy(OpenPolicy.restricted_to(*allowed))
    if not argv:
        return usage_error("Not enough arguments")
    cmd = argv[0]
    if cmd in ("-h", "--help"):
        write_out(HELP)
        return 0
    if cmd in ("-V", "--version"):
        write_out(f"{PROG} version 0.1.0\n")
        return 0
    module = COMMANDS.get(cmd)
    if module is None:
        return usage_error(f"Command not found: {cmd}")
    # __import__ rather than importlib.import_module: the importlib package is not loaded at start-up
    handler: Callable[[list[str]], int] = __import__(f"vdkit.cli.{module}", fromlist=["main"]).main
    return handler(argv[1:])


def main(argv: list[str] | None = None) -> int:
    # vdkit does no linear algebra; without this, importing numpy (the qcow2 metadata code uses it)
    # starts a pool of OpenBLAS threads, about 40 ms of every command that needs it.  The process is
    # ours here, unlike in library use, so the environment may be set.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except Exit as exc:
        code = exc.code
    except UsageError as exc:
        code = usage_error(exc.message)
    except VdkitError as exc:
        report_error(exc)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a bug in vdkit: say so in one line, never a traceback
        if os.environ.get("VDKIT_DEBUG"):
            raise
        error(f"internal error: {type(exc).__name__}: {exc} (set VDKIT_DEBUG=1 for a traceback)")
        code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return code


# Tracked objects allocated between two collections of the youngest generation, for a vdkit-img
# process (the interpreter's default is 700).  A start creates a few thousand long-lived objects
# (modules, functions, classes); at 700 that made eight collections, four of them full ones (a young
# heap makes the full-collection rule fire often): about a tenth of a bare interpreter start.
GC_THRESHOLD = 10_000


def process_main() -> NoReturn:
    """Run ``vdkit-img`` as a whole process (the installed script, ``python -m vdkit.cli.main``).

    Start-up is a target (``info`` within 1.5x of a bare interpreter), and two costs of a short run
    are the garbage collector's, not vdkit's: collections while the modules load, and the interpreter's
    teardown (a last full collection, then every module and object freed one by one, ~8M
    instructions, a fifth of a bare start).  So the objects made so far are frozen (never scanned
    again), collections wait for GC_THRESHOLD allocations, and when the command is done the process
    ends with :func:`os._exit` once the standard streams are flushed.  That is safe because vdkit
    keeps nothing for the teardown: images are file descriptors that the command closes (writes
    are ``pwrite``s already in the kernel, syncs explicit; the OFD locks go with the descriptors),
    there is no ``__del__`` or ``atexit`` in the package.  Anything another party registered for
    the teardown gets the ordinary exit instead (:func:`_teardown_needed`), and so does a flush that
    fails (reported as the ordinary exit reports it).  Library callers use :func:`main`.
    """
    import gc

    gc.freeze()
    gc.set_threshold(GC_THRESHOLD)
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    if _teardown_needed():
        sys.exit(code)
    os._exit(code)


def _teardown_needed() -> bool:
    """Whether something outside vdkit waits for the interpreter's exit: atexit callbacks (coverage,
    logging, a user's sitecustomize), a profiler or tracer (cProfile, pdb, trace write their results
    after the script returns), or a thread that is not a daemon (the interpreter joins it)."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    # Whoever registered a callback imported atexit (registering is its Python API; C code calls it
    # through the module too), so a process without the module has none, and does not import it.
    atexit = sys.modules.get("atexit")
    if atexit is not None:
        ncallbacks = getattr(atexit, "_ncallbacks", None)  # CPython's; elsewhere assume there are some
        if ncallbacks is None or ncallbacks():
            return True
    threading = sys.modules.get("threading")
    if threading is None:
        return False
    if getattr(threading, "_threading_atexits", None):  # concurrent.futures joins its workers there
        return True
    main_thread = threading.main_thread()
    return any(not t.daemon for t in threading.enumerate() if t is not main_thread)


if __name__ == "__main__":
    process_main()
