"""``vdkit-img rebase`` against ``qemu-img rebase``: same bytes, same messages, same guest view."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_img, vdkit_img
from tests.helpers.qemu_io import qio


def _chain(d: Path, opts: str) -> None:
    """old.qcow2 (3M) ← top.qcow2 (4M); new.raw (2M) and new.qcow2 (5M) as rebase targets."""
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "old.qcow2", "3M", cwd=d)
    qio("old.qcow2", ["write -P 1 0 2M", "write -z 512k 64k", "write -P 5 2560k 4k"], d)
    check_ok("create", "-q", "-f", "raw", "new.raw", "2M", cwd=d)
    qio("new.raw", ["write -P 1 0 1M", "write -P 2 1M 512k"], d, fmt="raw")
    check_ok("create", "-q", "-f", "qcow2", "new.qcow2", "5M", cwd=d)
    qio("new.qcow2", ["write -P 1 0 3M", "write -P 7 4M 64k"], d)
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "-b", "old.qcow2", "-F", "qcow2", "top.qcow2", "4M",
             cwd=d)
    qio("top.qcow2", ["write -P 3 1536k 64k", "write -z 100k 8k", "write -P 4 3M 100k"], d)


def _rebase_both(d: Path, args: list[str]) -> None:
    shutil.copy(d / "top.qcow2", d / "q.qcow2")
    shutil.copy(d / "top.qcow2", d / "v.qcow2")
    q = qemu_img("rebase", *args, "q.qcow2", cwd=d)
    v = vdkit_img("rebase", *args, "v.qcow2", cwd=d)
    assert (v.returncode, v.stdout) == (q.returncode, q.stdout), (args, q.stderr, v.stderr)
    assert v.normalized_stderr().replace("v.qcow2", "q.qcow2") == q.stderr, args
    assert (d / "q.qcow2").read_bytes() == (d / "v.qcow2").read_bytes(), f"image bytes differ for {args}"
    if q.returncode == 0:
        assert qemu_img("check", "v.qcow2", cwd=d).returncode == 0
        if "-u" not in args:  # a safe rebase never changes what the guest sees
            assert qemu_img("compare", "top.qcow2", "v.qcow2", cwd=d).returncode == 0


@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "cluster_size=4096", "extended_l2=on"])
def test_rebase(workdir: Path, opts: str) -> None:
    _chain(workdir, opts)
    for args in (["-b", "new.raw", "-F", "raw"], ["-b", "new.qcow2", "-F", "qcow2"], ["-b", ""],
                 ["-p", "-b", "new.qcow2", "-F", "qcow2"], ["-u", "-b", "new.raw", "-F", "raw"],
                 ["-u", "-b", ""], ["-b", "new.raw"], ["-u", "-b", "new.raw"], []):
        _rebase_both(workdir, args)


def test_rebase_errors(workdir: Path) -> None:
    _chain(workdir, "compat=1.1")
    _rebase_both(workdir, ["-b", "missing.qcow2", "-F", "qcow2"])
    _rebase_both(workdir, ["-c", "-u", "-b", "new.raw", "-F", "raw"])  # -c (compressed) is newer than 7.2
    (workdir / "old.qcow2").unlink()
    _rebase_both(workdir, ["-b", "new.raw", "-F", "raw"])  # old backing is gone: safe mode fails
    _rebase_both(workdir, ["-u", "-b", "new.raw", "-F", "raw"])  # unsafe mode does not need it


@pytest.mark.parametrize("args", [
    ["-u", "-b", "base.qcow2", "-F", "qcow2", "r.raw"], ["-u", "-b", "base.qcow2", "-F", "qcow2", "-f", "raw", "r.raw"],
    ["-u", "-b", "", "r.raw"], ["-b", "", "r.raw"], ["-b", "base.qcow2", "r.raw"], ["-u", "-b", "nope", "r.raw"],
    ["-b", "nope", "-F", "raw", "r.raw"], ["-U", "-u", "-b", "base.qcow2", "-F", "qcow2", "r.raw"],
    ["--image-opts", "-u", "-b", "base.qcow2", "-F", "qcow2", "file.filename=r.raw"],
    ["--image-opts", "-u", "-b", "base.qcow2", "-F", "qcow2", "driver=raw,file.filename=r.raw"],
    ["-u", "-b", "x", "q.qed"], ["-u", "-b", "x", "k.vmdk"], ["-u", "-b", "x", "-F", "raw", "k.vmdk"],
    ["-u", "-b", "", "-F", "qcow2", "-f", "raw", "r.raw"],
])
def test_rebase_other_formats(workdir: Path, args: list[str]) -> None:
    """A probed raw image opened writable: qemu-img's three-line warning first; a new backing file
    without -F is refused ('backing format must be specified') before the format is asked whether it
    can change its backing file at all (raw, vmdk: not supported; qed: supported)."""
    src = workdir / "src"
    src.mkdir()
    check_ok("create", "-q", "-f", "qcow2", "base.qcow2", "1M", cwd=src)
    for fmt, name in (("raw", "r.raw"), ("qed", "q.qed"), ("vmdk", "k.vmdk")):
        check_ok("create", "-q", "-f", fmt, name, "1M", cwd=src)
    results, images = [], []
    for who, tool in (("q", qemu_img), ("v", vdkit_img)):
        d = workdir / who
        shutil.copytree(src, d)  # the same bytes (a vmdk's CID is random)
        results.append(tool("rebase", *args, cwd=d))
        images.append((d / args[-1].rpartition("=")[2]).read_bytes())
    rq, rv = results
    bq, bv = images
    assert rq.returncode == 1
    assert (rv.returncode, rv.stdout, rv.normalized_stderr()) == (rq.returncode, rq.stdout, rq.stderr)
    assert bv == bq
