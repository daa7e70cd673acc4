"""``vdkit-img commit`` against ``qemu-img commit``.

Identical chains are built in two folders; qemu-img commits in one, vdkit in
the other.  Messages and exit codes must match, every layer must show the
same guest content afterwards (qemu-img compare), the overlay must be
emptied to the same bytes, and qemu-img check must be clean everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, vdkit_img
from tests.helpers.qemu_io import qio


def _chain(d: Path, opts: str) -> None:
    d.mkdir()
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "l1.qcow2", "2M", cwd=d)
    qio("l1.qcow2", ["write -P 9 0 2M"], d)
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "-b", "l1.qcow2", "-F", "qcow2", "l2.qcow2", "3M", cwd=d)
    qio("l2.qcow2", ["write -P 1 100k 300k", "write -z 1M 64k", "write -P 2 2M 1M"], d)
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "-b", "l2.qcow2", "-F", "qcow2", "l3.qcow2", cwd=d)
    qio("l3.qcow2", ["write -P 3 1500k 100k", "discard 0 64k", "write -c -P 4 2560k 64k"], d)
    check_ok("convert", "-O", "raw", "l3.qcow2", "before.raw", cwd=d)


@pytest.mark.parametrize("args", [[], ["-d"], ["-b", "l1.qcow2"], ["-q"], ["-b", "nope"], ["-d", "-q"]])
@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "extended_l2=on"])
def test_commit(workdir: Path, args: list[str], opts: str) -> None:
    q, v = workdir / "q", workdir / "v"
    _chain(q, opts)
    _chain(v, opts)
    assert_same(["commit", *args, "l3.qcow2"], q, vdkit_cwd=v)
    for layer in ("l1.qcow2", "l2.qcow2", "l3.qcow2"):
        r = qemu_img("compare", "-q", str(q / layer), str(v / layer))
        assert r.returncode == 0, f"{layer} differs after commit {args}"
        assert qemu_img("check", layer, cwd=v).returncode == 0, layer
    assert qemu_img("compare", "-q", "before.raw", "l3.qcow2", cwd=v).returncode == 0
    if opts == "compat=1.1" and not args or args == ["-q"]:
        assert (q / "l3.qcow2").read_bytes() == (v / "l3.qcow2").read_bytes(), "emptied overlay differs"


def test_commit_usage(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "alone.qcow2", "1M", cwd=workdir)
    for args in (["alone.qcow2"], [], ["a", "b"], ["missing.qcow2"]):
        rq = qemu_img("commit", *args, cwd=workdir)
        rv = vdkit_img("commit", *args, cwd=workdir)
        assert (rv.returncode, rv.stdout, rv.normalized_stderr()) == (rq.returncode, rq.stdout, rq.stderr)


@pytest.mark.parametrize("args", [["r.raw"], ["-f", "raw", "r.raw"], ["-q", "r.raw"], ["-b", "x", "r.raw"],
                                  ["--image-opts", "file.filename=r.raw"],
                                  ["--image-opts", "driver=raw,file.filename=r.raw"]])
def test_commit_probed_raw(workdir: Path, args: list[str]) -> None:
    """A raw image opened writable without -f: qemu-img's three-line probing warning, then the error."""
    check_ok("create", "-q", "-f", "raw", "r.raw", "1M", cwd=workdir)
    rq = qemu_img("commit", *args, cwd=workdir)
    rv = vdkit_img("commit", *args, cwd=workdir)
    assert (rv.returncode, rv.stdout, rv.normalized_stderr()) == (rq.returncode, rq.stdout, rq.stderr)
    assert rq.returncode == 1


@pytest.mark.parametrize("damage", ["missing", "garbage", "loop"])
@pytest.mark.parametrize("args", [[], ["-b", "l2.qcow2"], ["--image-opts", "file.filename=l3.qcow2"]])
def test_commit_chain_open_errors(workdir: Path, damage: str, args: list[str]) -> None:
    """A layer below the top that cannot be opened: qemu-img names the top, then 'Could not open
    backing file: ' once per level (the whole chain is one open), not the layer itself."""
    results = []
    for who, tool in (("q", qemu_img), ("v", vdkit_img)):
        d = workdir / who
        _chain(d, "compat=1.1")
        if damage == "missing":
            (d / "l1.qcow2").unlink()
        elif damage == "garbage":
            (d / "l2.qcow2").write_bytes(b"QFI\xfb" + bytes(60))
        else:
            check_ok("rebase", "-u", "-F", "qcow2", "-b", "l3.qcow2", "l1.qcow2", cwd=d)
        top = [] if args[:1] == ["--image-opts"] else ["l3.qcow2"]
        results.append(tool("commit", *args, *top, cwd=d))
    rq, rv = results
    assert rq.returncode == 1
    assert (rv.returncode, rv.stdout, rv.normalized_stderr()) == (rq.returncode, rq.stdout, rq.stderr)
