"""Typed QAPI shapes for image and snapshot info (QEMU 7.2 schema).

Field names are the QAPI member names with ``-`` written as ``_``; fields are
declared in the schema's order because QEMU's JSON key order depends on the
order members are inserted (see ``render_json``).  Optional members are
``None`` when absent.  These classes hold no behaviour: the collector fills
them, the renderers print them, and the CLI, QMP and HMP share all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SnapshotInfo:
    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_sec: int
    vm_clock_nsec: int
    icount: int | None = None


@dataclass
class Qcow2BitmapInfo:
    name: str
    granularity: int
    flags: list[str] = field(default_factory=list)


@dataclass
class LuksSlotInfo:
    active: bool
    key_offset: int
    iters: int | None = None
    stripes: int | None = None

    # schema order: active, iters, stripes, key-offset
    __qapi_order__ = ("active", "iters", "stripes", "key_offset")


@dataclass
class LuksInfo:
    """``ImageInfoSpecificQCow2Encryption`` with format ``luks`` (flat union)."""

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    hash_alg: str
    payload_offset: int
    master_key_iters: int
    uuid: str
    slots: list[LuksSlotInfo]
    ivgen_hash_alg: str | None = None
    format: str = "luks"

    __qapi_order__ = (
        "format", "cipher_alg", "cipher_mode", "ivgen_alg", "ivgen_hash_alg", "hash_alg",
        "payload_offset", "master_key_iters", "uuid", "slots",
    )


@dataclass
class AesEncryptionInfo:
    format: str = "aes"


@dataclass
class ImageInfoSpecificQcow2:
    compat: str
    refcount_bits: int
    compression_type: str
    data_file: str | None = None
    data_file_raw: bool | None = None
    extended_l2: bool | None = None
    lazy_refcounts: bool | None = None
    corrupt: bool | None = None
    encrypt: LuksInfo | AesEncryptionInfo | None = None
    bitmaps: list[Qcow2BitmapInfo] | None = None

    __qapi_order__ = (
        "compat", "data_file", "data_file_raw", "extended_l2", "lazy_refcounts", "corrupt",
        "refcount_bits", "encrypt", "bitmaps", "compression_type",
    )


@dataclass
class ImageInfoSpecific:
    """The ``ImageInfoSpecific`` union: ``{"type": ..., "data": ...}``."""

    type: str
    data: ImageInfoSpecificQcow2


@dataclass
class ImageInfo:
    filename: str
    format: str
    virtual_size: int
    dirty_flag: bool | None = None
    actual_size: int | None = None
    cluster_size: int | None = None
    encrypted: bool | None = None
    compressed: bool | None = None
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_filename_format: str | None = None
    snapshots: list[SnapshotInfo] | None = None
    backing_image: ImageInfo | None = None
    format_specific: ImageInfoSpecific | None = None

    __qapi_order__ = (
        "filename", "format", "dirty_flag", "actual_size", "virtual_size", "cluster_size",
        "encrypted", "compressed", "backing_filename", "full_backing_filename",
        "backing_filename_format", "snapshots", "backing_image", "format_specific",
    )
