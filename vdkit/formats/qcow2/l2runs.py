"""An L2 table's host clusters as runs, found in its bytes.

A qcow2 writer allocates clusters in order, so the used entries of an L2 table are mostly a few runs
of consecutive host clusters.  Walking the references run by run (refcount changes by ranges, the
COPIED flags of a whole table by one byte translation) is what lets a snapshot of gigabytes cost
little more than reading its tables.  Decoding a table into one Python integer per entry would cost
more than all the rest, so the runs are found in the table's bytes: unused stretches by
``bytes.find``/``lstrip``, and a run by comparing the table's bytes with the entries the run would
have (``struct.pack`` of a ``range``), its length found by galloping and bisection (``memcmp``).
"""

from __future__ import annotations

import struct

from vdkit.formats.qcow2 import layout as L

_FLAGS_OK = b"\x00\x80"  # an entry's first byte here: no flag but COPIED (not compressed, no reserved bits)
_ZERO_ENTRY = bytes(8)
_FIRST_PROBE = 16  # entries of a run compared first; doubled while they match


class Runs:
    """The host runs of one L2 table: clusters ``starts[j] .. starts[j] + lens[j] - 1`` in table order,
    and the stretches ``(first, end)`` of used (non-zero) entries."""

    __slots__ = ("starts", "lens", "used")

    def __init__(self, starts: list[int], lens: list[int], used: list[tuple[int, int]]) -> None:
        self.starts = starts
        self.lens = lens
        self.used = used

    @property
    def used_entries(self) -> int:
        return sum(b - a for a, b in self.used)


def entry_words(raw: bytes, entry_size: int) -> bytes:
    """The 8-byte entries of a table (an extended L2 table without its bitmap words)."""
    if entry_size == 8:
        return raw
    out = bytearray(len(raw) // entry_size * 8)
    for j in range(8):
        out[j::8] = raw[j::entry_size]
    return bytes(out)


_CHUNK = 4096  # bytes compared with zeros at once while skipping unused entries
_ZEROS = bytes(_CHUNK)


def _next_used(words: bytes, i: int, n: int) -> int:
    """Index of the first non-zero entry at or after ``i`` (``n`` if none)."""
    p = 8 * i
    size = len(words)
    while p < size:
        chunk = words[p : p + _CHUNK]
        if chunk != _ZEROS[: len(chunk)]:  # (memcmp; lstrip only on the chunk: it tests byte by byte)
            return (p + len(chunk) - len(chunk.lstrip(b"\0"))) // 8
        p += _CHUNK
    return n


def used_stretches(words: bytes) -> list[tuple[int, int]]:
    """``(first, end)`` entry ranges of the non-zero entries."""
    n = len(words) // 8
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        first = _next_used(words, i, n)
        if first >= n:
            break
        p = 8 * first
        while True:  # the next zero entry: 8 zero bytes at an entry boundary
            q = words.find(_ZERO_ENTRY, p)
            if q < 0:
                end = n
                break
            if not q % 8:
                end = q // 8
                break
            p = q + 1
        out.append((first, end))
        i = end
    return out


def l2_runs(raw: bytes, entry_size: int, cluster_bits: int, max_runs: int = 64) -> Runs | None:
    """The runs of the L2 table ``raw`` when every used entry is a standard one with an aligned host
    offset or none (None otherwise: compressed entries, reserved bits, a misaligned offset, or a
    fragmented table of more than ``max_runs`` runs averaging under four entries, all of which an
    entry-by-entry walk handles).

    A run starting with entry value ``e`` has the entries ``e, e + cs, e + 2cs, ...``: packed, they
    compare equal with the table's bytes as far as the run goes.  Every entry of a run thus equals
    its first one but for the offset (flags and low bits alike), unless adding clusters carried into
    the flag bits, which is checked at the run's last entry.
    """
    words = entry_words(raw, entry_size)
    if words[0::8].translate(None, _FLAGS_OK):
        return None
    cs = 1 << cluster_bits
    used = used_stretches(words)
    starts: list[int] = []
    lens: list[int] = []
    runs = done = 0
    for first, end in used:
        k = first
        while k < end:
            e = int.from_bytes(words[8 * k : 8 * k + 8], "big")
            off = e & L.L2E_OFFSET_MASK
            if off & (cs - 1):
                return None  # misaligned: reported by the entry-by-entry walk
            limit = min(end - k, ((1 << 64) - 1 - e) // cs + 1)  # (no entry past 2^64 - 1)
            # (a stretch is mostly one run: its first run is tried whole; later ones gallop up)
            m = _run_length(words, k, e, cs, limit, limit if k == first else _FIRST_PROBE)
            if (e + (m - 1) * cs) >> 56 != e >> 56:
                return None  # a carry into the flag bits
            if off:
                starts.append(off >> cluster_bits)
                lens.append(m)
            elif m > 1:  # (an entry without a host: the run's others name clusters 1, 2, ...)
                starts.append(1)
                lens.append(m - 1)
            k += m
            done += m
            runs += 1
            if runs > max_runs and runs * 4 > done:
                return None
    return Runs(starts, lens, used)


_ONE = (1).to_bytes(8, "big")
_consts: dict[tuple[int, int], tuple[int, int]] = {}  # (slots, cs) -> (Σ 2^(64j), cs·Σ j·2^(64j)) for j < slots


def _ramp(m: int, cs: int) -> tuple[int, int]:
    """``(Σ_{j<m} 2^(64j), cs·Σ_{j<m} j·2^(64j))``: slot j (from the least significant) holds 1, and j·cs."""
    hit = _consts.get((m, cs))
    if hit is None:
        if len(_consts) > 64:  # (a few sizes recur: the probes, the lengths of used stretches)
            _consts.clear()
        ones = int.from_bytes(_ONE * m, "big")
        steps = int.from_bytes(struct.pack(f">{m}Q", *range((m - 1) * cs, -1, -cs)), "big") if m > 1 else 0
        hit = _consts[m, cs] = (ones, steps)
    return hit


def _run_length(words: bytes, k: int, e: int, cs: int, limit: int, probe: int = _FIRST_PROBE) -> int:
    """How many entries from ``k`` on (1..``limit``) are ``e, e + cs, ...``.

    The expected entries of ``s`` slots are one big integer, ``(e + (s-1)·cs)·Σ 2^(64j) − cs·Σ j·2^(64j)``
    (slot j from the least significant holds ``e + (s-1-j)·cs``: no slot borrows or carries, the
    entries being far below 2^64), compared with the table's bytes as one integer: the most
    significant bit of their XOR is in the first entry that differs.  Probes grow eightfold from
    ``probe`` entries, so a short run costs little and a long one about one conversion of its bytes.
    """
    size = probe
    while True:
        size = min(size, limit)
        ones, steps = _ramp(size, cs)
        diff = int.from_bytes(words[8 * k : 8 * (k + size)], "big") ^ ((e + (size - 1) * cs) * ones - steps)
        if diff:
            return size - 1 - (diff.bit_length() - 1) // 64
        if size == limit:
            return size
        size *= 8



def same_runs(raw: bytes, other: bytes, entry_size: int, other_used: list[tuple[int, int]]) -> bool:
    """Whether the L2 table ``raw`` has the runs and used stretches of ``other`` (whose used stretches
    are ``other_used``): their bytes are equal but for the COPIED flags, every used entry's first
    byte is 0x00 or 0x80 in both, and the same entries are used (an entry of the COPIED flag alone
    in ``other`` is a zero entry in ``raw``).

    A snapshot taken and deleted again leaves such a pair (the active tree's copy and the snapshot's
    original): the copy's runs are then the original's, for a few C-speed passes over the used
    bytes instead of the walk :func:`l2_runs` makes.  The runs may differ where COPIED changed
    within one (the walk would cut it there); they name the same clusters."""
    if len(raw) != len(other):
        return False
    pos = 0
    for a, b in other_used:
        lo, hi = a * entry_size, b * entry_size
        if raw[pos:lo] != other[pos:lo]:  # (between the used stretches: zeros in both)
            return False
        seg, other_seg = raw[lo:hi], other[lo:hi]
        if seg != other_seg:
            top, other_top = seg[0::entry_size], other_seg[0::entry_size]
            if top.translate(None, _FLAGS_OK) or other_top.translate(None, _FLAGS_OK):
                return False
            mixed = bytearray(seg)
            mixed[0::entry_size] = other_top
            if mixed != other_seg:
                return False
            q = seg.find(_ZERO_ENTRY)  # (a zero entry here: the COPIED flag alone in ``other``)
            while q >= 0:
                if not q % entry_size:
                    return False
                q = seg.find(_ZERO_ENTRY, q + 1)
        pos = hi
    return raw[pos:] == other[pos:]
