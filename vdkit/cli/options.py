"""qemu-img's argument syntax: GNU getopt_long with its quirks.

qemu-img parses each subcommand with ``getopt_long`` and an option string
starting with ``:``: options may follow file names (arguments are permuted),
long options may be abbreviated to any unique prefix, ``--opt=value`` and
``--opt value`` are equivalent, short options may be bundled (``-qf qcow2``,
``-fqcow2``), and ``--`` ends option parsing.  Errors use qemu-img's words.
"""

from __future__ import annotations

from vdkit.errors import SpecNames, UsageError, VdkitError
from vdkit.record import field, record

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.objects import QomObject as QomObject  # re-exported: the daemon's -object
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
    from vdkit.errors import VdkitError

    if value is None:
        return "human"
    if value not in ("human", "json"):
        raise VdkitError("--output must be used with human or json as argument.")
    return value


def cvtnum(name: str, value: str, min_value: int = 0, max_value: int = 2**63 - 1) -> int:
    """qemu-img's size argument check, with its two-line error for bad syntax."""
    from vdkit.cli.main import PROG
    from vdkit.errors import VdkitError
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
            from vdkit.cli.main import write_err

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
    from vdkit.cli.main import warn

    PROCESS.warn = warn
    return interpreter.image_opts(spec, parsed)


def check_cache_modes(p: Parsed, *, cache: str | None = "t", src_cache: str | None = "T") -> None:
    """qemu-img's cache-mode checks (``-t``, then ``-T``), which come before the images are opened.

    vdkit's I/O does not depend on them (convert's target aside), but a bad
    value is an error in qemu-img, so it is one here too.
    """
    from vdkit.errors import VdkitError
    from vdkit.opts import CACHE_MODES  # qemu-img checks the name only

    for key, what in ((cache, "cache"), (src_cache, "source cache")):
        value = p.last(key) if key is not None else None
        if value is not None and value not in CACHE_MODES:
            raise VdkitError(f"Invalid {what} option: {value}")


def mutually_exclusive_image_opts(p: Parsed, *fmt_keys: str) -> None:
    """qemu-img refuses a format option next to ``--image-opts`` (the spec names its driver)."""
    from vdkit.errors import VdkitError

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
    from vdkit.cli.main import write_out

    if qom_type in CREATABLE:
        lines = [f"{qom_type} options:"] + [f"  {p}" for p in CREATABLE[qom_type].split()]
    else:
        lines = ["List of user creatable objects:"] + [f"  {t}" for t in sorted(CREATABLE)]
    write_out("\n".join(lines) + "\n")
    # qemu-img exits here; SystemExit rather than main's Exit, which is a different class when
    # vdkit.cli.main runs as __main__ (python -m)
    sys.stdout.flush()
    raise SystemExit(0)
