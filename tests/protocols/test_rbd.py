"""Ceph RBD images: vdkit-img against qemu-img (``qemu-block-extra``'s rbd driver) on one real cluster.

A single-node cluster (``tests/helpers/ceph-test-cluster.sh``: one monitor, one memstore OSD) runs for
the session.  Read-only commands run on the same image; commands that change an image run on twin
images made the same way (``q-...`` for qemu-img, ``v-...`` for vdkit-img), the outputs are compared
with the twin's name swapped, and the twins' data afterwards.  QEMU 7.2's transcripts:
``shared/reference/ceph-rbd.md`` §2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Result, qemu_img, qemu_io, vdkit_img
from tests.helpers import ceph

Setup = Callable[[str], None]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ceph.CephCluster:
    return ceph.session_cluster(tmp_path_factory, request)


def _same(q: Result, v: Result, swap: dict[str, str] | None = None) -> None:
    out, err = v.stdout, v.normalized_stderr()
    for theirs, ours in (swap or {}).items():
        out, err = out.replace(theirs, ours), err.replace(theirs, ours)
    assert out == q.stdout
    assert err == q.stderr
    assert v.returncode == q.returncode


class Twins:
    """Two images made alike: ``q`` for qemu-img, ``v`` for vdkit-img."""

    def __init__(self, cluster: ceph.CephCluster, setup: Setup | None, stem: str = "t") -> None:
        base = cluster.unique(stem)
        self.cluster = cluster
        self.q, self.v = f"q-{base}", f"v-{base}"
        if setup is not None:
            setup(self.q)
            setup(self.v)

    def run(self, *args: str, fmt: str = "{}") -> tuple[Result, Result]:
        """Both tools on their twin; ``{}`` in ``args`` is the image's ``rbd:`` name (``fmt`` shapes it)."""
        q = qemu_img(*[a.replace("{}", fmt.format(self.cluster.name(self.q))) for a in args])
        v = vdkit_img(*[a.replace("{}", fmt.format(self.cluster.name(self.v))) for a in args])
        _same(q, v, {self.v: self.q})
        return q, v

    def same_data(self) -> None:
        q = qemu_img("compare", "-f", "raw", "-F", "raw", self.cluster.name(self.q), self.cluster.name(self.v))
        assert q.returncode == 0, q.stdout + q.stderr


def both(*args: str) -> Result:
    q, v = qemu_img(*args), vdkit_img(*args)
    _same(q, v)
    return q


@pytest.fixture(scope="module")
def base_image(cluster: ceph.CephCluster) -> str:
    """64 MiB with data at 0 (64 KiB) and 5 MiB (4 KiB), snapshots s1 and s2 (s2 after a resize)."""
    name = cluster.unique("base")
    cluster.rbd("create", "--size", "48M", f"rbd/{name}")
    cluster.qemu_io(name, "write -P 0x11 0 64k", "write -P 0x22 5M 4k")
    cluster.rbd("snap", "create", f"rbd/{name}@s1")
    cluster.rbd("resize", "--size", "64M", f"rbd/{name}")
    cluster.rbd("snap", "create", f"rbd/{name}@with space")
    return name


# -- info and names ------------------------------------------------------------------------------

@pytest.mark.parametrize("output", ["human", "json"])
def test_info(cluster: ceph.CephCluster, base_image: str, output: str) -> None:
    name = cluster.name(base_image)
    both("info", f"--output={output}", name)
    both("info", f"--output={output}", "-f", "raw", name)
    both("info", f"--output={output}", "-f", "rbd", name)
    both("info", f"--output={output}", "--image-opts", f"driver=rbd,pool=rbd,image={base_image},conf={cluster.conf}")
    both("info", f"--output={output}", cluster.name(base_image + "@s1"))


def test_info_name_forms(cluster: ceph.CephCluster, base_image: str) -> None:
    conf = cluster.conf
    both("info", cluster.name(base_image, ":id=admin:rbd_cache=false"))
    both("info", "--image-opts", f"driver=raw,file.driver=rbd,file.pool=rbd,file.image={base_image},file.conf={conf},"
                                 "file.namespace=,file.user=admin")
    both("info", f'json:{{"driver": "rbd", "pool": "rbd", "image": "{base_image}", '
                 f'"server": [{{"host": "127.0.0.1", "port": "{cluster.port + 1}"}}]}}')
    both("info", "--image-opts", f"driver=rbd,pool=rbd,image={base_image},server.0.host=127.0.0.1,"
                                 f"server.0.port={cluster.port},auth-client-required.0=none,snapshot=s1")
    # escaped separators: a snapshot whose name holds a colon
    cluster.rbd("snap", "create", f"rbd/{base_image}@a:b")
    try:
        both("info", f"rbd:rbd/{base_image}@a\\:b:conf={conf}")
    finally:
        cluster.rbd("snap", "rm", f"rbd/{base_image}@a:b")


def test_namespace(cluster: ceph.CephCluster) -> None:
    ns, image = cluster.unique("ns"), "nimg"
    cluster.rbd("namespace", "create", f"rbd/{ns}")
    cluster.rbd("create", "--size", "4M", f"rbd/{ns}/{image}")
    cluster.rbd("snap", "create", f"rbd/{ns}/{image}@n1")
    both("info", cluster.name(f"{ns}/{image}"))
    both("info", "--output=json", "--image-opts",
         f"driver=rbd,pool=rbd,namespace={ns},image={image},conf={cluster.conf}")
    both("map", cluster.name(f"{ns}/{image}"))


def test_open_errors(cluster: ceph.CephCluster, base_image: str, tmp_path: Path) -> None:
    conf = cluster.conf
    for name in (cluster.name("nosuch"), cluster.name(base_image + "@nosuch"), cluster.name(base_image, pool="nopool"),
                 cluster.name("nons/nimg"), f"rbd:rbd/{base_image}:conf={tmp_path}/nonexistent.conf",
                 "rbd:rbd", cluster.name(""), cluster.name(base_image, ":bogus_option=1"),
                 cluster.name(base_image, ":bogus_option"), cluster.name(base_image, ":user=x")):
        both("info", name)
    for opts in ("driver=rbd,pool=rbd", f"driver=rbd,image={base_image}",
                 f"driver=rbd,pool=rbd,image={base_image},bogus=1",
                 f"driver=rbd,pool=rbd,image={base_image},conf={conf},key-secret=nosuchsecret"):
        both("info", "--image-opts", opts)
    local = tmp_path / "x.raw"
    local.write_bytes(bytes(4096))
    both("info", "-f", "rbd", str(local))
    both("check", cluster.name(base_image))
    both("check", "-f", "rbd", cluster.name(base_image))


def test_unreachable_monitor(tmp_path: Path) -> None:
    """A monitor nobody answers: both fail after the name's client_mount_timeout with QEMU's text."""
    import socket

    with socket.socket() as s:  # a port with no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = tmp_path / "dead.conf"
    dead.write_text(f"[global]\nmon host = 127.0.0.1:{port}\nauth client required = none\n")
    both("info", f"rbd:rbd/a:conf={dead}:client_mount_timeout=2")
    timed = tmp_path / "timed.conf"
    timed.write_text(dead.read_text() + "client mount timeout = 2\n")
    both("info", f"rbd:rbd/a:conf={timed}")


def test_unreachable_monitor_default_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a timeout in the name or the conf file QEMU waits librados' 300 s; vdkit sets its own
    default (DEFAULT_MOUNT_TIMEOUT, 30 s; 2 s here to keep the test short) and fails with QEMU's text."""
    from vdkit.errors import OpenError
    from vdkit.protocols import rbd

    assert rbd.DEFAULT_MOUNT_TIMEOUT <= 60
    monkeypatch.setattr(rbd, "DEFAULT_MOUNT_TIMEOUT", 2)
    dead = tmp_path / "dead.conf"
    dead.write_text("[global]\nmon host = 127.0.0.1:9\nauth client required = none\n")
    with pytest.raises(OpenError) as info:
        rbd.RbdFile(f"rbd:rbd/a:conf={dead}")
    assert info.value.message == "error connecting: Connection timed out"


def test_without_librbd(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Ceph client libraries: a clear error, nothing else changes."""
    import ctypes

    from vdkit.errors import OpenError
    from vdkit.protocols import rbd

    def no_lib(*args: object, **kw: object) -> None:
        raise OSError("librbd.so.1: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(rbd, "_libs", None)
    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    with pytest.raises(OpenError, match="librbd/librados could not be loaded .*librbd1 and librados2"):
        rbd.libs()


# -- map, compare, check ------------------------------------------------------------------------

def test_map(cluster: ceph.CephCluster, base_image: str) -> None:
    for output in ("human", "json"):
        both("map", f"--output={output}", cluster.name(base_image))
        both("map", f"--output={output}", "-f", "rbd", cluster.name(base_image))
        both("map", f"--output={output}", "-s", "4M", "-l", "3M", cluster.name(base_image))
    small = cluster.unique("objs")
    assert qemu_img("create", "-f", "raw", "-o", "cluster_size=1M", cluster.name(small), "3M").returncode == 0
    cluster.qemu_io(small, "write 1536k 4k")
    both("map", "--output=json", cluster.name(small))
    cluster.qemu_io(small, "discard 1M 1M")
    both("map", "--output=json", cluster.name(small))
    plain = cluster.unique("nofastdiff")  # no object map: everything is data
    cluster.rbd("create", "--size", "8M", "--image-feature", "layering", f"rbd/{plain}")
    both("map", "--output=json", cluster.name(plain))


def test_compare(cluster: ceph.CephCluster, base_image: str, tmp_path: Path) -> None:
    local = tmp_path / "copy.qcow2"
    assert qemu_img("convert", "-O", "qcow2", cluster.name(base_image), str(local)).returncode == 0
    both("compare", cluster.name(base_image), str(local))
    both("compare", "-s", cluster.name(base_image + "@s1"), cluster.name(base_image))
    assert qemu_io("-f", "qcow2", "-c", "write -P 0x33 2101248 512", str(local)).returncode == 0
    both("compare", cluster.name(base_image), str(local))


# -- create, convert, resize ----------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["-f", "raw", "{}", "8M"],
    ["-f", "raw", "-o", "cluster_size=1M", "{}", "3M"],
    ["-f", "rbd", "{}", "1000"],
    ["-f", "raw", "{}", "0"],
    ["-f", "raw", "-o", "preallocation=full", "{}", "1M"],
    ["-f", "raw", "-o", "cluster_size=3000", "{}", "1M"],
    ["-f", "raw", "-o", "help", "{}"],
])
def test_create(cluster: ceph.CephCluster, args: list[str]) -> None:
    t = Twins(cluster, None)
    t.run("create", *args)
    t.run("info", "{}")


def test_create_errors(cluster: ceph.CephCluster, tmp_path: Path) -> None:
    def setup(n: str) -> None:
        cluster.rbd("create", "--size", "1M", f"rbd/{n}")

    t = Twins(cluster, setup)
    t.run("create", "-f", "raw", "{}", "8M")  # exists
    both("create", "-f", "raw", cluster.name("new", pool="nopool"), "1M")
    both("create", "-f", "rbd", str(tmp_path / "y.raw"), "1M")


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src.qcow2"
    assert qemu_img("create", "-f", "qcow2", str(src), "9M").returncode == 0
    r = qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 300k", "-c", "write -P 0xa5 6M 1M", "-c", "write -z 7M 1M",
                str(src))
    assert r.returncode == 0
    return src


def test_convert_to_rbd(cluster: ceph.CephCluster, tmp_path: Path) -> None:
    src = _source(tmp_path)
    t = Twins(cluster, None)
    t.run("convert", "-O", "raw", str(src), "{}")
    t.same_data()
    assert qemu_img("compare", str(src), cluster.name(t.v)).returncode == 0
    t.run("map", "--output=json", "{}")
    t.run("convert", "-O", "raw", str(src), "{}")  # exists: File exists
    t.run("convert", "-n", "-O", "raw", str(src), "{}")
    t.run("convert", "-n", "--target-image-opts", str(src), "driver=rbd,pool=rbd,image={},conf=" + str(cluster.conf),
          fmt="{}")


def test_convert_from_rbd(cluster: ceph.CephCluster, base_image: str, tmp_path: Path) -> None:
    for target_fmt in ("raw", "qcow2"):
        for source in (cluster.name(base_image), cluster.name(base_image + "@s1")):
            q, v = tmp_path / f"q.{target_fmt}", tmp_path / f"v.{target_fmt}"
            for p in (q, v):
                p.unlink(missing_ok=True)
            rq = qemu_img("convert", "-O", target_fmt, source, str(q))
            rv = vdkit_img("convert", "-O", target_fmt, source, str(v))
            _same(rq, rv, {str(v): str(q)})
            assert rq.returncode == 0
            both("compare", str(q), str(v))
            both("map", "--output=json", str(v))
            if target_fmt == "raw":
                assert q.read_bytes() == v.read_bytes()


def test_resize(cluster: ceph.CephCluster) -> None:
    def setup(n: str) -> None:
        cluster.rbd("create", "--size", "4M", f"rbd/{n}")
        cluster.qemu_io(n, "write -P 0x11 0 4M")

    t = Twins(cluster, setup)
    t.run("resize", "{}", "8M")
    t.run("resize", "-f", "raw", "{}", "+1M")
    t.run("resize", "-f", "raw", "{}", "2M")
    t.run("resize", "-f", "raw", "--shrink", "{}", "2M")
    t.run("resize", "--preallocation=full", "-f", "raw", "{}", "4M")
    t.run("resize", "-f", "rbd", "{}", "3M")
    t.run("info", "{}")
    t.same_data()


def test_library(cluster: ceph.CephCluster) -> None:
    """vdkit.open on an rbd name: reads, writes and snapshots through the node, seen by qemu-img."""
    import vdkit

    image = cluster.unique("lib")
    cluster.rbd("create", "--size", "2M", f"rbd/{image}")
    with vdkit.open(cluster.name(image), "raw", readonly=False) as node:
        node.write(4096, b"\x77" * 8192)
        assert node.read(4096, 8192) == b"\x77" * 8192
        assert vdkit.image_info(node).cluster_size == 4 << 20
    r = qemu_io("-f", "raw", "-c", "read -P 0x77 4096 8192", "-c", "read -P 0 0 4096", cluster.name(image))
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0


def test_reads_and_writes_in_flight(cluster: ceph.CephCluster) -> None:
    """Reads of changing sizes and jumps, and writes in flight (aio): every read sees the image's bytes,
    the writes before it included, with or without a flush; qemu-io reads them too."""
    import os

    from vdkit.protocols.rbd import RbdFile

    image = cluster.unique("inflight")
    cluster.rbd("create", "--size", "12M", f"rbd/{image}")
    data = bytearray(os.urandom(12 << 20))
    data[5 << 20:7 << 20] = bytes(2 << 20)
    with RbdFile(cluster.name(image), readonly=False) as f:
        f.pwrite(0, bytes(data))
        f.flush()
        out = bytearray()
        for offset in range(0, 6 << 20, 1 << 20):  # pieces of 1 MiB, then of 512 KiB, then a jump
            buf = bytearray(1 << 20)
            f.readinto(offset, memoryview(buf))
            out += buf
        for offset in range(6 << 20, 9 << 20, 512 << 10):
            buf = bytearray(512 << 10)
            f.readinto(offset, memoryview(buf))
            out += buf
        assert out == data[:9 << 20]
        f.pwrite(9 << 20, b"\x99" * 4096)
        data[9 << 20:(9 << 20) + 4096] = b"\x99" * 4096
        for offset in (9 << 20, 10 << 20, 11 << 20, 3 << 20):
            buf = bytearray(1 << 20)
            f.readinto(offset, memoryview(buf))
            assert buf == data[offset:offset + (1 << 20)], offset
        # writes in flight (aio): pieces, then one overlapping two of them, read back without a flush
        for offset in range(0, 8 << 20, 1 << 20):
            piece = os.urandom(1 << 20)
            f.pwrite(offset, piece)
            data[offset:offset + (1 << 20)] = piece
        f.pwrite((3 << 20) - 4096, b"\x42" * 8192)
        data[(3 << 20) - 4096:(3 << 20) + 4096] = b"\x42" * 8192
        buf = bytearray(12 << 20)
        f.readinto(0, memoryview(buf))
        assert buf == data
    r = qemu_io("-f", "raw", "-c", "read -P 0x42 3141632 8192", cluster.name(image))
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0


def test_convert_reads_in_flight(cluster: ceph.CephCluster, tmp_path: Path) -> None:
    """convert from RBD reads several pieces at once (rbd_aio_read into the copy's buffers): for -m 1, 4
    and 16 the output's bytes and map equal qemu-img's (data, zeros written, objects never written, a
    partial last piece); reads started straight on the file, finished in order, one across the end."""
    import os

    from vdkit.protocols.rbd import RbdFile

    image = cluster.unique("ahead")
    cluster.rbd("create", "--size", "22M", f"rbd/{image}")
    cluster.qemu_io(image, "write -P 0x31 0 5M", "write -z 5M 1M", "write -P 0x32 6M 4k", "write -P 0x33 12M 10M")
    name = cluster.name(image)
    for m in ("1", "4", "16"):
        q, v = tmp_path / f"q{m}.raw", tmp_path / f"v{m}.raw"
        _same(qemu_img("convert", "-m", m, "-O", "raw", name, str(q)),
              vdkit_img("convert", "-m", m, "-O", "raw", name, str(v)), {str(v): str(q)})
        assert q.read_bytes() == v.read_bytes()
        both("map", "--output=json", str(v))
    data = bytes(os.urandom(3 << 20))
    with RbdFile(name, readonly=False) as f:
        f.pwrite(20 << 20, data[: 2 << 20])  # in flight while the reads start: waited for first
        bufs = [bytearray(b"\xee" * (1 << 20)) for _ in range(4)]
        offsets = (19 << 20, 20 << 20, 21 << 20, 22 << 20)
        reads = [f.start_readinto(off, memoryview(b)) for off, b in zip(offsets, bufs, strict=True)]
        for r in reads:
            f.finish_read(r)
        assert bufs[0] == b"\x33" * (1 << 20)
        assert bufs[1] + bufs[2] == data[: 2 << 20]
        assert bufs[3] == bytes(1 << 20)  # past the end: zeros, as readinto
        tail = bytearray(b"\xee" * (2 << 20))
        f.finish_read(f.start_readinto(21 << 20, memoryview(tail)))  # across the end
        assert tail == data[1 << 20 : 2 << 20] + bytes(1 << 20)


# -- RBD snapshots as internal snapshots ----------------------------------------------------------

def _snap_image(cluster: ceph.CephCluster, name: str) -> None:
    """4 MiB of 0x11, snapshot s1, then 0x22 over the first MiB."""
    cluster.rbd("create", "--size", "4M", f"rbd/{name}")
    cluster.qemu_io(name, "write -P 0x11 0 4M")
    cluster.rbd("snap", "create", f"rbd/{name}@s1")
    cluster.qemu_io(name, "write -P 0x22 0 1M")


def test_snapshot_list_create_delete(cluster: ceph.CephCluster) -> None:
    t = Twins(cluster, lambda n: cluster.rbd("create", "--size", "4M", f"rbd/{n}") and None)
    t.run("snapshot", "-l", "{}")  # none: no output
    t.run("snapshot", "-c", "s1", "{}")
    t.run("snapshot", "-c", "with space", "{}")
    t.run("snapshot", "-c", "s1", "{}")  # exists: File exists, with the driver's own line first
    t.run("snapshot", "-l", "{}")
    t.run("info", "--output=json", "{}")
    t.run("snapshot", "-d", "nosuch", "{}")
    t.run("snapshot", "-d", "s1", "{}")
    t.run("snapshot", "-l", "{}")
    for opts in ("driver=rbd,pool=rbd,image={},conf=" + str(cluster.conf),
                 "driver=raw,file.driver=rbd,file.pool=rbd,file.image={},file.conf=" + str(cluster.conf)):
        t.run("snapshot", "--image-opts", "-c", "o1", opts, fmt="{}")
        t.run("snapshot", "--image-opts", "-l", opts, fmt="{}")
        t.run("snapshot", "--image-opts", "-d", "o1", opts, fmt="{}")
    assert [line.split()[0] for line in cluster.rbd("snap", "ls", f"rbd/{t.v}").stdout.splitlines()[1:]] \
        and "with space" in cluster.rbd("snap", "ls", f"rbd/{t.v}").stdout


def test_snapshot_apply(cluster: ceph.CephCluster) -> None:
    t = Twins(cluster, lambda n: _snap_image(cluster, n))
    t.run("snapshot", "-a", "nosuch", "{}")
    t.run("snapshot", "-a", "s1", "{}")  # the probing warning twice: QEMU reopens the raw node
    t.same_data()
    r = qemu_io("-f", "raw", "-c", "read -P 0x11 0 4M", cluster.name(t.v))
    assert "Pattern verification failed" not in r.stdout, r.stdout
    # a size change comes back with the snapshot
    cluster.rbd("resize", "--size", "8M", f"rbd/{t.q}")
    cluster.rbd("resize", "--size", "8M", f"rbd/{t.v}")
    t.run("snapshot", "--image-opts", "-a", "s1", "driver=rbd,pool=rbd,image={},conf=" + str(cluster.conf),
          fmt="{}")
    t.run("info", "{}")


def test_snapshot_delete_protected(cluster: ceph.CephCluster) -> None:
    def setup(n: str) -> None:
        _snap_image(cluster, n)
        cluster.rbd("snap", "protect", f"rbd/{n}@s1")
        cluster.rbd("clone", f"rbd/{n}@s1", f"rbd/{n}-clone")

    t = Twins(cluster, setup)
    t.run("snapshot", "-d", "s1", "{}")  # Device or resource busy
    t.run("snapshot", "-l", "{}")
    both("info", cluster.name(t.v + "-clone"))
    both("map", "--output=json", cluster.name(t.v + "-clone"))


def test_snapshot_read_only_open(cluster: ceph.CephCluster) -> None:
    """An image opened at a snapshot cannot be written (QEMU's text through qemu-io/vdkit)."""
    import vdkit
    from vdkit.errors import VdkitError

    image = cluster.unique("ro")
    _snap_image(cluster, image)
    with pytest.raises(VdkitError, match="rbd snapshots are read-only"):
        vdkit.open(cluster.name(image + "@s1"), "raw", readonly=False)
    r = qemu_io("-f", "raw", "-c", "write 0 512", cluster.name(image + "@s1"))
    assert "rbd snapshots are read-only" in r.stderr
    t = Twins(cluster, None)
    t.run("convert", "-O", "raw", cluster.name(image + "@s1"), "{}")
    t.same_data()
    t.run("convert", "-l", "s1", "-O", "raw", cluster.name(image), "{}")


# -- cephx: user, key-secret, keys in the name ------------------------------------------------------

@pytest.fixture(scope="module")
def cephx(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ceph.CephCluster:
    return ceph.session_cluster(tmp_path_factory, request, auth="cephx")


def test_cephx_user_and_key_secret(cephx: ceph.CephCluster, tmp_path: Path) -> None:
    image = cephx.unique("x")
    cephx.rbd("create", "--size", "4M", f"rbd/{image}")
    key = cephx.key()
    nokey = tmp_path / "nokey.conf"
    nokey.write_text("".join(line for line in cephx.conf.read_text().splitlines(keepends=True)
                             if not line.startswith("keyring")))
    both("info", cephx.name(image))  # the keyring named by the conf file
    both("info", f"rbd:rbd/{image}:conf={nokey}")  # no key: error connecting
    opts = f"driver=rbd,pool=rbd,image={image},conf={nokey},user=admin,key-secret=sec0"
    both("info", "--object", f"secret,id=sec0,data={key},format=base64", "--image-opts", opts)
    both("info", "--object", f"secret,id=sec0,data={key}", "--image-opts", opts)  # encoded twice: EINVAL
    wrong = "AQBkaW5nZG9uZ2Rpbmdkb25nZGluZ2RvbmdkaW5nZA=="
    both("info", "--object", f"secret,id=sec0,data={wrong},format=base64", "--image-opts", opts)
    both("info", "--object", f"secret,id=sec0,data={key},format=base64", "--image-opts",
         opts.replace("user=admin", "user=nobody"))
    both("info", f"rbd:rbd/{image}:conf={nokey}:id=admin:key={key}")
    both("info", f"rbd:rbd/{image}:conf={nokey}:keyring={cephx.dir}/keyring")
    both("info", "--image-opts", f"driver=rbd,pool=rbd,image={image},conf={nokey},auth-client-required.0=none")


# -- qcow2 on rbd ------------------------------------------------------------------------------------

def _export(cluster: ceph.CephCluster, image: str, path: Path) -> bytes:
    cluster.rbd("export", f"rbd/{image}", str(path))
    return path.read_bytes()


def test_qcow2_on_rbd(cluster: ceph.CephCluster, tmp_path: Path) -> None:
    """create/convert -O qcow2 onto rbd (the image grows as clusters are written), then every reader."""
    t = Twins(cluster, None)
    t.run("create", "-f", "qcow2", "{}", "16M")
    qb, vb = _export(cluster, t.q, tmp_path / "q.img"), _export(cluster, t.v, tmp_path / "v.img")
    assert len(qb) == len(vb) and qb[104:] == vb[104:]  # beyond the header's time-free fields: identical
    t.run("info", "{}")
    t.run("snapshot", "-c", "qs", "{}")  # a qcow2 snapshot (the RBD image's own are not listed)
    import re

    date = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # qcow2 snapshots have real dates: the twins' differ
    listed = [date.sub("DATE", tool("snapshot", "-l", cluster.name(n)).stdout)
              for tool, n in ((qemu_img, t.q), (vdkit_img, t.v))]
    assert listed[0] == listed[1] and "qs" in listed[0]
    src = _source(tmp_path)
    c = Twins(cluster, None)
    c.run("convert", "-O", "qcow2", str(src), "{}")
    for args in (["info", "{}"], ["map", "--output=json", "{}"], ["check", "{}"], ["compare", str(src), "{}"]):
        c.run(*args)
    assert qemu_img("check", cluster.name(c.v)).returncode == 0

