"""The one qcow2 metadata overlap test (:mod:`vdkit.formats.qcow2.overlap`).

The I/O engine and ``check`` both ask it; the differential side (events
named as QEMU names them) is in ``tests/test_corruption_events.py`` and the
check repair tests.  Here: the fast numpy path and the writer's sorted offsets
answer as the plain-int path and as a cluster-by-cluster reading of the
rule, for arbitrary layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.overlap import NAMES, NONE, Metadata, MetadataMap, SortedOffsets, first_overlap

CS = 512  # the smallest cluster keeps the search space small


@dataclass(frozen=True)
class _Snap:
    l1_table_offset: int
    l1_size: int


def _brute(m: MetadataMap, offset: int, size: int, ignore: Metadata) -> Metadata | None:
    """The rule spelled out: the clusters a write touches against the clusters each structure has."""
    if size <= 0:
        return None
    touched = set(range(offset // CS, (offset + size - 1) // CS + 1))

    def meets(off: int, length: int) -> bool:
        return length > 0 and bool(touched & set(range(off // CS, (off + length - 1) // CS + 1)))

    tests = [
        (Metadata.MAIN_HEADER, 0 in touched),
        (Metadata.ACTIVE_L1, meets(m.l1_offset, m.l1_size * 8)),
        (Metadata.REFCOUNT_TABLE, meets(m.reftable_offset, m.reftable_bytes)),
        (Metadata.SNAPSHOT_TABLE, meets(m.snapshots_offset, m.snapshots_bytes)),
        (Metadata.INACTIVE_L1, any(meets(s.l1_table_offset, s.l1_size * 8) for s in m.snapshots)),
        (Metadata.ACTIVE_L2, any(e & L.L1E_OFFSET_MASK and meets(e & L.L1E_OFFSET_MASK, CS) for e in m.l1)),
        (Metadata.REFCOUNT_BLOCK,
         any(e & L.REFT_OFFSET_MASK and meets(e & L.REFT_OFFSET_MASK, CS) for e in m.reftable)),
        (Metadata.BITMAP_DIRECTORY, m.bitmap_directory is not None and meets(*m.bitmap_directory)),
    ]
    return next((sec for sec, hit in tests if hit and not ignore & sec), None)


offsets = st.integers(0, 64 * CS)
entries = st.lists(st.one_of(st.just(0), st.integers(0, 64 * CS).map(lambda o: o | (1 << 63))), max_size=6)


@settings(max_examples=300, deadline=None)
@given(l1_off=offsets, l1=entries, rt_off=offsets, rt=entries, rt_bytes=st.integers(0, 2 * CS),
       sn_off=offsets, sn_bytes=st.integers(0, CS), snaps=st.lists(st.tuples(offsets, st.integers(0, 70)), max_size=3),
       bitmaps=st.none() | st.tuples(offsets, st.integers(1, 3 * CS)),
       offset=st.integers(0, 66 * CS), size=st.integers(0, 3 * CS),
       ignore=st.sampled_from([NONE, *NAMES]))
def test_numpy_plain_and_sorted_tables_answer_as_the_rule(
        l1_off: int, l1: list[int], rt_off: int, rt: list[int], rt_bytes: int, sn_off: int, sn_bytes: int,
        snaps: list[tuple[int, int]], bitmaps: tuple[int, int] | None, offset: int, size: int,
        ignore: Metadata) -> None:
    plain = MetadataMap(
        cluster_size=CS, l1_offset=l1_off, l1_size=len(l1), l1=l1, reftable_offset=rt_off, reftable_bytes=rt_bytes,
        reftable=rt, snapshots_offset=sn_off, snapshots_bytes=sn_bytes,
        snapshots=[_Snap(o, n) for o, n in snaps], bitmap_directory=bitmaps)
    vector = MetadataMap(
        cluster_size=CS, l1_offset=l1_off, l1_size=len(l1), l1=np.array(l1, dtype=np.uint64),
        reftable_offset=rt_off, reftable_bytes=rt_bytes, reftable=np.array(rt, dtype=np.uint64),
        snapshots_offset=sn_off, snapshots_bytes=sn_bytes, snapshots=plain.snapshots, bitmap_directory=bitmaps)
    indexed = MetadataMap(  # what a writer holds (Qcow2IO._sorted_offsets)
        cluster_size=CS, l1_offset=l1_off, l1_size=len(l1), l1=SortedOffsets(vector.l1, L.L1E_OFFSET_MASK),
        reftable_offset=rt_off, reftable_bytes=rt_bytes, reftable=SortedOffsets(rt, L.REFT_OFFSET_MASK),
        snapshots_offset=sn_off, snapshots_bytes=sn_bytes, snapshots=plain.snapshots, bitmap_directory=bitmaps)
    expected = _brute(plain, offset, size, ignore)
    assert first_overlap(plain, offset, size, ignore) == expected
    assert first_overlap(vector, offset, size, ignore) == expected
    assert first_overlap(indexed, offset, size, ignore) == expected
