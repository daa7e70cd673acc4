"""QEMU's option syntax, shared by every front end: sizes, ``a=b,c=d`` lists, typed option tables.

``qemu-img create -o``, ``-drive``/``-blockdev`` and HMP all spell options the
QemuOpts way; the parsing lives here, below the block layer, so that a format
driver can declare its creation options (:class:`OptDesc`) without reaching up
into a front end.
"""

from __future__ import annotations

from vdkit.errors import VdkitError
from vdkit.record import record

TYPE_CHECKING = False  # typing is not imported at run time: every vdkit-img start reads this module
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# -- sizes (qemu_strtosz) -------------------------------------------------

_SIZE_SUFFIXES = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


class SizeRangeError(ValueError):
    """The size does not fit in 64 bits (QEMU's -ERANGE)."""


_BLANKS = " \t\n\v\f\r"  # C's isspace()
_DIGITS = "0123456789"
_HEX_DIGITS = "0123456789abcdefABCDEF"


def _span(text: str, pos: int, chars: str) -> int:
    """The end of the run of ``chars`` starting at ``pos``."""
    n = len(text)
    while pos < n and text[pos] in chars:
        pos += 1
    return pos


def strtosz(text: str, *, warn: list[str] | None = None) -> int:
    """Parse a size as QEMU does: decimal or hex, optional fraction, suffix B/K/M/G/T/P/E.

    Suffixes are powers of 1024; a fraction needs a suffix other than B and is
    rounded half up after scaling (``0.1M`` is 104858).  Hex takes no fraction;
    a hex number with a suffix still works but earns a deprecation warning
    (appended to ``warn``).  Raises ``ValueError`` for bad syntax and
    :class:`SizeRangeError` for values of 2^64 or more.
    """
    # Scanned by hand, not with re: every vdkit-img create/resize parses a size, and importing re
    # (with enum) costs two thirds of a bare interpreter start.
    pos = _span(text, 0, _BLANKS)
    sign = text[pos : pos + 1]
    if sign in ("+", "-"):
        pos += 1
    start = pos
    pos = _span(text, pos, _DIGITS)
    digits = text[start:pos]
    if not digits or sign == "-":
        raise ValueError(text)
    val = int(digits)
    frac = 0
    if val == 0 and text[pos : pos + 1] in ("x", "X") and len(digits) == 1:
        end = _span(text, pos + 1, _HEX_DIGITS)
        if end == pos + 1:
            raise ValueError(text)
        val = int(text[pos + 1 : end], 16)
        pos = end
        if text[pos : pos + 1] == ".":
            raise ValueError(text)
        if text[pos : pos + 1].upper() in _SIZE_SUFFIXES and warn is not None:
            warn.append(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
    elif text[pos : pos + 1] == ".":
        end = _span(text, pos + 1, _DIGITS)
        if end == pos + 1:
            pos += 1  # "5." and "5.k": the dot alone is skipped
        else:
            e = end + (text[end + 1 : end + 2] in ("+", "-"))
            if text[end : end + 1] in ("e", "E") and _span(text, e + 1, _DIGITS) > e + 1:
                raise ValueError(text)  # an exponent makes the whole input invalid
            fraction = float(text[pos:end])
            scaled = int(fraction * 2.0**64)
            frac = scaled if scaled < 2**64 else 0  # what the C cast yields on x86-64
            pos = end
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



# -- option tables (QemuOptsList) ----------------------------------------------------------------

@record(frozen=True, slots=True)
class OptDesc:
    name: str
    type: str  # "string" | "bool" | "size" | "number"
    default: str | None = None
    help: str = ""


# The file protocol's options, appended after the format's own (duplicates merged).
FILE_CREATE_OPTS = [
    OptDesc("size", "size", help="Virtual disk size"),
    OptDesc("nocow", "bool", help="Turn off copy-on-write (valid only on btrfs)"),
    OptDesc("preallocation", "string", help="Preallocation mode (allowed values: off, falloc, full)"),
    OptDesc("extent_size_hint", "size", help="Extent size hint for the image file, 0 to disable"),
]


def with_file_options(own: list[OptDesc]) -> list[OptDesc]:
    """A format's creation options followed by the file protocol's (names already declared skipped)."""
    names = {d.name for d in own}
    return own + [d for d in FILE_CREATE_OPTS if d.name not in names]


class CreateOpts:
    """The parsed ``-o`` list: last value wins, printed in declaration order."""

    def __init__(self, table: list[OptDesc]) -> None:
        self.table = table
        self.by_name = {d.name: d for d in table}
        self.raw: dict[str, str] = {}
        self.value: dict[str, int | bool | str] = {}

    def set(self, name: str, text: str) -> None:
        desc = self.by_name.get(name)
        if desc is None:
            raise VdkitError(f"Invalid parameter '{name}'")
        self.value[name] = parse_value(desc, text)
        self.raw[name] = text

    def set_number(self, name: str, value: int) -> None:
        self.value[name] = value
        self.raw[name] = str(value)

    def get(self, name: str, default: int | bool | str | None = None) -> int | bool | str | None:
        if name in self.value:
            return self.value[name]
        desc = self.by_name.get(name)
        if desc is not None and desc.default is not None:
            return parse_value(desc, desc.default)
        return default

    def has(self, name: str) -> bool:
        return name in self.value

    def printed(self) -> str:
        parts = []
        for d in self.table:
            given = d.name in self.value
            text = self.raw[d.name] if given else d.default
            if text is None:
                continue
            if d.type == "string":
                parts.append(f"{d.name}={text.replace(',', ',,')}")
            elif d.type in ("size", "number") and given:
                v = int(self.value[d.name])
                parts.append(f"{d.name}={v - 2**64 if v >= 2**63 else v}")
            else:
                parts.append(f"{d.name}={text}")
        return " ".join(parts)


_SIZE_HINT = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n"
def parse_bool(name: str, text: str) -> bool:
    """A boolean option value as QEMU reads them all (``qapi_bool_parse``: QemuOpts, keyval,
    ``-drive``, ``-blockdev``): on/yes/true/y or off/no/false/n."""
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise VdkitError(f"Parameter '{name}' expects 'on' or 'off'")


def parse_value(desc: OptDesc, text: str) -> int | bool | str:
    if desc.type == "bool":
        return parse_bool(desc.name, text)
    if desc.type == "size":
        try:
            return strtosz(text)
        except SizeRangeError:
            raise VdkitError(f"Value '{text}' is out of range for parameter '{desc.name}'") from None
        except ValueError:
            raise VdkitError(
                f"Parameter '{desc.name}' expects a non-negative number below 2^64", hint=_SIZE_HINT
            ) from None
    if desc.type == "number":
        try:
            value = int(text.strip(), 0)
        except ValueError:
            raise VdkitError(f"Parameter '{desc.name}' expects a number") from None
        if not 0 <= value < 2**64:
            raise VdkitError(f"Value '{text}' is out of range for parameter '{desc.name}'")
        return value
    return text


# -- cache modes (bdrv_parse_cache_mode) ---------------------------------------

CACHE_MODES: dict[str, tuple[bool, bool, bool]] = {
    # mode: (cache.writeback, cache.direct, cache.no-flush); "off" is QEMU's old name for "none"
    "none": (True, True, False),
    "off": (True, True, False),
    "writeback": (True, False, False),
    "writethrough": (False, False, False),
    "directsync": (False, True, False),
    "unsafe": (True, False, True),
}
"""QEMU's cache modes (``-t``/``-T`` of qemu-img, ``cache=`` of ``-drive``) and what each one sets."""


# -- QemuOpts lists ------------------------------------------------------------

def split_items(text: str, *, empty: bool = True) -> list[str]:
    """QemuOpts items: comma separated, ``,,`` a literal comma.

    Every item, empty ones included (``empty=False`` drops them): callers that
    report a leading or doubled-up comma need to see the empty item.
    """
    items, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    items.append("".join(cur))
    return items if empty else [it for it in items if it]


def split_options(text: str) -> list[tuple[str, str]]:
    """``a=b,c=d`` with ``,,`` standing for a literal comma inside a value."""
    out: list[tuple[str, str]] = []
    i = 0
    n = len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        name = text[i:j]
        if j < n and text[j] == "=":
            j += 1
            buf = []
            while j < n:
                if text[j] == ",":
                    if text[j + 1 : j + 2] == ",":
                        buf.append(",")
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            value = "".join(buf)
        else:
            value = "off" if name.startswith("no") else "on"
            name = name[2:] if name.startswith("no") else name
        out.append((name, value))
        i = j + 1
    return out


def dotted_parent(tree: dict[str, Any], key: str, conflict: Callable[[str], VdkitError]
                  ) -> tuple[dict[str, Any], str]:
    """Where a dotted key (``file.filename``) goes in the nested object ``tree``: the object that holds
    its last part (made on the way) and that part.  A key used both for a value and as the prefix of
    other keys (``file=f`` beside ``file.filename=x``, in either order) raises ``conflict(prefix)``
    with that key's dotted prefix (``file``): each caller words that as its grammar does."""
    *path, last = key.split(".")
    cur = tree
    for i, part in enumerate(path):
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise conflict(".".join(path[:i + 1]))
        cur = nxt
    if isinstance(cur.get(last), dict):
        raise conflict(key)
    return cur, last


def id_wellformed(text: str) -> bool:
    """QEMU's identifier rule (ids, node names, export and object ids): an ASCII letter, then letters,
    digits, ``-``, ``.`` or ``_``.  No ``re``: ids are checked on start-up paths."""
    return bool(text) and text[0].isascii() and text[0].isalpha() and all(
        c.isascii() and (c.isalnum() or c in "-._") for c in text)


def valid_option_list(text: str) -> bool:
    """What qemu-img accepts as one ``-o`` argument (no leading comma, no odd run of trailing ones)."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


# -- socket addresses (socket_parse) -------------------------------------------

def parse_socket_address(text: str) -> dict[str, Any]:
    """An address string as QEMU's monitor reads it: ``unix:PATH``, ``fd:NAME``, ``vsock:CID:PORT``,
    else (after an optional ``tcp:``) ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT``; ``,options`` are ignored.

    The result is QAPI's ``SocketAddress`` (``{"type": ..., "data": {...}}``), what QMP
    commands take; ports stay text (a number or a service name, see :func:`inet_port`).
    """
    import re

    if text.startswith("unix:"):
        if not text[5:]:
            raise VdkitError("invalid Unix socket address")
        return {"type": "unix", "data": {"path": text[5:]}}
    if text.startswith("fd:"):
        if not text[3:]:
            raise VdkitError("invalid file descriptor address")
        # the daemon has no getfd: no descriptor has a name
        raise VdkitError(f"File descriptor named '{text[3:]}' has not been found")
    if text.startswith("vsock:"):
        m = re.match(r"([^:]{1,32}):([^,]{1,32})", text[6:])
        if m is None:
            raise VdkitError(f"error parsing address '{text[6:]}'")
        return {"type": "vsock", "data": {"cid": m.group(1), "port": m.group(2)}}
    if text.startswith("tcp:"):
        text = text[4:]
    if text.startswith("["):
        m = re.match(r"\[([^\]]{1,64})\]:([^,]{1,32})", text)
        if m is None:
            raise VdkitError(f"error parsing IPv6 address '{text}'")
    elif text.startswith(":"):
        m = re.match(r"()(?::([^,]{1,32}))", text)
        if m is None:
            raise VdkitError(f"error parsing port in address '{text}'")
    else:
        m = re.match(r"([^:]{1,64}):([^,]{1,32})", text)
        if m is None:
            raise VdkitError(f"error parsing address '{text}'")
    return {"type": "inet", "data": {"host": m.group(1), "port": m.group(2)}}


def inet_port(host: str, port: str) -> int:
    """A TCP port given as a number or a service name, resolved by getaddrinfo as QEMU resolves it
    (a number above 65535 wraps, as glibc stores it), with QEMU's error."""
    import socket

    try:
        sockaddr = socket.getaddrinfo(None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][4]
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "Name or service not known"
        raise VdkitError(f"address resolution failed for {host}:{port}: {reason}") from None
    return int(sockaddr[1])


def refuse_encryption(opts: CreateOpts) -> None:
    """vdkit creates no encrypted images (yet): refuse any ``encrypt.*`` option that asks for one."""
    if any(name.startswith("encrypt") and opts.value[name] is not False for name in opts.value):
        raise VdkitError("Creating encrypted images is not supported by vdkit")


