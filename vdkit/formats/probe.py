"""Format probing as qemu-img does it: the highest-scoring driver wins.

Only qcow2 is recognised by content among the formats vdkit implements;
anything else is raw.  Images in formats we do not implement but QEMU would
detect (qcow v1, vmdk, vdi, ...) are refused by name rather than silently
treated as raw data.
"""

from __future__ import annotations

PROBE_SIZE = 2048

_FOREIGN_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"KDMV", "vmdk"),
    (b"COWD", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"vhdxfile", "vhdx"),
    (b"conectix", "vpc"),
    (b"QED\0", "qed"),
    (b"LUKS\xba\xbe", "luks"),
    (b"WithoutFreeSpace", "parallels"),
    (b"WithouFreSpacExt", "parallels"),
)


def probe_format(head: bytes) -> str:
    """Name of the format of an image whose first bytes are ``head``."""
    if len(head) >= 8 and head[:4] == b"QFI\xfb":
        version = int.from_bytes(head[4:8], "big")
        if version >= 2:
            return "qcow2"
        if version == 1:
            return "qcow"
    for magic, name in _FOREIGN_MAGICS:
        if head.startswith(magic):
            return name
    if len(head) >= 0x48 and head[0x40:0x44] == b"\x7f\x10\xda\xbe":
        return "vdi"
    return "raw"


SUPPORTED_FORMATS = ("qcow2", "raw")
