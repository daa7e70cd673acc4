"""The table backends of :mod:`vdkit.io.tables` (imported on first use: defining them costs a few
million instructions, which the formats that only decode a table at ``info`` time should not pay).

One algorithm, two representations: the qcow2 allocator (refcount.py, create.py, snapshot_ops.py) and
check work on whole tables of entries and cluster indices through a :class:`Backend`.  :data:`SMALL`
keeps tables as ``list[int]`` and works with ``struct``, ``bytes.find`` and C-level builtins; :data:`NUMPY`
keeps them as ``uint64``/``int64`` arrays.  ``tables.backend_for`` picks one.
"""

from __future__ import annotations

import struct
from _bisect import bisect_right  # (the C modules of bisect and operator: importing bisect.py and
from _operator import add, ne, sub  # operator.py costs a quarter and a third of a millisecond)
from itertools import compress, repeat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from vdkit.io.tables import Tab

_SUB_BYTE_SHIFT: dict[tuple[int, int], bytes] = {}  # (bits, k) -> translate table extracting entry k
_SUB_BYTE_PACK: dict[tuple[int, int], bytes] = {}  # (bits, k) -> translate table placing entry k


def _shift_table(bits: int, k: int) -> bytes:
    key = (bits, k)
    t = _SUB_BYTE_SHIFT.get(key)
    if t is None:
        mask = (1 << bits) - 1
        t = _SUB_BYTE_SHIFT[key] = bytes((b >> (k * bits)) & mask for b in range(256))
    return t


def _pack_table(bits: int, k: int) -> bytes:
    key = (bits, k)
    t = _SUB_BYTE_PACK.get(key)
    if t is None:
        mask = (1 << bits) - 1
        t = _SUB_BYTE_PACK[key] = bytes(((b & mask) << (k * bits)) & 0xFF for b in range(256))
    return t


class Backend:
    """The operations the qcow2 allocator needs on tables of unsigned integers.

    ``vals`` tables hold entries (refcounts, L1/L2 entries: unsigned 64-bit), ``idx`` tables cluster
    indices (signed).  Both index, slice and ``len()`` alike in every backend; everything vectorised
    goes through these methods.
    """

    name = ""

    # construction and conversion
    def zeros(self, n: int) -> Tab: raise NotImplementedError
    def array(self, values: Sequence[int] | Tab) -> Tab: raise NotImplementedError
    def indices(self, values: Sequence[int]) -> Tab: raise NotImplementedError
    def arange(self, lo: int, hi: int) -> Tab: raise NotImplementedError
    def concat(self, parts: Sequence[Tab]) -> Tab: raise NotImplementedError
    def tolist(self, t: Tab) -> list[int]: raise NotImplementedError
    def copy(self, t: Tab) -> Tab: raise NotImplementedError
    def convert(self, t: Tab) -> Tab: raise NotImplementedError  # a table of either backend, as this one's

    # encoding
    def decode_u64(self, raw: bytes | bytearray | memoryview) -> Tab: raise NotImplementedError
    def encode_u64(self, t: Tab) -> bytes: raise NotImplementedError
    def decode_refcounts(self, raw: bytes | bytearray | memoryview, bits: int) -> Tab: raise NotImplementedError
    def encode_refcounts(self, t: Tab, bits: int) -> bytes: raise NotImplementedError

    # searching
    def nonzero(self, t: Tab) -> list[int]: raise NotImplementedError
    def count_nonzero(self, t: Tab, lo: int, hi: int) -> int: raise NotImplementedError
    def any_nonzero(self, t: Tab, lo: int, hi: int) -> bool: raise NotImplementedError

    def zero_scan(self, t: Tab, start: int, n: int) -> tuple[int, int, int]:
        """Zero runs of ``t[start:]``: (length of the leading zero run, index of the first run of ``n``
        zeros or -1, and when there is none, the index where the final zero run begins (``len(t)`` when
        the last entry is not 0; unspecified when a run was found))."""
        raise NotImplementedError

    # in-place slices
    def fits(self, t: Tab, lo: int, hi: int, addend: int, maxval: int) -> bool:
        """Whether every entry of ``t[lo:hi]`` plus ``addend`` stays within ``0..maxval``."""
        raise NotImplementedError

    def add_slice(self, t: Tab, lo: int, hi: int, addend: int) -> list[int]:
        """Add ``addend`` to ``t[lo:hi]`` (the caller checked :meth:`fits`); the indices now 0."""
        raise NotImplementedError

    def get_slice(self, t: Tab, lo: int, hi: int) -> Tab: raise NotImplementedError
    def set_slice(self, t: Tab, lo: int, values: Tab) -> None: raise NotImplementedError

    def set_strided(self, t: Tab, lo: int, step: int, first: int, count: int, increment: int) -> None:
        """``t[lo + k*step] = first + k*increment`` for ``k < count``."""
        raise NotImplementedError

    # sets of cluster indices
    def unique_sorted(self, t: Tab) -> Tab: raise NotImplementedError
    def unique_shifted(self, t: Tab, bits: int) -> list[int]: raise NotImplementedError  # sorted {e >> bits}
    def members(self, a: Tab, b: Tab) -> list[int]: raise NotImplementedError  # entries of a that are in b
    def intersects(self, a: Tab, b: Tab) -> bool: raise NotImplementedError  # some entry of a is in b
    def positions_in(self, t: Tab, mask: int, values: Sequence[int]) -> list[int]:
        """Indices ``j`` with ``t[j] & mask`` among ``values``."""
        raise NotImplementedError

    def gather(self, keys: Tab, per: int, lookup: Callable[[int], Tab | None]) -> Tab:
        """``lookup(k // per)[k % per]`` for every key (0 where ``lookup`` gives None or ``k`` is
        negative): a two-level table read, each second-level table looked up once."""
        raise NotImplementedError

    def any_exceeds(self, cur: Tab, adds: Tab, maxval: int) -> bool:
        """Whether some ``cur[i] + adds[i]`` exceeds ``maxval``."""
        raise NotImplementedError

    def add_signed(self, cur: Tab, sums: Tab) -> Tab:
        """``cur + sums`` element-wise as signed integers (may leave the entries' range)."""
        raise NotImplementedError

    def apply_deltas(self, vals: Tab, idx: Tab, sums: Tab, maxval: int) -> int:
        """``vals[idx[i]] += sums[i]`` in place; the lowest of those ``idx`` now 0 (-1: none).

        Raises ``ValueError`` (``vals`` unchanged or partly changed: the caller drops it) when an entry
        would leave ``0..maxval``."""
        raise NotImplementedError

    # entries with flag bits (L1/L2 tables)
    def strided(self, t: Tab, start: int, step: int) -> Tab: raise NotImplementedError  # a copy of t[start::step]
    def take(self, t: Tab, idx: Tab) -> Tab: raise NotImplementedError  # t[idx] (a copy)
    def masked(self, t: Tab, mask: int) -> Tab: raise NotImplementedError  # t & mask
    def masked_nonzero(self, t: Tab, mask: int) -> Tab: raise NotImplementedError  # (t & mask) where not 0
    def nonzero_values(self, t: Tab) -> Tab: raise NotImplementedError  # the entries that are not 0
    def shifted(self, t: Tab, bits: int) -> Tab: raise NotImplementedError  # t >> bits as indices
    def field(self, t: Tab, idx: Tab, mask: int, bits: int) -> Tab:
        """``(t[i] & mask) >> bits`` for every ``i`` of ``idx``, as indices."""
        raise NotImplementedError

    def with_flag(self, t: Tab, flag: int, present: bool) -> Tab:
        """The entries of ``t`` that have (``present``) or lack any bit of ``flag``."""
        raise NotImplementedError

    def flag_positions(self, t: Tab, present: int, absent: int) -> Tab:
        """Indices of the entries with some bit of ``present`` and none of ``absent``."""
        raise NotImplementedError

    def first_misaligned(self, t: Tab, align: int) -> int | None:
        """The first entry that is not a multiple of ``align`` (a power of two), or None."""
        raise NotImplementedError

    def any_masked_zero(self, t: Tab, mask: int) -> bool:
        """Whether an entry is not 0 but has no bit of ``mask``."""
        raise NotImplementedError

    def clear_flag(self, t: Tab, flag: int, unless: int) -> None:
        """Clear ``flag`` in place in every entry without a bit of ``unless``."""
        raise NotImplementedError

    def set_flag(self, t: Tab, idx: Tab, flag: int) -> None: raise NotImplementedError  # t[idx] |= flag

    def flag_runs(self, t: Tab, lo: int, hi: int, need: int, some: int, absent: int) -> list[tuple[int, int, bool]]:
        """Maximal runs ``(start, end, value)`` of ``[lo, hi)`` (relative to ``lo``) by whether an
        entry has every bit of ``need``, some bit of ``some`` and none of ``absent``."""
        raise NotImplementedError
    def positions_equal(self, t: Tab, value: int) -> Tab: raise NotImplementedError  # indices with t[i] == value
    def count_equal(self, t: Tab, value: int) -> int: raise NotImplementedError
    def equal(self, a: Tab, b: Tab) -> bool: raise NotImplementedError  # same length and entries
    def unique_counts(self, t: Tab) -> tuple[list[int], list[int]]:
        """Distinct values of ``t`` ascending and how often each occurs."""
        raise NotImplementedError

    def deltas(self) -> Deltas: raise NotImplementedError


class Deltas:
    """Net changes per cluster index, accumulated from many additions."""

    def add(self, keys: Tab, addend: int) -> None: raise NotImplementedError
    def add_range(self, lo: int, hi: int, addend: int) -> None: raise NotImplementedError

    def add_runs(self, starts: Tab, lens: Tab, addend: int) -> None:
        """Add ``addend`` to keys ``starts[j] .. starts[j] + lens[j] - 1`` for every ``j``."""
        raise NotImplementedError

    def items(self) -> tuple[Tab, Tab]:
        """Sorted keys and their sums (zero sums included)."""
        raise NotImplementedError

    def lookup(self, keys: Tab) -> Tab:
        """The sum for every key (0 where none)."""
        raise NotImplementedError

    def at(self, key: int) -> int:
        """The sum for one key."""
        return int(self.plus_range([0], key)[0])

    def plus(self, cur: Tab, keys: Tab) -> Tab:
        """``cur[i]`` plus the sum for ``keys[i]``, as signed integers."""
        raise NotImplementedError

    def plus_range(self, cur: Tab, lo: int) -> Tab:
        """:meth:`plus` for the keys ``lo, lo + 1, ...``."""
        raise NotImplementedError

    def negative_runs(self) -> list[tuple[int, int]]:
        """``(first, end)`` runs of the keys whose sum is below 0, sorted and disjoint."""
        keys, sums = self.items()
        out: list[tuple[int, int]] = []
        for k, v in zip(Deltas.tolist(keys), Deltas.tolist(sums), strict=True):
            if v < 0:
                if out and out[-1][1] == k:
                    out[-1] = (out[-1][0], k + 1)
                else:
                    out.append((k, k + 1))
        return out

    def segments(self, lo: int, hi: int) -> list[tuple[int, int, int]] | None:
        """The changed keys of ``[lo, hi)`` as ``(first, end, sum)`` runs of equal sum (zero sums
        included), in order; None where the changes are held key by key (numpy's)."""
        return None

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """``[lo, hi)`` cut where the sum changes: ``(first, end, sum)`` pieces in order, covering it."""
        out: list[tuple[int, int, int]] = []
        prev = None
        for k, v in zip(range(lo, hi), self.tolist(self.lookup(range(lo, hi))), strict=True):
            if prev is not None and prev[2] == v:
                prev = (prev[0], k + 1, v)
                out[-1] = prev
            else:
                prev = (k, k + 1, v)
                out.append(prev)
        return out

    @staticmethod
    def tolist(t: Tab) -> list[int]:
        return t if isinstance(t, list) else list(t.tolist())

    def apply_block(self, blk: int, per: int, vals: Tab, maxval: int) -> int:
        """Add the sums of keys ``blk * per .. blk * per + per - 1`` to ``vals`` (their counts) in place;
        the lowest index of a key with a sum (zero sums included) whose count is now 0, -1 for none.
        Raises ``ValueError`` (``vals`` partly changed: the caller drops it) when a count would leave
        ``0..maxval``."""
        raise NotImplementedError

    def by_block(self, per: int) -> dict[int, tuple[Tab, Tab]]:
        """The sums (zeros included) grouped by ``key // per``: block -> (``key % per``, sums)."""
        raise NotImplementedError

    def touched_blocks(self, per: int) -> list[int]:
        """Distinct ``key // per`` of the keys whose sum is not 0, ascending."""
        raise NotImplementedError


_STRUCT_CODES = {8: "B", 16: "H", 32: "I", 64: "Q"}


_CHUNK = 256  # entries tested by one any() while looking for a non-zero one


def _nonzero_at(t: list[int]) -> list[int]:
    """Indices of the non-zero entries: chunk by chunk, a chunk of zeros skipped by one ``any()`` and
    the others' indices picked by ``compress`` (refcount tables are mostly zeros; all at C speed)."""
    out: list[int] = []
    for i in range(0, len(t), _CHUNK):
        chunk = t[i : i + _CHUNK]
        if any(chunk):
            out += compress(range(i, i + len(chunk)), chunk)
    return out


def _next_nonzero(t: list[int], i: int) -> int:
    """Index of the first non-zero entry at or after ``i`` (``len(t)`` if none)."""
    size = len(t)
    while i < size:
        chunk = t[i : i + _CHUNK]
        if any(chunk):
            return i + bytes(map(bool, chunk)).find(1)
        i += _CHUNK
    return size


def _last_nonzero(t: list[int], lo: int) -> int:
    """Index of the last non-zero entry at or after ``lo`` (``lo - 1`` if none)."""
    i = len(t)
    while i > lo:
        a = max(lo, i - _CHUNK)
        chunk = t[a:i]
        if any(chunk):
            return a + bytes(map(bool, chunk)).rfind(1)
        i = a
    return lo - 1


class _SmallDeltas(Deltas):
    """Net changes as runs of equal change.  Adding a run of keys costs four dictionary entries however
    long it is (a snapshot adds whole trees, tens of thousands of clusters in a few runs): a difference
    map of the running sum and one of how many additions cover a key; the sorted, disjoint segments
    (covered keys with their sum, zero sums included) are built from them when first asked for."""

    def __init__(self) -> None:
        self._sum: dict[int, int] = {}  # key -> change of the running sum from that key on
        self._cov: dict[int, int] = {}  # key -> change of the number of additions covering keys from it on
        self._segs: tuple[list[int], list[int], list[int]] | None = None  # (first, end, sum) of the segments

    def _span(self, lo: int, hi: int, addend: int) -> None:
        s, c = self._sum, self._cov
        s[lo] = s.get(lo, 0) + addend
        s[hi] = s.get(hi, 0) - addend
        c[lo] = c.get(lo, 0) + 1
        c[hi] = c.get(hi, 0) - 1

    def add(self, keys: Tab, addend: int) -> None:
        if isinstance(keys, range) and keys.step == 1:
            self.add_range(keys.start, keys.stop, addend)
            return
        n = len(keys)
        if not n:
            return
        self._segs = None
        a = 0
        for b in (*run_cuts(keys), n):  # keys[a:b] ascend by one: one span each
            first = keys[a]
            self._span(first, first + b - a, addend)
            a = b

    def add_range(self, lo: int, hi: int, addend: int) -> None:
        if hi > lo:
            self._segs = None
            self._span(lo, hi, addend)

    def add_runs(self, starts: Tab, lens: Tab, addend: int) -> None:
        self._segs = None
        for lo, n in zip(starts, lens, strict=True):
            if n > 0:
                self._span(lo, lo + n, addend)

    def _segments(self) -> tuple[list[int], list[int], list[int]]:
        if self._segs is None:
            from itertools import accumulate

            bounds = sorted(self._cov)  # (every span adds its two keys to both maps)
            sums = list(accumulate(map(self._sum.__getitem__, bounds)))
            covered = accumulate(map(self._cov.__getitem__, bounds))
            los: list[int] = []
            his: list[int] = []
            vals: list[int] = []
            for i in compress(range(len(bounds) - 1), covered):
                lo, hi, v = bounds[i], bounds[i + 1], sums[i]
                if los and his[-1] == lo and vals[-1] == v:
                    his[-1] = hi
                else:
                    los.append(lo)
                    his.append(hi)
                    vals.append(v)
            self._segs = (los, his, vals)
        return self._segs

    def items(self) -> tuple[Tab, Tab]:
        keys: list[int] = []
        sums: list[int] = []
        for lo, hi, v in zip(*self._segments(), strict=True):
            keys += range(lo, hi)
            sums += [v] * (hi - lo)
        return keys, sums

    def negative_runs(self) -> list[tuple[int, int]]:
        los, his, vals = self._segments()
        out: list[tuple[int, int]] = []
        for lo, hi, v in zip(los, his, vals, strict=True):
            if v < 0:
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
        return out

    def segments(self, lo: int, hi: int) -> list[tuple[int, int, int]] | None:
        los, his, vals = self._segments()
        out: list[tuple[int, int, int]] = []
        i = bisect_right(his, lo)
        while i < len(los) and los[i] < hi:
            out.append((max(los[i], lo), min(his[i], hi), vals[i]))
            i += 1
        return out

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        los, his, vals = self._segments()
        out: list[tuple[int, int, int]] = []
        i = bisect_right(his, lo)
        pos = lo
        while pos < hi:
            if i >= len(los) or los[i] >= hi:
                out.append((pos, hi, 0))
                break
            if los[i] > pos:
                out.append((pos, los[i], 0))
                pos = los[i]
            end = min(his[i], hi)
            out.append((pos, end, vals[i]))
            pos = end
            i += 1
        return out

    def _range_sums(self, lo: int, hi: int, out: list[int]) -> None:
        """Append the sums of keys ``lo..hi-1`` to ``out``."""
        los, his, vals = self._segments()
        i = bisect_right(his, lo)
        pos = lo
        while pos < hi:
            if i >= len(los) or los[i] >= hi:
                out += [0] * (hi - pos)
                return
            if los[i] > pos:
                out += [0] * (los[i] - pos)
                pos = los[i]
            end = min(his[i], hi)
            out += [vals[i]] * (end - pos)
            pos = end
            i += 1

    def lookup(self, keys: Tab) -> Tab:
        out: list[int] = []
        n = len(keys)
        a = 0
        for b in (*run_cuts(keys), n) if n else ():  # by runs of consecutive keys: one search each
            first = keys[a]
            self._range_sums(first, first + b - a, out)
            a = b
        return out

    def at(self, key: int) -> int:
        if self._segs is None:  # (the running sum's changes up to the key: no rebuild of the segments)
            return sum([v for k, v in self._sum.items() if k <= key])
        los, his, vals = self._segs
        i = bisect_right(his, key)
        return vals[i] if i < len(los) and los[i] <= key else 0

    def plus(self, cur: Tab, keys: Tab) -> Tab:
        return list(map(add, cur, self.lookup(keys)))

    def plus_range(self, cur: Tab, lo: int) -> Tab:
        sums: list[int] = []
        self._range_sums(lo, lo + len(cur), sums)
        return list(map(add, cur, sums))

    def by_block(self, per: int) -> dict[int, tuple[Tab, Tab]]:
        out: dict[int, tuple[Tab, Tab]] = {}
        for lo, hi, v in zip(*self._segments(), strict=True):
            while lo < hi:
                blk = lo // per
                base = blk * per
                end = min(hi, base + per)
                idx, sums = out.setdefault(blk, ([], []))
                idx += range(lo - base, end - base)
                sums += [v] * (end - lo)
                lo = end
        return out

    def touched_blocks(self, per: int) -> list[int]:
        out: set[int] = set()
        for lo, hi, v in zip(*self._segments(), strict=True):
            if v:
                out.update(range(lo // per, (hi - 1) // per + 1))
        return sorted(out)

    def apply_block(self, blk: int, per: int, vals: Tab, maxval: int) -> int:
        los, his, sums = self._segments()
        base = blk * per
        end = base + per
        lowest = -1
        i = bisect_right(his, base)
        while i < len(los) and los[i] < end:
            a, b, v = max(los[i], base) - base, min(his[i], end) - base, sums[i]
            new = vals[a:b]
            if v:
                new = [x + v for x in new]
                if min(new) < 0 or max(new) > maxval:
                    raise ValueError("refcount out of range")
                vals[a:b] = new
            if lowest < 0 and 0 in new:
                lowest = a + new.index(0)
            i += 1
        return lowest


_U64_PIECE = 256  # entries of a big table tested for zeros at once by decode_u64/encode_u64
_U64_ZEROS = bytes(8 * _U64_PIECE)


def run_cuts(keys: Tab) -> list[int]:
    """Indices ``i`` where ``keys[i]`` is not ``keys[i - 1] + 1``: the starts of runs of consecutive
    keys but the first (found at C speed)."""
    return list(compress(range(1, len(keys)), map(ne, map(sub, keys[1:], keys), repeat(1))))


class _Small(Backend):
    """Tables as ``list[int]``; every loop that can runs inside a C builtin."""

    name = "small"

    def zeros(self, n: int) -> Tab:
        return [0] * n

    def array(self, values: Sequence[int] | Tab) -> Tab:
        return [int(v) for v in values]

    indices = array

    def arange(self, lo: int, hi: int) -> Tab:
        return list(range(lo, hi))

    def concat(self, parts: Sequence[Tab]) -> Tab:
        out: list[int] = []
        for p in parts:
            out += p
        return out

    def tolist(self, t: Tab) -> list[int]:
        return list(t)

    def copy(self, t: Tab) -> Tab:
        return list(t)

    def convert(self, t: Tab) -> Tab:
        return t if isinstance(t, list) else t.tolist()

    def decode_u64(self, raw: bytes | bytearray | memoryview) -> Tab:
        n = len(raw) // 8
        if n < 2 * _U64_PIECE:
            return list(struct.unpack(f">{n}Q", raw[: n * 8]))
        # (a refcount table or a big L1 is mostly zeros: only the pieces holding entries are unpacked,
        # the others found zero by comparing them in place)
        raw = bytes(raw)
        out = [0] * n
        step = 8 * _U64_PIECE
        for p in range(0, n * 8, step):
            if not raw.startswith(_U64_ZEROS, p):
                q = min(p + step, n * 8)
                out[p // 8 : q // 8] = struct.unpack(f">{(q - p) // 8}Q", raw[p:q])
        return out

    def encode_u64(self, t: Tab) -> bytes:
        n = len(t)
        if n < 2 * _U64_PIECE:
            return struct.pack(f">{n}Q", *t)
        parts = []  # (pieces of zeros: list.count tests them, no conversion of each entry)
        for i in range(0, n, _U64_PIECE):
            piece = t[i : i + _U64_PIECE]
            k = len(piece)
            parts.append(_U64_ZEROS[: 8 * k] if piece.count(0) == k else struct.pack(f">{k}Q", *piece))
        return b"".join(parts)

    def decode_refcounts(self, raw: bytes | bytearray | memoryview, bits: int) -> Tab:
        raw = bytes(raw)
        if bits >= 8:
            n = len(raw) * 8 // bits
            w = bits // 8
            if w > 1:  # counts below 256 (the usual): every entry's last byte is its value
                zeros = bytes(n)
                if all(raw[k::w] == zeros for k in range(w - 1)):
                    return list(raw[w - 1 :: w])
            return list(struct.unpack(f">{n}{_STRUCT_CODES[bits]}", raw))
        per_byte = 8 // bits
        out = bytearray(len(raw) * per_byte)
        for k in range(per_byte):
            out[k::per_byte] = raw.translate(_shift_table(bits, k))
        return list(out)

    def encode_refcounts(self, t: Tab, bits: int) -> bytes:
        if bits >= 8:
            return struct.pack(f">{len(t)}{_STRUCT_CODES[bits]}", *t)
        per_byte = 8 // bits
        entries = bytes(t)
        n = len(entries) // per_byte
        acc = 0
        for k in range(per_byte):
            acc |= int.from_bytes(entries[k::per_byte].translate(_pack_table(bits, k)), "big")
        return acc.to_bytes(n, "big")

    def nonzero(self, t: Tab) -> list[int]:
        return _nonzero_at(t)

    def count_nonzero(self, t: Tab, lo: int, hi: int) -> int:
        part = t[lo:hi]
        return int(len(part) - part.count(0))

    def any_nonzero(self, t: Tab, lo: int, hi: int) -> bool:
        return any(t[lo:hi])

    def zero_scan(self, t: Tab, start: int, n: int) -> tuple[int, int, int]:
        # Run by run, each found at C speed (list.index for the next 0, a chunked any() for the next
        # non-zero), so a block that is mostly in use or mostly free costs a few calls, not a pass.
        size = len(t)
        lead = _next_nonzero(t, start) - start
        if lead >= n:
            return lead, start, -1
        i = start + lead
        while True:
            try:
                z = t.index(0, i)
            except ValueError:
                return lead, -1, _last_nonzero(t, start) + 1
            if z + n > size:
                return lead, -1, _last_nonzero(t, z) + 1
            if not any(t[z : z + n]):
                return lead, z, -1
            i = _next_nonzero(t, z)

    def fits(self, t: Tab, lo: int, hi: int, addend: int, maxval: int) -> bool:
        if hi <= lo:
            return True
        if addend > 0:
            return addend <= maxval and bool(max(t[lo:hi]) <= maxval - addend)
        return bool(min(t[lo:hi]) >= -addend)

    def add_slice(self, t: Tab, lo: int, hi: int, addend: int) -> list[int]:
        new = [v + addend for v in t[lo:hi]]
        t[lo:hi] = new
        if addend >= 0:
            return []
        return [lo + i for i, v in enumerate(new) if not v]

    def get_slice(self, t: Tab, lo: int, hi: int) -> Tab:
        return t[lo:hi]

    def set_slice(self, t: Tab, lo: int, values: Tab) -> None:
        t[lo : lo + len(values)] = values

    def set_strided(self, t: Tab, lo: int, step: int, first: int, count: int, increment: int) -> None:
        t[lo : lo + count * step : step] = range(first, first + count * increment, increment)

    def unique_sorted(self, t: Tab) -> Tab:
        return sorted(set(t))

    def unique_shifted(self, t: Tab, bits: int) -> list[int]:
        if t and min(t) >> bits == max(t) >> bits:  # all in one (the usual case): no set
            return [t[0] >> bits]
        return sorted({e >> bits for e in t})

    def members(self, a: Tab, b: Tab) -> list[int]:
        hit = set(a).intersection(b)  # (``a`` is the short one where it matters: no set of ``b``)
        return [x for x in a if x in hit]

    def intersects(self, a: Tab, b: Tab) -> bool:
        return not set(b).isdisjoint(a)

    def positions_in(self, t: Tab, mask: int, values: Sequence[int]) -> list[int]:
        vs = set(values)
        return [j for j, v in enumerate(t) if v & mask in vs]

    def gather(self, keys: Tab, per: int, lookup: Callable[[int], Tab | None]) -> Tab:
        if not len(keys):
            return []
        lo, hi = min(keys), max(keys)
        spanned = hi // per - lo // per + 1
        # keys dense in a few second-level tables (the common case): one flat list of them, read by a
        # listcomp; a few keys (an L1's tables) are looked up one by one instead of copying the tables
        if lo >= 0 and spanned <= 64 and len(keys) * 8 >= spanned * per:
            flat: list[int] = []
            for b in range(lo // per, hi // per + 1):
                vals = lookup(b)
                flat += [0] * per if vals is None else vals
            base = lo // per * per
            return [flat[k - base] for k in keys]
        out = []
        blocks: dict[int, Tab | None] = {}
        for k in keys:
            if k < 0:
                out.append(0)
                continue
            b, i = divmod(k, per)
            if b in blocks:
                vals = blocks[b]
            else:
                vals = blocks[b] = lookup(b)
            out.append(0 if vals is None else vals[i])
        return out

    def any_exceeds(self, cur: Tab, adds: Tab, maxval: int) -> bool:
        return any(c + a > maxval for c, a in zip(cur, adds, strict=True))

    def add_signed(self, cur: Tab, sums: Tab) -> Tab:
        return [int(c) + s for c, s in zip(cur, sums, strict=True)]

    def apply_deltas(self, vals: Tab, idx: Tab, sums: Tab, maxval: int) -> int:
        if idx and idx[-1] - idx[0] + 1 == len(idx) and idx[0] <= idx[-1]:  # one sorted run: slices
            a, b = idx[0], idx[-1] + 1
            new = [v + d for v, d in zip(vals[a:b], sums, strict=True)]
            if min(new) < 0 or max(new) > maxval:
                raise ValueError("refcount out of range")
            vals[a:b] = new
            return a + new.index(0) if 0 in new else -1
        lowest = -1
        for i, d in zip(idx, sums, strict=True):
            v = vals[i] + d
            if v < 0 or v > maxval:
                raise ValueError(i)
            vals[i] = v
            if not v and (lowest < 0 or i < lowest):
                lowest = i
        return lowest

    def strided(self, t: Tab, start: int, step: int) -> Tab:
        return t[start::step]

    def take(self, t: Tab, idx: Tab) -> Tab:
        return [t[i] for i in idx]

    def masked(self, t: Tab, mask: int) -> Tab:
        return [e & mask for e in t]

    def masked_nonzero(self, t: Tab, mask: int) -> Tab:
        return [m for e in compress(t, t) if (m := e & mask)]  # (compress skips the zeros at C speed)

    def nonzero_values(self, t: Tab) -> Tab:
        return list(filter(None, t))

    def shifted(self, t: Tab, bits: int) -> Tab:
        return [e >> bits for e in t]

    def field(self, t: Tab, idx: Tab, mask: int, bits: int) -> Tab:
        return [(t[i] & mask) >> bits for i in idx]

    def with_flag(self, t: Tab, flag: int, present: bool) -> Tab:
        if present:
            return [e for e in t if e and e & flag]
        return [e for e in t if not (e and e & flag)]

    def flag_positions(self, t: Tab, present: int, absent: int) -> Tab:
        return [i for i in _nonzero_at(t) if t[i] & present and not t[i] & absent]

    def first_misaligned(self, t: Tab, align: int) -> int | None:
        m = align - 1  # (not functools.reduce: functools imports collections, a quarter of a start)
        low = [e & m for e in t]
        if not any(low):
            return None
        return int(t[low.index(next(x for x in low if x))])

    def any_masked_zero(self, t: Tab, mask: int) -> bool:
        return any([not e & mask for e in filter(None, t)])

    def clear_flag(self, t: Tab, flag: int, unless: int) -> None:
        keep = ~flag
        # (``e and`` first: a zero entry, the common one, is then a truth test, not a big-int AND)
        t[:] = [e & keep if e and e & flag and not e & unless else e for e in t]

    def set_flag(self, t: Tab, idx: Tab, flag: int) -> None:
        for i in idx:
            t[i] |= flag

    def flag_runs(self, t: Tab, lo: int, hi: int, need: int, some: int, absent: int) -> list[tuple[int, int, bool]]:
        runs: list[tuple[int, int, bool]] = []
        start, cur = 0, False
        for i in range(hi - lo):
            e = t[lo + i]
            v = bool(e) and e & need == need and bool(e & some) and not e & absent
            if i == 0:
                cur = v
            elif v != cur:
                runs.append((start, i, cur))
                start, cur = i, v
        if hi > lo:
            runs.append((start, hi - lo, cur))
        return runs

    def positions_equal(self, t: Tab, value: int) -> Tab:
        return [i for i, e in enumerate(t) if e == value]

    def count_equal(self, t: Tab, value: int) -> int:
        return int(t.count(value))

    def equal(self, a: Tab, b: Tab) -> bool:
        return bool(a == b)

    def unique_counts(self, t: Tab) -> tuple[list[int], list[int]]:
        counts: dict[int, int] = {}
        for e in t:
            counts[e] = counts.get(e, 0) + 1
        keys = sorted(counts)
        return keys, [counts[k] for k in keys]

    def deltas(self) -> Deltas:
        return _SmallDeltas()


class _NumpyDeltas(Deltas):
    """Pending additions summed per addend and merged into sorted arrays by binary search, so the many
    small additions of a transaction (one per allocation) do not re-sort what a tree walk produced."""

    def __init__(self) -> None:
        import numpy as np

        self.np = np
        self._pending: list[tuple[Tab, int]] = []
        self._keys = np.zeros(0, dtype=np.int64)
        self._sums = np.zeros(0, dtype=np.int64)
        self._blocks: tuple[int, dict[int, tuple[Tab, Tab]]] | None = None  # by_block's, for apply_block

    def add(self, keys: Tab, addend: int) -> None:
        arr = self.np.asarray(keys, dtype=self.np.int64)
        if len(arr):
            self._pending.append((arr, addend))

    def add_range(self, lo: int, hi: int, addend: int) -> None:
        if hi > lo:
            self._pending.append((self.np.arange(lo, hi, dtype=self.np.int64), addend))

    def add_runs(self, starts: Tab, lens: Tab, addend: int) -> None:
        np = self.np
        starts = np.asarray(starts, dtype=np.int64)
        lens = np.asarray(lens, dtype=np.int64)
        total = int(lens.sum())
        if total:  # run j's keys: starts[j] - (keys before run j) + their positions in the whole
            keys = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(total, dtype=np.int64)
            self._pending.append((keys, addend))

    def _consolidate(self) -> None:
        if not self._pending:
            return
        self._blocks = None
        np = self.np
        by_delta: dict[int, list[Tab]] = {}
        for a, d in self._pending:
            by_delta.setdefault(d, []).append(a)
        self._pending = []
        for d, arrs in by_delta.items():
            uk, cnt = np.unique(np.concatenate(arrs), return_counts=True)
            self._merge(uk, cnt.astype(np.int64) * d)

    def _merge(self, uk: Tab, us: Tab) -> None:
        np = self.np
        if not len(self._keys):
            self._keys, self._sums = uk, us
            return
        pos = np.searchsorted(self._keys, uk)
        found = pos < len(self._keys)
        found[found] = self._keys[pos[found]] == uk[found]
        self._sums[pos[found]] += us[found]
        if not np.all(found):
            new = ~found
            self._keys = np.insert(self._keys, pos[new], uk[new])
            self._sums = np.insert(self._sums, pos[new], us[new])

    def items(self) -> tuple[Tab, Tab]:
        self._consolidate()
        return self._keys, self._sums

    def lookup(self, keys: Tab) -> Tab:
        np = self.np
        keys = np.asarray(keys, dtype=np.int64)
        out = np.zeros(len(keys), dtype=np.int64)
        k, s = self.items()
        if len(k) and len(keys):
            pos = np.minimum(np.searchsorted(k, keys), len(k) - 1)
            hit = k[pos] == keys
            out[hit] = s[pos[hit]]
        return out

    def plus(self, cur: Tab, keys: Tab) -> Tab:
        np = self.np
        return np.asarray(cur).astype(np.int64) + self.lookup(keys)

    def plus_range(self, cur: Tab, lo: int) -> Tab:
        return self.plus(cur, self.np.arange(lo, lo + len(cur), dtype=self.np.int64))

    def negative_runs(self) -> list[tuple[int, int]]:
        np = self.np
        keys, sums = self.items()
        k = keys[sums < 0]
        if not len(k):
            return []
        cuts = np.flatnonzero(np.diff(k) != 1) + 1
        firsts = k[np.concatenate(([0], cuts))].tolist()
        lasts = k[np.concatenate((cuts - 1, [len(k) - 1]))].tolist()
        return [(a, b + 1) for a, b in zip(firsts, lasts, strict=True)]

    def apply_block(self, blk: int, per: int, vals: Tab, maxval: int) -> int:
        self._consolidate()
        if self._blocks is None or self._blocks[0] != per:
            self._blocks = (per, self.by_block(per))
        idx, sums = self._blocks[1].get(blk, ([], []))
        return NUMPY.apply_deltas(vals, idx, sums, maxval)

    def by_block(self, per: int) -> dict[int, tuple[Tab, Tab]]:
        k, s = self.items()
        rts = k // per
        out: dict[int, tuple[Tab, Tab]] = {}
        if not len(k):
            return out
        cuts = self.np.flatnonzero(rts[1:] != rts[:-1]) + 1
        for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(k)], strict=True):
            out[int(rts[a])] = (k[a:b] % per, s[a:b])
        return out

    def touched_blocks(self, per: int) -> list[int]:
        k, s = self.items()
        return sorted(set((k[s != 0] // per).tolist()))


class _Numpy(Backend):
    """Tables as numpy arrays (``uint64`` entries, ``int64`` indices), vectorised."""

    name = "numpy"

    @property
    def np(self) -> Any:
        import numpy

        return numpy

    def zeros(self, n: int) -> Tab:
        return self.np.zeros(n, dtype=self.np.uint64)

    def array(self, values: Sequence[int] | Tab) -> Tab:
        return self.np.array(values, dtype=self.np.uint64)

    def indices(self, values: Sequence[int]) -> Tab:
        return self.np.asarray(values, dtype=self.np.int64)

    def arange(self, lo: int, hi: int) -> Tab:
        return self.np.arange(lo, hi, dtype=self.np.int64)

    def concat(self, parts: Sequence[Tab]) -> Tab:
        np = self.np
        return np.concatenate([np.zeros(0, dtype=np.int64), *parts])

    def tolist(self, t: Tab) -> list[int]:
        return list(t.tolist()) if hasattr(t, "tolist") else list(t)

    def copy(self, t: Tab) -> Tab:
        return t.copy()

    def convert(self, t: Tab) -> Tab:
        return t if not isinstance(t, list) else self.np.array(t, dtype=self.np.uint64)

    def decode_u64(self, raw: bytes | bytearray | memoryview) -> Tab:
        n = len(raw) // 8
        return self.np.frombuffer(bytes(raw[: n * 8]), dtype=">u8").astype(self.np.uint64)

    def encode_u64(self, t: Tab) -> bytes:
        return bytes(self.np.asarray(t, dtype=self.np.uint64).astype(">u8").tobytes())

    def decode_refcounts(self, raw: bytes | bytearray | memoryview, bits: int) -> Tab:
        np = self.np
        if bits >= 8:
            return np.frombuffer(bytes(raw), dtype=f">u{bits // 8}").astype(np.uint64)
        data = np.frombuffer(bytes(raw), dtype=np.uint8)
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        return ((data[:, None] >> shifts) & np.uint8((1 << bits) - 1)).ravel().astype(np.uint64)

    def encode_refcounts(self, t: Tab, bits: int) -> bytes:
        np = self.np
        if bits >= 8:
            return t.astype(f">u{bits // 8}").tobytes()  # type: ignore[no-any-return]
        shifts = np.arange(0, 8, bits, dtype=np.uint8)
        parts = t.astype(np.uint8).reshape(-1, 8 // bits) << shifts
        return np.bitwise_or.reduce(parts, axis=1).astype(np.uint8).tobytes()  # type: ignore[no-any-return]

    def nonzero(self, t: Tab) -> list[int]:
        return self.np.flatnonzero(t).tolist()  # type: ignore[no-any-return]

    def count_nonzero(self, t: Tab, lo: int, hi: int) -> int:
        return int(self.np.count_nonzero(t[lo:hi]))

    def any_nonzero(self, t: Tab, lo: int, hi: int) -> bool:
        return bool(t[lo:hi].any())

    def zero_scan(self, t: Tab, start: int, n: int) -> tuple[int, int, int]:
        np = self.np
        size = len(t) - start
        nz = np.flatnonzero(t[start:])
        if not len(nz):
            return size, (start if n <= size else -1), start
        lead = int(nz[0])
        if lead >= n:
            return lead, start, start + int(nz[-1]) + 1
        big = np.flatnonzero(np.diff(nz) - 1 >= n)
        if len(big):
            first = start + int(nz[big[0]]) + 1
        elif size - int(nz[-1]) - 1 >= n:
            first = start + int(nz[-1]) + 1
        else:
            first = -1
        return lead, first, start + int(nz[-1]) + 1

    def fits(self, t: Tab, lo: int, hi: int, addend: int, maxval: int) -> bool:
        if hi <= lo:
            return True
        seg = t[lo:hi]
        if addend > 0:
            return addend <= maxval and not bool(np_any_gt(seg, maxval - addend))
        return not bool((seg < self.np.uint64(-addend)).any())

    def add_slice(self, t: Tab, lo: int, hi: int, addend: int) -> list[int]:
        np = self.np
        seg = t[lo:hi]
        if addend >= 0:
            seg += np.uint64(addend)
            return []
        seg -= np.uint64(-addend)
        return (np.flatnonzero(seg == 0) + lo).tolist()  # type: ignore[no-any-return]

    def get_slice(self, t: Tab, lo: int, hi: int) -> Tab:
        return t[lo:hi].copy()

    def set_slice(self, t: Tab, lo: int, values: Tab) -> None:
        t[lo : lo + len(values)] = values

    def set_strided(self, t: Tab, lo: int, step: int, first: int, count: int, increment: int) -> None:
        np = self.np
        t[lo : lo + count * step : step] = np.arange(count, dtype=np.uint64) * np.uint64(increment) + np.uint64(first)

    def unique_sorted(self, t: Tab) -> Tab:
        np = self.np
        x = np.sort(np.asarray(t))
        if len(x) == 0:
            return x
        return x[np.concatenate(([True], x[1:] != x[:-1]))]  # (np.unique imports numpy.ma: 10 ms)

    def unique_shifted(self, t: Tab, bits: int) -> list[int]:
        return self.tolist(self.unique_sorted(self.shifted(t, bits)))

    def members(self, a: Tab, b: Tab) -> list[int]:
        np = self.np
        a = np.asarray(a, dtype=np.int64)
        return a[np.isin(a, np.asarray(b, dtype=np.int64))].tolist()  # type: ignore[no-any-return]

    def intersects(self, a: Tab, b: Tab) -> bool:
        np = self.np
        return bool(np.isin(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)).any())

    def positions_in(self, t: Tab, mask: int, values: Sequence[int]) -> list[int]:
        np = self.np
        vals = np.asarray(values, dtype=np.uint64)
        return np.flatnonzero(np.isin(t & np.uint64(mask), vals)).tolist()  # type: ignore[no-any-return]

    def gather(self, keys: Tab, per: int, lookup: Callable[[int], Tab | None]) -> Tab:
        np = self.np
        keys = np.asarray(keys, dtype=np.int64)
        out = np.zeros(len(keys), dtype=np.uint64)
        if not len(keys):
            return out
        rt = keys // per
        valid = keys >= 0
        for r in np.unique(rt[valid]).tolist():
            vals = lookup(r)
            if vals is None:
                continue
            sel = valid & (rt == r)
            out[sel] = vals[keys[sel] % per]
        return out

    def any_exceeds(self, cur: Tab, adds: Tab, maxval: int) -> bool:
        np = self.np
        room = np.uint64(maxval) - np.asarray(cur, dtype=np.uint64)
        return bool(np.any(room < np.asarray(adds).astype(np.uint64)))

    def add_signed(self, cur: Tab, sums: Tab) -> Tab:
        np = self.np
        return np.asarray(cur).astype(np.int64) + np.asarray(sums, dtype=np.int64)

    def apply_deltas(self, vals: Tab, idx: Tab, sums: Tab, maxval: int) -> int:
        np = self.np
        idx = np.asarray(idx, dtype=np.int64)
        if maxval < (1 << 63):
            new = vals[idx].astype(np.int64) + np.asarray(sums, dtype=np.int64)
            if np.any(new < 0) or np.any(new > maxval):
                raise ValueError("refcount out of range")
            vals[idx] = new.astype(np.uint64)
        else:  # 64-bit counts do not fit int64: entry by entry
            for i, d in zip(idx.tolist(), np.asarray(sums).tolist(), strict=True):
                v = int(vals[i]) + int(d)
                if v < 0 or v > maxval:
                    raise ValueError("refcount out of range")
                vals[i] = v
        zero = idx[vals[idx] == 0]
        return int(zero.min()) if len(zero) else -1

    def strided(self, t: Tab, start: int, step: int) -> Tab:
        return t[start::step].copy()

    def take(self, t: Tab, idx: Tab) -> Tab:
        return t[self.np.asarray(idx, dtype=self.np.int64)]

    def masked(self, t: Tab, mask: int) -> Tab:
        return t & self.np.uint64(mask)

    def masked_nonzero(self, t: Tab, mask: int) -> Tab:
        m = t & self.np.uint64(mask)
        return m[m != 0]

    def nonzero_values(self, t: Tab) -> Tab:
        return t[t != 0]

    def shifted(self, t: Tab, bits: int) -> Tab:
        np = self.np
        return (np.asarray(t, dtype=np.uint64) >> np.uint64(bits)).astype(np.int64)

    def field(self, t: Tab, idx: Tab, mask: int, bits: int) -> Tab:
        np = self.np
        sel = t[np.asarray(idx, dtype=np.int64)]
        return ((sel & np.uint64(mask)) >> np.uint64(bits)).astype(np.int64)

    def with_flag(self, t: Tab, flag: int, present: bool) -> Tab:
        has = (t & self.np.uint64(flag)) != 0
        return t[has if present else ~has]

    def flag_positions(self, t: Tab, present: int, absent: int) -> Tab:
        np = self.np
        return np.flatnonzero(((t & np.uint64(present)) != 0) & ((t & np.uint64(absent)) == 0))

    def first_misaligned(self, t: Tab, align: int) -> int | None:
        np = self.np
        bad = np.flatnonzero(np.asarray(t, dtype=np.uint64) & np.uint64(align - 1))
        return int(t[bad[0]]) if len(bad) else None

    def any_masked_zero(self, t: Tab, mask: int) -> bool:
        np = self.np
        return bool(((t != 0) & ((t & np.uint64(mask)) == 0)).any())

    def clear_flag(self, t: Tab, flag: int, unless: int) -> None:
        np = self.np
        sel = (t & np.uint64(unless)) == 0
        t[sel] &= np.uint64(~flag & (2**64 - 1))

    def flag_runs(self, t: Tab, lo: int, hi: int, need: int, some: int, absent: int) -> list[tuple[int, int, bool]]:
        np = self.np
        seg = t[lo:hi]
        n = len(seg)
        if n == 0:
            return []
        mask = ((seg & np.uint64(need)) == np.uint64(need)) & ((seg & np.uint64(some)) != 0) \
            & ((seg & np.uint64(absent)) == 0)
        bounds = [0, *(np.flatnonzero(mask[1:] != mask[:-1]) + 1).tolist(), n]
        first = bool(mask[0])
        return [(bounds[i], bounds[i + 1], first != (i % 2 == 1)) for i in range(len(bounds) - 1)]

    def set_flag(self, t: Tab, idx: Tab, flag: int) -> None:
        t[self.np.asarray(idx, dtype=self.np.int64)] |= self.np.uint64(flag)

    def positions_equal(self, t: Tab, value: int) -> Tab:
        return self.np.flatnonzero(self.np.asarray(t) == value)

    def count_equal(self, t: Tab, value: int) -> int:
        return int(self.np.count_nonzero(t == self.np.uint64(value)))

    def equal(self, a: Tab, b: Tab) -> bool:
        return bool(self.np.array_equal(a, b))

    def unique_counts(self, t: Tab) -> tuple[list[int], list[int]]:
        keys, counts = self.np.unique(t, return_counts=True)
        return keys.tolist(), counts.tolist()

    def deltas(self) -> Deltas:
        return _NumpyDeltas()


def np_any_gt(seg: Tab, limit: int) -> bool:
    """Whether an entry of the ``uint64`` array ``seg`` exceeds ``limit`` (a Python int ≥ 0)."""
    import numpy as np

    return bool((seg > np.uint64(limit)).any())


SMALL: Backend = _Small()
NUMPY: Backend = _Numpy()
