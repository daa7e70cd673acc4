"""vdkit.io.tables backends: the stdlib one (lists) and numpy's give the same answers for every operation.

numpy's backend is the oracle where it is plain numpy (decoding, unique, isin); both are checked against
a direct Python model besides, so a shared mistake cannot hide.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.io import tables

S, N = tables.SMALL, tables.NUMPY
BITS = [1, 2, 4, 8, 16, 32, 64]

# mostly zeros, so zero runs of every length occur
entries = st.lists(st.one_of(st.just(0), st.just(0), st.just(0), st.integers(1, 3)), max_size=300)


def _model_zero_scan(vals: list[int], start: int, n: int) -> tuple[int, int, int]:
    part = vals[start:]
    lead = next((i for i, v in enumerate(part) if v), len(part))
    first = next((start + i for i in range(len(part) - n + 1) if not any(part[i : i + n])), -1)
    last = max((i for i, v in enumerate(part) if v), default=-1)
    return lead, first, start + last + 1


@settings(max_examples=400, deadline=None)
@given(vals=entries, data=st.data())
def test_zero_scan(vals: list[int], data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(vals)))
    n = data.draw(st.integers(1, 40))
    lead, first, tail = _model_zero_scan(vals, start, n)
    for got in (S.zero_scan(list(vals), start, n), N.zero_scan(N.array(vals), start, n)):
        assert got[:2] == (lead, first)
        if first < 0:  # the final run's start only matters when no run was found
            assert got[2] == tail


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from(BITS), data=st.data())
def test_refcount_blocks_roundtrip(bits: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 40)) * 8
    top = data.draw(st.sampled_from([(1 << bits) - 1, min(255, (1 << bits) - 1), 256]))  # (counts below 256: a byte)
    vals = data.draw(st.lists(st.integers(0, min(top, (1 << bits) - 1)), min_size=n, max_size=n))
    raw = N.encode_refcounts(N.array(vals), bits)
    assert len(raw) == n * bits // 8
    assert S.encode_refcounts(list(vals), bits) == raw
    assert S.decode_refcounts(raw, bits) == vals
    assert N.decode_refcounts(raw, bits).tolist() == vals
    if bits >= 8:  # big-endian, as the specification says
        assert raw == b"".join(v.to_bytes(bits // 8, "big") for v in vals)


@settings(max_examples=100, deadline=None)
@given(vals=st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_u64(vals: list[int]) -> None:
    raw = struct.pack(f">{len(vals)}Q", *vals)
    assert S.encode_u64(vals) == N.encode_u64(N.array(vals)) == raw
    assert S.decode_u64(raw + b"xyz") == N.decode_u64(raw + b"xyz").tolist() == vals


@settings(max_examples=60, deadline=None)
@given(n=st.integers(500, 3000), at=st.lists(st.tuples(st.integers(0, 2999), st.integers(1, 2**64 - 1)), max_size=8))
def test_u64_of_big_sparse_tables(n: int, at: list[tuple[int, int]]) -> None:
    """Big tables (a refcount table, a big L1) decode and encode piece by piece, zero pieces skipped:
    the same as one struct call, with entries in any piece, at a piece's edges, in the partial last one."""
    vals = [0] * n
    for i, v in at:
        vals[i % n] = v
    raw = struct.pack(f">{n}Q", *vals)
    assert S.encode_u64(vals) == raw
    assert S.decode_u64(raw + b"xyz") == vals


@settings(max_examples=300, deadline=None)
@given(vals=st.lists(st.integers(0, 7), min_size=1, max_size=60), data=st.data())
def test_slices(vals: list[int], data: st.DataObject) -> None:
    lo = data.draw(st.integers(0, len(vals)))
    hi = data.draw(st.integers(lo, len(vals)))
    addend = data.draw(st.sampled_from([-3, -1, 1, 2, 9]))
    maxval = 7
    fits = hi <= lo or (all(0 <= v + addend <= maxval for v in vals[lo:hi]) and addend <= maxval)
    s, n = list(vals), N.array(vals)
    assert S.fits(s, lo, hi, addend, maxval) == N.fits(n, lo, hi, addend, maxval) == fits
    assert S.count_nonzero(s, lo, hi) == N.count_nonzero(n, lo, hi) == sum(1 for v in vals[lo:hi] if v)
    assert S.any_nonzero(s, lo, hi) == N.any_nonzero(n, lo, hi) == any(vals[lo:hi])
    if fits:
        old_s, old_n = S.get_slice(s, lo, hi), N.get_slice(n, lo, hi)
        want = [i for i in range(lo, hi) if vals[i] + addend == 0] if addend < 0 else []
        assert S.add_slice(s, lo, hi, addend) == N.add_slice(n, lo, hi, addend) == want
        assert s == n.tolist() == vals[:lo] + [v + addend for v in vals[lo:hi]] + vals[hi:]
        S.set_slice(s, lo, old_s)
        N.set_slice(n, lo, old_n)
        assert s == n.tolist() == vals
    assert S.nonzero(s) == N.nonzero(n) == [i for i, v in enumerate(vals) if v]


@settings(max_examples=200, deadline=None)
@given(a=st.lists(st.integers(0, 50), max_size=40), b=st.lists(st.integers(0, 50), max_size=40))
def test_sets(a: list[int], b: list[int]) -> None:
    assert S.unique_sorted(a) == N.unique_sorted(N.indices(a)).tolist() == sorted(set(a))
    assert S.members(a, b) == N.members(N.indices(a), N.indices(b)) == [x for x in a if x in b]
    assert S.intersects(a, b) == N.intersects(N.indices(a), N.indices(b)) == any(x in b for x in a)
    assert S.unique_shifted(a, 3) == N.unique_shifted(N.array(a), 3) == sorted({x >> 3 for x in a})
    assert S.first_misaligned(a, 4) == N.first_misaligned(N.array(a), 4) == next((x for x in a if x % 4), None)
    idx = list(range(0, len(a), 2))
    assert S.field(a, idx, 0x1C, 2) == N.field(N.array(a), N.indices(idx), 0x1C, 2).tolist() == [
        (a[i] & 0x1C) >> 2 for i in idx]
    assert S.positions_in(a, 0x3C, b) == N.positions_in(N.array(a), 0x3C, b) == [
        j for j, v in enumerate(a) if v & 0x3C in b]
    assert S.concat([a, b]) == N.concat([N.indices(a), N.indices(b)]).tolist() == a + b
    cur = [x % 5 for x in a]
    assert S.any_exceeds(cur, a, 40) == N.any_exceeds(N.array(cur), N.indices(a), 40) == any(
        c + x > 40 for c, x in zip(cur, a, strict=True))


@settings(max_examples=200, deadline=None)
@given(adds=st.lists(st.tuples(st.lists(st.integers(0, 99), max_size=20), st.integers(-3, 3)), max_size=8),
       ranges=st.lists(st.tuples(st.integers(0, 99), st.integers(0, 10), st.integers(-2, 2)), max_size=4),
       per=st.sampled_from([1, 7, 32]))
def test_deltas(adds: list[tuple[list[int], int]], ranges: list[tuple[int, int, int]], per: int) -> None:
    model: dict[int, int] = {}
    ds, dn = S.deltas(), N.deltas()
    for keys, d in adds:
        ds.add(keys, d)
        dn.add(N.indices(keys), d)
        for k in keys:
            model[k] = model.get(k, 0) + d
    for lo, n, d in ranges:
        ds.add_range(lo, lo + n, d)
        dn.add_range(lo, lo + n, d)
        for k in range(lo, lo + n):
            model[k] = model.get(k, 0) + d
    keys = sorted(model)
    ks, ss = ds.items()
    kn, sn = dn.items()
    assert ks == kn.tolist() == keys
    assert ss == sn.tolist() == [model[k] for k in keys]
    probe = list(range(-2, 110, 3))
    assert ds.lookup(probe) == dn.lookup(N.indices(probe)).tolist() == [model.get(k, 0) for k in probe]
    cur = [k % 4 for k in probe]
    assert ds.plus(cur, probe) == dn.plus(N.array(cur), N.indices(probe)).tolist() == [
        c + model.get(k, 0) for c, k in zip(cur, probe, strict=True)]
    touched = sorted({k // per for k in keys if model[k]})
    assert ds.touched_blocks(per) == dn.touched_blocks(per) == touched
    bs, bn = ds.by_block(per), dn.by_block(per)
    assert sorted(bs) == sorted(bn) == sorted({k // per for k in keys})
    for blk, (idx, sums) in bs.items():
        assert idx == bn[blk][0].tolist() == [k % per for k in keys if k // per == blk]
        assert sums == bn[blk][1].tolist() == [model[k] for k in keys if k // per == blk]


@settings(max_examples=200, deadline=None)
@given(vals=st.lists(st.integers(0, 5), min_size=1, max_size=30), data=st.data(),
       maxval=st.sampled_from([5, 2**64 - 1]))
def test_apply_deltas(vals: list[int], data: st.DataObject, maxval: int) -> None:
    idx = sorted(set(data.draw(st.lists(st.integers(0, len(vals) - 1), max_size=10))))
    sums = data.draw(st.lists(st.integers(-6, 6), min_size=len(idx), max_size=len(idx)))
    new = list(vals)
    for i, d in zip(idx, sums, strict=True):
        new[i] += d
    ok = all(0 <= new[i] <= maxval for i in idx)
    s, n = list(vals), N.array(vals)
    if not ok:
        with pytest.raises(ValueError):
            S.apply_deltas(s, idx, sums, maxval)
        with pytest.raises(ValueError):
            N.apply_deltas(n, N.indices(idx), N.indices(sums), maxval)
        return
    lowest = min((i for i in idx if new[i] == 0), default=-1)
    assert S.apply_deltas(s, idx, sums, maxval) == lowest
    assert N.apply_deltas(n, N.indices(idx), N.indices(sums), maxval) == lowest
    assert s == n.tolist() == new


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.integers(-3, 40), max_size=30), per=st.sampled_from([4, 16]))
def test_gather(keys: list[int], per: int) -> None:
    blocks = {0: list(range(100, 100 + per)), 2: list(range(300, 300 + per))}

    def lookup_s(b: int) -> list[int] | None:
        return blocks.get(b)

    def lookup_n(b: int) -> np.ndarray | None:
        v = blocks.get(b)
        return None if v is None else N.array(v)

    want = [0 if k < 0 or k // per not in blocks else blocks[k // per][k % per] for k in keys]
    assert S.gather(keys, per, lookup_s) == N.gather(N.indices(keys), per, lookup_n).tolist() == want


def test_strided_and_convert() -> None:
    s, n = S.zeros(12), N.zeros(12)
    S.set_strided(s, 1, 2, 1000, 5, 64)
    N.set_strided(n, 1, 2, 1000, 5, 64)
    assert s == n.tolist() == [0, 1000, 0, 1064, 0, 1128, 0, 1192, 0, 1256, 0, 0]
    assert S.convert(n) == s and N.convert(s).tolist() == s
    assert S.add_signed([1, 2], [-3, 4]) == N.add_signed(N.array([1, 2]), N.indices([-3, 4])).tolist() == [-2, 6]


def test_backend_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables, "FORCE", None)
    assert tables.backend_for(0) is S
    assert tables.backend_for(tables.NUMPY_MIN_BYTES) is N
    monkeypatch.setattr(tables, "FORCE", "small")
    assert tables.backend_for(1 << 40) is S
    monkeypatch.setattr(tables, "FORCE", "numpy")
    assert tables.backend_for(0) is N


# L2-like entries: mostly 0, else an offset with any of the top flag bits
flagged = st.lists(st.one_of(st.just(0), st.just(0), st.builds(
    lambda off, flags: off << 9 | flags << 62, st.integers(0, 1 << 20), st.integers(0, 3))), max_size=80)


@settings(max_examples=300, deadline=None)
@given(vals=flagged)
def test_flag_ops(vals: list[int]) -> None:
    C, P, M = 1 << 63, 1 << 62, ((1 << 56) - 1) & ~511
    s, n = list(vals), N.array(vals)
    assert S.masked(s, M) == N.masked(n, M).tolist() == [v & M for v in vals]
    assert S.masked_nonzero(s, M) == N.masked_nonzero(n, M).tolist() == [v & M for v in vals if v & M]
    assert S.nonzero_values(s) == N.nonzero_values(n).tolist() == [v for v in vals if v]
    assert S.shifted(s, 9) == N.shifted(n, 9).tolist() == [v >> 9 for v in vals]
    for present in (True, False):
        assert S.with_flag(s, P, present) == N.with_flag(n, P, present).tolist() == [
            v for v in vals if bool(v & P) == present]
    want_pos = [i for i, v in enumerate(vals) if v & M and not v & P]
    assert S.flag_positions(s, M, P) == N.flag_positions(n, M, P).tolist() == want_pos
    assert S.any_masked_zero(s, M) == N.any_masked_zero(n, M) == any(v and not v & M for v in vals)
    assert S.take(s, want_pos) == N.take(n, N.indices(want_pos)).tolist() == [vals[i] for i in want_pos]
    assert S.strided(s, 1, 2) == N.strided(n, 1, 2).tolist() == vals[1::2]
    assert S.unique_counts(s) == N.unique_counts(n) == (
        sorted(set(vals)), [vals.count(v) for v in sorted(set(vals))])
    assert S.count_equal(s, 0) == N.count_equal(n, 0) == vals.count(0)
    assert S.positions_equal(s, 0) == N.positions_equal(n, 0).tolist() == [i for i, v in enumerate(vals) if v == 0]
    S.clear_flag(s, C, P)
    N.clear_flag(n, C, P)
    cleared = [v & ~C if not v & P else v for v in vals]
    assert s == n.tolist() == cleared
    assert S.equal(s, cleared) and N.equal(n, N.array(cleared))
    assert not S.equal(s, [*cleared, 0]) and not N.equal(n, N.array([*cleared, 0]))
    S.set_flag(s, want_pos, C)
    N.set_flag(n, N.indices(want_pos), C)
    assert s == n.tolist() == [v | C if i in want_pos else v for i, v in enumerate(cleared)]


@settings(max_examples=300, deadline=None)
@given(vals=flagged, data=st.data())
def test_flag_runs(vals: list[int], data: st.DataObject) -> None:
    """The in-place runs of a write (qcow2 io): every bit of ``need``, some of ``some``, none of ``absent``."""
    lo = data.draw(st.integers(0, len(vals)))
    hi = data.draw(st.integers(lo, len(vals)))
    C, P, M = 1 << 63, 1 << 62, ((1 << 56) - 1) & ~511
    for need, some, absent in ((C, M, P), (C, M | C, P), (0, M, 0), (C | P, M, 0)):
        flags = [bool(v and v & need == need and v & some and not v & absent) for v in vals[lo:hi]]
        model: list[tuple[int, int, bool]] = []
        for i, f in enumerate(flags):  # maximal runs of equal flags, from lo
            if model and model[-1][2] == f:
                model[-1] = (model[-1][0], i + 1, f)
            else:
                model.append((i, i + 1, f))
        assert S.flag_runs(list(vals), lo, hi, need, some, absent) == model
        assert N.flag_runs(N.array(vals), lo, hi, need, some, absent) == model


@settings(max_examples=200, deadline=None)
@given(runs=st.lists(st.tuples(st.lists(st.tuples(st.integers(0, 99), st.integers(0, 12)), max_size=6),
                               st.integers(-3, 3)), max_size=5),
       keys=st.lists(st.tuples(st.lists(st.integers(0, 99), max_size=10), st.integers(-2, 2)), max_size=3),
       per=st.sampled_from([1, 7, 32]), data=st.data())
def test_deltas_by_runs(runs: list[tuple[list[tuple[int, int]], int]], keys: list[tuple[list[int], int]],
                        per: int, data: st.DataObject) -> None:
    """Runs added as runs (add_runs) and read back by ranges (plus_range) and by block (apply_block)."""
    model: dict[int, int] = {}
    ds, dn = S.deltas(), N.deltas()
    for rs, d in runs:
        starts, lens = [a for a, _ in rs], [n for _, n in rs]
        ds.add_runs(starts, lens, d)
        dn.add_runs(N.indices(starts), N.indices(lens), d)
        for a, n in rs:
            for k in range(a, a + n):
                model[k] = model.get(k, 0) + d
    for ks, d in keys:
        ds.add(ks, d)
        dn.add(N.indices(ks), d)
        for k in ks:
            model[k] = model.get(k, 0) + d
    ks_, ss = ds.items()
    assert ks_ == dn.items()[0].tolist() == sorted(model)
    assert ss == [model[k] for k in sorted(model)]
    neg = sorted(k for k, v in model.items() if v < 0)
    assert [k for a, b in ds.negative_runs() for k in range(a, b)] == neg
    assert ds.negative_runs() == dn.negative_runs()
    lo = data.draw(st.integers(0, 110))
    cur = data.draw(st.lists(st.integers(0, 5), max_size=30))
    want = [c + model.get(lo + i, 0) for i, c in enumerate(cur)]
    assert ds.plus_range(list(cur), lo) == dn.plus_range(N.array(cur), lo).tolist() == want
    maxval = 9
    for blk in range(0, 112 // per + 1):
        vals = data.draw(st.lists(st.integers(0, maxval), min_size=per, max_size=per))
        new = [v + model.get(blk * per + i, 0) for i, v in enumerate(vals)]
        s, n = list(vals), N.array(vals)
        if any(not 0 <= new[i] <= maxval for i in range(per) if blk * per + i in model):
            with pytest.raises(ValueError):
                ds.apply_block(blk, per, s, maxval)
            with pytest.raises(ValueError):
                dn.apply_block(blk, per, n, maxval)
            continue
        lowest = min((i for i in range(per) if blk * per + i in model and new[i] == 0), default=-1)
        assert ds.apply_block(blk, per, s, maxval) == dn.apply_block(blk, per, n, maxval) == lowest
        assert s == n.tolist() == new
