"""Model objects to QEMU-style JSON: qemu-img's pretty form and QMP's compact form.

Two QEMU details make its JSON byte-reproducible only with care:

* **Key order.** QEMU keeps objects in a hash table of 512 buckets and emits
  keys bucket by bucket; within a bucket the most recently inserted key comes
  first.  Members are inserted in QAPI schema order.  ``qdict_order`` computes
  that order from the key list.
* **Escaping.** Output is ASCII; characters from U+007F up become ``\\uXXXX``
  (upper-case hex, surrogate pairs above the BMP), as do control characters
  other than the five with short escapes.

``to_qobject`` turns a tree of records (:mod:`vdkit.record`) or dataclasses into plain dicts/lists in schema order;
the two printers then only deal with JSON values.
"""

from __future__ import annotations

import sys

from vdkit.record import fields, is_record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_BUCKETS = 512
_CACHE_LIMIT = 4096  # keys come from images and monitors: bound the memo tables
_BUCKET_OF: dict[str, int] = {}
_ORDER_OF: dict[tuple[str, ...], tuple[str, ...]] = {}


def qdict_bucket(key: str) -> int:
    """Bucket of ``key`` in QEMU's QDict (32-bit wrapping arithmetic)."""
    bucket = _BUCKET_OF.get(key)
    if bucket is None:
        data = key.encode("utf-8", "surrogateescape")
        value = (0x238F13AF * len(data)) & 0xFFFFFFFF
        for i, c in enumerate(data):
            value = (value + (c << ((i * 5) % 24))) & 0xFFFFFFFF
        bucket = ((1103515243 * value + 12345) & 0xFFFFFFFF) % _BUCKETS
        if len(_BUCKET_OF) < _CACHE_LIMIT:
            _BUCKET_OF[key] = bucket
    return bucket


def qdict_order(keys: list[str]) -> list[str]:
    """The order QEMU iterates a QDict whose keys were inserted in ``keys`` order."""
    key = tuple(keys)
    order = _ORDER_OF.get(key)
    if order is None:
        indexed = [(qdict_bucket(k), -i, k) for i, k in enumerate(keys)]
        indexed.sort()
        order = tuple(k for _, _, k in indexed)
        if len(_ORDER_OF) < _CACHE_LIMIT:
            _ORDER_OF[key] = order
    return list(order)


def _member_name(name: str) -> str:
    return name.rstrip("_").replace("_", "-")


_PLANS: dict[type, list[tuple[str, str]]] = {}


def _plan(cls: type) -> list[tuple[str, str]]:
    """(attribute, member name) pairs of a model class in QAPI order, computed once per class."""
    plan = _PLANS.get(cls)
    if plan is None:
        order = getattr(cls, "__qapi_order__", None) or fields(cls)
        # QAPI members whose name keeps "_" (e.g. ``detect_zeroes``) are listed in ``__qapi_names__``
        names: dict[str, str] = getattr(cls, "__qapi_names__", {})
        plan = _PLANS[cls] = [(n, names.get(n) or _member_name(n)) for n in order]
    return plan


def to_qobject(obj: Any) -> Any:
    """Record (or dataclass) tree -> JSON values; dict key order = QAPI insertion order."""
    if is_record(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for name, member in _plan(type(obj)):
            value = getattr(obj, name)
            if value is None:
                continue
            out[member] = to_qobject(value)
        return out
    if isinstance(obj, list | tuple):
        return [to_qobject(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_qobject(v) for k, v in obj.items()}
    # No enum member exists unless something imported enum (this module does not: start-up cost)
    enum = sys.modules.get("enum")
    if enum is not None and isinstance(obj, enum.Enum):
        return obj.value
    return obj


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
