"""bochs (growing redolog, read-only): vdkit-img against qemu-img 7.2 on images built here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.formats.images import bochs_image
from tests.formats.ro_diff import assert_same, run_sweep, same_read_side, same_refusals
from tests.helpers.patching import patched_copy


def pattern(size: int) -> bytes:
    """The reference's pattern, scaled: data, zeros, a lone sector, a data tail."""
    disk = bytearray(size)
    disk[0:65536] = b"\xaa" * 65536
    disk[size // 3:size // 3 + 5000] = b"\x55" * 5000
    disk[-512:] = b"\x11" * 512
    return bytes(disk)


VARIANTS = {
    "v2": {},
    "v1": {"version": 1},
    "small-extent": {"extent": 512},
    "big-extent": {"extent": 1 << 20},
    "full-bitmap": {"allocate_zero_extents": True, "extent": 4096},
    "oversized-catalog": {"catalog": 100},
    "odd-bitmap": {"bitmap": 1},
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bochs")
    disk = pattern(1 << 20)
    (d / "src.raw").write_bytes(disk)
    for name, kw in VARIANTS.items():
        bochs_image(d / f"{name}.bochs", disk, **kw)
    return d


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_read_side(images: Path, variant: str) -> None:
    same_read_side(images, f"{variant}.bochs", "bochs", full=variant == "v2")


def test_refusals(images: Path) -> None:
    same_refusals(images, "v2.bochs", "bochs")


def _patched(d: Path, name: str, *fields: tuple[int, str, int]) -> str:
    patched_copy(d / "v2.bochs", d / name, fields)
    return name


BAD_HEADERS = {
    "version3": [(64, "<I", 0x00030000)],  # not bochs: probed as raw, refused with -f bochs
    "v1-sized": [(64, "<I", 0x00010000)],
    "catalog-too-large": [(72, "<I", (1 << 20) + 1)],
    "catalog-max": [(72, "<I", 1 << 20)],
    "catalog-too-small": [(72, "<I", 1)],
    "extent-zero": [(80, "<I", 0)],
    "extent-511": [(80, "<I", 511)],
    "extent-odd": [(80, "<I", 513)],
    "extent-16M": [(80, "<I", 16 << 20)],
    "extent-8M": [(80, "<I", 8 << 20)],
    "both-bad": [(72, "<I", 1 << 21), (80, "<I", 0)],
    "disk-zero": [(88, "<Q", 0)],
    "disk-1000": [(88, "<Q", 1000)],
    "disk-huge": [(88, "<Q", 1 << 63)],
    "header-0": [(68, "<I", 0)],
    "header-far": [(68, "<I", 0xFFFFFF00)],
    "bitmap-0": [(76, "<I", 0)],
    "bitmap-huge": [(76, "<I", 0x80000000)],
    "catalog-entry-far": [(512, "<I", 0x7FFFFFFF)],
    "catalog-entry-0": [(512 + 4, "<I", 0)],
    "magic": [(3, "<B", 0x20)],
    "magic-nul": [(22, "<B", 0x20)],
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_headers(images: Path, case: str) -> None:
    name = _patched(images, f"bad-{case}.bochs", *BAD_HEADERS[case])
    for args in (["info"], ["info", "-f", "bochs"], ["info", "--output=json", "-f", "bochs"]):
        assert_same([*args, name], images)
    assert_same(["compare", "-f", "bochs", "-F", "raw", name, "src.raw"], images)


def test_damage_sweep(images: Path) -> None:
    run_sweep(images, images / "v2.bochs", "bochs", range(15), 512 + 4 * 32 + 64)
