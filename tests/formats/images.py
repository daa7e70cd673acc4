"""Builders for the read-only formats qemu-img cannot create (bochs, cloop, dmg).

Each builder writes an image from the public format descriptions, from a
``disk`` byte string (the guest view) and per-format layout choices, so the
tests can compare vdkit and qemu-img on the same files.
"""

from __future__ import annotations

import base64
import bz2
import struct
import zlib
from pathlib import Path

SECTOR = 512

# -- bochs (growing redolog) ------------------------------------------------------------------

BOCHS_MAGIC = b"Bochs Virtual HD Image"


def bochs_image(path: Path, disk: bytes, *, extent: int = 32 * 1024, bitmap: int = 512, version: int = 2,
                catalog: int | None = None, allocate_zero_extents: bool = False,
                header_size: int = 512) -> None:
    """A growing redolog: extents holding any non-zero sector are allocated, in reverse order
    (so catalog order and file order differ); within an extent only non-zero sectors are marked."""
    size = len(disk)
    n = catalog if catalog is not None else -(-size // extent)
    hdr = bytearray(header_size)
    hdr[0:32] = BOCHS_MAGIC.ljust(32, b"\0")
    hdr[32:48] = b"Redolog".ljust(16, b"\0")
    hdr[48:64] = b"Growing".ljust(16, b"\0")
    if version == 2:
        struct.pack_into("<IIIIIIQ", hdr, 64, 0x00020000, header_size, n, bitmap, extent, 0, size)
    else:
        struct.pack_into("<IIIIIQ", hdr, 64, 0x00010000, header_size, n, bitmap, extent, size)
    cat = [0xFFFFFFFF] * n
    blocks = []
    used = [i for i in range(min(n, -(-size // extent)))
            if allocate_zero_extents or any(disk[i * extent:(i + 1) * extent])]
    bm_sectors = -(-bitmap // SECTOR)
    for slot, i in enumerate(reversed(used)):
        cat[i] = slot
        chunk = disk[i * extent:(i + 1) * extent].ljust(extent, b"\0")
        bm = bytearray(bm_sectors * SECTOR)
        for s in range(extent // SECTOR):
            if any(chunk[s * SECTOR:(s + 1) * SECTOR]) or allocate_zero_extents:
                bm[s // 8] |= 1 << (s % 8)
        blocks.append(bytes(bm) + chunk)
    with open(path, "wb") as f:
        f.write(hdr)
        f.write(struct.pack(f"<{n}I", *cat))
        for b in blocks:
            f.write(b)


# -- cloop ------------------------------------------------------------------------------------

CLOOP_PREAMBLE = (b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
                  .ljust(128, b"\0"))


def cloop_image(path: Path, disk: bytes, *, block_size: int = 64 * 1024, level: int = 9) -> None:
    """The cloop V2 layout: preamble, u32 BE block size and count, count+1 u64 BE offsets, zlib blocks."""
    n = -(-len(disk) // block_size)
    blocks = [zlib.compress(disk[i * block_size:(i + 1) * block_size].ljust(block_size, b"\0"), level)
              for i in range(n)]
    pos = 128 + 8 + 8 * (n + 1)
    offsets = []
    for b in blocks:
        offsets.append(pos)
        pos += len(b)
    offsets.append(pos)
    with open(path, "wb") as f:
        f.write(CLOOP_PREAMBLE + struct.pack(">II", block_size, n) + struct.pack(f">{n + 1}Q", *offsets))
        for b in blocks:
            f.write(b)


# -- dmg (UDIF) -------------------------------------------------------------------------------

ZERO, RAW, IGNORE, ZLIB, BZ2, COMMENT, TERM = 0, 1, 2, 0x80000005, 0x80000006, 0x7FFFFFFE, 0xFFFFFFFF


def mish_block(first_sector: int, sectors: int, data_offset: int,
               chunks: list[tuple[int, int, int, int, int]]) -> bytes:
    """One ``mish`` table: chunks are (type, sector, sector count, compressed offset, compressed length),
    sectors relative to ``first_sector``, offsets relative to ``data_offset``."""
    out = bytearray(204)
    out[0:4] = b"mish"
    struct.pack_into(">IQQQII", out, 4, 1, first_sector, sectors, data_offset, 0, 0)
    struct.pack_into(">I", out, 200, len(chunks))
    for c in chunks:
        out += struct.pack(">IIQQQQ", c[0], 0, c[1], c[2], c[3], c[4])
    return bytes(out)


def plist(blocks: list[bytes]) -> bytes:
    items = "".join(
        "\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n"
        f"\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n\t\t\t\t{base64.b64encode(b).decode()}\n\t\t\t\t</data>\n"
        f"\t\t\t\t<key>ID</key>\n\t\t\t\t<string>{i}</string>\n\t\t\t\t<key>Name</key>\n"
        f"\t\t\t\t<string>part {i}</string>\n\t\t\t</dict>\n"
        for i, b in enumerate(blocks))
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n'
            '<plist version="1.0">\n<dict>\n\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n'
            f"{items}\t\t</array>\n\t</dict>\n</dict>\n</plist>\n").encode()


def koly(data_len: int, xml_off: int, xml_len: int, sectors: int, *, rsrc_off: int = 0, rsrc_len: int = 0) -> bytes:
    out = bytearray(512)
    out[0:4] = b"koly"
    struct.pack_into(">IIIQQQQQ", out, 4, 4, 512, 1, 0, 0, data_len, rsrc_off, rsrc_len)
    struct.pack_into(">QQ", out, 216, xml_off, xml_len)
    struct.pack_into(">IQ", out, 488, 1, sectors)
    return bytes(out)


def dmg_image(path: Path, disk: bytes, *, chunk_sectors: int = 64, kinds: tuple[int, ...] = (ZLIB, RAW, ZERO, IGNORE),
              parts: int = 2, comment: bool = True) -> None:
    """A UDIF image: the disk split in ``parts`` mish tables, chunks of ``chunk_sectors`` sectors
    cycling through ``kinds`` (zero and ignore chunks only where the data is zero, else zlib)."""
    total = -(-len(disk) // SECTOR)
    disk = disk.ljust(total * SECTOR, b"\0")
    data = bytearray()
    blocks = []
    per_part = -(-total // parts)
    k = 0
    for p in range(parts):
        first = p * per_part
        count = min(per_part, total - first)
        if count <= 0:
            break
        base = len(data)
        chunks = []
        if comment:
            chunks.append((COMMENT, 0, 0, 0, 0))
        s = 0
        while s < count:
            n = min(chunk_sectors, count - s)
            payload = disk[(first + s) * SECTOR:(first + s + n) * SECTOR]
            kind = kinds[k % len(kinds)]
            k += 1
            if kind in (ZERO, IGNORE) and any(payload):
                kind = ZLIB
            if kind == RAW:
                enc = payload
            elif kind == ZLIB:
                enc = zlib.compress(payload)
            elif kind == BZ2:
                enc = bz2.compress(payload)
            else:
                enc = b""
            chunks.append((kind, s, n, len(data) - base, len(enc)))
            data += enc
            s += n
        chunks.append((TERM, count, 0, len(data) - base, 0))
        blocks.append(mish_block(first, count, base, chunks))
    xml = plist(blocks)
    with open(path, "wb") as f:
        f.write(data)
        f.write(xml)
        f.write(koly(len(data), len(data), len(xml), total))
