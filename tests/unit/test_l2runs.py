"""l2runs: an L2 table's host runs found in its bytes equal the entry-by-entry walk's references.

The model is :meth:`Geometry.l2_references` (the walk snapshot operations used before, and still use
for tables the runs refuse) plus a direct reading of the entries; every table the runs accept must
give the same hosts in the same order and the same used entries, and a refusal must have a reason
(a flag the runs do not handle, a misaligned offset, or a fragmented table).
"""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.cluster import Geometry
from vdkit.formats.qcow2.l2runs import l2_runs, same_runs
from vdkit.io import tables

COPIED = L.OFLAG_COPIED

# a table as pieces: unused stretches, runs of consecutive hosts (COPIED or not), odd entries
piece = st.one_of(
    st.tuples(st.just("zeros"), st.integers(1, 40)),
    st.tuples(st.just("run"), st.integers(1, 300), st.integers(1, 5000), st.booleans(), st.booleans()),
    st.tuples(st.just("entry"), st.sampled_from([
        1,  # zero flag, no host
        COPIED | 1,
        COPIED,  # the flag alone (Runs.bare)
        L.OFLAG_COMPRESSED | 0x1234,  # compressed
        (1 << 57) | (7 << 16),  # a reserved bit
        0x200,  # misaligned for clusters over 512 bytes
        COPIED | 0x00FFFFFFFFFF0000,  # a host at the very top: the next entry would carry into the flags
    ])),
)


def _table(pieces: list[tuple], bits: int, n: int) -> list[int]:
    cs = 1 << bits
    out: list[int] = []
    for p in pieces:
        if p[0] == "zeros":
            out += [0] * p[1]
        elif p[0] == "run":
            _, count, first, copied, zero_flag = p
            flags = (COPIED if copied else 0) | (1 if zero_flag else 0)
            out += [((first + i) * cs) | flags for i in range(count)]
        else:
            out.append(p[1])
    return (out + [0] * n)[:n]


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(piece, max_size=30), bits=st.sampled_from([9, 12, 16]), extended=st.booleans(),
       seed=st.integers(0, 2**32))
def test_runs_equal_the_entry_walk(pieces: list[tuple], bits: int, extended: bool, seed: int) -> None:
    if extended:
        bits = 14  # (extended L2 needs clusters of 16 KiB at least)
    geom = Geometry(cluster_bits=bits, extended_l2=extended)
    n = geom.l2_entries
    entries = _table(pieces, bits, n)
    if extended:
        rnd = random.Random(seed)
        bitmaps = [rnd.getrandbits(64) for _ in range(n)]
        words = [w for pair in zip(entries, bitmaps, strict=True) for w in pair]
    else:
        words = entries
    raw = struct.pack(f">{len(words)}Q", *words)
    runs = l2_runs(raw, geom.l2_entry_size, bits)
    used = [i for i, e in enumerate(entries) if e]
    odd = any(e >> 56 not in (0, 0x80) or e & L.L2E_OFFSET_MASK & ((1 << bits) - 1) for e in entries if e)
    if runs is None:
        cuts = sum(1 for i in used if i == 0 or not entries[i - 1] or entries[i] != entries[i - 1] + (1 << bits))
        assert odd or cuts > 64 or any(e >> 56 != (e + (1 << bits)) >> 56 for e in entries if e)
        return
    assert not odd
    hosts = [c for a, k in zip(runs.starts, runs.lens, strict=True) for c in range(a, a + k)]
    assert hosts == geom.l2_references(tables.SMALL.array(entries))
    assert [i for a, b in runs.used for i in range(a, b)] == used
    assert runs.used_entries == len(used)
    assert runs.bare == (COPIED in entries)


def test_runs_of_a_written_table() -> None:
    """The usual table: two runs of COPIED entries, zeros between and after."""
    bits = 16
    entries = [0] * 8192
    entries[0:1024] = [COPIED | ((100 + i) << bits) for i in range(1024)]
    entries[4096:5120] = [COPIED | ((5000 + i) << bits) for i in range(1024)]
    runs = l2_runs(struct.pack(">8192Q", *entries), 8, bits)
    assert runs is not None
    assert (runs.starts, runs.lens, runs.used) == ([100, 5000], [1024, 1024], [(0, 1024), (4096, 5120)])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(piece, max_size=30), bits=st.sampled_from([9, 12, 16]), extended=st.booleans(),
       flips=st.lists(st.integers(0, 2**20), max_size=8), seed=st.integers(0, 2**32))
def test_same_runs_means_the_same_clusters(pieces: list[tuple], bits: int, extended: bool, flips: list[int],
                                           seed: int) -> None:
    """A table and a copy with some COPIED flags flipped (and sometimes another change): where
    same_runs says yes, both tables' runs name the same hosts and the same used entries."""
    if extended:
        bits = 14
    geom = Geometry(cluster_bits=bits, extended_l2=extended)
    n = geom.l2_entries
    entries = _table(pieces, bits, n)
    other = list(entries)
    for f in flips:
        other[f % n] ^= COPIED
    rnd = random.Random(seed)
    if rnd.random() < 0.2:
        other[rnd.randrange(n)] ^= 1 << rnd.randrange(64)  # (a change beyond the flags: not the same runs)
    if rnd.random() < 0.3:  # an entry of the COPIED flag alone: used in one table, a zero entry in the other
        j = rnd.randrange(n)
        entries[j], other[j] = (COPIED, 0) if rnd.random() < 0.5 else (0, COPIED)
    bitmaps = [rnd.getrandbits(64) for _ in range(n)] if extended else []

    def pack(es: list[int]) -> bytes:
        words = [w for pair in zip(es, bitmaps, strict=True) for w in pair] if extended else es
        return struct.pack(f">{len(words)}Q", *words)

    a, b = pack(entries), pack(other)
    rb = l2_runs(b, geom.l2_entry_size, bits)
    if rb is not None:  # (the zero-entry search skipped where the runs saw no bare COPIED flag: same answer)
        assert same_runs(a, b, geom.l2_entry_size, rb.used, rb.bare) == same_runs(a, b, geom.l2_entry_size, rb.used)
    if rb is None or not same_runs(a, b, geom.l2_entry_size, rb.used):
        return  # (snapshot_ops shares only runs the walk found)
    assert all(x & ~COPIED == y & ~COPIED for x, y in zip(entries, other, strict=True))
    ra = l2_runs(a, geom.l2_entry_size, bits)
    if ra is None:
        return  # (the walk refuses the other one, e.g. fragmented by the flips)
    hosts = [[c for s, k in zip(r.starts, r.lens, strict=True) for c in range(s, s + k)] for r in (ra, rb)]
    assert hosts[0] == hosts[1] and ra.used == rb.used


def _naive_run_length(entries: list[int], k: int, cs: int, limit: int) -> int:
    m = 1
    while m < limit and entries[k + m] == entries[k] + m * cs:
        m += 1
    return m


@settings(max_examples=400, deadline=None)
@given(bits=st.integers(9, 21), start=st.integers(0, (1 << 47) - 1), near=st.integers(0, 5),
       length=st.integers(1, 3000), cut=st.integers(0, 3000), change=st.integers(0, 63),
       low=st.sampled_from([0, 1, 0x1FE, 0x155]), copied=st.booleans(), probe=st.sampled_from([1, 16, 3000]))
def test_run_length_equals_an_entry_walk(bits: int, start: int, near: int, length: int, cut: int, change: int,
                                         low: int, copied: bool, probe: int) -> None:
    """_run_length (bytes built from repeated bytes, compared whole) finds where an arithmetic run of
    entries ends, as an entry-by-entry comparison does: runs across byte carries of the cluster
    number (starting just below a multiple of 2^8, 2^16, ... when ``near``), with low bits, the
    COPIED flag and one entry changed in any bit (``cut``, ``change``) or none."""
    from vdkit.formats.qcow2.l2runs import _run_length

    cs = 1 << bits
    top = (1 << (56 - bits)) - 1  # the largest cluster number
    u = min(start >> bits, top)
    if near:
        u = max(0, ((u >> (8 * near)) + 1 << (8 * near)) - length // 2 - 1) & top
    n = min(length, top - u + 1)
    entries = [(COPIED if copied else 0) | ((u + i) << bits) | (low & (cs - 1)) for i in range(n)]
    if cut < n:
        entries[cut] ^= 1 << change
    words = struct.pack(f">{n}Q", *entries)
    limit = min(n, ((1 << 64) - 1 - entries[0]) // cs + 1)  # (as l2_runs bounds it)
    assert _run_length(words, 0, entries[0], cs, limit, min(probe, limit)) == _naive_run_length(entries, 0, cs, limit)


def test_same_runs_refuses_an_entry_between_the_stretches() -> None:
    """An entry of the COPIED flag alone (or anything) where ``other`` has none, before, between or
    after its used stretches: not the same used entries."""
    bits = 16
    other = [0] * 8192
    other[100:200] = [COPIED | ((500 + i) << bits) for i in range(100)]
    other[4000:4100] = [COPIED | ((900 + i) << bits) for i in range(100)]
    b = struct.pack(">8192Q", *other)
    rb = l2_runs(b, 8, bits)
    assert rb is not None and not rb.bare
    cleared = [e & ~COPIED for e in other]
    assert same_runs(struct.pack(">8192Q", *cleared), b, 8, rb.used, rb.bare)
    for j, extra in ((5, COPIED), (3000, COPIED), (8191, 1 << bits), (4100, COPIED)):
        entries = list(cleared)
        entries[j] = extra
        assert not same_runs(struct.pack(">8192Q", *entries), b, 8, rb.used, rb.bare)
