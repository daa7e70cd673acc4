"""QAPI info shapes that ``info`` of a plain image never builds (re-exported by :mod:`vdkit.info.model`).

qcow2's persistent bitmaps and encryption (``ImageInfoSpecificQCow2Encryption``: LUKS or the legacy
AES cipher) and ``qemu-img check``'s result.  They live apart from the shapes every ``info`` builds
because each record class costs its share of every ``vdkit-img`` start; ``check`` imports only this
module.  Field order and naming follow :mod:`vdkit.info.model`'s rules.
"""

from __future__ import annotations

from vdkit.record import field, record


@record
class Qcow2BitmapInfo:
    name: str
    granularity: int
    flags: list[str] = field(default_factory=list)


@record
class LuksSlotInfo:
    active: bool
    key_offset: int
    iters: int | None = None
    stripes: int | None = None

    # schema order: active, iters, stripes, key-offset
    __qapi_order__ = ("active", "iters", "stripes", "key_offset")


@record
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


@record
class AesEncryptionInfo:
    format: str = "aes"



@record
class ImageCheck:
    """``qemu-img check`` result (QAPI ``ImageCheck``); counters are present only when non-zero."""

    filename: str
    format: str
    check_errors: int
    image_end_offset: int | None = None
    corruptions: int | None = None
    leaks: int | None = None
    corruptions_fixed: int | None = None
    leaks_fixed: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
