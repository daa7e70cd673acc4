"""render_human.size_to_str takes frexp()'s exponent from a bit length (no math import at start-up)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.info.render_human import _PREFIXES, size_to_str


def _with_frexp(value: int) -> str:
    _, e = math.frexp(value / (1000.0 / 1024.0))
    i = max(0, min(int((e - 1) / 10) * 10, 60))
    return f"{value / float(1 << i):0.3g} {_PREFIXES[i]}B"


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.integers(-(2**64), 2**64), st.integers(0, 70).flatmap(
    lambda k: st.integers(-3, 3).map(lambda d: max(0, (1 << k) + d))), st.integers(0, 7).flatmap(
    lambda k: st.integers(-3, 3).map(lambda d: max(0, 1000 * 1024**k // 1024 + d)))))
def test_same_as_frexp(value: int) -> None:
    assert size_to_str(value) == _with_frexp(value)
