"""``json:{...}`` pseudo-filenames: QEMU's grammar and error texts (``shared/reference/protocols.md`` §2).

The text after ``json:`` is one JSON object (single-quoted strings allowed,
as QEMU's parser allows them), flattened into the dotted keys ``--image-opts``
uses: nested objects and dotted keys are the same thing (the nested spelling
wins when both are given), list items are numbered (``x.0``).  The options
then go through the one interpreter :func:`vdkit.cli.options.image_opts`.
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


def parse(name: str) -> dict[str, object]:
    """``json:{...}`` -> flat options; errors are OpenErrors with QEMU's texts (no prefix)."""
    import json

    from vdkit.errors import OpenError

    text = _single_to_double(name[len(PREFIX):])
    if not text.strip():
        raise OpenError("Could not parse the JSON options: Expecting a JSON value")
    start = len(text) - len(text.lstrip())
    try:
        value, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as exc:
        eoi = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        what = "premature EOI" if eoi else "expecting value"
        raise OpenError(f"Could not parse the JSON options: JSON parse error, {what}") from None
    if text[end:].strip():
        raise OpenError("Could not parse the JSON options: Expecting at most one JSON value")
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


# -- raw's offset/size options: windows into the file below (vdkit.formats.raw.RawWindow) -----------

def _size_option(key: str, value: object) -> int:
    """A size option as QEMU's visitor takes it: a JSON integer, or a string with QEMU's size syntax."""
    from vdkit.errors import OpenError
    from vdkit.opts import _SIZE_HINT, strtosz

    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64:
        return value
    if isinstance(value, str):
        try:
            return strtosz(value)
        except ValueError:
            pass
    raise OpenError(f"Parameter '{key}' expects a non-negative number below 2^64", hint=_SIZE_HINT)


def window_name(opts: dict[str, object]) -> tuple[str, str, str] | None:
    """Raw nodes with ``offset``/``size`` (or stacked raw nodes) in flattened options -> (name, format, prefix).

    Each ``raw`` node down the ``file`` chain from the top (or from a format's ``file`` child) is a
    window into the one below.  Returns None when no raw node has a windowed meaning; else the
    ``json:{...}`` name QEMU gives the top node (keys as given, values with their types), its
    format and the key prefix of the file node's options (``file.file.``...).  The options used
    are removed from ``opts``.  Errors are QEMU's texts.  :data:`vdkit.formats.raw.WINDOWS`
    remembers how to open the name (:class:`vdkit.formats.raw.RawWindow`, one per raw node).
    """
    from vdkit.errors import OpenError, UnsupportedError

    top = opts.get("driver")
    prefix = "" if top == "raw" else "file."
    if opts.get(prefix + "driver") != "raw":
        return None
    levels: list[tuple[str, dict[str, object]]] = []
    while opts.get(prefix + "driver") == "raw":
        strong = {k: opts[prefix + k] for k in ("offset", "size") if prefix + k in opts}
        levels.append((prefix, strong))
        prefix += "file."
    if len(levels) == 1 and not levels[0][1] and top == "raw":
        return None  # a plain raw node
    if not isinstance(top, str):
        raise UnsupportedError("A raw file child under a probed format is not supported by vdkit")
    below = opts.get(prefix + "driver", "file")
    if below != "file":
        raise UnsupportedError(f"A raw node over '{below}' is not supported by vdkit")
    filename = opts.get(prefix + "filename")
    if not isinstance(filename, str):
        raise OpenError("The 'file' block driver requires a file name")
    from vdkit.info.render_json import dumps_compact

    windows: list[tuple[int, int | None, str]] = []
    desc: dict[str, object] = {"driver": "file", "filename": filename}
    for level_prefix, strong in reversed(levels):
        offset = _size_option("offset", strong["offset"]) if "offset" in strong else 0
        size = _size_option("size", strong["size"]) if "size" in strong else None
        node: dict[str, object] = {}
        if "offset" in strong:
            node["offset"] = strong["offset"]
        node["driver"] = "raw"
        if "size" in strong:
            node["size"] = strong["size"]
        node["file"] = desc
        desc = node
        windows.append((offset, size, "json:" + dumps_compact(desc)))
        for k in ("driver", "offset", "size"):
            opts.pop(level_prefix + k, None)
    for k in ("driver", "filename"):
        opts.pop(prefix + k, None)
    if top != "raw":
        desc = {"driver": top, "file": desc}
        opts.pop("driver", None)
    name = "json:" + dumps_compact(desc)
    from vdkit.formats.raw import WINDOWS

    WINDOWS[name] = (filename, windows)
    return name, top, prefix
