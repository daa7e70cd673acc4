"""LUKS version 1 headers, parsed as far as image info reports them.

An encrypted qcow2 image carries a LUKS1 header in a cluster-aligned area the
header extension points at.  Info only needs the public parts (cipher, hash,
key-slot layout, UUID); no key material is ever decrypted here.  The header
is untrusted: every field is range-checked before use, and the caller reads
at most :data:`LUKS_MAX_HEADER` bytes.

Reference: the LUKS1 on-disk format specification (cryptsetup project).
"""

from __future__ import annotations

import struct

from vdkit.errors import CorruptImageError
from vdkit.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.info.extra_model import LuksInfo

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_MAX_HEADER = 16 * 1024 * 1024
SECTOR = 512
NUM_KEY_SLOTS = 8
KEY_SLOT_ACTIVE = 0x00AC71F3
KEY_SLOT_DISABLED = 0x0000DEAD

# magic, version, cipher name, cipher mode, hash spec, payload offset, key bytes,
# mk digest, mk digest salt, mk digest iterations, uuid
_PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")

# Cipher names LUKS stores -> QEMU's algorithm names by key length in bytes.
_CIPHERS: dict[str, dict[int, str]] = {
    "aes": {16: "aes-128", 24: "aes-192", 32: "aes-256"},
    "serpent": {16: "serpent-128", 24: "serpent-192", 32: "serpent-256"},
    "twofish": {16: "twofish-128", 24: "twofish-192", 32: "twofish-256"},
    "cast5": {16: "cast5-128"},
    "sm4": {16: "sm4"},
    "des3_ede": {24: "3des"},
}
_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")


@record(frozen=True)
class LuksKeySlot:
    active: bool
    iterations: int
    key_offset: int  # bytes
    stripes: int


@record(frozen=True)
class LuksHeader:
    """The public part of a LUKS1 header, names already mapped to QEMU's."""

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    ivgen_hash_alg: str | None
    hash_alg: str
    payload_offset: int  # bytes
    master_key_iterations: int
    uuid: str
    slots: tuple[LuksKeySlot, ...]


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


_MODES = ("ecb", "cbc", "xts", "ctr")
_IVGENS = ("plain", "plain64", "essiv")


def _hash(name: str) -> str:
    if name not in _HASHES:
        raise CorruptImageError(f"Hash algorithm '{name}' not supported")
    return name


HEADER_SECTORS = 4096 // SECTOR  # the 592-byte header, 4 KiB-aligned as QEMU lays it out
STRIPES = 4000


def _check_layout(raw: bytes, payload_offset: int, key_bytes: int, mk_iters: int) -> None:
    """QEMU 7.2's header sanity checks, which come before the cipher names are looked at (observed order:
    payload vs header, master key iterations, then per key slot: stripes, state, iterations of an active
    slot, overlap with the header, with the payload, with each later slot)."""
    if payload_offset < HEADER_SECTORS:
        raise CorruptImageError("LUKS payload is overlapping with the header")
    if mk_iters == 0:
        raise CorruptImageError("LUKS key iteration count is zero")
    # key material of a slot: key bytes x stripes, in 4 KiB units, in sectors (QEMU's 32-bit arithmetic)
    material = (((key_bytes * STRIPES) & 0xFFFFFFFF) + 4095 & ~4095 & 0xFFFFFFFF) // SECTOR
    slots = [_SLOT.unpack_from(raw, _PHDR.size + i * _SLOT.size) for i in range(NUM_KEY_SLOTS)]
    for i, (active, iters, _salt, key_offset, stripes) in enumerate(slots):
        if stripes != STRIPES:
            raise CorruptImageError(f"Keyslot {i} is corrupted (stripes {stripes} != {STRIPES})")
        if active not in (KEY_SLOT_ACTIVE, KEY_SLOT_DISABLED):
            raise CorruptImageError(f"Keyslot {i} state (active/disable) is corrupted")
        if active == KEY_SLOT_ACTIVE and iters == 0:
            raise CorruptImageError(f"Keyslot {i} iteration count is zero")
        if key_offset < HEADER_SECTORS:
            raise CorruptImageError(f"Keyslot {i} is overlapping with the LUKS header")
        if key_offset + material > payload_offset:
            raise CorruptImageError(f"Keyslot {i} is overlapping with the encrypted payload")
        for j in range(i + 1, NUM_KEY_SLOTS):
            other = slots[j][3]
            if key_offset < other + material and other < key_offset + material:
                raise CorruptImageError(f"Keyslots {i} and {j} are overlapping in the header")


def parse_luks_header(raw: bytes) -> LuksHeader:
    """Decode the LUKS1 header at the start of ``raw``.

    Fields are checked in the order qemu-img checks them, with its words, so
    a damaged header is reported the same way by both tools.
    """
    if len(raw) < _PHDR.size + NUM_KEY_SLOTS * _SLOT.size:
        raise CorruptImageError("Volume is not in LUKS format")
    (magic, version, cipher_name, cipher_mode, hash_spec, payload_offset, key_bytes, _digest, _salt,
     mk_iters, uuid) = _PHDR.unpack_from(raw)
    if magic != LUKS_MAGIC:
        raise CorruptImageError("Volume is not in LUKS format")
    if version != 1:
        raise CorruptImageError(f"LUKS version {version} is not supported")
    _check_layout(raw, payload_offset, key_bytes, mk_iters)
    name = _cstr(cipher_name)
    mode_spec = _cstr(cipher_mode)
    mode, dash, ivgen_spec = mode_spec.partition("-")
    if not dash:
        raise CorruptImageError(f"Unexpected cipher mode string format '{mode_spec}'")
    if mode not in _MODES:
        raise CorruptImageError(f"Cipher mode '{mode}' not supported")
    ivgen, colon, ivgen_hash = ivgen_spec.partition(":")
    if ivgen not in _IVGENS:
        raise CorruptImageError(f"IV generator '{ivgen}' not supported")
    ivgen_hash_alg = _hash(ivgen_hash) if colon else None
    # XTS uses two keys of half the stored length each.
    alg_key_bytes = key_bytes // 2 if mode == "xts" else key_bytes
    alg = _CIPHERS.get(name, {}).get(alg_key_bytes)
    if alg is None:
        raise CorruptImageError(f"Algorithm '{name}' with key size {alg_key_bytes} bytes not supported")
    hash_alg = _hash(_cstr(hash_spec))
    slots = []
    for i in range(NUM_KEY_SLOTS):
        active, iters, _slot_salt, key_offset, stripes = _SLOT.unpack_from(raw, _PHDR.size + i * _SLOT.size)
        slots.append(LuksKeySlot(active == KEY_SLOT_ACTIVE, iters, key_offset * SECTOR, stripes))
    return LuksHeader(
        cipher_alg=alg,
        cipher_mode=mode,
        ivgen_alg=ivgen,
        ivgen_hash_alg=ivgen_hash_alg,
        hash_alg=hash_alg,
        payload_offset=payload_offset * SECTOR,
        master_key_iterations=mk_iters,
        uuid=_cstr(uuid),
        slots=tuple(slots),
    )


def luks_info(raw: bytes) -> LuksInfo:
    """LUKS header -> the QAPI encryption info (iterations and stripes only for active slots)."""
    from vdkit.info.extra_model import LuksInfo, LuksSlotInfo

    hdr = parse_luks_header(raw)
    return LuksInfo(
        cipher_alg=hdr.cipher_alg,
        cipher_mode=hdr.cipher_mode,
        ivgen_alg=hdr.ivgen_alg,
        ivgen_hash_alg=hdr.ivgen_hash_alg,
        hash_alg=hdr.hash_alg,
        payload_offset=hdr.payload_offset,
        master_key_iters=hdr.master_key_iterations,
        uuid=hdr.uuid,
        slots=[
            LuksSlotInfo(
                active=s.active,
                key_offset=s.key_offset,
                iters=s.iterations if s.active else None,
                stripes=s.stripes if s.active else None,
            )
            for s in hdr.slots
        ],
    )
