"""``vdkit.io.file.find_aligned`` (convert's zero-sector heads, L2 tables' zero entries) against the plain
definition: the first multiple of ``align`` at or after ``start`` where the pattern lies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.io.file import find_aligned


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from([0, 0, 0, 1, 0x80]), max_size=200).map(bytes),
       start=st.integers(0, 210), align=st.sampled_from([1, 8, 16]), size=st.sampled_from([1, 8, 16]))
def test_find_aligned_is_the_first_aligned_match(data: bytes, start: int, align: int, size: int) -> None:
    """Zeros mostly, so matches across word boundaries (the misaligned ones skipped) are common."""
    pattern = bytes(size)
    want = next((p for p in range(start, len(data) - size + 1) if not p % align and data[p : p + size] == pattern),
                -1)
    assert find_aligned(data, pattern, start, align) == want
