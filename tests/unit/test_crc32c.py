"""vhdx's CRC32C (zero runs skipped by multiplying with powers of x) equals the plain byte-at-a-time CRC32C."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.formats.vhdx import layout as L


def _plain(data: bytes, crc: int = 0) -> int:
    t = L._table()
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def test_known_value() -> None:
    assert L.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert L.crc32c(bytes(4096)) == _plain(bytes(4096))


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.one_of(st.binary(max_size=40), st.integers(0, 5000).map(bytes)), max_size=6),
       crc=st.integers(0, 0xFFFFFFFF))
def test_zero_runs(parts: list[bytes], crc: int) -> None:
    data = b"".join(parts)
    assert L.crc32c(data, crc) == _plain(data, crc)


def test_table_is_the_bitwise_rule() -> None:
    """The table built from its eight one-bit entries equals the bit-by-bit definition everywhere."""
    for byte in range(256):
        c = byte
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        assert L._table()[byte] == c


def test_powers_of_x_are_the_squares() -> None:
    """Each stored x**(2**k) is the square of the one before, starting at x, and the cycle closes."""
    x = 1 << 30
    for k in range(31):
        assert L._X2N[k] == x
        x = L._mulmod(x, x)
    assert x == L._X2N[0]
