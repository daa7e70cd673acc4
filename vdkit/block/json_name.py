"""``json:{...}`` pseudo-filenames: QEMU's grammar and error texts (``shared/reference/protocols.md`` §2).

The text after ``json:`` is one JSON object (single-quoted strings allowed,
as QEMU's parser allows them), flattened into the dotted keys ``--image-opts``
uses: nested objects and dotted keys are the same thing (the nested spelling
wins when both are given), list items are numbered (``x.0``).  The options
then go through the one interpreter :func:`vdkit.block.image_opts.image_opts`.
Values keep their JSON types here; the interpreter decides what a
non-string means.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

PREFIX = "json:"


def is_json_name(name: str) -> bool:
    return name.startswith(PREFIX)


def loads(text: str) -> Any:
    """One JSON value as QEMU reads a command-line text (a ``json:`` name's, ``-blockdev {...}``): with
    the parser it reads QMP with (:func:`vdkit.qjson.loads`); errors are OpenErrors with its texts."""
    from vdkit.errors import OpenError
    from vdkit.qjson import JsonError
    from vdkit.qjson import loads as qjson_loads

    try:
        return qjson_loads(text.encode("utf-8"))
    except JsonError as exc:
        raise OpenError(str(exc)) from None


def parse(name: str) -> dict[str, object]:
    """``json:{...}`` -> flat options; errors are OpenErrors with QEMU's texts (no prefix)."""
    from vdkit.errors import OpenError

    try:
        value = loads(name[len(PREFIX):])
    except OpenError as exc:
        raise exc.prefixed("Could not parse the JSON options: ") from None
    if not isinstance(value, dict):
        raise OpenError("Invalid JSON object given")
    return flatten(value)


def flatten(tree: dict[str, Any]) -> dict[str, object]:
    """Nested objects and lists -> dotted keys; a nested spelling overrides the same dotted one."""
    flat: dict[str, object] = {}
    nested: dict[str, object] = {}
    for key, value in tree.items():
        if key == "backing" and value == {}:
            flat[key] = {}  # an empty backing object is still a member (QEMU refuses it where it is unused)
        elif isinstance(value, (dict, list)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            sub = flatten({str(k): v for k, v in items})
            for k, v in sub.items():
                nested[f"{key}.{k}"] = v
        else:
            flat[key] = value
    flat.update(nested)
    return flat
