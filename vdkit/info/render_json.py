"""Model objects to QEMU-style JSON: qemu-img's pretty form and QMP's compact form.

Two QEMU details make its JSON byte-reproducible only with care:

* **Key order.** QEMU keeps objects in a hash table of 512 buckets and emits
  keys bucket by bucket; within a bucket the most recently inserted key comes
  first.  Members are inserted in QAPI schema order.  ``qdict_order`` computes
  that order from the key list.
* **Escaping.** Output is ASCII; characters from U+007F up become ``\\uXXXX``
  (upper-case hex, surrogate pairs above the BMP), as do control characters
  other than the five with short escapes.

``to_qobject`` turns a tree of records (:mod:`vdkit.record`) or dataclasses into plain dicts/lists in schema order
(it and ``qdict_order`` live in the :mod:`vdkit.info` package itself); the two printers then only deal
with JSON values.
"""

from __future__ import annotations

# The QObject form (QAPI member order, QDict iteration order) is the info package's own
# (vdkit/info/__init__.py), shared with the human renderer; re-exported here for the JSON writer's users.
from vdkit.info import qdict_bucket as qdict_bucket
from vdkit.info import qdict_order as qdict_order
from vdkit.info import to_qobject as to_qobject

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(s: str) -> str:
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return '"' + s + '"'  # fast path: nothing to escape (isprintable excludes U+007F)
    out = ['"']
    for ch in s:
        esc = _SHORT_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
            continue
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte kept by surrogateescape
            out.append("\\uFFFD")
        elif cp < 0x20 or cp >= 0x7F:
            if cp > 0xFFFF:
                cp -= 0x10000
                out.append(f"\\u{0xD800 | (cp >> 10):04X}\\u{0xDC00 | (cp & 0x3FF):04X}")
            else:
                out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _scalar(v: Any) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return quote(v)
    raise TypeError(f"not a JSON value: {v!r}")


def _items(d: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, d[k]) for k in qdict_order(list(d))]


def dumps_pretty(value: Any, indent: int = 0) -> str:
    """qemu-img's pretty JSON (no trailing newline)."""
    pad = "    " * (indent + 1)
    end = "    " * indent
    if isinstance(value, dict):
        items = _items(value)
        if not items:
            return "{\n" + end + "}"
        body = ",\n".join(f"{pad}{quote(k)}: {dumps_pretty(v, indent + 1)}" for k, v in items)
        return "{\n" + body + "\n" + end + "}"
    if isinstance(value, list):
        if not value:
            return "[\n" + end + "]"
        body = ",\n".join(pad + dumps_pretty(v, indent + 1) for v in value)
        return "[\n" + body + "\n" + end + "]"
    return _scalar(value)


def dumps_compact(value: Any) -> str:
    """QMP's compact JSON: ``{"a": 1, "b": [1, 2]}``."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{quote(k)}: {dumps_compact(v)}" for k, v in _items(value)) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps_compact(v) for v in value) + "]"
    return _scalar(value)


def render_pretty(obj: Any) -> str:
    """Model object(s) -> qemu-img ``--output=json`` text, with the final newline."""
    return dumps_pretty(to_qobject(obj)) + "\n"
