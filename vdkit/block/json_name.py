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


class _DuplicateKey(ValueError):
    """An object names a key twice: QEMU's JSON parser refuses it where Python's keeps the last (which
    could open another file than the one a reader of the text sees first)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKey
    return out


def loads(text: str) -> Any:
    """One JSON value as QEMU's parser reads a command-line text (a ``json:`` name's, ``-blockdev {...}``):
    single-quoted strings allowed, a key twice refused; errors are OpenErrors with its texts.

    Python's decoder stands in for QEMU's, so a few texts are approximations: a duplicate key is found
    as its object closes (an object that never closes, or a syntax error after the duplicate, reports
    that error; QEMU reports whichever comes first), and a bad keyword is "expecting value"."""
    import json

    from vdkit.errors import OpenError

    text = _single_to_double(text)
    if not text.strip():
        raise OpenError("Expecting a JSON value")
    start = len(text) - len(text.lstrip())
    try:
        value, end = json.JSONDecoder(object_pairs_hook=_unique_keys).raw_decode(text, start)
    except _DuplicateKey:
        raise OpenError("JSON parse error, duplicate key") from None
    except json.JSONDecodeError as exc:
        eoi = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        what = "premature EOI" if eoi else "expecting value"
        raise OpenError(f"JSON parse error, {what}") from None
    if text[end:].strip():
        raise OpenError("Expecting at most one JSON value")
    return value


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


def _single_to_double(text: str) -> str:
    """QEMU's JSON parser takes 'single-quoted' strings: rewrite them as JSON strings."""
    if "'" not in text:
        return text
    import json

    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == '"':  # copy a double-quoted string as it is
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif c == "'":
            j = i + 1
            buf: list[str] = []
            while j < len(text) and text[j] != "'":
                if text[j] == "\\" and j + 1 < len(text):
                    buf.append(text[j + 1] if text[j + 1] in "'\\" else "\\" + text[j + 1])
                    j += 2
                    continue
                buf.append(text[j])
                j += 1
            if j >= len(text):
                out.append(text[i:])  # unterminated: let the parser report it
                break
            out.append(json.dumps("".join(buf)))
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)
