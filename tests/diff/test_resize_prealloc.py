"""``vdkit-img resize --preallocation=...`` on qcow2 against ``qemu-img resize``.

The same starting image is resized by both tools; the results must agree in
every way qemu-img can observe (map, info, check, compare, file size,
allocated size) and byte for byte (``cmp``): where clusters land is decided
by QEMU's allocator, which vdkit replays.  Images are kept small so that
``full`` (which writes every new byte) stays cheap.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import check_ok, data_extents, qemu_img, vdkit_img
from tests.helpers.qemu_io import qio

MODES = ("metadata", "falloc", "full")
# ext4 may charge an extent-tree block to one file and not the other for the
# same extents: allocated sizes are compared with this much slack.
ALLOC_SLACK = 16 * 1024


def _info(path: Path) -> dict[str, object]:
    data = json.loads(check_ok("info", "--output=json", path.name, cwd=path.parent).stdout)
    data.pop("filename", None)
    data.pop("actual-size", None)  # compared separately, with slack
    return data


def _map(path: Path) -> str:
    return check_ok("map", "--output=json", path.name, cwd=path.parent).stdout


def _resize_both(cwd: Path, args: list[str], *, extra_files: tuple[str, ...] = ()) -> int:
    """Resize copies ``q.qcow2``/``v.qcow2`` of ``img.qcow2``; compare everything; return the exit code."""
    for who in ("q", "v"):
        shutil.copy(cwd / "img.qcow2", cwd / f"{who}.qcow2")
        for extra in extra_files:
            shutil.copy(cwd / extra, cwd / f"{who}.{extra}")
    q = qemu_img("resize", *[a.replace("IMG", "q.qcow2") for a in args], cwd=cwd)
    v = vdkit_img("resize", *[a.replace("IMG", "v.qcow2") for a in args], cwd=cwd)
    assert (v.returncode, v.stdout) == (q.returncode, q.stdout), (args, q.stderr, v.stderr)
    assert v.normalized_stderr().replace("v.qcow2", "q.qcow2") == q.stderr, args
    qf, vf = cwd / "q.qcow2", cwd / "v.qcow2"
    assert qf.stat().st_size == vf.stat().st_size, args
    assert qf.read_bytes() == vf.read_bytes(), f"image bytes differ for {args}"
    if q.returncode == 0:
        assert _map(vf) == _map(qf), args
        assert _info(vf) == _info(qf), args
        r = qemu_img("check", "--output=json", "v.qcow2", cwd=cwd)
        assert r.returncode == 0, r.stdout
        counts = json.loads(r.stdout)
        assert counts.get("leaks", 0) == 0 and counts.get("corruptions", 0) == 0, counts
        assert qemu_img("compare", "q.qcow2", "v.qcow2", cwd=cwd).returncode == 0, args
        if any(m in a for a in args for m in ("falloc", "full")):
            qa, va = qf.stat().st_blocks * 512, vf.stat().st_blocks * 512
            assert abs(qa - va) <= ALLOC_SLACK, (args, qa, va)
    return q.returncode


def _grown_content_ok(cwd: Path, before: Path, after: str) -> None:
    """The old guest content is kept and the new area reads as zeros."""
    raw = cwd / "expect.raw"
    check_ok("convert", "-O", "raw", before.name, raw.name, cwd=cwd)
    new_size = json.loads(check_ok("info", "--output=json", after, cwd=cwd).stdout)["virtual-size"]
    with raw.open("r+b") as f:
        f.truncate(new_size)
    assert qemu_img("compare", "-f", "raw", raw.name, after, cwd=cwd).returncode == 0


# (create options, size, qemu-io commands, snapshot?, new size)
CASES = [
    # old end inside an allocated cluster: kept by metadata, remapped (with COW) by falloc/full
    ("cluster_size=64k", "1000k", ["write -P 1 0 64k", "write -P 2 960k 40k"], False, "3000k"),
    # unallocated partial cluster, zero flag cluster, compressed cluster at the old end
    ("cluster_size=64k", "1000k", ["write -z 960k 40k"], False, "2M"),
    ("cluster_size=64k", "1000k", ["write -c -P 3 960k 40k"], False, "1100k"),
    # L1 growth, new L2 tables and new refcount blocks (the table itself grows for metadata)
    ("cluster_size=512", "64k", ["write -P 1 0 10k"], False, "8M"),
    ("cluster_size=4096,compat=0.10", "1M", ["write -P 1 0 100k"], False, "3M"),
    ("cluster_size=16k,extended_l2=on", "999k", ["write -P 1 990k 2k", "write -z 995k 3k"], False, "2M"),
    ("cluster_size=64k,extended_l2=on", "1025k", ["write -P 1 1024k 1k"], False, "2M"),
    ("cluster_size=64k,refcount_bits=1", "1M", ["write -P 1 0 64k"], False, "3M"),
    ("cluster_size=2M", "3M", ["write -P 1 2M 1M"], False, "5M"),
    # internal snapshot: the last cluster and its L2 table are shared and must be copied
    ("cluster_size=4096", "1000k", ["write -P 1 0 1000k"], True, "1500k"),
    ("cluster_size=64k,extended_l2=on", "1000k", ["write -P 1 0 1000k"], True, "2M"),
]


@pytest.mark.parametrize("opts,size,cmds,snap,new", CASES, ids=[f"{c[0]}-{c[1]}-{c[4]}" for c in CASES])
def test_prealloc_grow(workdir: Path, opts: str, size: str, cmds: list[str], snap: bool, new: str) -> None:
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", size, cwd=workdir)
    qio("img.qcow2", cmds, workdir)
    if snap:
        check_ok("snapshot", "-c", "s1", "img.qcow2", cwd=workdir)
    for mode in MODES:
        assert _resize_both(workdir, [f"--preallocation={mode}", "IMG", new]) == 0
        _grown_content_ok(workdir, workdir / "img.qcow2", "v.qcow2")


@pytest.mark.parametrize("opts", ["cluster_size=64k", "cluster_size=64k,extended_l2=on", "compat=0.10"])
def test_prealloc_over_longer_backing(workdir: Path, opts: str) -> None:
    """A backing file longer than the old size must not show through: zero flags, or allocated subclusters."""
    (workdir / "b.raw").write_bytes(b"\x09" * (4 << 20))
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, "-b", "b.raw", "-F", "raw", "img.qcow2", "1000k",
             cwd=workdir)
    qio("img.qcow2", ["write -P 1 0 64k"], workdir)
    for mode in ("off", *MODES):
        rc = _resize_both(workdir, [f"--preallocation={mode}", "IMG", "3M"])
        # v2 images have no zero flag: qemu-img fails (after preallocating) where it would need one
        assert rc == (1 if "compat=0.10" in opts and mode in ("off", "metadata") else 0)
    (workdir / "b.raw").write_bytes(b"\x09" * (900 << 10))  # shorter than the image: nothing to hide
    _resize_both(workdir, ["--preallocation=falloc", "IMG", "3M"])


def test_prealloc_data_file(workdir: Path) -> None:
    """External data file: host offset = guest offset, the data file grows with the mode (exactly, for off)."""
    check_ok("create", "-q", "-f", "qcow2", "-o", "data_file=img.data", "img.qcow2", "1000k", cwd=workdir)
    qio("img.qcow2", ["write -P 1 900k 100k"], workdir)
    for mode in ("off", *MODES):
        for who in ("q", "v"):
            shutil.copy(workdir / "img.data", workdir / f"{who}.data")
            shutil.copy(workdir / "img.qcow2", workdir / f"{who}.qcow2")
            check_ok("amend", "-f", "qcow2", "-o", f"data_file={who}.data", f"{who}.qcow2", cwd=workdir)
        q = qemu_img("resize", f"--preallocation={mode}", "q.qcow2", "3M", cwd=workdir)
        v = vdkit_img("resize", f"--preallocation={mode}", "v.qcow2", "3M", cwd=workdir)
        assert (v.returncode, v.stdout, v.stderr) == (q.returncode, q.stdout, q.stderr), mode
        q_img, v_img = (workdir / "q.qcow2").read_bytes(), (workdir / "v.qcow2").read_bytes()
        assert q_img.replace(b"q.data", b"v.data") == v_img, mode
        qd, vd = workdir / "q.data", workdir / "v.data"
        assert qd.read_bytes() == vd.read_bytes(), mode
        assert qd.stat().st_size == vd.stat().st_size, mode
        if mode in ("falloc", "full"):
            assert abs(qd.stat().st_blocks - vd.stat().st_blocks) * 512 <= ALLOC_SLACK, mode
        assert _map(workdir / "v.qcow2") == _map(workdir / "q.qcow2")
        assert qemu_img("check", "v.qcow2", cwd=workdir).returncode == 0


def test_prealloc_huge_metadata(workdir: Path) -> None:
    """1 TiB of metadata: 2048 L2 tables, 512 refcount blocks, a grown L1; a sparse file of ~1 TiB."""
    check_ok("create", "-q", "-f", "qcow2", "img.qcow2", "1G", cwd=workdir)
    qio("img.qcow2", ["write -P 1 0 64k"], workdir)
    shutil.copy(workdir / "img.qcow2", workdir / "q.qcow2")
    shutil.copy(workdir / "img.qcow2", workdir / "v.qcow2")
    assert qemu_img("resize", "--preallocation=metadata", "q.qcow2", "1T", cwd=workdir).returncode == 0
    assert vdkit_img("resize", "--preallocation=metadata", "v.qcow2", "1T", cwd=workdir).returncode == 0
    qf, vf = workdir / "q.qcow2", workdir / "v.qcow2"
    assert qf.stat().st_size == vf.stat().st_size
    # Reading 1 TiB of holes would take minutes: compare where data is, and that it is the same places.
    assert data_extents(qf) == data_extents(vf)
    with qf.open("rb") as a, vf.open("rb") as b:
        for start, end in data_extents(qf):
            a.seek(start)
            b.seek(start)
            assert a.read(end - start) == b.read(end - start), (start, end)
    assert _map(vf) == _map(qf)
    assert qemu_img("check", "v.qcow2", cwd=workdir).returncode == 0


def test_prealloc_errors(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "1M", cwd=workdir)
    check_ok("snapshot", "-c", "s", "v2.qcow2", cwd=workdir)
    check_ok("create", "-q", "-f", "qcow2", "img.qcow2", "1M", cwd=workdir)
    for args in (["--preallocation=metadata", "IMG", "+0"], ["--preallocation=falloc", "--shrink", "IMG", "512k"],
                 ["--preallocation=full", "IMG", "1M"], ["--preallocation=bogus", "IMG", "2M"],
                 ["--preallocation=metadata", "-f", "raw", "IMG", "2M"]):
        _resize_both(workdir, args)
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "img.qcow2", "1M", cwd=workdir)
    assert _resize_both(workdir, ["--preallocation=metadata", "IMG", "1T"]) == 1  # the L1 table would be too big
    shutil.copy(workdir / "v2.qcow2", workdir / "img.qcow2")
    assert _resize_both(workdir, ["--preallocation=metadata", "IMG", "2M"]) == 1


def test_prealloc_metadata_grows_refcount_table_as_qemu(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", "img.qcow2", "64k",
             cwd=workdir)
    qio("img.qcow2", ["write -P 1 0 10k"], workdir)
    _resize_both(workdir, ["--preallocation=metadata", "IMG", "20M"])
