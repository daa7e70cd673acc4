"""L1/L2 access: entry classification and lookup against ``qemu-img map``, L1 growth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_img, qemu_io
from vdkit.block.driver import DATA, OFFSET_VALID
from vdkit.block.node import open_image
from vdkit.formats.qcow2.cluster import Geometry
from vdkit.formats.qcow2.driver import Qcow2Driver
from vdkit.formats.qcow2.layout import ClusterType


def test_compressed_descriptor_decoding() -> None:
    # the verified example of the format doc §7.4 (64 KiB clusters)
    g = Geometry(16)
    assert g.csize_shift == 54
    assert g.compressed_range(0x400000000006004F) == (0x6004F, 512 - 0x4F)
    assert g.classify(0x400000000006004F) == ClusterType.COMPRESSED
    assert g.classify(0x8000000000050000) == ClusterType.NORMAL
    assert g.classify(0x0000000000050001) == ClusterType.ZERO_ALLOC
    assert g.classify(0x1) == ClusterType.ZERO_PLAIN
    assert g.classify(0) == ClusterType.UNALLOCATED
    x = Geometry(16, extended_l2=True)
    assert x.classify(0, 0xFFFFFFFF00000000) == ClusterType.ZERO_PLAIN
    assert x.subcluster_type(0x8000000000050000, 0x3, 1) == ClusterType.NORMAL
    assert x.subcluster_type(0x8000000000050000, 0x3, 2) == ClusterType.UNALLOCATED


@pytest.mark.parametrize("opts", ["cluster_size=4k", "extended_l2=on", "compat=0.10"])
def test_block_status_matches_qemu_map(tmp_path: Path, opts: str) -> None:
    """The first and last byte of every run qemu-img maps, as the driver's block status answers them."""
    img = tmp_path / "m.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, str(img), "4M")
    for cmd in ("write -P 1 0 64k", "write -z 128k 64k", "write -c -P 2 1M 64k", "write -P 3 3M 4k"):
        assert qemu_io("-c", cmd, str(img)).returncode == 0
    runs = json.loads(check_ok("map", "--output=json", str(img)).stdout)
    with open_image(str(img), "qcow2") as node:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        for run in runs:
            for probe in (run["start"], run["start"] + run["length"] - 1):
                st = drv.block_status(probe, 1)
                if run["data"] and "offset" in run:
                    assert st.flags & DATA and st.flags & OFFSET_VALID
                    assert st.offset == run["offset"] + (probe - run["start"])
                elif run["data"]:  # compressed: data at no plain offset
                    assert st.flags & DATA and not st.flags & OFFSET_VALID
                else:  # zero clusters, or unallocated without a backing file
                    assert not st.flags & DATA


def test_grow_l1(tmp_path: Path) -> None:
    img = tmp_path / "g.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "64M")
    assert qemu_io("-c", "write -P 1 0 64k", str(img)).returncode == 0
    node = open_image(str(img), "qcow2", readonly=False)
    try:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        drv.clusters.grow_l1(5, drv.refcounts)
        assert drv.clusters.l1_size == 5  # x1.5 rounded up: 1, 2, 3, 5
        drv.clusters.grow_l1(9, drv.refcounts, exact=True)
        assert drv.clusters.l1_size == drv.header.l1_size == 9
    finally:
        node.close()
    info = json.loads(check_ok("info", "--output=json", str(img)).stdout)
    assert info["virtual-size"] == 64 * 1024 * 1024
    assert int.from_bytes(img.read_bytes()[36:40], "big") == 9
    r = qemu_img("check", str(img))
    assert r.returncode == 0, r.stdout + r.stderr
    assert qemu_io("-c", "read -P 1 0 64k", str(img)).returncode == 0
