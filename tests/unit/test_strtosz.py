"""opts.strtosz scans by hand (no ``re`` at start-up): the same answers as the regex version it replaced.

The regex version below is the oracle: it was held to qemu-img's sizes by the CLI's differential tests
(create/resize/convert -o sizes) before the rewrite; a few of QEMU's own cases are pinned as well.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.opts import _SIZE_SUFFIXES, SizeRangeError, strtosz


def _regex_strtosz(text: str, warn: list[str]) -> int:
    m = re.match(r"[ \t\n\v\f\r]*([+-]?)([0-9]*)", text)
    assert m is not None
    sign, digits = m.group(1), m.group(2)
    pos = m.end()
    if not digits or sign == "-":
        raise ValueError(text)
    val = int(digits)
    frac = 0
    if val == 0 and text[pos : pos + 1] in ("x", "X") and digits == "0" * len(digits) and len(digits) == 1:
        h = re.match(r"[0-9a-fA-F]+", text[pos + 1 :])
        if h is None:
            raise ValueError(text)
        val = int(h.group(0), 16)
        pos += 1 + h.end()
        if text[pos : pos + 1] == ".":
            raise ValueError(text)
        if text[pos : pos + 1].upper() in _SIZE_SUFFIXES:
            warn.append(f"Using a multiplier suffix on hex numbers is deprecated: {text}")
    elif text[pos : pos + 1] == ".":
        f = re.match(r"\.([0-9]*)", text[pos:])
        assert f is not None
        if not f.group(1):
            pos += 1
        else:
            if re.match(r"[eE][+-]?[0-9]", text[pos + f.end() :]):
                raise ValueError(text)
            scaled = int(float(f.group(0)) * 2.0**64)
            frac = scaled if scaled < 2**64 else 0
            pos += f.end()
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
    part = frac << shift
    result = (val << shift) + (part >> 64) + ((part & (2**64 - 1)) >> 63)
    if result >= 2**64:
        raise SizeRangeError(text)
    return result


def _outcome(fn, text: str) -> tuple[object, list[str]]:  # type: ignore[no-untyped-def]
    warn: list[str] = []
    try:
        return fn(text, warn), warn
    except SizeRangeError:
        return "ERANGE", warn
    except ValueError:
        return "EINVAL", warn


_ALPHABET = "0123456789abcdefxXeE.+- \t\n\v\f\rkKmMgGtTpPbB\u0663\uff11zZ"
_TOKENS = ["0x", "0X", "1", "0", "18446744073709551615", "18446744073709551616", "9" * 25, ".", ".5", "e5",
           "E-3", "k", "M", "G", "T", "P", "E", "B", " ", "-", "+", "0x1p", "1.", "fF"]


def _part(chars: str, max_size: int) -> st.SearchStrategy[str]:
    return st.text(chars, max_size=max_size)


# size-shaped text: blanks, sign, digits or 0x + hex, fraction, exponent, suffix, trailing junk
_SHAPED = st.tuples(_part(" \t", 2), _part("+-", 1), st.one_of(_part("0123456789", 22), st.just("0x"), st.just("0X")),
                    _part("0123456789abcdefABCDEF", 4), _part(".", 1), _part("0123456789", 4), _part("eE", 1),
                    _part("+-", 1), _part("0123456789", 2), _part("kKmMgGtTpPeEbB", 1), _part("xz.", 1)).map("".join)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.text(_ALPHABET, max_size=14), st.lists(st.sampled_from(_TOKENS), max_size=5).map("".join),
                 _SHAPED))
def test_same_as_regex_version(text: str) -> None:
    assert _outcome(lambda t, w: strtosz(t, warn=w), text) == _outcome(_regex_strtosz, text)


@pytest.mark.parametrize(("text", "value"), [("1G", 1 << 30), ("0.1M", 104858), ("  +12k", 12288), ("0x10", 16),
                                              ("5.", 5), ("1.5k", 1536), ("16E", "ERANGE"), ("1e3", "EINVAL"),
                                              ("0.5", "EINVAL"), ("-1", "EINVAL"), ("0x", "EINVAL")])
def test_qemu_cases(text: str, value: object) -> None:
    assert _outcome(lambda t, w: strtosz(t, warn=w), text)[0] == value
