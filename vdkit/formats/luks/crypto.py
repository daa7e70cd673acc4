"""LUKS1 key recovery and sector decryption.

Key derivation (PBKDF2) and the anti-forensic merge use only :mod:`hashlib`.
The block ciphers come from the ``cryptography`` package (pyca), a widely
used, maintained binding to OpenSSL: AES in XTS and CBC modes, which covers
qemu-img's default (``aes-256-xts-plain64``, sha256) and the common
``cbc-essiv`` layouts.  vdkit implements no cipher itself; without the
package, or for ciphers it lacks (twofish, serpent, cast5, sm4), opening with
a key fails with a clear message.

Reference: the LUKS1 on-disk format specification (cryptsetup), section 2
(PBKDF2, AF-split with the header's hash, master key digest check).
"""

from __future__ import annotations

import hashlib

from vdkit.errors import OpenError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from vdkit.formats.luks.header import LuksHeader

SECTOR = 512


def _aes_module() -> tuple[Any, Any, Any]:
    try:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise OpenError("LUKS decryption needs the 'cryptography' package (pip install vdkit[luks])") from None
    return Cipher, algorithms, modes


def _diffuse(block: bytes, hash_name: str) -> bytes:
    """AF diffusion: the block hashed in digest-sized pieces, each with its big-endian index prepended."""
    size = hashlib.new(hash_name).digest_size
    out = bytearray()
    for i in range(0, len(block), size):
        piece = block[i:i + size]
        out += hashlib.new(hash_name, (i // size).to_bytes(4, "big") + piece).digest()[:len(piece)]
    return bytes(out)


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    d = bytes(key_bytes)
    for s in range(stripes - 1):
        stripe = material[s * key_bytes:(s + 1) * key_bytes]
        d = _diffuse(bytes(a ^ b for a, b in zip(d, stripe, strict=True)), hash_name)
    last = material[(stripes - 1) * key_bytes:stripes * key_bytes]
    return bytes(a ^ b for a, b in zip(d, last, strict=True))


class SectorCipher:
    """Decrypts 512-byte sectors with the header's cipher, mode and IV generator."""

    def __init__(self, header: LuksHeader, key: bytes) -> None:
        if not header.cipher_alg.startswith("aes-") or header.cipher_mode not in ("xts", "cbc"):
            raise OpenError(f"vdkit cannot decrypt {header.cipher_alg}-{header.cipher_mode} "
                            "(AES in XTS or CBC mode only)")
        cipher, algorithms, modes = _aes_module()
        self._cipher, self._algorithms, self._modes = cipher, algorithms, modes
        self.mode = header.cipher_mode
        self.key = key
        self.ivgen = header.ivgen_alg
        self._essiv: Any = None
        try:
            if self.ivgen == "essiv":
                salt = hashlib.new(header.ivgen_hash_alg or "sha256", key).digest()
                self._essiv = cipher(algorithms.AES(salt), modes.ECB()).encryptor()
            self.decrypt(bytes(SECTOR), 0)  # key sizes the library refuses (AES-192-XTS) fail here, not later
        except Exception as exc:  # ValueError / UnsupportedAlgorithm from the library
            raise OpenError(f"vdkit cannot decrypt {header.cipher_alg}-{header.cipher_mode}-{header.ivgen_alg}: "
                            f"{exc}") from None

    def _iv(self, sector: int) -> bytes:
        if self.ivgen == "plain":
            return (sector & 0xFFFFFFFF).to_bytes(16, "little")
        iv = (sector & 0xFFFFFFFFFFFFFFFF).to_bytes(16, "little")
        if self._essiv is not None:
            return bytes(self._essiv.update(iv))
        return iv

    def decrypt(self, data: bytes, first_sector: int) -> bytes:
        """``data`` (whole sectors) starting at sector ``first_sector`` of the encrypted area."""
        return self._run(data, first_sector, encrypt=False)

    def encrypt(self, data: bytes, first_sector: int) -> bytes:
        return self._run(data, first_sector, encrypt=True)

    def _run(self, data: bytes, first_sector: int, *, encrypt: bool) -> bytes:
        out = bytearray(len(data))
        alg = self._algorithms.AES(self.key)
        mode_cls: Callable[[bytes], object] = (self._modes.XTS if self.mode == "xts"
                                               else self._modes.CBC)
        for i in range(0, len(data), SECTOR):
            c = self._cipher(alg, mode_cls(self._iv(first_sector + i // SECTOR)))
            op = c.encryptor() if encrypt else c.decryptor()
            out[i:i + SECTOR] = op.update(data[i:i + SECTOR]) + op.finalize()
        return bytes(out)


def unlock(header: LuksHeader, raw_header: bytes, read: Callable[[int, int], bytes], passphrase: bytes,
           key_bytes: int) -> bytes:
    """The master key: try each active slot (PBKDF2, decrypt, AF-merge) against the header's digest."""
    digest = raw_header[112:132]
    mk_salt = raw_header[132:164]
    for i, slot in enumerate(header.slots):
        if not slot.active:
            continue
        salt = raw_header[208 + 48 * i + 8:208 + 48 * i + 40]
        slot_key = hashlib.pbkdf2_hmac(header.hash_alg, passphrase, salt, slot.iterations, key_bytes)
        size = key_bytes * slot.stripes
        material = read(slot.key_offset, -(-size // SECTOR) * SECTOR)
        plain = SectorCipher(header, slot_key).decrypt(material, 0)[:size]
        master = af_merge(plain, key_bytes, slot.stripes, header.hash_alg)
        check = hashlib.pbkdf2_hmac(header.hash_alg, master, mk_salt, header.master_key_iterations, 20)
        if check == digest:
            return master
    raise OpenError("Invalid password, cannot unlock any keyslot")
