"""Source images for the data-path differential tests, all written by qemu-img/qemu-io."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import check_ok
from tests.helpers.qemu_io import qio

MIXED = ["write -P 0x11 0 64k", "write -P 0x22 192k 8k", "write -z 320k 128k", "write -P 0x33 512k 64k",
         "discard 512k 64k", "write -P 0x44 1M 300k", "write -z 1536k 4k", "write -c -P 0x55 2M 64k",
         "write -c -P 0x66 2112k 64k", "write -P 0x77 3M 1k", "write -P 0 3200k 64k"]


def build(kind: str, cwd: Path) -> str:
    """Make image ``kind`` in ``cwd``; returns the file name to open."""
    if kind in ("v3", "v2", "zstd", "extl2", "c4k"):
        opts = {"v3": "compat=1.1", "v2": "compat=0.10", "zstd": "compression_type=zstd",
                "extl2": "extended_l2=on", "c4k": "cluster_size=4096"}[kind]
        check_ok("create", "-q", "-f", "qcow2", "-o", opts, f"{kind}.qcow2", "4M", cwd=cwd)
        qio(f"{kind}.qcow2", MIXED, cwd)
        return f"{kind}.qcow2"
    if kind == "raw":
        check_ok("create", "-q", "-f", "raw", "src.raw", "3M", cwd=cwd)
        qio("src.raw", ["write -P 1 0 100k", "write -P 0 100k 8k", "write -P 2 1M 3k", "write -P 3 2047k 2k"],
            cwd, fmt="raw")
        return "src.raw"
    if kind == "chain":
        check_ok("create", "-q", "-f", "raw", "base.raw", "1M", cwd=cwd)
        qio("base.raw", ["write -P 1 0 1M"], cwd, fmt="raw")
        check_ok("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw",
                 "mid.qcow2", "3M", cwd=cwd)
        qio("mid.qcow2", ["write -P 2 512k 1M", "write -c -P 4 2M 64k"], cwd)
        check_ok("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "4M", cwd=cwd)
        qio("top.qcow2", ["write -P 3 700k 100k", "write -z 0 64k", "write -P 5 3M 64k", "discard 1M 64k"], cwd)
        return "top.qcow2"
    if kind == "datafile":
        check_ok("create", "-q", "-f", "qcow2", "-o", "data_file=df.bin", "df.qcow2", "2M", cwd=cwd)
        qio("df.qcow2", ["write -P 1 0 64k", "write -P 2 1M 100k", "write -z 1536k 64k"], cwd)
        return "df.qcow2"
    if kind == "snap":
        check_ok("create", "-q", "-f", "qcow2", "snap.qcow2", "2M", cwd=cwd)
        qio("snap.qcow2", ["write -P 1 0 1M", "write -c -P 9 1M 64k"], cwd)
        check_ok("snapshot", "-c", "first", "snap.qcow2", cwd=cwd)
        qio("snap.qcow2", ["write -P 2 64k 64k", "write -z 0 64k"], cwd)
        check_ok("snapshot", "-c", "1", "snap.qcow2", cwd=cwd)  # a *name* that looks like an ID
        qio("snap.qcow2", ["write -P 3 512k 64k"], cwd)
        return "snap.qcow2"
    raise ValueError(kind)


KINDS = ["v3", "v2", "zstd", "extl2", "c4k", "raw", "chain", "datafile", "snap"]
