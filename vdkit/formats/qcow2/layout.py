"""On-disk layout of qcow2 (versions 2 and 3): structs, masks and limits, and the header.

The header and its extensions are parsed, validated and serialised here too (the second half of this
module): every qcow2 operation reads both, and a module of its own was a share of every start.
Validation follows the order QEMU 7.2 applies when opening an image, so that the first problem
reported for a broken image is the one qemu-img reports, with the same text.  Everything the header
points at is checked against the limits before anything is allocated for it.

No I/O and no ``enum`` here (its import costs half an interpreter start, and
every ``info`` of a qcow2 image reads this module): the small code sets are
int constants in plain classes, and the ``struct.Struct`` layouts are made on
first use (``__getattr__``): ``info`` decodes cluster 0 with ``int.from_bytes``
(:func:`parse_header`) and never imports ``struct`` and its C module.
Field names follow the qcow2 specification (docs/interop/qcow2.txt in QEMU);
limits are those QEMU 7.2 enforces, so an image QEMU refuses is refused here
with the same words.
"""

from __future__ import annotations

from vdkit.errors import CorruptImageError, OpenError, UnsupportedError, VdkitError
from vdkit.record import field, record, replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    import struct

    from vdkit.formats.qcow2.cluster_type import ClusterType as ClusterType

# (The generic snapshot descriptor's limits and "no icount" marker are vdkit.block.snapshot's: that
# module loads only for an image with snapshots.)

MAGIC = b"QFI\xfb"

# The binary layouts, as ``struct`` formats; the module attribute of each name is its ``struct.Struct``,
# made on first use (``__getattr__`` below).
_STRUCTS = {
    # Header: the 72-byte v2 part, the 32 mandatory v3 bytes (the optional compression-type byte plus
    # the padding that QEMU 7.2 always writes follow)
    "HEADER_V2": ">4sIQIIQIIQQIIQ",
    "HEADER_V3_EXTRA": ">QQQII",
    "EXT_HEADER": ">II",  # header extension: type, length
    "FEATURE_ENTRY": ">BB46s",
    "BITMAPS_EXT": ">IIQQ",
    "CRYPTO_EXT": ">QQ",
    "BITMAP_DIR_ENTRY": ">QIIBBHI",
    # snapshot table entry: fixed part (40 bytes) and known extra data (24 bytes)
    "SNAPSHOT_HEADER": ">QIHHIIQII",
    "SNAPSHOT_EXTRA": ">QQQ",
}
if TYPE_CHECKING:
    HEADER_V2: struct.Struct
    HEADER_V3_EXTRA: struct.Struct
    EXT_HEADER: struct.Struct
    FEATURE_ENTRY: struct.Struct
    BITMAPS_EXT: struct.Struct
    CRYPTO_EXT: struct.Struct
    BITMAP_DIR_ENTRY: struct.Struct
    SNAPSHOT_HEADER: struct.Struct
    SNAPSHOT_EXTRA: struct.Struct
V2_HEADER_SIZE = 72
V3_MIN_HEADER_SIZE = 104
V3_HEADER_SIZE = 112  # what QEMU 7.2 writes: 104 + compression type + padding
EXT_HEADER_SIZE = 8
FEATURE_ENTRY_SIZE = 48
BITMAPS_EXT_SIZE = 24
CRYPTO_EXT_SIZE = 16

# Header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441


class FeatureType:
    INCOMPATIBLE = 0
    COMPATIBLE = 1
    AUTOCLEAR = 2


# Incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F

COMPAT_LAZY_REFCOUNTS = 1 << 0

AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = 0x3

# The feature name table QEMU 7.2 writes, in its order.
FEATURE_TABLE = (
    (FeatureType.INCOMPATIBLE, 0, "dirty bit"),
    (FeatureType.INCOMPATIBLE, 1, "corrupt bit"),
    (FeatureType.INCOMPATIBLE, 2, "external data file"),
    (FeatureType.INCOMPATIBLE, 3, "compression type"),
    (FeatureType.INCOMPATIBLE, 4, "extended L2 entries"),
    (FeatureType.COMPATIBLE, 0, "lazy refcounts"),
    (FeatureType.AUTOCLEAR, 0, "bitmaps"),
    (FeatureType.AUTOCLEAR, 1, "raw external data"),
)


class CompressionType:
    ZLIB = 0
    ZSTD = 1


COMPRESSION_NAMES = {CompressionType.ZLIB: "zlib", CompressionType.ZSTD: "zstd"}  # QAPI Qcow2CompressionType


CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# L1 / L2 entry masks
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF

# Limits (QEMU 7.2)
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_FILE_NAME = 1023
MAX_BACKING_FORMAT_NAME = 16  # QEMU keeps it in a 16-byte buffer
MAX_REFTABLE_SIZE = 8 * 1024 * 1024
MAX_L1_SIZE = 32 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_SIZE = 64 * 1024 * 1024
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_HOST_OFFSET = (1 << 56) - 1

SNAPSHOT_EXTRA_SIZE = 24  # SNAPSHOT_EXTRA's


def __getattr__(name: str) -> object:
    """The ``struct.Struct`` layouts and ``ClusterType``, made or imported on first use (``info`` of an
    image without snapshots or bitmaps needs none of them)."""
    if name in _STRUCTS:
        return layout(name)
    if name == "ClusterType":
        from vdkit.formats.qcow2.cluster_type import ClusterType

        return ClusterType
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def layout(name: str) -> struct.Struct:
    """The ``struct.Struct`` of one of the binary layouts (``_STRUCTS``), made on first use and then
    kept as the module attribute of that name (where later reads find it)."""
    made: struct.Struct | None = globals().get(name)
    if made is None:
        import struct

        made = globals()[name] = struct.Struct(_STRUCTS[name])
    return made


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# -- the header: parse, validate, serialise -----------------------------------------------------------

@record(frozen=True)
class FeatureName:
    type: int
    bit: int
    name: str


@record(frozen=True)
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@record(frozen=True)
class CryptoExtension:
    offset: int
    length: int


@record(frozen=True)
class UnknownExtension:
    type: int
    data: bytes


@record(frozen=True)
class Qcow2Header:
    """Everything cluster 0 says, decoded.  v2 images get v3's implicit defaults."""

    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_SIZE
    compression_type: int = CompressionType.ZLIB
    unknown_header_fields: bytes = b""
    # extensions
    backing_format: str | None = None
    data_file: str | None = None
    crypto: CryptoExtension | None = None
    feature_table: tuple[FeatureName, ...] = ()
    bitmaps: BitmapsExtension | None = None
    unknown_extensions: tuple[UnknownExtension, ...] = ()
    backing_file: str | None = None
    # A bitmaps extension whose autoclear bit is clear: a program without
    # bitmap support touched the image, so QEMU warns and ignores the bitmaps.
    bitmaps_inconsistent: bool = False
    # raw bytes of the backing name, kept for the rare non-UTF-8 name
    backing_file_raw: bytes | None = field(default=None, repr=False)

    # -- derived geometry -----------------------------------------------------
    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    def l1_entries_needed(self, size: int | None = None) -> int:
        """L1 entries that describe the virtual disk (``size_to_l1``).

        The rest of the L1/L2 arithmetic lives in ``cluster.Geometry``; this one
        sum is here because open-time validation needs it before numpy is loaded.
        """
        span = self.cluster_size * (self.cluster_size // (16 if self.extended_l2 else 8))
        return ((self.size if size is None else size) + span - 1) // span

    def evolve(self, **changes: object) -> Qcow2Header:
        return replace(self, **changes)


def _unsupported_features(mask: int, table: tuple[FeatureName, ...]) -> str:
    names = []
    for feat in table:
        if feat.type == FeatureType.INCOMPATIBLE and mask & (1 << feat.bit):
            names.append(feat.name)
            mask &= ~(1 << feat.bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(names)


def _be(buf: bytes, start: int, end: int) -> int:
    """The big-endian unsigned number in ``buf[start:end]``."""
    return int.from_bytes(buf[start:end], "big")


def _validate_table(offset: int, entries: int, entry_len: int, max_bytes: int, name: str, cluster_size: int) -> None:
    if entries > max_bytes // entry_len:
        raise OpenError(f"{name} too large")
    if (2**63 - 1) - entries * entry_len < offset or offset % cluster_size:
        raise OpenError(f"{name} offset invalid")


def parse_header(cluster0: bytes, *, readonly: bool = True, check_mode: bool = False) -> Qcow2Header:
    """Decode cluster 0 (or at least its first 2 MiB available bytes).

    ``cluster0`` must hold the whole first cluster (zero padded if the file
    is shorter); the caller reads ``max(header, cluster)`` bytes.
    """
    if len(cluster0) < V2_HEADER_SIZE or cluster0[:4] != MAGIC:
        raise OpenError("Image is not in qcow2 format")
    # Big-endian fields of the v2 part (HEADER_V2), decoded without struct (start-up cost).
    version = _be(cluster0, 4, 8)
    backing_file_offset = _be(cluster0, 8, 16)
    backing_file_size = _be(cluster0, 16, 20)
    cluster_bits = _be(cluster0, 20, 24)
    size = _be(cluster0, 24, 32)
    crypt_method = _be(cluster0, 32, 36)
    l1_size = _be(cluster0, 36, 40)
    l1_table_offset = _be(cluster0, 40, 48)
    refcount_table_offset = _be(cluster0, 48, 56)
    refcount_table_clusters = _be(cluster0, 56, 60)
    nb_snapshots = _be(cluster0, 60, 64)
    snapshots_offset = _be(cluster0, 64, 72)
    if version not in (2, 3):
        raise UnsupportedError(f"Unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise UnsupportedError(f"Unsupported cluster size: 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits
    hdr: dict[str, object] = {}
    if version == 3:  # HEADER_V3_EXTRA (cluster 0 holds at least 512 bytes)
        incompat, compat, autoclear = _be(cluster0, 72, 80), _be(cluster0, 80, 88), _be(cluster0, 88, 96)
        refcount_order, header_length = _be(cluster0, 96, 100), _be(cluster0, 100, 104)
        if header_length < V3_MIN_HEADER_SIZE:
            raise OpenError("qcow2 header too short")
        if header_length > cluster_size:
            raise OpenError("qcow2 header exceeds cluster size")
        hdr.update(
            incompatible_features=incompat,
            compatible_features=compat,
            autoclear_features=autoclear,
            refcount_order=refcount_order,
            header_length=header_length,
        )
        if header_length > V3_HEADER_SIZE:
            hdr["unknown_header_fields"] = bytes(cluster0[V3_HEADER_SIZE:header_length])
    else:
        incompat = 0
        header_length = V2_HEADER_SIZE
    if backing_file_offset > cluster_size:
        raise OpenError("Invalid backing file offset")

    compression_type: int = CompressionType.ZLIB
    if header_length > V3_MIN_HEADER_SIZE:
        compression_type = cluster0[V3_MIN_HEADER_SIZE]
        if compression_type not in (CompressionType.ZLIB, CompressionType.ZSTD):
            raise OpenError(f"qcow2: unknown compression type: {compression_type}")
        if compression_type != CompressionType.ZLIB and not incompat & INCOMPAT_COMPRESSION:
            raise OpenError("qcow2: Compression type incompatible feature bit must be set")
    if compression_type == CompressionType.ZLIB and incompat & INCOMPAT_COMPRESSION:
        raise OpenError("qcow2: Compression type incompatible feature bit must not be set")

    ext_end = backing_file_offset if backing_file_offset else cluster_size
    autoclear = int(hdr.get("autoclear_features", 0))  # type: ignore[call-overload]

    if incompat & ~INCOMPAT_MASK:
        # Only the feature names are wanted here; a broken extension area
        # just means there are none to report.
        try:
            table = parse_extensions(cluster0, header_length, ext_end, cluster_size).get("feature_table", ())
        except VdkitError:
            table = ()
        raise UnsupportedError(
            "Unsupported qcow2 feature(s): "
            + _unsupported_features(incompat & ~INCOMPAT_MASK, table)  # type: ignore[arg-type]
        )
    if incompat & INCOMPAT_CORRUPT and not readonly and not check_mode:
        raise CorruptImageError("qcow2: Image is corrupt; cannot be opened read/write")
    refcount_order = int(hdr.get("refcount_order", 4))  # type: ignore[call-overload]
    if refcount_order > MAX_REFCOUNT_ORDER:
        raise OpenError("Reference count entry width too large; may not exceed 64 bits")
    extl2 = bool(incompat & INCOMPAT_EXTL2)
    if extl2 and cluster_size // 32 < 512:
        raise OpenError(f"Unsupported subcluster size: {cluster_size // 32}")
    if refcount_table_clusters == 0 and not check_mode:
        raise OpenError("Image does not contain a reference count table")
    _validate_table(
        refcount_table_offset, refcount_table_clusters, cluster_size, MAX_REFTABLE_SIZE,
        "Reference count table", cluster_size,
    )
    if not check_mode:
        # The offset is checked even when there are no snapshots.
        _validate_table(snapshots_offset, nb_snapshots, 40, 40 * MAX_SNAPSHOTS, "Snapshot table", cluster_size)
    if l1_size > MAX_L1_SIZE // 8:
        raise OpenError("Active L1 table too large")
    _validate_table(l1_table_offset, l1_size, 8, MAX_L1_SIZE, "Active L1 table", cluster_size)
    span = cluster_size * (cluster_size // (16 if extl2 else 8))
    needed = (size + span - 1) // span
    if needed > 2**31 - 1:
        raise OpenError("Image is too big")
    if l1_size < needed:
        raise OpenError("L1 table is too small")
    if crypt_method > CRYPT_LUKS:
        # QEMU prints the field as a signed 32-bit number.
        signed = crypt_method - (1 << 32) if crypt_method >= 1 << 31 else crypt_method
        raise OpenError(f"Unsupported encryption method {signed}")

    ext = parse_extensions(cluster0, header_length, ext_end, cluster_size,
                           bitmaps_trusted=bool(autoclear & AUTOCLEAR_BITMAPS), crypt_method=crypt_method)
    if crypt_method == CRYPT_LUKS and "crypto" not in ext:
        raise OpenError(f"Missing CRYPTO header for crypt method {crypt_method}")
    header = Qcow2Header(
        version=version,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        compression_type=compression_type,
        **hdr,  # type: ignore[arg-type]
        **ext,  # type: ignore[arg-type]
    )

    if backing_file_offset:
        if backing_file_size > MAX_BACKING_FILE_NAME or backing_file_size > cluster_size - backing_file_offset:
            raise OpenError("Backing file name too long")
        # A C string to QEMU: bytes past EOF read as zeros and end it.
        raw = bytes(cluster0[backing_file_offset : backing_file_offset + backing_file_size]).split(b"\0", 1)[0]
        if not raw:
            return header  # an empty name means no backing file
        header = replace(
            header, backing_file=raw.decode("utf-8", "surrogateescape"), backing_file_raw=raw
        )
    return header


def parse_extensions(buf: bytes, start: int, end: int, cluster_size: int, *,
                     bitmaps_trusted: bool = True, crypt_method: int = CRYPT_LUKS) -> dict[str, object]:
    """Walk the extension area ``[start, end)`` of cluster 0.

    ``bitmaps_trusted`` is the autoclear bitmaps bit: without it a bitmaps
    extension is only length-checked, then flagged (``bitmaps_inconsistent``)
    instead of validated, because QEMU ignores its content.
    """
    out: dict[str, object] = {}
    features: list[FeatureName] = []
    unknown: list[UnknownExtension] = []
    off = start
    end = min(end, len(buf))
    while off < end:
        # Any bytes left start another extension; a header that does not fit is "too large".
        if off + EXT_HEADER_SIZE > end:
            raise OpenError("Header extension too large")
        ext_type, ext_len = _be(buf, off, off + 4), _be(buf, off + 4, off + 8)  # EXT_HEADER
        off += EXT_HEADER_SIZE
        if ext_len > end - off:
            raise OpenError("Header extension too large")
        data = bytes(buf[off : off + ext_len])
        if ext_type == EXT_END:
            break
        if ext_type == EXT_BACKING_FORMAT:
            if ext_len >= MAX_BACKING_FORMAT_NAME:
                raise OpenError(f"ERROR: ext_backing_format: len={ext_len} too large (>={MAX_BACKING_FORMAT_NAME})")
            # A C string to QEMU: it ends at the first NUL; empty means "not stored".
            fmt_name = data.split(b"\0", 1)[0]
            out["backing_format"] = fmt_name.decode("utf-8", "replace") if fmt_name else None
        elif ext_type == EXT_FEATURE_TABLE:
            for at in range(0, ext_len // FEATURE_ENTRY_SIZE * FEATURE_ENTRY_SIZE, FEATURE_ENTRY_SIZE):
                name = data[at + 2 : at + FEATURE_ENTRY_SIZE]  # FEATURE_ENTRY: type, bit, 46-byte name
                features.append(FeatureName(data[at], data[at + 1], name.split(b"\0", 1)[0].decode("utf-8", "replace")))
        elif ext_type == EXT_BITMAPS:
            if ext_len != BITMAPS_EXT_SIZE:
                raise OpenError("bitmaps_ext: Invalid extension length")
            nb, reserved, dsize, doff = _be(data, 0, 4), _be(data, 4, 8), _be(data, 8, 16), _be(data, 16, 24)
            if not bitmaps_trusted:
                out["bitmaps_inconsistent"] = True
                out["bitmaps"] = BitmapsExtension(nb, dsize, doff)
                off += (ext_len + 7) & ~7
                continue
            if reserved:
                raise OpenError("bitmaps_ext: Reserved field is not zero")
            if nb == 0 or nb > MAX_BITMAPS:
                raise OpenError(
                    f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of "
                    f"{MAX_BITMAPS}" if nb else "found bitmaps extension with zero bitmaps"
                )
            if dsize > MAX_BITMAP_DIRECTORY_SIZE:
                raise OpenError(
                    f"bitmaps_ext: bitmap directory size ({dsize}) exceeds the maximum supported size "
                    f"({MAX_BITMAP_DIRECTORY_SIZE})"
                )
            if doff % cluster_size:
                raise OpenError("bitmaps_ext: invalid bitmap directory offset")
            out["bitmaps"] = BitmapsExtension(nb, dsize, doff)
        elif ext_type == EXT_CRYPTO_HEADER:
            if crypt_method != CRYPT_LUKS:
                raise OpenError("CRYPTO header extension only expected with LUKS encryption method")
            if ext_len != CRYPTO_EXT_SIZE:
                raise OpenError(f"CRYPTO header extension size {ext_len}, but expected size {CRYPTO_EXT_SIZE}")
            out["crypto"] = CryptoExtension(_be(data, 0, 8), _be(data, 8, 16))
        elif ext_type == EXT_DATA_FILE:
            out["data_file"] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")  # a C string
        else:
            unknown.append(UnknownExtension(ext_type, data))
        off += (ext_len + 7) & ~7
    out["feature_table"] = tuple(features)
    out["unknown_extensions"] = tuple(unknown)
    return out


# -- serialisation ------------------------------------------------------------------------------

def _ext(ext_type: int, data: bytes) -> bytes:
    pad = (-len(data)) % 8
    return layout("EXT_HEADER").pack(ext_type, len(data)) + data + bytes(pad)


def feature_table_bytes() -> bytes:
    entry = layout("FEATURE_ENTRY")
    return b"".join(entry.pack(t, bit, name.encode()) for t, bit, name in FEATURE_TABLE)


def serialize_header(h: Qcow2Header) -> bytes:
    """Header, extensions and backing name exactly as QEMU 7.2 lays them out.

    Returns the bytes of cluster 0 up to the end of the backing file name; the
    backing file offset and size fields are computed here.
    """
    import struct  # (only writers serialise: info never imports it)
    if h.version == 2:
        header_length = V2_HEADER_SIZE
    else:
        header_length = max(V3_HEADER_SIZE, h.header_length)
    exts = b""
    if h.backing_format is not None:
        exts += _ext(EXT_BACKING_FORMAT, h.backing_format.encode())
    if h.data_file is not None:
        exts += _ext(EXT_DATA_FILE, h.data_file.encode("utf-8", "surrogateescape"))
    if h.crypto is not None:
        exts += _ext(EXT_CRYPTO_HEADER, layout("CRYPTO_EXT").pack(h.crypto.offset, h.crypto.length))
    if h.version == 3 and h.cluster_size > 4096:
        exts += _ext(EXT_FEATURE_TABLE, feature_table_bytes())
    if h.bitmaps is not None:
        exts += _ext(EXT_BITMAPS, layout("BITMAPS_EXT").pack(h.bitmaps.nb_bitmaps, 0, h.bitmaps.directory_size,
                                                      h.bitmaps.directory_offset))
    for u in h.unknown_extensions:
        exts += _ext(u.type, u.data)
    exts += bytes(8)
    backing = b""
    if h.backing_file is not None:
        raw = h.backing_file_raw
        backing = h.backing_file.encode("utf-8", "surrogateescape") if raw is None else raw
    backing_offset = header_length + len(exts) if backing else 0
    fixed = layout("HEADER_V2").pack(
        MAGIC, h.version, backing_offset, len(backing), h.cluster_bits, h.size, h.crypt_method,
        h.l1_size, h.l1_table_offset, h.refcount_table_offset, h.refcount_table_clusters,
        h.nb_snapshots, h.snapshots_offset,
    )
    if h.version == 3:
        fixed += layout("HEADER_V3_EXTRA").pack(
            h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
            header_length,
        )
        fixed += struct.pack(">B7x", h.compression_type)
        fixed += h.unknown_header_fields
    out = fixed + exts + backing
    if len(out) > h.cluster_size:
        raise UnsupportedError("Header extensions do not fit in the first cluster")
    return out
