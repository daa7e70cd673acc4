"""``vdkit-img resize`` against ``qemu-img resize``: same messages, same resulting bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_img, vdkit_img
from tests.helpers.qemu_io import qio


def _resize_both(cwd: Path, src: str, args: list[str]) -> None:
    ext = src.rsplit(".", 1)[1]
    shutil.copy(cwd / src, cwd / f"q.{ext}")
    shutil.copy(cwd / src, cwd / f"v.{ext}")
    q = qemu_img("resize", *[a.replace("IMG", f"q.{ext}") for a in args], cwd=cwd)
    v = vdkit_img("resize", *[a.replace("IMG", f"v.{ext}") for a in args], cwd=cwd)
    assert v.stdout == q.stdout, (args, q.stderr, v.stderr)
    assert v.normalized_stderr().replace("v.", "q.") == q.stderr, args
    assert v.returncode == q.returncode, args
    assert (cwd / f"q.{ext}").read_bytes() == (cwd / f"v.{ext}").read_bytes(), f"image bytes differ for {args}"
    if ext == "qcow2" and q.returncode == 0:
        assert qemu_img("check", f"v.{ext}", cwd=cwd).returncode == 0


SIZES = [["IMG", "+1M"], ["IMG", "64M"], ["IMG", "1G"], ["--shrink", "IMG", "2M"], ["--shrink", "IMG", "-3M"],
         ["--shrink", "IMG", "5121k"], ["--shrink", "IMG", "512"], ["IMG", "3M"], ["IMG", "+1000"],
         ["-q", "IMG", "+0"], ["--preallocation=full", "IMG", "-1k"], ["--preallocation=foo", "IMG", "+1k"],
         ["IMG", "-20M"], ["IMG", "20E"], ["IMG", "x1"]]


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=512", "cluster_size=4096,compat=0.10",
                                  "extended_l2=on,cluster_size=16k", "refcount_bits=1"])
def test_resize_qcow2(workdir: Path, opts: str) -> None:
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", "8M", cwd=workdir)
    qio("img.qcow2", ["write -P 1 0 1M", "write -P 2 5M 2M", "write -z 4M 64k", "write -P 3 7M 512"], workdir)
    if "refcount_bits=1" not in opts:
        check_ok("snapshot", "-c", "s", "img.qcow2", cwd=workdir)
        qio("img.qcow2", ["write -P 4 6M 64k"], workdir)
    for args in SIZES:
        _resize_both(workdir, "img.qcow2", ["-f", "qcow2", *args])


def test_resize_raw(workdir: Path) -> None:
    (workdir / "img.raw").write_bytes(b"\x07" * 3000)
    for args in SIZES:
        _resize_both(workdir, "img.raw", ["-f", "raw", *args])
    _resize_both(workdir, "img.raw", ["IMG", "+512"])  # probed raw: the warning first


def test_resize_usage(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "img.qcow2", "1M", cwd=workdir)
    for args in (["IMG"], ["IMG", "1M", "2M"], ["IMG", "-f", "qcow2"], ["missing.qcow2", "1M"]):
        _resize_both(workdir, "img.qcow2", args)
