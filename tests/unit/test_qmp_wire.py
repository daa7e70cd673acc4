"""The sans-I/O QMP core, driven with bytes only (no sockets, no processes).

Hypothesis checks that any input is survived (every event is a request or an
input error), that splitting the stream at arbitrary points never changes
the result, and that valid JSON objects parse to what ``json`` says.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.errors import VdkitError
from vdkit.monitor.commands import Arg, CommandContext, CommandNotFoundError, CommandRegistry, opt, validate
from vdkit.monitor.qmp_wire import NEED_DATA, InputError, QmpSession, Request


def events(session: QmpSession, chunks: list[bytes]) -> list[Request | InputError]:
    out: list[Request | InputError] = []
    for chunk in chunks:
        session.receive_data(chunk)
        while (ev := session.next_event()) is not NEED_DATA:
            assert isinstance(ev, Request | InputError)
            out.append(ev)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


# QEMU refuses surrogates and noncharacters (U+FDD0..U+FDEF, U+xFFFE/U+xFFFF) in strings; NUL is fine
_text = st.text(st.characters(blacklist_categories=("Cs",)).filter(
    lambda c: not (0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE)), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 63 - 1) | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6))
def test_any_bytes_are_survived_and_split_invariant(data: bytes, cuts: list[int]) -> None:
    whole = events(QmpSession(), [data, b" "])
    pieces = events(QmpSession(), [*split(data, cuts), b" "])
    assert whole == pieces


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["execute", "arguments", "id", "x"]), json_values, max_size=4),
       st.lists(st.integers(0, 400), max_size=6))
def test_objects_parse_like_json(obj: dict[str, Any], cuts: list[int]) -> None:
    data = json.dumps(obj).encode()
    got = events(QmpSession(), split(data, cuts))
    assert len(got) == 1
    ev = got[0]
    if isinstance(ev, Request):
        assert ev.name == obj["execute"] and ev.arguments == obj.get("arguments", {})
        assert ev.has_id == ("id" in obj) and ev.id == obj.get("id")
    else:
        assert ev.desc.startswith("QMP input")


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([
    b'{"execute":"a"}', b"{'execute':'b','id':1}", b'[1]', b"}", b"{", b"tru", b"e ", b'"\\u00e9"', b"\n",
    b'{"id":{"x":[1,2]}}', b"@", b"-", b"01", b'{"execute":1}', b"'", b'"',
]), max_size=12), st.lists(st.integers(0, 200), max_size=5))
def test_token_soup(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    assert events(QmpSession(), [data, b" "]) == events(QmpSession(), [*split(data, cuts), b" "])


def test_transcript_examples() -> None:
    s = QmpSession(package="vdkit test")
    assert s.greeting() == (b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
                            b'"package": "vdkit test"}, "capabilities": ["oob"]}}\r\n')
    evs = events(s, [b"{'execute': 'query-status'}{\"execute\":\n\"x\", \"id\": [1]}", b'{"a" 1}'])
    assert evs[0] == Request("query-status", {})
    assert evs[1] == Request("x", {}, [1], True)
    assert evs[2] == InputError("JSON parse error, missing : in object pair")
    assert s.reply(evs[1], {}) == b'{"return": {}, "id": [1]}\r\n'
    assert s.error("GenericError", "x", id=5, has_id=True) == (
        b'{"id": 5, "error": {"class": "GenericError", "desc": "x"}}\r\n')
    assert s.event("STOP") == b""  # not negotiated yet
    s.negotiate([])
    assert s.event("STOP", timestamp=1.5) == (
        b'{"timestamp": {"seconds": 1, "microseconds": 500000}, "event": "STOP"}\r\n')


def test_no_trailing_newline_and_numbers() -> None:
    s = QmpSession()
    assert events(s, [b'{"execute":"a","arguments":{"n":12']) == []
    assert events(s, [b"34}}"]) == [Request("a", {"n": 1234})]
    assert events(s, [b"42"]) == []  # a number needs a delimiter
    assert events(s, [b"\n"]) == [InputError("QMP input must be a JSON object")]


def test_limits() -> None:
    s = QmpSession(max_message_size=100, max_nesting=8)
    assert events(s, [b"[" * 9]) == [InputError("JSON nesting depth limit exceeded")]
    s = QmpSession(max_message_size=100)
    got = events(s, [b'{"id":"' + b"y" * 200 + b'"}{"execute":"ok"}'])
    assert got[0] == InputError("JSON token size limit exceeded")
    assert got[-1] == Request("ok", {})


def test_exec_oob_only_after_enabling() -> None:
    s = QmpSession()
    assert events(s, [b'{"exec-oob":"a"}']) == [InputError("QMP input member 'exec-oob' is unexpected")]
    s.negotiate(["oob"])
    assert events(s, [b'{"exec-oob":"a","id":1}']) == [Request("a", {}, 1, True, oob=True)]


SCHEMA = (Arg("device"), opt("n", "int"), opt("flag", "bool"), opt("mode", enum=("a", "b")),
          opt("list", "array", items=Arg("x", "int")))


@pytest.mark.parametrize("args,message", [
    ({}, "Parameter 'device' is missing"),
    ({"device": 1}, "Invalid parameter type for 'device', expected: string"),
    ({"device": "d", "n": True}, "Invalid parameter type for 'n', expected: integer"),
    ({"device": "d", "n": 1.5}, "Invalid parameter type for 'n', expected: integer"),
    ({"device": "d", "flag": 0}, "Invalid parameter type for 'flag', expected: boolean"),
    ({"device": "d", "mode": "c"}, "Parameter 'mode' does not accept value 'c'"),
    ({"device": "d", "list": [1, "2"]}, "Invalid parameter type for 'list[1]', expected: integer"),
    ({"device": "d", "extra": 1}, "Parameter 'extra' is unexpected"),
    ({"extra": 1}, "Parameter 'device' is missing"),
])
def test_schema_errors(args: dict[str, Any], message: str) -> None:
    with pytest.raises(VdkitError) as exc:
        validate(SCHEMA, args)
    assert exc.value.message == message


def test_dispatch_negotiation_rules() -> None:
    reg = CommandRegistry()
    reg.register("qmp_capabilities", negotiation=True)(lambda ctx, a: None)
    reg.register("q")(lambda ctx, a: {"ok": True})
    ctx = CommandContext(machine=None)
    with pytest.raises(CommandNotFoundError, match="Expecting capabilities negotiation"):
        reg.dispatch(ctx, "q", {}, negotiated=False)
    assert reg.dispatch(ctx, "qmp_capabilities", {}, negotiated=False) == {}
    with pytest.raises(CommandNotFoundError, match="already complete"):
        reg.dispatch(ctx, "qmp_capabilities", {})
    with pytest.raises(CommandNotFoundError, match="The command nope has not been found"):
        reg.dispatch(ctx, "nope", {})
    with pytest.raises(VdkitError, match="does not support OOB"):
        reg.dispatch(ctx, "q", {}, oob=True)
    assert reg.dispatch(ctx, "q", {}) == {"ok": True}


@pytest.mark.parametrize("data,want", [
    (b'{"execute":"a","id":1,"id":2}', ["JSON parse error, duplicate key"]),
    (b'{"execute":"a","id":"\\ud800"}', ["JSON parse error, \\ud800 is not a valid Unicode character"]),
    (b'{"execute":"a","id":"\\u12"}', ['JSON parse error, \\u12" is not a valid Unicode character']),
    (b'{"execute":"a","id":"\\ud83f\\udfff"}', ["JSON parse error, \\ud83f\\udfff is not a valid Unicode character"]),
    (b'{"execute":"a","id":"\xef\xbf\xbf"}', ["JSON parse error, invalid UTF-8 sequence in string"]),
    (b'{"execute":"a","id":"\xff"}', ["JSON parse error, stray '\"\ufffd'", "JSON parse error, expecting value"]),
    (b'{"a":"\xe2(\xa1\x01"}', ["JSON parse error, stray '\"\ufffd(\ufffd\x01'", "JSON parse error, expecting value"]),
    (b'{"a":@abc "x"}', ["JSON parse error, stray '@'", "JSON parse error, expecting value"]),
    (b"\xc3\xa9", ["JSON parse error, stray '\ufffd'"]),
    (b"\x00", ["JSON parse error, stray ''"]),
    (b'{"execute":"a","id":0e5}', ["JSON parse error, expected separator in dict"]),
])
def test_parse_errors_as_qemu(data: bytes, want: list[str]) -> None:
    got = events(QmpSession(), [data, b"\n"])
    assert [e.desc for e in got if isinstance(e, InputError)] == want


@pytest.mark.parametrize("text,echo", [
    (b"1.5e3", b"1500"), (b"0.1", b"0.10000000000000001"), (b"-0.0", b"-0"), (b"1e300", b"1.0000000000000001e+300"),
    (b"-9223372036854775809", b"-9.2233720368547758e+18"), (b"18446744073709551615", b"18446744073709551615"),
    (b"1e999", b"inf"), (b'"\\u0000\xc0\x80"', b'"\\u0000\\u0000"'), (b'"\xf0\x9f\x98\x80"', b'"\\uD83D\\uDE00"'),
])
def test_id_echo_as_qemu(text: bytes, echo: bytes) -> None:
    s = QmpSession()
    (req,) = events(s, [b'{"execute":"a","id":' + text + b"}"])
    assert isinstance(req, Request)
    assert s.reply(req, {}) == b'{"return": {}, "id": ' + echo + b"}\r\n"
