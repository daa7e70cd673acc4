"""qcow2's ``Format specific information`` (QAPI ``ImageInfoSpecificQcow2``)."""

from __future__ import annotations

from vdkit.formats.qcow2 import layout as L
from vdkit.info.model import ImageInfoSpecific, ImageInfoSpecificQcow2

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.formats.qcow2.driver import Qcow2Driver
    from vdkit.info.extra_model import AesEncryptionInfo, LuksInfo


def specific_info(driver: Qcow2Driver) -> ImageInfoSpecific:
    return ImageInfoSpecific("qcow2", _qcow2_specific(driver))


def _qcow2_specific(driver: Qcow2Driver) -> ImageInfoSpecificQcow2:
    h = driver.header
    encrypt: LuksInfo | AesEncryptionInfo | None = None
    if h.crypt_method == L.CRYPT_LUKS:
        raw = driver.luks_header()
        from vdkit.formats.luks import luks_info

        encrypt = luks_info(raw) if raw is not None else None
    elif h.crypt_method == L.CRYPT_AES:
        from vdkit.info.extra_model import AesEncryptionInfo

        encrypt = AesEncryptionInfo()
    spec = ImageInfoSpecificQcow2(
        compat="0.10" if h.version == 2 else "1.1",
        refcount_bits=h.refcount_bits,
        compression_type=L.COMPRESSION_NAMES[h.compression_type],
        encrypt=encrypt,
    )
    if h.version >= 3:
        spec.lazy_refcounts = h.lazy_refcounts
        spec.corrupt = h.corrupt
        spec.extended_l2 = h.extended_l2
        spec.data_file = h.data_file
        if h.has_data_file:
            spec.data_file_raw = h.data_file_raw
        bitmaps = driver.bitmaps
        if bitmaps:
            from vdkit.info.extra_model import Qcow2BitmapInfo

            spec.bitmaps = [
                Qcow2BitmapInfo(
                    name=b.name,
                    granularity=b.granularity,
                    flags=[f for bit, f in ((b.IN_USE, "in-use"), (b.AUTO, "auto")) if b.flags & bit],
                )
                for b in bitmaps
            ]
    return spec


