"""An L2 table's host clusters as runs, found in its bytes.

A qcow2 writer allocates clusters in order, so the used entries of an L2 table are mostly a few runs
of consecutive host clusters.  Walking the references run by run (refcount changes by ranges, the
COPIED flags of a whole table by one byte translation) is what lets a snapshot of gigabytes cost
little more than reading its tables.  Decoding a table into one Python integer per entry would cost
more than all the rest, so the runs are found in the table's bytes: unused stretches by
``bytes.find``/``lstrip``, and a run by comparing the table's bytes with the bytes the run would
have (built from repeated bytes, :func:`_expected`), its length found by galloping and bisection
(``memcmp``).
"""

from __future__ import annotations

from vdkit.formats.qcow2 import layout as L
from vdkit.io.file import find_aligned

_FLAGS_OK = b"\x00\x80"  # an entry's first byte here: no flag but COPIED (not compressed, no reserved bits)
_ZERO_ENTRY = bytes(8)
_FIRST_PROBE = 16  # entries of a run compared first; doubled while they match


class Runs:
    """The host runs of one L2 table: clusters ``starts[j] .. starts[j] + lens[j] - 1`` in table order,
    and the stretches ``(first, end)`` of used (non-zero) entries."""

    __slots__ = ("starts", "lens", "used", "bare")

    def __init__(self, starts: list[int], lens: list[int], used: list[tuple[int, int]], bare: bool = True) -> None:
        self.starts = starts
        self.lens = lens
        self.used = used
        self.bare = bare  # whether a used entry may be the COPIED flag alone (False: l2_runs saw none)

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
    # (startswith compares in place: zero chunks are skipped without copying them; then 64 bytes at
    # a time, and lstrip, which tests byte by byte, only on the last 64)
    while p + _CHUNK <= size and words.startswith(_ZEROS, p):
        p += _CHUNK
    while p < size and words.startswith(_ZEROS[: min(64, size - p)], p):
        p += 64
    if p >= size:
        return n
    chunk = words[p : p + 64]
    return (p + len(chunk) - len(chunk.lstrip(b"\0"))) // 8


def used_stretches(words: bytes) -> list[tuple[int, int]]:
    """``(first, end)`` entry ranges of the non-zero entries."""
    n = len(words) // 8
    out: list[tuple[int, int]] = []
    i = 0
    while i < n:
        first = _next_used(words, i, n)
        if first >= n:
            break
        q = find_aligned(words, _ZERO_ENTRY, 8 * first)  # the next zero entry
        end = n if q < 0 else q // 8
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
    cs = 1 << cluster_bits
    used = used_stretches(words)
    starts: list[int] = []
    lens: list[int] = []
    runs = done = 0
    bare = False
    for first, end in used:
        k = first
        while k < end:
            e = int.from_bytes(words[8 * k : 8 * k + 8], "big")
            if e >> 56 not in (0, 0x80):  # (the run's entries have its first byte: tested once a run)
                return None  # compressed, or reserved bits: the entry-by-entry walk's
            off = e & L.L2E_OFFSET_MASK
            if off & (cs - 1):
                return None  # misaligned: reported by the entry-by-entry walk
            if e == L.OFLAG_COPIED:  # (only a run's first entry can be: the next one has a host)
                bare = True
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
    return Runs(starts, lens, used, bare)


_patterns: dict[tuple[int, int], bytes] = {}  # (cluster_bits, shift) -> one period of a fast column


def _pattern(c: int, s: int) -> bytes:
    """One period of the byte at bit ``s`` of ``w << c`` for consecutive ``w`` from 0: ``2^(s+8-c)``
    bytes (each value repeated ``2^(s-c)`` times when ``s >= c``; ``(w << (c-s)) & 255`` otherwise)."""
    hit = _patterns.get((c, s))
    if hit is None:
        ramp = bytes(range(256))
        if s >= c:
            rep = 1 << (s - c)
            out = bytearray(256 * rep)
            for t in range(rep):
                out[t::rep] = ramp
            hit = bytes(out)
        else:
            hit = ramp[: 256 >> (c - s)].translate(bytes((b << (c - s)) & 255 for b in range(256)))
        _patterns[c, s] = hit
    return hit


def _expected(e: int, c: int, m: int) -> bytes | bytearray:
    """The big-endian bytes of the ``m`` entries ``e, e + 2^c, e + 2^(c+1), ...`` (all below 2^64).

    Built from repeated bytes, not entry by entry: the byte columns holding the low bits of the
    cluster number change from entry to entry (a period of at most 2^15 entries, sliced from
    :func:`_pattern` and put in with one strided assignment each); every other byte changes at
    most once every 256 entries, so the entries with those columns cleared are a few repeated
    8-byte values."""
    fast = [s for s in range(0, 64, 8) if s + 8 > c and s < c + 8]  # (bit positions of the columns)
    top = fast[-1] + 8 - c  # the cluster number's bits below ``top`` live in the fast columns
    fast_mask = 0
    for s in fast:
        fast_mask |= 0xFF << s
    u = e >> c
    low = e & ((1 << c) - 1)
    pieces = []
    j = 0
    while j < m:
        n = min(m - j, (1 << top) - ((u + j) & ((1 << top) - 1)))
        pieces.append(((e + (j << c)) & ~fast_mask).to_bytes(8, "big") * n)
        j += n
    out = bytearray(b"".join(pieces))
    for s in fast:
        pat = _pattern(c, s)
        period = len(pat)
        off = u % period
        col = (pat * ((off + m + period - 1) // period))[off : off + m]
        if s < c and (low >> s) & 255:  # (bits of the entry below the cluster offset in this byte)
            col = col.translate(bytes(b | ((low >> s) & 255) for b in range(256)))
        out[7 - s // 8 :: 8] = col
    return out


def _first_diff(a: bytes, b: bytes | bytearray) -> int:
    """The index of the first 8-byte entry where ``a`` and ``b`` (same length, different) differ."""
    lo, hi = 0, len(a)
    while hi - lo > 64:  # (bisection by slices: memcmp, no per-byte step in Python)
        mid = (lo + hi) // 2 & ~7
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    while a[lo : lo + 8] == b[lo : lo + 8]:
        lo += 8
    return lo // 8


def _run_length(words: bytes, k: int, e: int, cs: int, limit: int, probe: int = _FIRST_PROBE) -> int:
    """How many entries from ``k`` on (1..``limit``) are ``e, e + cs, ...``.

    The table's bytes are compared with the bytes those entries would have (:func:`_expected`, made
    of repeated bytes at C speed); probes grow eightfold from ``probe`` entries, so a short run costs
    little and a long one about one comparison of its bytes.
    """
    c = cs.bit_length() - 1
    size = probe
    while True:
        size = min(size, limit)
        seg = words[8 * k : 8 * (k + size)]
        want = _expected(e, c, size)
        if seg != want:
            return _first_diff(seg, want)
        if size == limit:
            return size
        size *= 8


def _zeros_at(words: bytes, lo: int, hi: int) -> bool:
    """Whether ``words[lo:hi]`` is all zeros (compared in place, 4 KiB at a time)."""
    while hi - lo >= _CHUNK:
        if not words.startswith(_ZEROS, lo):
            return False
        lo += _CHUNK
    return words.startswith(_ZEROS[: hi - lo], lo)


def same_runs(raw: bytes, other: bytes, entry_size: int, other_used: list[tuple[int, int]],
              other_bare: bool = True) -> bool:
    """Whether the L2 table ``raw`` has the runs and used stretches of ``other`` (whose used stretches
    are ``other_used``): their bytes are equal but for the COPIED flags, every used entry's first
    byte is 0x00 or 0x80 in both, and the same entries are used (an entry of the COPIED flag alone
    in ``other`` is a zero entry in ``raw``; ``other_bare`` False: ``other`` has no such entry,
    :attr:`Runs.bare`).

    A snapshot taken and deleted again leaves such a pair (the active tree's copy and the snapshot's
    original): the copy's runs are then the original's, for a few C-speed passes over the used
    bytes instead of the walk :func:`l2_runs` makes.  The runs may differ where COPIED changed
    within one (the walk would cut it there); they name the same clusters."""
    if len(raw) != len(other):
        return False
    pos = 0
    for a, b in other_used:
        lo, hi = a * entry_size, b * entry_size
        # (between the used stretches: zeros in both; ``other``'s are, without bitmap words between)
        if not (_zeros_at(raw, pos, lo) if entry_size == 8 else raw[pos:lo] == other[pos:lo]):
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
            if other_bare and find_aligned(seg, _ZERO_ENTRY, 0, entry_size) >= 0:
                return False  # (a zero entry here: the COPIED flag alone in ``other``)
        pos = hi
    if entry_size == 8:
        return _zeros_at(raw, pos, len(raw))
    return raw[pos:] == other[pos:]
