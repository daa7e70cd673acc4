"""Differential tests: ``vdkit-img snapshot -c/-a/-d`` against ``qemu-img snapshot``.

Each scenario runs the same command sequence with qemu-img on one copy of an
image and with vdkit-img on another, and after every step compares exit
code, stdout and stderr, the snapshot lists (dates aside), ``qemu-img check``
and the guest-visible content of the active layer and of every snapshot.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, qemu_io, require_tool, vdkit_img
from tests.helpers.patching import get_u64, set_u64
from tests.helpers.qemu_io import qemu_io_script


def make_image(path: Path, opts: str = "", size: str = "8M", writes: tuple[str, ...] = ()) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    check_ok(*args, str(path), size)
    for w in writes:
        r = qemu_io("-c", w, str(path))
        assert r.returncode == 0, r.stderr
    return path


def snapshot_list(path: Path) -> list[dict[str, object]]:
    info = json.loads(check_ok("info", "--output=json", "-U", str(path)).stdout)
    out = []
    for s in info.get("snapshots", []):
        s = dict(s)
        s.pop("date-sec")
        s.pop("date-nsec")
        out.append(s)
    return out


def check_counts(path: Path) -> tuple[int, dict[str, int]]:
    r = qemu_img("check", "--output=json", str(path))
    data = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    keys = ("corruptions", "leaks", "check-errors")
    return r.returncode, {k: int(data.get(k, 0)) for k in keys}


def guest(path: Path, snapshot_id: str | None = None) -> bytes:
    out = path.with_suffix(f".{snapshot_id or 'active'}.raw")
    args = ["convert", "-U", "-O", "raw"]
    if snapshot_id is not None:
        args += ["-l", f"snapshot.id={snapshot_id}"]
    check_ok(*args, str(path), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def assert_equivalent(q: Path, v: Path, *, vdkit_clean: bool = True) -> None:
    """Same snapshots, same guest content; vdkit's image passes check cleanly."""
    assert snapshot_list(v) == snapshot_list(q)
    # vdkit reads back what it wrote exactly as qemu-img does
    assert_same(["snapshot", "-l", v.name], cwd=v.parent)
    assert_same(["info", "--output=json", v.name], cwd=v.parent)
    rc, counts = check_counts(v)
    if vdkit_clean:
        assert (rc, counts) == (0, {"corruptions": 0, "leaks": 0, "check-errors": 0}), counts
    else:
        assert rc in (0, 3) and counts["corruptions"] == 0
    assert guest(v) == guest(q)
    for s in snapshot_list(q):
        assert guest(v, str(s["id"])) == guest(q, str(s["id"]))


def run_both(q: Path, v: Path, *args: str) -> int:
    """Run one snapshot command on both copies; outputs must agree."""
    rq = qemu_img("snapshot", *args, str(q.name), cwd=q.parent)
    rv = vdkit_img("snapshot", *args, str(v.name), cwd=v.parent)
    stderr_v = rv.normalized_stderr().replace(v.name, q.name)
    assert (rv.returncode, rv.stdout, stderr_v) == (rq.returncode, rq.stdout, rq.stderr), args
    return rq.returncode


def pair(tmp_path: Path, base: Path) -> tuple[Path, Path]:
    q = tmp_path / "q" / "img.qcow2"
    v = tmp_path / "v" / "img.qcow2"
    for p in (q, v):
        p.parent.mkdir(exist_ok=True)
        shutil.copy(base, p)
    return q, v


def io_both(q: Path, v: Path, cmd: str) -> None:
    for p in (q, v):
        qemu_io_script(None, str(p), [cmd], None)


IMAGE_KINDS = {
    "v3": ("", "8M"),
    "v2": ("compat=0.10", "8M"),
    "c512-rb8": ("cluster_size=512,refcount_bits=8", "1M"),
    "extl2": ("extended_l2=on,cluster_size=16k", "8M"),
    "rb64": ("refcount_bits=64,cluster_size=4k", "2M"),
    "lazy": ("lazy_refcounts=on", "8M"),
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_create_write_revert_delete(tmp_path: Path, kind: str) -> None:
    opts, size = IMAGE_KINDS[kind]
    base = make_image(tmp_path / "base.qcow2", opts, size,
                      ("write -P 0x11 0 96k", "write -c -P 0x22 256k 64k", "write -z 512k 64k"))
    q, v = pair(tmp_path, base)
    # with 512-byte clusters and 8-bit refcounts QEMU's revert overflows transiently
    # (it counts the snapshot tree up before the old tree down); vdkit fails the same way
    expect = 1 if kind == "c512-rb8" else 0
    assert run_both(q, v, "-c", "s1") == 0
    assert_equivalent(q, v)
    io_both(q, v, "write -P 0x33 4k 8k")
    io_both(q, v, "write -P 0x44 300k 4k")
    assert run_both(q, v, "-c", "s2") == 0
    io_both(q, v, "write -P 0x55 0 4k")
    assert_equivalent(q, v)
    assert run_both(q, v, "-a", "s1") == expect
    assert_equivalent(q, v, vdkit_clean=True)
    io_both(q, v, "write -P 0x66 64k 64k")
    assert run_both(q, v, "-a", "2") == expect  # by ID
    assert_equivalent(q, v)
    assert run_both(q, v, "-d", "s1") == 0
    assert_equivalent(q, v)
    assert run_both(q, v, "-d", "s2") == 0
    assert_equivalent(q, v)
    assert snapshot_list(v) == []


def test_ids_names_and_lookup_rules(tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.qcow2", writes=("write -P 1 0 64k",))
    q, v = pair(tmp_path, base)
    for name in ("a", "b", "c"):
        assert run_both(q, v, "-c", name) == 0
    assert run_both(q, v, "-d", "c") == 0
    assert run_both(q, v, "-c", "d") == 0  # ID 3 again
    assert run_both(q, v, "-d", "a") == 0
    assert run_both(q, v, "-c", "e") == 0  # ID 4
    assert run_both(q, v, "-c", "2") == 0  # a name that looks like an ID
    assert run_both(q, v, "-c", "") == 0  # empty name is accepted
    assert run_both(q, v, "-c", "b") == 0  # duplicate name
    assert run_both(q, v, "-c", "n" * 300) == 0  # truncated to 255 bytes
    assert_equivalent(q, v)
    assert run_both(q, v, "-d", "2") == 0  # the snapshot *named* "2" (by name only)
    assert run_both(q, v, "-d", "3") == 1  # ID only: not found
    assert run_both(q, v, "-d", "b") == 0  # first of two "b"
    assert run_both(q, v, "-a", "nonexist") == 1
    assert run_both(q, v, "-d", "nonexist") == 1
    assert run_both(q, v, "-d", "n" * 300) == 1  # untruncated lookup fails like QEMU's
    assert run_both(q, v, "-d", "n" * 255) == 0
    assert run_both(q, v, "-a", "e") == 0
    assert_equivalent(q, v)


def test_no_action_opens_read_write(tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.qcow2", writes=("write -P 1 0 4k",))
    q, v = pair(tmp_path, base)
    assert run_both(q, v) == 0
    assert run_both(q, v, "-U") == 1  # force-share needs a read-only open
    assert run_both(q, v, "-U", "-c", "x") == 1
    assert v.read_bytes() == base.read_bytes()


@pytest.mark.parametrize("bits", [1, 2])
def test_refcount_overflow(tmp_path: Path, bits: int) -> None:
    base = make_image(tmp_path / "base.qcow2", f"refcount_bits={bits}", "1M", ("write -P 7 0 4k",))
    q, v = pair(tmp_path, base)
    for name in ("s1", "s2", "s3"):
        rc = run_both(q, v, "-c", name)
        # QEMU leaks the clusters of a failed attempt; vdkit's failure leaves nothing behind
        assert_equivalent(q, v, vdkit_clean=True)
        if rc:
            break
    assert rc == 1


def test_corrupt_image_refused(tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.qcow2", writes=("write -P 1 0 4k",))
    set_u64(base, 72, get_u64(base, 72) | 2)  # incompatible features: corrupt
    q, v = pair(tmp_path, base)
    for args in (("-c", "x"), ("-a", "x"), ("-d", "x"), ()):
        assert run_both(q, v, *args) == 1
    assert v.read_bytes() == base.read_bytes()


def test_data_file_image(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "data_file=base.data", str(base), "1M", cwd=tmp_path)
    q = tmp_path / "q.qcow2"
    for p in (q,):
        shutil.copy(base, p)
    rq = qemu_img("snapshot", "-c", "x", "q.qcow2", cwd=tmp_path)
    rv = vdkit_img("snapshot", "-c", "x", "base.qcow2", cwd=tmp_path)
    assert rv.returncode == rq.returncode == 1
    assert rv.normalized_stderr() == rq.stderr


def test_write_lock_conflict(tmp_path: Path) -> None:
    img = make_image(tmp_path / "lk.qcow2")
    # qemu-io waiting for commands on a pipe holds the image open read-write.  Probing
    # the lock while qemu-io takes it can make qemu-io fail, so (re)start until it holds.
    proc = None
    for _ in range(20):
        proc = subprocess.Popen([require_tool("qemu-io"), str(img)], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        if proc.poll() is None and "lock" in qemu_img("info", str(img)).stderr:
            break
        assert proc.stdin is not None
        proc.stdin.close()
        proc.kill()
        proc.wait()
    assert proc is not None
    try:
        before = img.read_bytes()
        rq = qemu_img("snapshot", "-c", "x", "lk.qcow2", cwd=tmp_path)
        rv = vdkit_img("snapshot", "-c", "x", "lk.qcow2", cwd=tmp_path)
        assert rq.returncode == rv.returncode == 1
        assert 'Failed to get "write" lock' in rq.stderr
        assert rv.normalized_stderr() == rq.stderr
        assert img.read_bytes() == before
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.kill()
        proc.wait()


def test_backing_chain_snapshot(tmp_path: Path) -> None:
    base = make_image(tmp_path / "b.qcow2", writes=("write -P 9 0 1M",))
    top = tmp_path / "base.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(top), cwd=tmp_path)
    assert qemu_io("-c", "write -P 8 64k 4k", str(top)).returncode == 0
    q = tmp_path / "q.qcow2"
    v = tmp_path / "v.qcow2"
    shutil.copy(top, q)
    shutil.copy(top, v)
    assert base.exists()
    assert run_both(q, v, "-c", "s") == 0
    io_both(q, v, "write -P 7 0 128k")
    assert run_both(q, v, "-a", "s") == 0
    assert_equivalent(q, v)


def test_revert_to_smaller_disk_size(tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.qcow2", size="1M", writes=("write -P 1 0 64k",))
    check_ok("snapshot", "-c", "small", str(base))
    check_ok("resize", "-q", str(base), "600M")
    assert qemu_io("-c", "write -P 2 500M 64k", str(base)).returncode == 0
    q, v = pair(tmp_path, base)
    assert run_both(q, v, "-a", "small") == 0
    assert_equivalent(q, v)
    assert run_both(q, v, "-c", "after") == 0
    assert_equivalent(q, v)


def test_unknown_autoclear_bits_cleared_on_write_open(tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.qcow2", writes=("write -P 1 0 4k",))
    set_u64(base, 88, 1 << 40)  # autoclear features
    q, v = pair(tmp_path, base)
    assert run_both(q, v, "-c", "s") == 0
    assert_equivalent(q, v)
    assert v.read_bytes()[88:96] == q.read_bytes()[88:96] == bytes(8)


def test_dirty_image(tmp_path: Path) -> None:
    """A lazy-refcount image left dirty: repaired first (as QEMU) or refused, never written blindly."""
    import importlib.util

    base = make_image(tmp_path / "base.qcow2", "lazy_refcounts=on", "1M")
    qemu_io("-c", "write -P 1 0 64k", "-c", "sigraise 9", str(base))
    assert "cleanly shut down: no" in check_ok("info", str(base)).stdout
    q, v = pair(tmp_path, base)
    rq = qemu_img("snapshot", "-c", "s", str(q))
    rv = vdkit_img("snapshot", "-c", "s", str(v))
    assert rq.returncode == 0
    if importlib.util.find_spec("vdkit.formats.qcow2.check") is None:
        assert rv.returncode == 1 and rv.stderr.count("\n") == 1 and "dirty" in rv.stderr
        assert v.read_bytes() == base.read_bytes()
    else:
        assert rv.returncode == 0
        assert rv.stderr == rq.stderr  # the repair's messages, as QEMU prints them
        assert_equivalent(q, v)


def test_lying_refcount_never_overwrites_data(tmp_path: Path) -> None:
    """A data cluster whose refcount says 0 is not reused for metadata (untrusted images)."""
    img = make_image(tmp_path / "lie.qcow2", writes=("write -P 5 0 64k",))
    with open(img, "r+b") as f:  # refcount block at 0x20000, 16-bit entries; data cluster 5
        f.seek(0x20000 + 5 * 2)
        assert f.read(2) == b"\0\1"
        f.seek(0x20000 + 5 * 2)
        f.write(b"\0\0")
    before = img.read_bytes()
    r = vdkit_img("snapshot", "-c", "s", str(img))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "Could not create snapshot 's'" in r.stderr
    assert img.read_bytes() == before


def test_raw_image(tmp_path: Path) -> None:
    """Raw has no snapshots: probing warnings (twice for apply) and qemu-img's errors."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x01" * 65536)
    q = tmp_path / "q" / "img.raw"
    v = tmp_path / "v" / "img.raw"
    for p in (q, v):
        p.parent.mkdir()
        shutil.copy(base, p)
    for args in (("-c", "x"), ("-a", "x"), ("-d", "x"), ()):
        run_both(q, v, *args)
    assert v.read_bytes() == base.read_bytes()


def test_snapshot_grows_refcount_table(tmp_path: Path) -> None:
    """512-byte clusters, 64-bit refcounts: one table cluster covers 2 MiB of file."""
    base = make_image(tmp_path / "base.qcow2", "cluster_size=512,refcount_bits=64", "4M",
                      ("write -P 1 0 1800k",))
    q, v = pair(tmp_path, base)
    before = int.from_bytes(v.read_bytes()[48:56], "big")
    for i in range(3):
        assert run_both(q, v, "-c", f"s{i}") == 0
        io_both(q, v, f"write -P {i + 2} {i * 600}k 300k")
    assert int.from_bytes(v.read_bytes()[48:56], "big") != before
    assert int.from_bytes(v.read_bytes()[56:60], "big") > 1  # the table grew
    assert_equivalent(q, v)
    assert run_both(q, v, "-a", "s0") == 0
    assert run_both(q, v, "-d", "s1") == 0
    assert_equivalent(q, v)


def test_snapshot_count_limit(tmp_path: Path) -> None:
    """With 65536 snapshots, creating one more fails with -27 (File too large)."""
    from vdkit.formats.qcow2.snapshot import SnapshotEntry, serialize_snapshot_table

    base = make_image(tmp_path / "base.qcow2", size="1M")
    entries = [SnapshotEntry(0, 0, str(i + 1), "", 0, 0, 0, 0, 1 << 20) for i in range(65536)]
    table = serialize_snapshot_table(entries)
    with open(base, "r+b") as f:
        f.seek(0, 2)
        off = (f.tell() + 65535) // 65536 * 65536
        f.seek(off)
        f.write(table)
        f.seek(60)
        f.write((65536).to_bytes(4, "big") + off.to_bytes(8, "big"))
    q, v = pair(tmp_path, base)
    assert run_both(q, v, "-c", "one-too-many") == 1
    assert v.read_bytes() == base.read_bytes()


def test_l1_repeating_one_table_is_cheap(tmp_path: Path) -> None:
    """A crafted L1 pointing 131072 times at one full L2 table: a clean error, not a memory blow-up."""
    img = make_image(tmp_path / "rep.qcow2", size="64T", writes=("write -P 1 0 64k",))
    raw = bytearray(img.read_bytes())
    l1_size = int.from_bytes(raw[36:40], "big")
    l1_off = int.from_bytes(raw[40:48], "big")
    assert l1_size == 131072
    first = raw[l1_off : l1_off + 8]
    with open(img, "r+b") as f:
        f.seek(l1_off)
        f.write(bytes(first) * l1_size)
    before = img.read_bytes()
    r = vdkit_img("snapshot", "-c", "s", str(img))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "-22 (Invalid argument)" in r.stderr  # 16-bit counts cannot hold 131072 references
    assert img.read_bytes() == before


@pytest.mark.parametrize("disable", [False, True])
def test_revert_refused_with_persistent_bitmaps(tmp_path: Path, disable: bool) -> None:
    """QEMU loads persistent bitmaps on open and will not revert under them, enabled or not."""
    base = make_image(tmp_path / "base.qcow2", writes=("write -P 1 0 64k",))
    check_ok("snapshot", "-c", "s1", str(base))
    check_ok("bitmap", "--add", str(base), "b0")
    if disable:
        check_ok("bitmap", "--disable", str(base), "b0")
    q, v = pair(tmp_path, base)
    io_both(q, v, "write -P 2 0 64k")
    before = v.read_bytes()
    assert run_both(q, v, "-a", "s1") == 1
    assert run_both(q, v, "-a", "nonexist") == 1  # the bitmap check comes before the lookup
    assert v.read_bytes() == before
    assert run_both(q, v, "-c", "s2") == 0  # creating and deleting are allowed
    assert run_both(q, v, "-d", "s1") == 0
    assert_equivalent(q, v)


@pytest.mark.parametrize("bits", [2, 16])
def test_revert_fails_where_the_counts_would_pass_the_limit_on_the_way(tmp_path: Path, bits: int) -> None:
    """QEMU counts the snapshot's tree up before counting the active one down: with 2-bit refcounts,
    data shared by the active tree and two snapshots (count 3, the limit) cannot be reverted to
    (EINVAL, nothing written), though the counts after the revert would fit; with 16 bits it can
    (vdkit checks this peak by runs of equal change over the refcount blocks)."""
    base = make_image(tmp_path / "base.qcow2", f"refcount_bits={bits}", "1M", ("write -P 7 0 64k",))
    q, v = pair(tmp_path, base)
    for name in ("s1", "s2"):
        assert run_both(q, v, "-c", name) == 0
    before = v.read_bytes()
    rc = run_both(q, v, "-a", "s1")
    assert rc == (1 if bits == 2 else 0)
    if rc:
        assert v.read_bytes() == before
    assert_equivalent(q, v)
