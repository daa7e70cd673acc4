"""qemu-img's argument syntax: GNU getopt_long with its quirks.

qemu-img parses each subcommand with ``getopt_long`` and an option string
starting with ``:``: options may follow file names (arguments are permuted),
long options may be abbreviated to any unique prefix, ``--opt=value`` and
``--opt value`` are equivalent, short options may be bundled (``-qf qcow2``,
``-fqcow2``), and ``--`` ends option parsing.  Errors use qemu-img's words.
"""

from __future__ import annotations

from vdkit.errors import UsageError
from vdkit.record import field, record


@record(frozen=True)
class LongOpt:
    name: str
    has_arg: bool
    key: str  # the short letter it maps to, or a long-only key such as "output"


@record
class Parsed:
    opts: list[tuple[str, str | None]] = field(default_factory=list)
    args: list[str] = field(default_factory=list)

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


# -- sizes (qemu_strtosz and qemu-img's cvtnum) -------------------------------------------------

_SIZE_SUFFIXES = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


class SizeRangeError(ValueError):
    """The size does not fit in 64 bits (QEMU's -ERANGE)."""


def strtosz(text: str, *, warn: list[str] | None = None) -> int:
    """Parse a size as QEMU does: decimal or hex, optional fraction, suffix B/K/M/G/T/P/E.

    Suffixes are powers of 1024; a fraction needs a suffix other than B and is
    rounded half up after scaling (``0.1M`` is 104858).  Hex takes no fraction;
    a hex number with a suffix still works but earns a deprecation warning
    (appended to ``warn``).  Raises ``ValueError`` for bad syntax and
    :class:`SizeRangeError` for values of 2^64 or more.
    """
    import re

    m = re.match(r"[ \t\n\v\f\r]*([+-]?)([0-9]*)", text)
    assert m is not None
    sign, digits = m.group(1), m.group(2)
    pos = m.end()
    if not digits or sign == "-":
        raise ValueError(text)
    val = int(digits)
    frac = 0
    if val == 0 and text[pos : pos + 1] in ("x", "X") and digits == "0" * len(digits) and len(digits) == 1:
        h = re.match(r"[0-9a-fA-F]+", text[pos + 1 :])
        if h is None:
            raise ValueError(text)
        val = int(h.group(0), 16)
        pos += 1 + h.end()
        if text[pos : pos + 1] == ".":
            raise ValueError(text)
        if text[pos : pos + 1].upper() in _SIZE_SUFFIXES and warn is not None:
            warn.append(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
    elif text[pos : pos + 1] == ".":
        f = re.match(r"\.([0-9]*)", text[pos:])
        assert f is not None
        if not f.group(1):
            pos += 1  # "5." and "5.k": the dot alone is skipped
        else:
            if re.match(r"[eE][+-]?[0-9]", text[pos + f.end() :]):
                raise ValueError(text)  # an exponent makes the whole input invalid
            fraction = float(f.group(0))
            scaled = int(fraction * 2.0**64)
            frac = scaled if scaled < 2**64 else 0  # what the C cast yields on x86-64
            pos += f.end()
    shift = 0
    if pos < len(text) and text[pos].upper() in _SIZE_SUFFIXES:
        shift = _SIZE_SUFFIXES[text[pos].upper()]
        pos += 1
    if pos != len(text):
        raise ValueError(text)
    if val >= 2**64:
        raise SizeRangeError(text)
    if shift == 0:
        if frac:
            raise ValueError(text)
        return val
    whole = val << shift
    part = frac << shift
    result = whole + (part >> 64) + ((part & (2**64 - 1)) >> 63)
    if result >= 2**64:
        raise SizeRangeError(text)
    return result


def cvtnum(name: str, value: str, min_value: int = 0, max_value: int = 2**63 - 1) -> int:
    """qemu-img's size argument check, with its two-line error for bad syntax."""
    from vdkit.cli.main import PROG
    from vdkit.errors import VdkitError

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


# -- --image-opts (the subset vdkit's formats need) ---------------------------------------------

def _split_opts(spec: str) -> list[str]:
    """QemuOpts syntax: comma separated, ``,,`` is a literal comma, empty items ignored."""
    items, cur, i = [], [], 0
    while i < len(spec):
        if spec[i] == ",":
            if spec[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(spec[i])
        i += 1
    items.append("".join(cur))
    return [it for it in items if it]


def image_opts(spec: str) -> tuple[str, str | None]:
    """``--image-opts`` string -> (file name, format or None to probe).

    Only ``driver`` (qcow2/raw), ``file.driver=file`` and ``file.filename``
    are understood; anything else is refused with qemu-img's words.  Errors
    carry the ``Could not open '<spec>': `` prefix qemu-img gives them.
    """
    from vdkit.errors import OpenError

    opts: dict[str, str] = {}
    try:
        for item in _split_opts(spec):
            key, eq, value = item.partition("=")
            if not eq:
                raise OpenError(f"Cannot find device='{item}' nor node-name='{item}'")
            opts[key] = value
        driver = opts.pop("driver", None)
        filename = opts.pop("file.filename", None)
        file_driver = opts.pop("file.driver", "file")
        if driver is not None and driver not in ("qcow2", "raw"):
            raise OpenError(f"Unknown driver '{driver}'")
        if file_driver != "file":
            raise OpenError(f"Unknown driver '{file_driver}'")
        if opts:
            key = next(iter(opts))
            if driver is None:
                raise OpenError("Must specify either driver or file")
            raise OpenError(f"Block format '{driver}' does not support the option '{key}'")
        if filename is None:
            if driver is None:
                raise OpenError("Must specify either driver or file")
            raise OpenError('A block device must be specified for "file"')
    except OpenError as exc:
        raise exc.prefixed(f"Could not open '{spec}': ") from None
    return filename, driver


def reprefix_open_error(exc: Exception, filename: str, spec: str) -> Exception:
    """Name ``spec`` instead of ``filename`` in a top-level "Could not open" error, as qemu-img does."""
    from vdkit.errors import VdkitError

    if not isinstance(exc, VdkitError):
        return exc
    prefix = f"Could not open '{filename}': "
    if exc.message.startswith(prefix):
        inner = exc.__cause__ if isinstance(exc.__cause__, VdkitError) else None
        if inner is not None and inner.message == exc.message[len(prefix):]:
            return inner.prefixed(f"Could not open '{spec}': ")
        err = exc.prefixed("")
        err.message = f"Could not open '{spec}': " + exc.message[len(prefix):]
        err.args = (err.message,)
        return err
    return exc
