"""vdkit-img: the qemu-img compatible command line.

This module is the only place where errors become exit codes and stderr
lines.  Subcommands live in their own modules and are imported only when
used, so that starting the program stays cheap.  What every subcommand
parses its arguments with is here too (the second half of this module;
a module of its own was a share of every start):

qemu-img's argument syntax: GNU getopt_long with its quirks.

qemu-img parses each subcommand with ``getopt_long`` and an option string
starting with ``:``: options may follow file names (arguments are permuted),
long options may be abbreviated to any unique prefix, ``--opt=value`` and
``--opt value`` are equivalent, short options may be bundled (``-qf qcow2``,
``-fqcow2``), and ``--`` ends option parsing.  Errors use qemu-img's words.
"""

from __future__ import annotations

import os
import sys

from vdkit.errors import SpecNames, UsageError, VdkitError, take_corruption_report
from vdkit.record import field, record

TYPE_CHECKING = False  # typing and collections.abc are not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from vdkit.block.objects import QomObject as QomObject  # re-exported: the daemon's -object

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
convert -T/-C/-W/-r/--salvage, commit -t/-r, rebase -t/-T, check/compare -T.  (convert -m N
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



# -- qemu-img's argument syntax (getopt_long), shared by the subcommands ---------------------------

# vdkit.opts (sizes, cache modes, creation options) is imported by the functions that use it: info,
# snapshot and map parse no size, and the module is about a thirtieth of a bare interpreter start.


class ObjectError(VdkitError):
    """A bad ``--object``: compare exits with 2 for it, the other commands with 1."""


@record(frozen=True)
class LongOpt:
    name: str
    has_arg: bool
    key: str  # the short letter it maps to, or a long-only key such as "output"


@record
class Parsed:
    opts: list[tuple[str, str | None]] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    # ``--object`` definitions, created (checked) as the option is met, like qemu-img does
    objects: dict[str, QomObject] = field(default_factory=dict)

    def last(self, key: str) -> str | None:
        value = None
        for k, v in self.opts:
            if k == key:
                value = v
        return value

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.opts)


def getopt_long(argv: list[str], shortopts: str, longopts: list[LongOpt], argv0: str | None = None) -> Parsed:
    """Parse ``argv`` (the arguments after the subcommand name ``argv0``).

    qemu-img names the offending argument as ``argv[optind - 1]``; glibc has
    not yet moved past a bundle (``-qx``) when it meets an unknown letter in
    its middle, so the message then names the *previous* argument (the
    subcommand itself for the first one).  Pass ``argv0`` to get that quirk.
    """
    short_arg: dict[str, bool] = {}
    i = 0
    while i < len(shortopts):
        ch = shortopts[i]
        if ch == ":":
            i += 1
            continue
        takes = i + 1 < len(shortopts) and shortopts[i + 1] == ":"
        short_arg[ch] = takes
        i += 2 if takes else 1
    out = Parsed()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            out.args.extend(argv[i:])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            exact = [lo for lo in longopts if lo.name == name]
            matches = exact or [lo for lo in longopts if lo.name.startswith(name)]
            # glibc calls a prefix ambiguous only when the candidates differ in
            # what they do; qemu-img's leading ':' turns that into "unrecognized".
            if len({(m.has_arg, m.key) for m in matches}) != 1:
                raise UsageError(f"unrecognized option '{arg}'")
            lo = matches[0]
            if lo.has_arg:
                if not eq:
                    if i >= len(argv):
                        raise UsageError(f"missing argument for option '{arg}'")
                    value = argv[i]
                    i += 1
                out.opts.append((lo.key, value))
                if lo.key == "object":
                    # qemu-img creates each object when getopt returns it: a bad one ends the
                    # command before later options are even looked at.
                    try:
                        add_object(value, out.objects)
                    except VdkitError as exc:
                        raise ObjectError(exc.message, hint=exc.hint) from None
            else:
                if eq:
                    raise UsageError(f"unrecognized option '{arg}'")
                out.opts.append((lo.key, None))
            continue
        if arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                ch = arg[j]
                j += 1
                if ch not in short_arg:
                    shown = arg
                    if argv0 is not None and j < len(arg):
                        shown = argv[i - 2] if i >= 2 else argv0
                    raise UsageError(f"unrecognized option '{shown}'")
                if short_arg[ch]:
                    if j < len(arg):
                        value = arg[j:]
                    elif i < len(argv):
                        value = argv[i]
                        i += 1
                    else:
                        raise UsageError(f"missing argument for option '{arg}'")
                    out.opts.append((ch, value))
                    break
                out.opts.append((ch, None))
            continue
        out.args.append(arg)
    return out


def output_format(value: str | None) -> str:
    """Validate ``--output``; qemu-img reports this one without the Try line."""
    if value is None:
        return "human"
    if value not in ("human", "json"):
        raise VdkitError("--output must be used with human or json as argument.")
    return value


def cvtnum(name: str, value: str, min_value: int = 0, max_value: int = 2**63 - 1) -> int:
    """qemu-img's size argument check, with its two-line error for bad syntax."""
    from vdkit.opts import SizeRangeError, strtosz

    warnings: list[str] = []
    try:
        result = strtosz(value, warn=warnings)
    except SizeRangeError:
        result = None
    except ValueError:
        raise VdkitError(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for",
            hint=f"\0{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n",
        ) from None
    finally:
        if warnings:
            for w in warnings:
                write_err(f"{PROG}: warning: {w}\n")
    if result is None or not min_value <= result <= max_value:
        raise VdkitError(f"Invalid {name} specified. Must be between {min_value} and {max_value}.")
    return result



def image_opts(spec: str, parsed: dict[str, object] | None = None) -> tuple[str, str | None]:
    """The one option interpreter (:func:`vdkit.block.image_opts.image_opts`), whose warnings qemu-img prints
    as ``vdkit-img: warning: ...`` (also those given later, when a ``backing`` object opens)."""
    from vdkit.block import image_opts as interpreter
    from vdkit.block.secrets import PROCESS

    PROCESS.warn = warn
    return interpreter.image_opts(spec, parsed)


def check_cache_modes(p: Parsed, *, cache: str | None = "t", src_cache: str | None = "T") -> None:
    """qemu-img's cache-mode checks (``-t``, then ``-T``), which come before the images are opened.

    vdkit's I/O does not depend on them (convert's target aside), but a bad
    value is an error in qemu-img, so it is one here too.
    """
    from vdkit.opts import CACHE_MODES  # qemu-img checks the name only

    for key, what in ((cache, "cache"), (src_cache, "source cache")):
        value = p.last(key) if key is not None else None
        if value is not None and value not in CACHE_MODES:
            raise VdkitError(f"Invalid {what} option: {value}")


def mutually_exclusive_image_opts(p: Parsed, *fmt_keys: str) -> None:
    """qemu-img refuses a format option next to ``--image-opts`` (the spec names its driver)."""
    if p.has("image-opts") and any(p.last(k) is not None for k in fmt_keys):
        raise VdkitError("--image-opts and --format are mutually exclusive")


def open_args(name: str, fmt: str | None, use_opts: bool) -> tuple[str, str | None, str | None]:
    """(file name, format, spec) for one image argument: the spec is the argument under ``--image-opts``."""
    if not use_opts:
        if name.startswith("json:"):  # QEMU's json: pseudo-filename: the same options, as JSON
            from vdkit.block import json_name
            from vdkit.errors import OpenError

            try:
                parsed = json_name.parse(name)
            except OpenError as exc:
                raise exc.prefixed(f"Could not open '{name}': ") from None
            filename, driver = image_opts(name, parsed)
            return filename, driver or fmt, name
        # Only a spec parsed earlier (which imported the option store to write it) can have set one: a plain
        # command such as ``info x.qcow2`` does not pay for importing the store to learn that it is empty.
        import sys

        store = sys.modules.get("vdkit.block.secrets")
        if store is not None:
            store.forget_backing(name)
        return name, fmt, None
    filename, driver = image_opts(name)
    return filename, driver, name


def spec_names(*pairs: tuple[str, str | None]) -> SpecNames:
    """:class:`vdkit.errors.SpecNames` (errors of images opened from a spec name the spec, as
    qemu-img's do) with vdkit-img's word where the spec gave qcow2's ``encrypt.key-secret``: qemu-img
    would decrypt, vdkit-img cannot, and the block layer's "key-secret is required" would be a false
    reason."""
    return SpecNames(*pairs, explain=_cannot_decrypt)


def _cannot_decrypt(renamed: Exception, spec: str) -> Exception:
    from vdkit.errors import UnsupportedError

    if (isinstance(renamed, VdkitError) and "encrypt.key-secret=" in spec
            and renamed.message.endswith("Parameter 'encrypt.key-secret' is required for cipher")):
        return UnsupportedError(f"Could not open '{spec}': vdkit-img cannot read encrypted data")
    return renamed


# -- --object (QOM user-creatable objects): created by vdkit.block.objects, shared with the library -------

def add_object(spec: str, objects: dict[str, QomObject]) -> None:
    """Create ``--object spec`` into ``objects`` (:func:`vdkit.block.objects.add_object`); ``help`` (alone
    or after a type) prints what qemu-img prints and ends the command with status 0."""
    from vdkit.block.objects import ObjectHelp
    from vdkit.block.objects import add_object as create

    try:
        create(spec, objects)
    except ObjectHelp as asked:
        _print_object_help(asked.qom_type)


def _print_object_help(qom_type: str | None) -> None:
    import sys

    from vdkit.block.objects import CREATABLE

    if qom_type in CREATABLE:
        lines = [f"{qom_type} options:"] + [f"  {p}" for p in CREATABLE[qom_type].split()]
    else:
        lines = ["List of user creatable objects:"] + [f"  {t}" for t in sorted(CREATABLE)]
    write_out("\n".join(lines) + "\n")
    # qemu-img exits here; SystemExit rather than main's Exit, which is a different class when
    # vdkit.cli.main runs as __main__ (python -m)
    sys.stdout.flush()
    raise SystemExit(0)


if __name__ == "__main__":
    process_main()
