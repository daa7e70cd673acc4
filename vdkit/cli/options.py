"""qemu-img's argument syntax: GNU getopt_long with its quirks.

qemu-img parses each subcommand with ``getopt_long`` and an option string
starting with ``:``: options may follow file names (arguments are permuted),
long options may be abbreviated to any unique prefix, ``--opt=value`` and
``--opt value`` are equivalent, short options may be bundled (``-qf qcow2``,
``-fqcow2``), and ``--`` ends option parsing.  Errors use qemu-img's words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vdkit.errors import UsageError


@dataclass(frozen=True)
class LongOpt:
    name: str
    has_arg: bool
    key: str  # the short letter it maps to, or a long-only key such as "output"


@dataclass
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


def getopt_long(argv: list[str], shortopts: str, longopts: list[LongOpt]) -> Parsed:
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
                    raise UsageError(f"unrecognized option '{arg}'")
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
