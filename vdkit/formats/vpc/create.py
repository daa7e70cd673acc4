"""``qemu-img create -f vpc``: QEMU 7.2's CHS size rounding, footer and layout.

The disk size is rounded up to what a CHS geometry (the VHD specification's
algorithm) can describe, unless ``force_size=on`` (exact size, maximum
geometry, creator ``qem2``).  Dynamic files are: footer copy, dynamic header,
BAT (all unallocated), footer; fixed files: the data, then the footer.  The
time stamp and the UUID are the only fields that differ between two runs.
"""

from __future__ import annotations

import struct

from vdkit.errors import VdkitError
from vdkit.formats.vpc.driver import FIXED, MAX_CHS, MAX_SECTORS, checksum

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.opts import CreateOpts

BLOCK_SIZE = 0x200000
VHD_EPOCH = 946684800  # 2000-01-01 00:00:00 UTC


def chs_of(sectors: int) -> tuple[int, int, int]:
    """The VHD specification's geometry for a disk of ``sectors`` sectors."""
    total = min(sectors, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def disk_geometry(size: int, force_size: bool) -> tuple[int, tuple[int, int, int]]:
    """``(sectors, (C, H, S))`` stored for a requested size in bytes, as QEMU 7.2 computes them.

    QEMU tries the requested sector count, then one more, and so on, until the
    geometry covers the request; the disk is then exactly the geometry's size,
    except at the maximum geometry, where the requested size is kept.
    """
    want = -(-size // 512)
    if force_size:
        return want, MAX_CHS
    if want == 0:
        return 0, (0, 0, 0)
    count = want
    while True:
        chs = chs_of(count)
        if chs == MAX_CHS:
            return want, chs
        if chs[0] * chs[1] * chs[2] >= want:
            return chs[0] * chs[1] * chs[2], chs
        count += 1


def make_footer(sectors: int, chs: tuple[int, int, int], *, fixed: bool, force_size: bool,
                timestamp: int, uid: bytes) -> bytes:
    """A 512-byte footer with its checksum."""
    size = sectors * 512
    f = bytearray(512)
    struct.pack_into(">8sIIQI4sI4sQQHBBI", f, 0, b"conectix", 2, 0x00010000,
                     0xFFFFFFFFFFFFFFFF if fixed else 512, timestamp & 0xFFFFFFFF,
                     b"qem2" if force_size else b"qemu", 0x00050003, b"Wi2k", size, size,
                     chs[0], chs[1], chs[2], FIXED if fixed else 3)
    f[68:84] = uid
    struct.pack_into(">I", f, 64, checksum(f, 64))
    return bytes(f)


def dynamic_header(entries: int) -> bytes:
    h = bytearray(1024)
    struct.pack_into(">8sQQIII", h, 0, b"cxsparse", 0xFFFFFFFFFFFFFFFF, 1536, 0x00010000, entries, BLOCK_SIZE)
    struct.pack_into(">I", h, 36, checksum(h, 36))
    return bytes(h)


def create_from_options(filename: str, opts: CreateOpts) -> None:
    """Check the options in QEMU's order (the file is emptied first) and write the image."""
    import os
    import time
    import uuid

    from vdkit.formats.raw import create_file
    from vdkit.io.file import ImageFile

    create_file(filename, opts)  # the protocol's file, emptied (the preallocation option checked)
    subformat = str(opts.get("subformat") or "dynamic")
    if subformat not in ("dynamic", "fixed"):
        raise VdkitError(f"Parameter 'subformat' does not accept value '{subformat}'")
    force_size = bool(opts.get("force_size", False))
    sectors, chs = disk_geometry(int(opts.get("size") or 0), force_size)
    if sectors > MAX_SECTORS:
        raise VdkitError("The image size is too large for file format 'vpc'")
    fixed = subformat == "fixed"
    footer = make_footer(sectors, chs, fixed=fixed, force_size=force_size,
                         timestamp=int(time.time()) - VHD_EPOCH, uid=uuid.uuid4().bytes)
    with ImageFile(filename, readonly=False) as f:
        if fixed:
            size = sectors * 512
            os.ftruncate(f.fd, size)
            if size:
                f.pwrite(0, bytes(min(size, 4096)))  # allocated, as the file QEMU creates
            f.pwrite(size, footer)
        else:
            entries = -(-sectors * 512 // BLOCK_SIZE)
            bat_len = -(-entries * 4 // 512) * 512
            f.pwritev(0, [footer, dynamic_header(entries), b"\xff" * bat_len, footer])
        f.flush()
