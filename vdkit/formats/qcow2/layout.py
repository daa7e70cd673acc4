"""On-disk layout of qcow2 (versions 2 and 3): structs, masks and limits.

No I/O and no ``enum`` here (its import costs half an interpreter start, and
every ``info`` of a qcow2 image reads this module): the small code sets are
int constants in plain classes, and the ``struct.Struct`` layouts are made on
first use (``__getattr__``): ``info`` decodes cluster 0 with ``int.from_bytes``
(:func:`.header.parse_header`) and never imports ``struct`` and its C module.
Field names follow the qcow2 specification (docs/interop/qcow2.txt in QEMU);
limits are those QEMU 7.2 enforces, so an image QEMU refuses is refused here
with the same words.
"""

from __future__ import annotations

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
    fmt = _STRUCTS.get(name)
    if fmt is not None:
        import struct

        layout = globals()[name] = struct.Struct(fmt)  # later reads find the module attribute
        return layout
    if name == "ClusterType":
        from vdkit.formats.qcow2.cluster_type import ClusterType

        return ClusterType
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
