"""``qemu-img create -f vhdx``: QEMU 7.2's options, checks (in its order) and file layout.

Layout of a new image (observed from qemu-img 7.2): file identifier with the
creator string, two headers (sequence numbers n and n+1, one random file and
data write GUID), two identical region tables (BAT, then metadata, neither
marked required), the log at 1 MiB, the BAT after it (rounded up to 1 MiB),
1 MiB of metadata after that (table, then the five items packed from 64 KiB),
and the payload starting 4 MiB after the metadata region's end.
"""

from __future__ import annotations

import os
import struct

from vdkit.errors import VdkitError
from vdkit.formats.vhdx import layout as L
from vdkit.opts import CreateOpts, OptDesc

OWN_OPTS = [
    OptDesc("size", "size", None, "Virtual disk size; max of 64TB."),
    OptDesc("log_size", "size", "1048576", "Log size; min 1MB."),
    OptDesc("block_size", "size", "0",
            "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size."),
    OptDesc("subformat", "string", None,
            "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'."),
    OptDesc("block_state_zero", "bool", None,
            "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when "
            "using 'qemu-img convert' with subformat=dynamic."),
]

CREATOR = "QEMU v7.2.22"


def auto_block_size(size: int) -> int:
    if size <= L.GiB:
        return 8 * L.MiB
    if size <= 100 * L.GiB:
        return 16 * L.MiB
    if size <= 32 * L.TiB:
        return 32 * L.MiB
    return 64 * L.MiB


def create_from_options(filename: str, opts: CreateOpts) -> None:
    from vdkit.io.file import ImageFile

    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in ("off", "falloc", "full", "metadata"):
        raise VdkitError(f"invalid parameter value: {prealloc}")
    try:
        os.close(os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as exc:
        from vdkit.errors import os_error_message

        raise VdkitError(f"Could not create '{filename}': {os_error_message(exc)}", errno=exc.errno) from exc
    with ImageFile(filename, readonly=False) as f:
        f.truncate(0)
        if prealloc == "metadata":  # the file protocol's refusal, once the file exists
            raise VdkitError(f"Unsupported preallocation mode: {prealloc}")
        subformat = str(opts.get("subformat", "dynamic"))
        if subformat not in ("dynamic", "fixed"):
            raise VdkitError(f"Parameter 'subformat' does not accept value '{subformat}'")
        size = -(-int(opts.get("size") or 0) // 512) * 512
        if size > L.MAX_IMAGE_SIZE:
            raise VdkitError("Image size too large; max of 64TB")
        log_size = -(-int(opts.get("log_size") or 0) // L.MiB) * L.MiB
        if log_size == 0:
            raise VdkitError("Log size must be a multiple of 1 MB")
        block_size = int(opts.get("block_size") or 0)
        if block_size & (block_size - 1):
            raise VdkitError("Block size must be a power of two")
        if block_size == 0:
            block_size = auto_block_size(size)
        block_size = min(max(block_size, L.MIN_BLOCK_SIZE), L.MAX_BLOCK_SIZE)
        zero_state = bool(opts.get("block_state_zero", True))
        write_image(f, size, log_size, block_size, fixed=subformat == "fixed", zero_state=zero_state)
        f.flush()


def write_image(f, size: int, log_size: int, block_size: int, *, fixed: bool,  # type: ignore[no-untyped-def]
                zero_state: bool) -> None:
    sector = 512
    total = L.bat_entries(size, block_size, sector, False)
    ratio = L.chunk_ratio(block_size, sector)
    log_offset = L.MiB
    bat_offset = log_offset + log_size
    bat_length = -(-total * 8 // L.MiB) * L.MiB
    meta_offset = bat_offset + bat_length
    meta_length = L.MiB
    data_start = meta_offset + meta_length + 4 * L.MiB

    # file identifier
    ident = bytearray(L.LOG_SECTOR)
    ident[:8] = L.FILE_ID_SIG
    creator = CREATOR.encode("utf-16-le")
    ident[8 : 8 + len(creator)] = creator
    f.pwrite(0, ident)

    # headers
    import random

    seq = random.getrandbits(32)
    fw, dw = L.guid_random(), L.guid_random()
    for i, off in enumerate((L.HEADER1_OFFSET, L.HEADER2_OFFSET)):
        h = L.Header(sequence=seq + i, file_write_guid=fw, data_write_guid=dw, log_length=log_size,
                     log_offset=log_offset)
        f.pwrite(off, h.pack())

    # region tables
    table = L.pack_region_table([(L.BAT_GUID, bat_offset, bat_length, 0),
                                 (L.METADATA_GUID, meta_offset, meta_length, 0)])
    f.pwrite(L.REGION_TABLE_OFFSET, table)
    f.pwrite(L.REGION_TABLE2_OFFSET, table)

    # metadata
    meta = bytearray(L.METADATA_TABLE_SIZE)
    struct.pack_into("<8sHH", meta, 0, b"metadata", 0, 5)
    items = [
        (L.FILE_PARAMETERS_GUID, 8, 4, struct.pack("<II", block_size, 1 if fixed else 0)),
        (L.VIRTUAL_DISK_SIZE_GUID, 8, 6, struct.pack("<Q", size)),
        (L.PAGE83_GUID, 16, 6, L.guid_random()),
        (L.LOGICAL_SECTOR_GUID, 4, 6, struct.pack("<I", sector)),
        (L.PHYSICAL_SECTOR_GUID, 4, 6, struct.pack("<I", sector)),
    ]
    values = bytearray(L.LOG_SECTOR)
    at = 0
    for i, (guid, length, flags, value) in enumerate(items):
        struct.pack_into("<16sIIII", meta, 32 + 32 * i, guid, L.METADATA_TABLE_SIZE + at, length, flags, 0)
        values[at : at + length] = value
        at += length

    # BAT
    payload = -(-size // block_size)
    bat: bytearray | None = None
    if fixed and not zero_state:
        bat = bytearray(bat_length)
        for b in range(payload):
            struct.pack_into("<Q", bat, L.bat_index(b, ratio) * 8,
                             (data_start + b * block_size) | L.PAYLOAD_FULLY_PRESENT)
    elif zero_state:
        bat = bytearray(bat_length)
        for b in range(min(payload, total)):
            struct.pack_into("<Q", bat, L.bat_index(b, ratio) * 8, L.PAYLOAD_ZERO)
    if bat is not None:
        pos = 0
        while pos < bat_length:  # in 1 MiB pieces: a 64 MiB BAT is not one big write
            f.pwrite(bat_offset + pos, bat[pos : pos + L.MiB])
            pos += L.MiB
    f.pwrite(meta_offset, meta)
    f.pwrite(meta_offset + L.METADATA_TABLE_SIZE, values)
    f.truncate(data_start + size if fixed else data_start)
