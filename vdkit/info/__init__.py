"""Image info: collected as typed records (``collect``, ``model``), rendered as qemu-img/QMP do
(``render_human``, ``render_json``).  Submodules load on first attribute access.

The package itself holds what both renderers build on, the QObject form of the records: QAPI member
order (``to_qobject``) and QEMU's QDict iteration order (``qdict_order``).  Two QEMU details make its
output byte-reproducible only with care, and this is the first:

* **Key order.** QEMU keeps objects in a hash table of 512 buckets and emits keys bucket by bucket;
  within a bucket the most recently inserted key comes first.  Members are inserted in QAPI schema
  order.  ``qdict_order`` computes that order from the key list.

(The second, escaping, is ``render_json``'s.)  Here rather than in a module of their own because the
package is imported with either renderer anyway, and each module costs a share of every start.
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


def __getattr__(name: str) -> object:
    from vdkit import _submodule

    return _submodule(__name__, name)
