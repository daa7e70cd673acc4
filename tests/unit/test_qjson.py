"""``vdkit.qjson.loads``: a whole text read as QEMU's ``qobject_from_json`` reads a command-line JSON.

The parser is QMP's (tests/unit/test_qmp_wire.py, tests/daemon/test_qmp_parse_diff.py); its texts for
``json:`` names and ``-blockdev {...}`` are compared with qemu-img and qemu-system-x86_64 in
tests/protocols/test_nbd_options.py and tests/daemon/test_graph_diff.py.  Here: any JSON value
``json`` writes reads back as itself, a key given twice is refused wherever it is, and no input gets
anything but a value or a :class:`~vdkit.qjson.JsonError`.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_qmp_wire import json_values
from vdkit.qjson import JsonError, loads


@settings(max_examples=150, deadline=None)
@given(json_values, st.booleans(), st.sampled_from(["", " ", "\n\t "]))
def test_what_json_writes_reads_back(value: Any, ascii_only: bool, space: str) -> None:
    text = space + json.dumps(value, ensure_ascii=ascii_only) + space
    assert loads(text.encode("utf-8")) == value


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text("ab\"\\\u00e9 ", max_size=4), json_values, min_size=1, max_size=4), st.data())
def test_a_key_twice_is_refused(tree: dict[str, Any], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(tree)))
    inner = json.dumps(tree)[1:-1]
    twice = "{" + inner + ", " + json.dumps(key) + ": null}"
    with pytest.raises(JsonError, match="^JSON parse error, duplicate key$"):
        loads(twice.encode())
    with pytest.raises(JsonError, match="^JSON parse error, duplicate key$"):  # nested, and never closed
        loads(('{"a": [' + twice).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_a_value_or_qemus_error(data: bytes) -> None:
    try:
        loads(data)
    except JsonError as exc:
        assert str(exc)


@pytest.mark.parametrize(("text", "error"), [
    (b"", "Expecting a JSON value"),
    (b" \n", "Expecting a JSON value"),
    (b"{} {}", "Expecting at most one JSON value"),
    (b"{} @", "Expecting at most one JSON value"),
    (b'{"a":', "JSON parse error, premature EOI"),
    (b'{"a', "JSON parse error, stray '\"a'"),
    (b"[1, tr", "JSON parse error, invalid keyword 'tr'"),
    (b"[-", "JSON parse error, stray '-'"),
])
def test_the_ends_of_a_text(text: bytes, error: str) -> None:
    """What only a text's end does (QMP waits for more input instead): an unfinished token, value or
    second value.  (Each text's error is qemu-img's for the same json: name.)"""
    with pytest.raises(JsonError) as caught:
        loads(text)
    assert str(caught.value) == error
