"""Extended L2 runs on lists equal numpy's (issue 14: a small extended-L2 image is written without numpy).

A writable image whose tables are small holds them as lists (``tables.SMALL``), extended L2 included;
the I/O engine then classifies a table's subclusters in Python (``Qcow2IO._list_runs_extended``)
instead of numpy (``_classify`` + ``_coalesce``).  Both must give the same runs and record the same
corrupt entries with the same messages, in the same order, for any entries and bitmaps: tables of
data, zero, unallocated and mixed subclusters, compressed clusters, invalid bitmaps and misaligned
offsets, with and without an external data file.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import check_ok
from vdkit.block.node import open_image
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2.io import Qcow2IO

CS = 65536
FULL = 0xFFFFFFFF


@pytest.fixture(scope="module", params=["plain", "data_file"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qcow2IO]:
    d = tmp_path_factory.mktemp("extl2")
    opts = "extended_l2=on" + (f",data_file={d / 'df.raw'}" if request.param == "data_file" else "")
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", "64M", cwd=d)
    with open_image(str(d / "img.qcow2"), "qcow2", readonly=True, force_share=True) as node:
        yield node.driver.io  # type: ignore[attr-defined]


_host = st.integers(1, 6).map(lambda k: k * CS)
_entry = st.one_of(
    st.just(0),
    _host.map(lambda h: h | L.OFLAG_COPIED),
    _host.map(lambda h: h),  # (no COPIED)
    _host.map(lambda h: (h + 512) | L.OFLAG_COPIED),  # misaligned
    st.just(L.OFLAG_COPIED),  # no offset but COPIED (a data file's cluster 0)
    st.integers(0, 3).map(lambda k: L.OFLAG_COMPRESSED | (k << 62 - 16 + 8) | (5 * CS + 1000 * k)),
    st.integers(0, (1 << 64) - 1),
)
_bitmap = st.one_of(
    st.sampled_from([0, FULL, FULL << 32, 0x0000FFFF, 0xFFFF0000, 0x0000FFFF << 32, (0xF0 << 32) | 0x0F,
                     (1 << 32) | 1, 0x80000001]),
    st.integers(0, (1 << 64) - 1),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_entry, _bitmap), max_size=24), st.integers(0, 100))
def test_list_runs_equal_numpy_runs(engine: Qcow2IO, table: list[tuple[int, int]], first: int) -> None:
    entries = [e for e, _ in table]
    bitmaps = [b for _, b in table]
    l2_off, base = 3 * CS, 7 * 32 * CS
    engine._bad.clear()
    listed = engine._entry_runs(entries, bitmaps, l2_off, base, first)
    listed_bad = list(engine._bad.items())
    engine._bad.clear()
    vectorised = engine._entry_runs(np.array(entries, dtype=np.uint64), np.array(bitmaps, dtype=np.uint64),
                                    l2_off, base, first)
    assert listed == vectorised
    assert listed_bad == list(engine._bad.items())
    engine._bad.clear()
