"""The raw LUKS1 container: the header parsed without a key (info), data only with one.

The header (592 bytes) is parsed by :mod:`vdkit.formats.luks.header` with
qemu-img's texts; the virtual disk is the file after the payload offset.
Reading data needs the master key, which needs the passphrase: without a
``key-secret`` every data access is refused at open with qemu-img's
"Parameter 'key-secret' is required for cipher", as ``info`` alone opens
the image without I/O.
"""

from __future__ import annotations

from vdkit.block.driver import DATA, BlockStatus, FormatDriver
from vdkit.errors import OpenError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.driver import OpenContext
    from vdkit.formats.luks.crypto import SectorCipher
    from vdkit.formats.luks.header import LuksHeader
    from vdkit.info.model import ImageInfoSpecific
    from vdkit.io.file import ImageFile

PHDR_SIZE = 592


class LuksDriver(FormatDriver):
    format_name = "luks"

    def __init__(self, file: ImageFile, header: LuksHeader, cipher: SectorCipher | None = None) -> None:
        super().__init__(file)
        self.header = header
        self.cipher = cipher  # None: opened for metadata only

    @classmethod
    def open(cls, file: ImageFile, ctx: OpenContext) -> LuksDriver:
        from vdkit.formats.luks.header import parse_luks_header

        passphrase = b""
        if not ctx.no_io:  # the key is looked up before the header is read, as QEMU does
            from vdkit.block.secrets import lookup_secret, open_option

            secret_id = open_option(ctx.filename, "key-secret")
            if secret_id is None:
                raise OpenError("Parameter 'key-secret' is required for cipher")
            passphrase = lookup_secret(secret_id)
        header = parse_luks_header(file.pread(0, PHDR_SIZE))
        if file.size() < header.payload_offset:  # a negative disk size
            import errno

            raise OpenError("Could not refresh total sector count: Input/output error", errno=errno.EIO)
        if ctx.no_io:  # info: the header is all it needs (qemu-img does not check the key either)
            return cls(file, header)
        from vdkit.formats.luks.crypto import SectorCipher, unlock

        raw = file.pread(0, PHDR_SIZE)
        key_bytes = int.from_bytes(raw[108:112], "big")
        master = unlock(header, raw, file.pread, passphrase, key_bytes)
        return cls(file, header, SectorCipher(header, master))

    @property
    def dirty(self) -> bool | None:
        return False

    @property
    def has_key(self) -> bool:
        """Opened with its key: data can be read (the block layer's encrypted-without-key check passes)."""
        return self.cipher is not None

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """QEMU's luks driver reports the whole disk as data, without offsets (map: one entry)."""
        return BlockStatus(DATA, length)

    def write(self, offset: int, data: bytes, backing: Callable[[int, int], bytes] | None = None) -> None:
        """Whole sectors encrypted and written; a partial sector is read, patched and written back."""
        assert self.cipher is not None
        first = offset // 512
        end = -(-(offset + len(data)) // 512)
        if offset % 512 or len(data) % 512:
            buf = bytearray(self.read(first * 512, (end - first) * 512))
            buf[offset - first * 512:offset - first * 512 + len(data)] = data
            data = bytes(buf)
        self.file.pwrite(self.header.payload_offset + first * 512, self.cipher.encrypt(bytes(data), first))

    def read(self, offset: int, length: int, backing: Callable[[int, int], bytes] | None = None) -> bytes:
        """Whole encrypted sectors read and decrypted (IVs count sectors from the payload's start)."""
        assert self.cipher is not None
        first = offset // 512
        end = -(-(offset + length) // 512)
        raw = self.file.pread(self.header.payload_offset + first * 512, (end - first) * 512)
        plain = self.cipher.decrypt(raw, first)
        return plain[offset - first * 512:offset - first * 512 + length]

    @property
    def virtual_size(self) -> int:
        return -(-max(0, self.file.size() - self.header.payload_offset) // 512) * 512  # a partial sector counts

    @property
    def encrypted(self) -> bool:
        return True

    def specific_info(self) -> ImageInfoSpecific:
        from vdkit.formats.luks.info import ImageInfoSpecificLuks, LuksFormatSlot
        from vdkit.info.model import ImageInfoSpecific

        h = self.header
        return ImageInfoSpecific("luks", ImageInfoSpecificLuks(  # type: ignore[arg-type]
            cipher_alg=h.cipher_alg, cipher_mode=h.cipher_mode, ivgen_alg=h.ivgen_alg, hash_alg=h.hash_alg,
            payload_offset=h.payload_offset, master_key_iters=h.master_key_iterations, uuid=h.uuid,
            ivgen_hash_alg=h.ivgen_hash_alg,
            slots=[LuksFormatSlot(active=s.active, key_offset=s.key_offset,
                                  iters=s.iterations if s.active else None,
                                  stripes=s.stripes if s.active else None) for s in h.slots],
        ))
