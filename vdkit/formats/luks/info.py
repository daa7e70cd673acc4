"""luks's ``Format specific information`` (QAPI ``QCryptoBlockInfoLUKS``).

qemu-img 7.2 emits the members in the order its QDict round trip leaves
them (observed: ivgen-alg, hash-alg, cipher-alg, uuid, ivgen-hash-alg,
cipher-mode, slots, payload-offset, master-key-iters; in a slot: active,
iters, key-offset, stripes), not in schema order, so the records say so.
"""

from __future__ import annotations

from vdkit.record import record


@record
class LuksFormatSlot:
    active: bool
    key_offset: int
    iters: int | None = None
    stripes: int | None = None

    __qapi_order__ = ("active", "iters", "key_offset", "stripes")


@record
class ImageInfoSpecificLuks:
    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    hash_alg: str
    payload_offset: int
    master_key_iters: int
    uuid: str
    slots: list[LuksFormatSlot]
    ivgen_hash_alg: str | None = None

    __qapi_order__ = ("ivgen_alg", "hash_alg", "cipher_alg", "uuid", "ivgen_hash_alg", "cipher_mode", "slots",
                      "payload_offset", "master_key_iters")
