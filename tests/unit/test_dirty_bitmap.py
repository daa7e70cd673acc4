"""DirtyBitmap (packed bits, windowed run search) against a plain model: one bool per granule.

Random sequences of set/reset over random sizes and granularities; the count,
the dirty runs of a random range (also with a tiny search window, so runs
cross windows), the qcow2 serialisation (numpy's little-endian packbits of
the model) and resizing must agree with the model.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.block.dirty_bitmap import DirtyBitmap

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
@given(shift=st.integers(9, 13), size=st.integers(1, 1 << 22), steps=ops, window=st.sampled_from([8, 64, 512, 1 << 19]),
       cut=st.tuples(st.floats(0, 1), st.floats(0, 1)), new_size=st.integers(1, 1 << 22))
def test_bitmap_matches_model(shift: int, size: int, steps: list[tuple[bool, int, int]], window: int,
                              cut: tuple[float, float], new_size: int) -> None:
    gran = 1 << shift
    bm = DirtyBitmap(None, gran, size)
    bm.WINDOW = window
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
    back = DirtyBitmap(None, gran, size)
    back.deserialize(0, data, back.granules)
    assert (back.bits == bm.bits).all()
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
            bm.merge_from(other)
        elif op == "and":  # a job keeping only some of a bitmap (backup's copy bitmap)
            keep = DirtyBitmap(None, gran, bm.size)
            keep.set_dirty(off, length)
            bm.bits &= keep.bits
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
