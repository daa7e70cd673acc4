"""VMDK's ``Format specific information`` (QAPI ``ImageInfoSpecificVmdk``).

The extents are QAPI ``ImageInfo`` objects (filename, format, virtual size,
cluster size, compressed), as in QEMU's schema.
"""

from __future__ import annotations

from vdkit.info.model import ImageInfo, ImageInfoSpecific
from vdkit.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.formats.vmdk.driver import VmdkDriver


@record
class ImageInfoSpecificVmdk:
    create_type: str
    cid: int
    parent_cid: int
    extents: list[ImageInfo]


def specific_info(driver: VmdkDriver) -> ImageInfoSpecific:
    extents = []
    for e in driver.extents:
        info = ImageInfo(filename=e.name, format=e.kind, virtual_size=e.sectors * 512)
        if not e.flat:
            info.cluster_size = e.cluster_size
        if e.compressed:
            info.compressed = True
        extents.append(info)
    spec = ImageInfoSpecificVmdk(driver.create_type, driver.cid, driver.parent_cid, extents)
    return ImageInfoSpecific("vmdk", spec)  # type: ignore[arg-type]
