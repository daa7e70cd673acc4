"""zstd for qcow2 compressed clusters (``compression_type=zstd``), from whichever library is there.

qemu-img 7.2 always reads zstd clusters, so vdkit must too: ``zstandard`` is a required dependency, and
where it is missing the standard library's ``compression.zstd`` (Python 3.14+; same API as the
``backports.zstd`` package) does the same work.  Both wrap libzstd; level 3 in one frame with the content
size, as QEMU writes it, gives the same bytes from either.

Imported only when a zstd cluster is read or written, so the ``info`` path never loads a codec.
"""

from __future__ import annotations

from vdkit.errors import EIO, UnsupportedError, VdkitError

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from types import ModuleType

MISSING = ("zstd compressed clusters need the 'zstandard' Python package (pip install zstandard) "
           "or Python 3.14's compression.zstd")


def _stdlib() -> ModuleType | None:
    try:
        from compression import zstd  # type: ignore[import-not-found, unused-ignore]  # Python >= 3.14
    except ImportError:
        return None
    return zstd  # type: ignore[no-any-return, unused-ignore]


def decompress(raw: bytes, cluster_size: int) -> bytes:
    """Up to ``cluster_size`` bytes from the frames at the start of ``raw``.

    A cluster may span several frames; decoding stops once the cluster is full, so the rest of the last
    sector (the next cluster's bytes, or garbage) is never parsed.  Corrupt input is EIO, as in QEMU.
    """
    try:
        import zstandard
    except ImportError:
        zstd = _stdlib()
        if zstd is None:
            raise UnsupportedError(MISSING) from None
        return decompress_stdlib(zstd, raw, cluster_size)
    import io

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True)
        out = reader.read(cluster_size)
        while len(out) < cluster_size:
            more = reader.read(cluster_size - len(out))
            if not more:
                break
            out += more
    except zstandard.ZstdError as exc:
        raise VdkitError(f"Could not decompress cluster: {exc}", errno=EIO) from None
    return out


def decompress_stdlib(zstd: ModuleType, raw: bytes, cluster_size: int) -> bytes:
    """:func:`decompress` with the ``compression.zstd`` API (module passed in so tests can use the backport)."""
    out = b""
    try:
        while raw and len(out) < cluster_size:
            d = zstd.ZstdDecompressor()
            out += d.decompress(raw, cluster_size - len(out))
            if not d.eof:
                break  # cluster full, or the input ends inside this frame (truncated: the caller says so)
            raw = d.unused_data
    except zstd.ZstdError as exc:
        raise VdkitError(f"Could not decompress cluster: {exc}", errno=EIO) from None
    return out


def compress(data: bytes) -> bytes:
    """One zstd frame at level 3 (QEMU's default), content size in the header."""
    try:
        import zstandard
    except ImportError:
        zstd = _stdlib()
        if zstd is None:
            raise UnsupportedError(MISSING) from None
        return zstd.compress(data, level=3)  # type: ignore[no-any-return]
    return zstandard.ZstdCompressor(level=3).compress(data)
