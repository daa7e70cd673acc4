"""cloop (V2.0, read-only): vdkit-img against qemu-img 7.2 on images built here."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.formats.images import cloop_image
from tests.formats.ro_diff import assert_same, run_sweep, same_read_side, same_refusals
from tests.formats.test_bochs import pattern
from tests.helpers.patching import patched_copy

VARIANTS = {
    "b64k": {},
    "b512": {"block_size": 512},
    "b1m": {"block_size": 1 << 20},
    "stored": {"level": 0, "block_size": 4096},
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cloop")
    disk = pattern(1 << 20)
    (d / "src.raw").write_bytes(disk)
    for name, kw in VARIANTS.items():
        cloop_image(d / f"{name}.cloop", disk, **kw)
    return d


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_read_side(images: Path, variant: str) -> None:
    same_read_side(images, f"{variant}.cloop", "cloop", full=variant == "b64k")


def test_refusals(images: Path) -> None:
    same_refusals(images, "b64k.cloop", "cloop")


def _patched(d: Path, name: str, *fields: tuple[int, str, int], base: str = "b64k.cloop") -> str:
    patched_copy(d / base, d / name, fields)
    return name


BAD_HEADERS = {
    "bs-zero": [(128, ">I", 0)],
    "bs-100": [(128, ">I", 100)],
    "bs-512": [(128, ">I", 512)],  # opens; reading inflates to the wrong size: I/O error
    "bs-64M": [(128, ">I", 64 << 20)],
    "bs-128M": [(128, ">I", 128 << 20)],
    "n-zero": [(132, ">I", 0)],
    "n-one": [(132, ">I", 1)],
    "n-17": [(132, ">I", 17)],
    "n-big-in-limit": [(132, ">I", 0x3FFFFFF)],
    "n-too-many-offsets": [(132, ">I", 0x4000000)],
    "n-wraps": [(132, ">I", 0x1FFFFFFF)],
    "n-max": [(132, ">I", 0xFFFFFFFF)],
    "first-zero": [(136, ">Q", 0)],
    "first-backwards": [(136, ">Q", 100000)],
    "second-zero": [(144, ">Q", 0)],
    "second-huge": [(144, ">Q", 0xFFFFFFFFFFFF)],
    "second-short": [(144, ">Q", 300)],
    "block-128M": [(144 + 8 * 15, ">Q", (128 << 20) + 1000)],
    "magic-tail": [(100, ">B", 0x20)],
    "magic": [(20, ">B", 0x20)],
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_headers(images: Path, case: str) -> None:
    name = _patched(images, f"bad-{case}.cloop", *BAD_HEADERS[case])
    for args in (["info"], ["info", "-f", "cloop", "--output=json"]):
        assert_same([*args, name], images)
    assert_same(["compare", "-f", "cloop", "-F", "raw", name, "src.raw"], images)


def test_corrupt_stream(images: Path) -> None:
    """A damaged zlib stream in one block: the read of that block fails, as in qemu-img."""
    data = bytearray((images / "b64k.cloop").read_bytes())
    off = struct.unpack_from(">Q", data, 136 + 8 * 4)[0]
    data[off + 10:off + 20] = b"\xff" * 10
    (images / "zbad.cloop").write_bytes(bytes(data))
    assert_same(["compare", "src.raw", "zbad.cloop"], images)
    assert_same(["convert", "-O", "raw", "zbad.cloop", "zbad.raw"], images)


def test_damage_sweep(images: Path) -> None:
    run_sweep(images, images / "b64k.cloop", "cloop", range(20), 136 + 8 * 17 + 32)
