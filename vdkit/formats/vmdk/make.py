"""``qemu-img create -f vmdk``: the five subformats, laid out as QEMU 7.2 lays them out.

Created files match qemu-img's byte for byte except the random ``CID``.  A
sparse file gets its header (with the embedded descriptor for the monolithic
forms), both grain directories and zero-filled grain tables (left as holes,
as QEMU leaves them), up to the overhead rounded to a whole grain.
"""

from __future__ import annotations

import os
import struct

from vdkit.errors import VdkitError
from vdkit.opts import CreateOpts, OptDesc

OWN_OPTS = [
    OptDesc("size", "size", None, "Virtual disk size"),
    OptDesc("adapter_type", "string", None,
            "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"),
    OptDesc("backing_file", "string", None, "File name of a base image"),
    OptDesc("backing_fmt", "string", None, "Must be 'vmdk' if present"),
    OptDesc("compat6", "bool", "off", "VMDK version 6 image"),
    OptDesc("hwversion", "string", "undefined", "VMDK hardware version"),
    OptDesc("toolsversion", "string", None, "VMware guest tools version"),
    OptDesc("subformat", "string", None,
            "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | "
            "twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "),
    OptDesc("zeroed_grain", "bool", None, "Enable efficient zero writes using the zeroed-grain GTE feature"),
]

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized")
ADAPTERS = ("ide", "lsilogic", "buslogic", "legacyESX")
SECTOR = 512
GRAIN_SECTORS = 128
GTES = 512
DESC_SECTORS = 20
SPLIT_SECTORS = 4194304  # 2 GiB per extent of the twoGbMaxExtent forms


def _invalid(value: str) -> VdkitError:
    return VdkitError(f"invalid parameter value: {value}")


def sparse_layout(sectors: int) -> dict[str, int]:
    """Sector positions of a new sparse extent: RGD, RGT, GD, GT and the overhead."""
    gt_count = -(-sectors // (GTES * GRAIN_SECTORS))
    gd_sectors = -(-gt_count * 4 // SECTOR)
    gt_sectors = GTES * 4 // SECTOR
    rgd = 1 + DESC_SECTORS
    rgt = rgd + gd_sectors
    gd = rgt + gt_count * gt_sectors
    gt = gd + gd_sectors
    end = gt + gt_count * gt_sectors
    overhead = -(-end // GRAIN_SECTORS) * GRAIN_SECTORS
    return {"gt_count": gt_count, "gd_sectors": gd_sectors, "rgd": rgd, "rgt": rgt, "gd": gd, "gt": gt,
            "overhead": overhead}


def write_sparse_extent(path: str, sectors: int, *, stream: bool, zeroed: bool, desc: bytes) -> None:
    """A new sparse extent file; ``desc`` (may be empty) is embedded at sector 1."""
    from vdkit.io.file import ImageFile

    lay = sparse_layout(sectors)
    version = 3 if stream else (2 if zeroed else 1)
    flags = 3 | (4 if zeroed else 0) | (0x30000 if stream else 0)
    header = struct.pack(
        "<4sIIQQQQIQQQB4sH", b"KDMV", version, flags, sectors, GRAIN_SECTORS, 1, DESC_SECTORS, GTES,
        lay["rgd"], lay["gd"], lay["overhead"], 0, b"\n \r\n", 1 if stream else 0,
    )
    header += bytes(SECTOR - len(header))
    step = GTES * 4 // SECTOR
    rgd = struct.pack(f"<{lay['gt_count']}I", *(lay["rgt"] + i * step for i in range(lay["gt_count"])))
    gd = struct.pack(f"<{lay['gt_count']}I", *(lay["gt"] + i * step for i in range(lay["gt_count"])))
    _create_empty(path)
    with ImageFile(path, readonly=False) as f:
        f.pwrite(0, header + desc)
        if rgd:
            f.pwrite(lay["rgd"] * SECTOR, rgd)
            f.pwrite(lay["gd"] * SECTOR, gd)
        f.truncate(lay["overhead"] * SECTOR)


def _create_empty(path: str) -> None:
    from vdkit.errors import os_error_message

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise VdkitError(f"Could not create '{path}': {os_error_message(exc)}", errno=exc.errno) from exc
    os.close(fd)


def descriptor_text(*, cid: int, parent_cid: int, create_type: str, hint: str | None, extents: list[str],
                    hwversion: str, sectors: int, adapter: str, toolsversion: str) -> bytes:
    heads = 16 if adapter == "ide" else 255
    cylinders = sectors // (heads * 63)
    parent_line = f'parentFileNameHint="{hint}"' if hint is not None else ""
    text = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:x}\n"
        f"parentCID={parent_cid:x}\n"
        f'createType="{create_type}"\n'
        f"{parent_line}\n"
        "# Extent description\n"
        + "".join(extents)
        + "\n# The Disk Data Base\n"
        "#DDB\n\n"
        f'ddb.virtualHWVersion = "{hwversion}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.adapterType = "{adapter}"\n'
        f'ddb.toolsVersion = "{toolsversion}"\n'
    )
    return text.encode("utf-8", "surrogateescape")


def _split_name(base: str) -> tuple[str, str]:
    dot = base.rfind(".")
    return (base, "") if dot <= 0 else (base[:dot], base[dot:])


def _parent_cid(filename: str, backing: str, backing_fmt: str | None) -> int:
    """The backing image's CID, which the new image records as its parent's.

    QEMU's vmdk refuses a backing format other than vmdk first, then opens the backing image
    itself (even under ``-u``; probed, read-only, shared, without its own chain) and insists
    that it is a vmdk.  The file, the probe and vmdk's own open are all below the block layer.
    """
    from vdkit.block.chain import resolve_backing_name
    from vdkit.block.driver import OpenContext
    from vdkit.formats.registry import PROBE_SIZE, probe_format
    from vdkit.formats.vmdk.driver import open_vmdk
    from vdkit.io.file import ImageFile

    if backing_fmt is not None and backing_fmt != "vmdk":
        raise VdkitError("backing_file must be a vmdk image")
    full = resolve_backing_name(filename, backing) or backing
    with ImageFile(full, readonly=True, force_share=True) as file:  # its errors name the file already
        fmt = probe_format(file.pread(0, PROBE_SIZE), full)
        if fmt != "vmdk":
            raise VdkitError(f"Invalid backing file format: {fmt}. Must be vmdk")
        ctx = OpenContext(full, readonly=True, force_share=True)
        try:
            driver = open_vmdk(file, ctx)
            try:
                driver.open_children(ctx)
                return int(driver.cid)
            finally:
                for child in driver.extra_files():
                    child.close()
        except VdkitError as exc:
            raise exc.prefixed(f"Could not open '{full}': ") from exc


def create_from_options(filename: str, opts: CreateOpts) -> None:
    import random

    size = int(opts.get("size") or 0)
    adapter = str(opts.get("adapter_type") or "ide")
    if adapter not in ADAPTERS:
        raise _invalid(adapter)
    subformat = str(opts.get("subformat") or "monolithicSparse")
    if subformat not in SUBFORMATS:
        raise _invalid(subformat)
    compat6 = bool(opts.get("compat6"))
    hw = opts.get("hwversion")
    hw_set = opts.has("hwversion") and hw != "undefined"
    if compat6 and hw_set:
        raise VdkitError("compat6 cannot be enabled with hwversion set")
    hwversion = str(hw) if hw_set else ("6" if compat6 else "4")
    toolsversion = str(opts.get("toolsversion") or "2147483647")
    zeroed = bool(opts.get("zeroed_grain"))
    backing = opts.get("backing_file")
    parent_cid = 0xFFFFFFFF
    if isinstance(backing, str):
        fmt = opts.get("backing_fmt")
        parent_cid = _parent_cid(filename, backing, str(fmt) if isinstance(fmt, str) else None)
        if subformat in ("monolithicFlat", "twoGbMaxExtentFlat"):
            raise VdkitError("Flat image can't have backing file")
    sectors = -(-size // SECTOR)
    cid = random.getrandbits(32)
    folder, base = os.path.split(filename)
    prefix, ext = _split_name(base)

    def desc(extents: list[str]) -> bytes:
        return descriptor_text(cid=cid, parent_cid=parent_cid, create_type=subformat,
                               hint=backing if isinstance(backing, str) else None, extents=extents,
                               hwversion=hwversion, sectors=sectors, adapter=adapter, toolsversion=toolsversion)

    if subformat in ("monolithicSparse", "streamOptimized"):
        text = desc([f'RW {sectors} SPARSE "{base}"\n'])
        write_sparse_extent(filename, sectors, stream=subformat == "streamOptimized", zeroed=zeroed, desc=text)
        return
    from vdkit.formats.raw import create_raw

    flat = subformat in ("monolithicFlat", "twoGbMaxExtentFlat")
    if subformat == "monolithicFlat":
        pieces = [(f"{prefix}-flat{ext}", sectors)] if sectors else []
    else:
        pieces = []
        left = sectors
        i = 1
        while left > 0:
            n = min(left, SPLIT_SECTORS)
            pieces.append((f"{prefix}-{'f' if flat else 's'}{i:03d}{ext}", n))
            left -= n
            i += 1
    lines = []
    for name, n in pieces:
        path = os.path.join(folder, name)
        if flat:
            create_raw(path, n * SECTOR)
            lines.append(f'RW {n} FLAT "{name}" 0\n')
        else:
            write_sparse_extent(path, n, stream=False, zeroed=zeroed, desc=b"")
            lines.append(f'RW {n} SPARSE "{name}"\n')
    _create_empty(filename)
    from vdkit.io.file import ImageFile

    with ImageFile(filename, readonly=False) as f:
        f.pwrite(0, desc(lines))
