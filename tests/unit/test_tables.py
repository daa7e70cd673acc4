"""vdkit.io.tables: lists below ARRAY_MIN entries, arrays from there on; both decode and encode alike.

``array`` is the oracle for the list path (it is what the formats used before), and every property is
run with the threshold forced to 0 (always arrays) and past any table (always lists).
"""

from __future__ import annotations

import sys
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdkit.io import tables


def _oracle(data: bytes, width: int, order: str) -> list[int]:
    n = len(data) // width
    a = array({4: "I", 8: "Q"}[width], data[: n * width])
    if sys.byteorder != order:
        a.byteswap()
    return a.tolist()


@pytest.fixture(params=[0, 1 << 62], ids=["arrays", "lists"])
def threshold(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(tables, "ARRAY_MIN", request.param)
    return int(request.param)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), width=st.sampled_from([4, 8]), order=st.sampled_from(["little", "big"]))
def test_decode_encode(threshold: int, data: bytes, width: int, order: str) -> None:
    table = tables.decode(data, width, order)
    assert isinstance(table, list) == (len(data) // width < threshold)
    assert list(table) == _oracle(data, width, order)
    whole = data[: len(data) // width * width]
    assert tables.encode(table, width, order) == whole
    assert tables.encode(iter(list(table)), width, order) == whole
    if len(table):  # the formats assign and grow their tables in place
        table[0] = (1 << (8 * width)) - 1
        table.extend([0, 1])
        assert tables.encode(table, width, order)[:width] == b"\xff" * width
        assert list(table[-2:]) == [0, 1]


def test_encode_range(threshold: int) -> None:
    assert tables.encode(range(5, 9), 4, "little") == array("I", range(5, 9)).tobytes()
    assert tables.encode(range(5, 9), 8, "big") == b"".join(i.to_bytes(8, "big") for i in range(5, 9))
