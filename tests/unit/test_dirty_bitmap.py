"""DirtyBitmap (packed bits, runs searched by words and memcmp) against a plain model: one bool per granule.

Random sequences of set/reset over random sizes and granularities; the count,
the dirty runs of a random range (runs longer than the 64-byte word the search
reads at once, so whole bytes are skipped), the qcow2 serialisation (numpy's little-endian packbits of
the model), the pieces a qcow2 store writes, and resizing must agree with the model.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.block.dirty_bitmap import _ONES, _ZEROS, DirtyBitmap, _first_nonzero, _is_zero

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 1 << 22), st.integers(0, 1 << 21)), max_size=12)


def _model_runs(model: np.ndarray, gran: int, start: int, end: int) -> list[tuple[int, int]]:
    out = []
    i, b = start // gran, min(len(model), -(-end // gran))
    while i < b:
        if model[i]:
            j = i
            while j < b and model[j]:
                j += 1
            lo, hi = max(start, i * gran), min(end, j * gran)
            if hi > lo:
                out.append((lo, hi - lo))
            i = j
        else:
            i += 1
    return out


@settings(max_examples=150, deadline=None)
@given(shift=st.integers(9, 13), size=st.integers(1, 1 << 22), steps=ops,
       cut=st.tuples(st.floats(0, 1), st.floats(0, 1)), new_size=st.integers(1, 1 << 22))
def test_bitmap_matches_model(shift: int, size: int, steps: list[tuple[bool, int, int]],
                              cut: tuple[float, float], new_size: int) -> None:
    gran = 1 << shift
    bm = DirtyBitmap(None, gran, size)
    model = np.zeros(bm.granules, dtype=bool)
    for mark, off, length in steps:
        off %= size + 1
        if mark:
            bm.set_dirty(off, length)
            if length:
                model[off >> shift : min(len(model), (off + length + gran - 1) >> shift)] = True
        else:
            bm.reset(off, length)
            if length:
                a, end = (off + gran - 1) >> shift, off + length
                b = len(model) if end >= size else end >> shift
                if b > a:
                    model[a:b] = False
    assert bm.count() == int(model.sum()) * gran
    start, end = sorted(int(c * size) for c in cut)
    assert list(bm.dirty_runs(start, end)) == _model_runs(model, gran, start, end)
    set_from = np.flatnonzero(model[start >> shift :])
    first = None if not len(set_from) else max(start, ((start >> shift) + int(set_from[0])) << shift)
    assert bm.first_dirty(start) == first
    if first is not None and first < end:  # a job's step: the run its first dirty granule begins, clipped
        assert bm.run_at(first, end) == _model_runs(model, gran, first, end)[0]
    data = bm.serialize(0, bm.granules)
    assert data == np.packbits(model, bitorder="little").tobytes()
    for per in (8, 64, 4096):  # qcow2's data clusters of a bitmap: the pieces with a dirty granule
        pieces = np.flatnonzero(np.add.reduceat(model, np.arange(0, len(model), per)))
        assert bm.dirty_clusters(per) == pieces.tolist()
    back = DirtyBitmap(None, gran, size)
    back.deserialize(0, data, back.granules)
    assert back.bits == bm.bits
    bm.resize(new_size)
    kept = np.zeros(bm.granules, dtype=bool)
    kept[: min(len(model), len(kept))] = model[: len(kept)]
    assert bm.count() == int(kept.sum()) * gran
    assert list(bm.dirty_runs()) == _model_runs(kept, gran, 0, new_size)


steps_any = st.lists(st.tuples(st.sampled_from(["set", "reset", "clear", "merge", "and", "deser", "resize"]),
                               st.integers(0, 1 << 22), st.integers(0, 1 << 21), st.booleans()), max_size=20)


@settings(max_examples=150, deadline=None)
@given(shift=st.integers(9, 13), size=st.integers(1, 1 << 22), steps=steps_any)
def test_running_count_matches_recount(shift: int, size: int, steps: list[tuple[str, int, int, bool]]) -> None:
    """The count kept as bits change equals a recount of the bits after every change, whichever way they
    changed (ranges set and cleared, cleared whole, merged, replaced through ``bits``, deserialized, resized),
    asked for after some steps and not others (a count known or to be recounted when the next change comes)."""
    gran = 1 << shift
    bm = DirtyBitmap(None, gran, size)
    for op, off, length, ask in steps:
        off %= bm.size + 1
        if op == "set":
            bm.set_dirty(off, length)
        elif op == "reset":
            bm.reset(off, length)
        elif op == "clear":
            bm.clear()
        elif op == "merge":
            other = DirtyBitmap(None, gran if length & 1 else gran * 2, bm.size)
            other.set_dirty(off, length)
            was = bm.copy()
            bm.merge_from(other)
            if other.granularity == gran:  # bytewise
                assert bm.bits == bytes(a | b for a, b in zip(was.bits, other.bits, strict=True))
        elif op == "and":  # a job keeping only some of a bitmap (backup's copy bitmap)
            keep = DirtyBitmap(None, gran, bm.size)
            keep.set_dirty(off, length)
            want = np.unpackbits(np.frombuffer(bm.bits, np.uint8)) & np.unpackbits(np.frombuffer(keep.bits, np.uint8))
            bm.intersect(keep)
            assert (np.unpackbits(np.frombuffer(bm.bits, np.uint8)) == want).all()
        elif op == "deser":
            src = DirtyBitmap(None, gran, bm.size)
            src.set_dirty(off, length)
            bm.deserialize(0, src.serialize(0, src.granules), bm.granules)
        else:
            bm.resize(max(1, off))
        if ask:
            recount = int(np.unpackbits(bm.bits).sum())
            assert bm.count() == recount * gran
            assert bm.any() == bool(recount)
    assert bm.count() == int(np.unpackbits(bm.bits).sum()) * gran


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 3 << 20),
       marks=st.lists(st.tuples(st.integers(0, 3 << 20), st.integers(0, 254)), max_size=4),
       cut=st.tuples(st.floats(0, 1), st.floats(0, 1)), ones=st.booleans())
def test_first_nonzero_byte(size: int, marks: list[tuple[int, int]], cut: tuple[float, float], ones: bool) -> None:
    """The search for a byte other than the fill (chunks doubling to the fill's length compared with zeros
    or 0xff bytes, the hit halved down) finds the first such byte of a range of a buffer of a few megabytes,
    whatever its value."""
    fill = 0xFF if ones else 0
    buf = bytearray([fill]) * size
    for at, value in marks:
        if at < size:
            buf[at] = value if ones else value + 1
    start, end = sorted(int(c * size) for c in cut)
    want = min((at for at, _ in marks if start <= at < end), default=-1)
    assert _first_nonzero(buf, start, end, _ONES if ones else _ZEROS) == want
    if not ones:
        assert _is_zero(buf, start, end) == (want < 0)


spans = st.lists(st.tuples(st.integers(0, 1 << 26), st.integers(0, 1 << 22)), max_size=6)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 1 << 26), ours=spans, theirs=spans, merge=st.booleans(), ask=st.booleans())
def test_combine_across_chunks(size: int, ours: list[tuple[int, int]], theirs: list[tuple[int, int]], merge: bool,
                               ask: bool) -> None:
    """merge_from and intersect of 512-byte-granule bitmaps of up to 64 MiB (16 KiB of bits: several of the
    4 KiB pieces combined at a time, clean stretches of either skipped) equal the whole bitmaps' ``|`` and
    ``&``, and the count kept through them equals a recount."""
    a, b = DirtyBitmap(None, 512, size), DirtyBitmap(None, 512, size)
    for bm, marks in ((a, ours), (b, theirs)):
        for off, length in marks:
            bm.set_dirty(off % size, length)
    if not ask:
        a.bits = a.bits  # (the count forgotten: the combine leaves it to a recount)
    x, y = (int.from_bytes(bm.bits, "little") for bm in (a, b))
    want = (x | y) if merge else (x & y)
    a.merge_from(b) if merge else a.intersect(b)
    assert int.from_bytes(a.bits, "little") == want
    assert a.count() == want.bit_count() * 512


def test_search_boundaries() -> None:
    """Every position of a byte other than the fill in a buffer of 16 KiB, and the bytes around each
    chunk end of the doubling search in one of 3 MiB, are found (from several starts); a run of every
    length up to well past the 64-byte word, from starts across a byte, ends where it ends."""
    for fill, other, table in ((0, 1, _ZEROS), (0xFF, 0x7F, _ONES)):
        buf = bytearray([fill]) * (16 << 10)
        for at in range(len(buf)):
            buf[at] = other
            for start in (0, 1, 63):
                assert _first_nonzero(buf, start, len(buf), table) == (at if at >= start else -1)
            buf[at] = fill
        big = bytearray([fill]) * (3 << 20)
        ends, k, pos = [], 64, 0
        while pos < len(big):
            pos, k = pos + k, min(k * 2, len(table))
            ends.append(pos)
        for at in {e + d for e in ends for d in (-1, 0, 1) if 0 <= e + d < len(big)}:
            big[at] = other
            assert _first_nonzero(big, 0, len(big), table) == at
            big[at] = fill
    for lo in (0, 1, 7, 8, 9, 500, 511, 512, 513):
        for length in range(1, 1300):
            bm = DirtyBitmap(None, 512, 4 << 20)
            bm.set_dirty(lo * 512, length * 512)
            bm.set_dirty((lo + length + 2) * 512, 512)
            assert list(bm.dirty_runs()) == [(lo * 512, length * 512), ((lo + length + 2) * 512, 512)]


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 1 << 22), shift=st.integers(9, 16),
       sources=st.lists(st.tuples(st.integers(9, 16), spans), max_size=4),
       fail=st.sampled_from([None, "busy", "readonly", "inconsistent", "missing", "target busy", "target readonly"]),
       at=st.integers(0, 3))
def test_merge_bitmaps_all_or_nothing(size: int, shift: int, sources: list[tuple[int, list[tuple[int, int]]]],
                                      fail: str | None, at: int) -> None:
    """merge_bitmaps sets each target granule that a byte marked in some source falls in (sources of any
    granularity), or, when a source cannot be used, cannot be found, or the target cannot be changed,
    raises that bitmap's error and leaves the target as it was."""
    from vdkit.block.dirty_bitmap import merge_bitmaps
    from vdkit.errors import VdkitError

    target = DirtyBitmap("t", 1 << shift, size)
    target.set_dirty(0, 1)
    srcs: list[DirtyBitmap] = []
    want = {0}
    for i, (s, marks) in enumerate(sources):
        bm = DirtyBitmap(f"s{i}", 1 << s, size)
        for off, length in marks:
            bm.set_dirty(off % size, length)
        for off, length in bm.dirty_runs():
            want.update(range(off >> shift, min(off + length - 1, size - 1) // (1 << shift) + 1))
        srcs.append(bm)
    before = bytes(target.bits)
    bad = None
    if fail is not None and fail.startswith("target"):
        bad = target
        target.busy, target.readonly = fail == "target busy", fail == "target readonly"
    elif fail is not None and srcs:
        bad = srcs[at % len(srcs)]
        bad.busy, bad.readonly, bad.inconsistent = fail == "busy", fail == "readonly", fail == "inconsistent"

    def lookup() -> Iterator[DirtyBitmap]:
        for bm in srcs:
            if fail == "missing" and bm is bad:
                raise VdkitError(f"Dirty bitmap '{bm.name}' not found")
            yield bm

    if bad is None or fail == "readonly":  # (a read-only source may be read)
        merge_bitmaps(target, lookup())
        assert {g for g in range(target.granules) if target.is_set(g)} == want
        assert target.count() == len(want) << shift
        return
    with pytest.raises(VdkitError) as err:
        merge_bitmaps(target, lookup())
    assert f"'{bad.name}'" in err.value.message
    assert bytes(target.bits) == before
