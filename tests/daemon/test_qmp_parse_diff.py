"""QMP's JSON parser, differential against QEMU 7.2: malformed and unusual input.

The same bytes go to ``qemu-system-x86_64 -S`` and to ``vdkit-daemon -S``;
every line answered before a marker request must be identical.  Each input
is followed by a newline, which ends an unterminated string (a control
character is a lexical error) and the lexer's error recovery, so the marker
is always parsed on its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.conftest import Daemons, Monitor, exchange

NUMBERS = [
    b"1.5e3", b"1.5E+3", b"0.5e1", b"1.0", b"0.0", b"-0.0", b"-0.0e0", b"0.1", b"1e300", b"1e-5", b"1e-7",
    b"0.000001", b"1e15", b"1e16", b"1e17", b"1e21", b"1e22", b"123456.789", b"5e-324", b"4.9e-324",
    b"1.7976931348623157e308", b"2.2250738585072014e-308", b"1e999", b"-1e999", b"1e-400", b"-1e-400",
    b"123456789012345678901234567890", b"-12345678901234567890123", b"-9223372036854775809",
    b"-9223372036854775808", b"9223372036854775808", b"18446744073709551615", b"18446744073709551616",
    b"12345678901234567", b"-0", b"0e5", b"-0e0", b"0x10", b"00", b"-01", b"1.", b"0.", b"1e", b"1e-", b"-",
    b"-a", b".5", b"+1", b"1.5.5", b"TRUE", b"truex", b"nul", b"1e01", b"1E-01", b"123.456e-789", b"0.1e1",
    b"2.5e-1", b"100000000000000000000", b"1.7976931348623159e308",
]

STRINGS = [
    # escapes
    b'"\\u0000"', b'"a\\u0000b"', b'"\\u0000\\u0001"', b'"\\ud800"', b'"\\udc00"', b'"\\ud800\\u0041"',
    b'"\\ud800x"', b'"\\ud800\\ud800"', b'"\\ud800\\u"', b'"\\ud800\\udc0"', b'"\\ud800\\udc0g"',
    b'"\\ud800\\uzzzz"', b'"\\ud800\\n"', b'"\\U0041"', b'"\\u004G"', b'"\\uD800\\uDC00"', b'"\\uDFFF"',
    b'"\\uDBFF\\uDFFD"', b'"\\u00ff\\u0080\\u007f\\u001f"', b'"\\b\\f\\n\\r\\t\\"\\\\\\/"',
    b'"\\ud83d\\ude00"', b'"\\uD83D\\uDE00"', b'"\\u12"', b'"\\u1"',
    b'"\\u"', b'"\\u123"', b'"\\u00"', b'"\\u12345"', b'"\\uzzzz"', b'"\\u1g"', b'"\\u12g4"', b"'\\u12'",
    b'"\\uffff"', b'"\\ufffe"', b'"\\ufdd0"', b'"\\ud83f\\udfff"', b'"\\udbff\\udfff"', b'"\\uDBFF\\uDFFE"',
    b'"\\u00e9\\u20ac"', b'"\\a"', b'"\\x"', b'"\\/"', b'"\\\'"', b"'\\\"'", b'"\\ "', b'"\\\xc3\xa9"',
    # raw bytes: UTF-8, modified UTF-8 (C0 80 is NUL), invalid sequences, noncharacters
    b'"\xc3\xa9"', b'"\xe2\x82\xac"', b'"\xf0\x9f\x98\x80"', b'"\xc0\x80"', b'"\xc0\x80\xc0\x80"',
    b'"a\\u0000b\xc0\x80c"', b'"\xc3"', b'"\xc3\xa9\xc3"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"',
    b'"\xef\xbf\xbf"', b'"\xef\xbf\xbe"', b'"\xef\xb7\x90"', b'"\xef\xb7\xaf"', b'"\xef\xb7\xb0"',
    b'"\xf0\x9f\xbf\xbf"', b'"\xf4\x8f\xbf\xbf"', b'"\xe0\x80\x80"', b'"\xc1\xbf"', b'"\xf8\x88\x80\x80\x80"',
    b'"\x7f"', b'"\xc2\x80\xc2\xa0\xe2\x80\xa8\xef\xbb\xbf"', b'"\xf0\x90\x80"', b'"\xe2\x82"', b'"\xc2"', b'"\xbf"',
    b'"\xf0\x90\x80\x01"', b'"x\\ud800',
    # lexical errors inside strings: control characters and 0xFE/0xFF, also after a backslash
    b'"\xff"', b'"a\xffb"', b'"\xfe"', b'"\xc3\xff"', b'"\xe2\x82\xff"', b'"\x01"', b'"\x1f\x7f"', b'"a\nb"',
    b'"\t"', b'"\\\x01"', b'"\\\xff"', b'"\\\n"', b'"abc', b'"\\ud800\\"',
]

# invalid UTF-8 as QEMU prints it inside a "stray" message (one U+FFFD per invalid unit)
STRAY_TEXT = [
    b'{"a":"' + seq + b'\x01"}' for seq in (
        b"\xed\xa0\x80", b"\xc0\x80", b"\xe0\x80\x80", b"\xef\xbf\xbf", b"\xf4\x90\x80\x80",
        b"\xf8\x88\x80\x80\x80", b"\xfc\x80\x80\x80\x80\x80", b"\x80\x80", b"\xe2\x82\xac", b"\xc3",
        b"\xf0\x9f\x98\x80", b"\xc1\xbf", b"\xef\xb7\x90", b"\xf0\x80\x80\x80", b"\xe2(\xa1")
]

OTHER = [
    # duplicate keys, at any depth, and what is reported before them
    b'{"execute":"query-status","id":1,"id":2}', b'{"execute":"query-status","execute":"query-status"}',
    b'{"a":{"b":1,"b":2}}', b'{"execute":"query-status","id":{"a":1,"a":1}}',
    b'{"execute":"query-status","id":1,"id":2,"id":3}', b'{"a":1,"a":tru}', b'{"a":1,"a":@}',
    b'{"a":1,"a"}', b'{"a":1,"a":"\\x"}', b'{"a":1,"\\ud800":2}', b'{"\\x":1}',
    b'{"execute":"query-status","id":[{"a":1},{"a":2}]}',
    # stray bytes and the lexer's recovery (skips to a structural or control character)
    b"}", b"]", b":", b",", b"\x00", b"\x01", b"\x0b", b"\x0c", b"\x80", b"\xc3\xa9", b"\xff",
    b'{"a":\xff}', b'{"a":@abc}', b'{"a":@abc "x"}', b'{"a":@abc\n"x"}', b'{"a":@abc\t"x"}',
    b'{"a":@abc\x01"x"}', b'{"a":@abc\xfe}', b'{"a":@ab[c]}', b'{"a":@ab:1}', b'{"a":@ab,1}',
    b'@\x7f\x80{"execute":"query-status","id":9}', b'@"\x01{"execute":"query-status","id":9}',
    b'\xc3\xa9{"execute":"query-status","id":9}', b'\x0c{"execute":"query-status","id":9}',
    # structure
    b'{"a":{]}', b'{"a":[}]}', b'{"a":1}}', b'{"a":1}]', b'{"execute":"query-status","id":1}}', b"[]]",
    b"{{}}", b"{[]}", b'{"a"}', b'{"a":}', b"{,}", b"[,]", b"[1 2]", b"[1,,2]", b'{"a":1,,"b":2}',
    b'{"a"::1}', b"{:1}", b'{"a":1:2}', b"{true:1}", b"{null:1}", b"{abc:1}", b"{1.5:1}", b"{[1]:1}",
    b"{{}:1}", b"[abc]", b"abc ", b"true ", b"null ", b"1.5 ", b'"abc" ', b'{"a" "b"}', b"[[[[[1]]]]]",
    b'{"execute":"query-status" , "id" : 3 }', b'{"execute":"query-status","id":\r9}',
    # NUL inside names and arguments
    b'{"execute":"qu\\u0000ery-status"}', b'{"execute":"query-status\xc0\x80"}',
    b'{"execute":"human-monitor-command","arguments":{"command-line":"info \xc0\x80"}}',
    b'{"execute":"human-monitor-command","arguments":{"command-line":"\xc3\xa9"}}',
    b'{"execute":"eject","arguments":{"device":"cd\\u0000"}}',
    # NUL in HMP command lines (QEMU holds it as the bytes C0 80)
    *(b'{"execute":"human-monitor-command","arguments":{"command-line":"' + line + b'"}}' for line in (
        b"block_set_io_throttle d0 \\u0000 0 0 0 0 0", b"eject \\u0000", b'eject \\"a\\u0000b\\"', b"info \\u0000",
        b"\\u0000", b"block_set_io_throttle d0 '\\u0000' 0 0 0 0 0", b"help \\u0000")),
    # more lexer corners
    b'\xef\xbb\xbf{"execute":"query-status","id":1}', b"-", b"- ", b"-1 ", b"tru\x01e",
    b'{"execute":"query-status","id":1}\xff{"execute":"query-status","id":2}',
    b'{"execute":"query-status","id":1}\x01{"execute":"query-status","id":2}', b'[1,{"a":[2,@]}]',
    b"{'execute':'query-status','id':'\xff'}", b"{'execute':'query-status','id':'\\'}'}",
    b'{"execute":"block_set_io_throttle","arguments":{"device":"d0","bps":1e3}}',
    b'{"execute":"eject","arguments":{"device":"d0","force":1.5}}',
]

INPUTS = ([b'{"execute":"query-status","id":' + n + b"}" for n in NUMBERS]
          + [b'{"execute":"query-status","id":' + s + b"}" for s in STRINGS] + STRAY_TEXT + OTHER)


def _exchange(m: Monitor, data: bytes) -> list[str]:
    return exchange(m, data, sep=b"\n")  # the newline ends a trailing number or keyword


@pytest.fixture
def pair(daemons: Daemons, tmp_path: Path) -> tuple[Monitor, Monitor]:
    _, qpath, _ = daemons.qemu([], tmp_path)
    _, vpath, _ = daemons.vdkit([], tmp_path)
    return daemons.monitor(qpath).negotiate(), daemons.monitor(vpath).negotiate()


def test_json_parser_matches_qemu(pair: tuple[Monitor, Monitor]) -> None:
    q, v = pair
    diffs = []
    for data in INPUTS:
        want, got = _exchange(q, data), _exchange(v, data)
        if want != got:
            diffs.append((data, want, got))
    assert diffs == []


def test_unterminated_containers_wait_for_more(pair: tuple[Monitor, Monitor]) -> None:
    """Brackets are counted separately: ``[1,2}`` stays open until the ``]`` arrives."""
    q, v = pair
    for m in (q, v):
        m.send_raw(b'{"execute":"query-status","id":[1,2}')
    for m in (q, v):
        m.send_raw(b"]}")
    assert _exchange(v, b"") == _exchange(q, b"")
