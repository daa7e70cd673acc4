"""``qemu-img create -f luks``: a LUKS1 header with one key slot, as QEMU 7.2 lays it out.

Layout (observed): the 592-byte header in a 4 KiB area; eight key-material
areas of key bytes x 4000 stripes rounded up to 4 KiB, one after the other;
the payload after the last; the file is payload + size bytes, the payload
left sparse.  Salts, the master key and the UUID are random (``secrets``),
so two images never match byte for byte (as with qemu-img).  Iteration
counts come from timing PBKDF2 here for ``iter-time`` milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import time

from vdkit.errors import VdkitError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.opts import CreateOpts, OptDesc

SECTOR = 512
STRIPES = 4000
MIN_SLOT_ITERS = 1000
MIN_MASTER_ITERS = 1000
_KEY_BYTES = {"aes-128": 16, "aes-192": 24, "aes-256": 32}


def create_options() -> list[OptDesc]:
    from vdkit.opts import OptDesc

    return [
        OptDesc("size", "size", help="Virtual disk size"),
        OptDesc("key-secret", "string", help="ID of the secret that provides the keyslot passphrase"),
        OptDesc("cipher-alg", "string", help="Name of encryption cipher algorithm"),
        OptDesc("cipher-mode", "string", help="Name of encryption cipher mode"),
        OptDesc("ivgen-alg", "string", help="Name of IV generator algorithm"),
        OptDesc("ivgen-hash-alg", "string", help="Name of IV generator hash algorithm"),
        OptDesc("hash-alg", "string", help="Name of encryption hash algorithm"),
        OptDesc("iter-time", "number", help="Time to spend in PBKDF in milliseconds"),
    ]


def _af_split(key: bytes, hash_name: str) -> bytes:
    """The anti-forensic split: 3999 random stripes, the last one making the merge give ``key``."""
    from vdkit.formats.luks.crypto import _diffuse

    n = len(key)
    out = bytearray()
    d = bytes(n)
    for _ in range(STRIPES - 1):
        stripe = secrets.token_bytes(n)
        out += stripe
        d = _diffuse(bytes(a ^ b for a, b in zip(d, stripe, strict=True)), hash_name)
    out += bytes(a ^ b for a, b in zip(d, key, strict=True))
    return bytes(out)


def _iterations(hash_name: str, key_bytes: int, millis: int) -> int:
    """PBKDF2 iterations taking ``millis`` ms of CPU time here (timed on a sample, as QEMU benchmarks)."""
    sample = 10000
    start = time.process_time()
    hashlib.pbkdf2_hmac(hash_name, b"benchmark", bytes(32), sample, key_bytes)
    spent = max(time.process_time() - start, 1e-6)
    return int(sample * millis / 1000 / spent)


def create(filename: str, opts: CreateOpts) -> None:
    from vdkit.block.secrets import lookup_secret, set_open_option
    from vdkit.formats.luks.crypto import SectorCipher
    from vdkit.formats.luks.header import parse_luks_header

    secret_id = opts.get("key-secret")
    if not isinstance(secret_id, str):
        raise VdkitError("Parameter 'key-secret' is required for cipher")
    passphrase = lookup_secret(secret_id)
    alg = str(opts.get("cipher-alg") or "aes-256")
    mode = str(opts.get("cipher-mode") or "xts")
    ivgen = str(opts.get("ivgen-alg") or "plain64")
    ivgen_hash = opts.get("ivgen-hash-alg")
    hash_name = str(opts.get("hash-alg") or "sha256")
    iter_time = int(opts.get("iter-time") or 2000)
    if alg not in _KEY_BYTES or mode not in ("xts", "cbc"):
        raise VdkitError(f"vdkit cannot create {alg}-{mode} LUKS images (AES in XTS or CBC mode only)")
    key_bytes = _KEY_BYTES[alg] * (2 if mode == "xts" else 1)
    mode_spec = f"{mode}-{ivgen}" + (f":{ivgen_hash}" if ivgen == "essiv" else "")
    material_sectors = (key_bytes * STRIPES + 4095) // 4096 * 4096 // SECTOR
    header_sectors = 4096 // SECTOR
    payload = header_sectors + 8 * material_sectors
    size = int(opts.get("size") or 0)

    master = secrets.token_bytes(key_bytes)
    mk_salt = secrets.token_bytes(32)
    mk_iters = max(MIN_MASTER_ITERS, _iterations(hash_name, key_bytes, iter_time) // 8)
    digest = hashlib.pbkdf2_hmac(hash_name, master, mk_salt, mk_iters, 20)
    uuid = str(__import__("uuid").uuid4())
    hdr = bytearray(4096)
    struct.pack_into(">6sH32s32s32sII20s32sI40s", hdr, 0, b"LUKS\xba\xbe", 1, alg.split("-")[0].encode(),
                     mode_spec.encode(), hash_name.encode(), payload, key_bytes, digest, mk_salt, mk_iters,
                     uuid.encode())
    slot_salt = secrets.token_bytes(32)
    slot_iters = max(MIN_SLOT_ITERS, _iterations(hash_name, key_bytes, iter_time))
    for i in range(8):
        offset = header_sectors + i * material_sectors
        if i == 0:
            struct.pack_into(">II32sII", hdr, 208, 0x00AC71F3, slot_iters, slot_salt, offset, STRIPES)
        else:
            struct.pack_into(">II32sII", hdr, 208 + 48 * i, 0x0000DEAD, 0, bytes(32), offset, STRIPES)
    header = parse_luks_header(bytes(hdr))  # the checks info and open will make, and the names
    slot_key = hashlib.pbkdf2_hmac(hash_name, passphrase, slot_salt, slot_iters, key_bytes)
    split = _af_split(master, hash_name)
    split += bytes(-len(split) % SECTOR)
    encrypted = SectorCipher(header, slot_key).encrypt(split, 0)
    prealloc = str(opts.get("preallocation", "off"))
    from vdkit.formats.raw import create_raw

    create_raw(filename, 0, "off")
    fd = os.open(filename, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(hdr), 0)
        os.pwrite(fd, encrypted, header_sectors * SECTOR)
        os.ftruncate(fd, payload * SECTOR + size)
        if prealloc == "falloc" and size:
            os.posix_fallocate(fd, payload * SECTOR, size)
        elif prealloc == "full" and size:  # the file layer's zeros (not encrypted zeros), as QEMU's
            chunk = bytes(1 << 20)
            for at in range(0, size, len(chunk)):
                os.pwrite(fd, chunk[:min(len(chunk), size - at)], payload * SECTOR + at)
    finally:
        os.close(fd)
    set_open_option(filename, "key-secret", secret_id)  # convert -O luks opens the target with it
