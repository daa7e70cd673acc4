"""vdkit-daemon drives on Ceph RBD images, against qemu-system-x86_64 with the same drives.

Both daemons run on one test cluster (``tests/helpers/ceph.py``).  Queries run on the same images;
commands that change them run on twin images (``q-...`` for QEMU, ``v-...`` for vdkit) and the
answers are compared with the names swapped.  QEMU 7.2's transcripts: ``shared/reference/ceph-rbd.md``
§2.7.  One deliberate difference is tested as such: ``savevm``/``loadvm`` on an rbd disk refuse before
touching anything (QEMU deletes a same-named snapshot, or rolls the disk back, and then fails).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, qemu_img, qemu_io, require_tool
from tests.daemon.conftest import Daemons, Monitor, daemons, normalise, normalise_hmp  # noqa: F401
from tests.helpers import ceph
from tests.helpers.qemu_io import qemu_io_script
from tests.nbd.conftest import short_sock


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ceph.CephCluster:
    return ceph.session_cluster(tmp_path_factory, request)


def _image(cluster: ceph.CephCluster, name: str, size: str = "32M") -> None:
    cluster.rbd("create", "--size", size, f"rbd/{name}")
    cluster.qemu_io(name, "write -P 0x11 0 1M")
    cluster.rbd("snap", "create", f"rbd/{name}@cli-snap")


def _pair(daemons: Daemons, q_args: list[str], v_args: list[str], tmp: Path) -> tuple[Monitor, Monitor]:  # noqa: F811
    for d in ("q", "v"):
        (tmp / d).mkdir(exist_ok=True)
    _, qpath, _ = daemons.qemu(q_args, tmp / "q")
    _, vpath, _ = daemons.vdkit(v_args, tmp / "v")
    return daemons.monitor(qpath).negotiate(), daemons.monitor(vpath).negotiate()


def test_drives_in_queries(daemons: Daemons, cluster: ceph.CephCluster, tmp_path: Path) -> None:  # noqa: F811
    vm, other = cluster.unique("vm"), cluster.unique("other")
    _image(cluster, vm)
    _image(cluster, other, "8M")
    conf = cluster.conf
    drives = [f"file={cluster.name(vm)},if=none,id=d0",
              f"file={cluster.name(vm + '@cli-snap')},format=raw,if=none,id=ro0,readonly=on",
              f"driver=rbd,pool=rbd,image={other},conf={conf},if=none,id=d1",
              f"file.driver=rbd,file.pool=rbd,file.image={other},file.conf={conf},format=raw,if=none,id=d2"]
    args = [a for d in drives for a in ("-drive", d)]
    q, v = _pair(daemons, args, args, tmp_path)
    for cmd in ("query-block", "query-named-block-nodes"):
        assert normalise(v.cmd_line(cmd)) == normalise(q.cmd_line(cmd)), cmd
    for line in ("info block", "info block -v", "info block -n", "info snapshots"):
        assert normalise_hmp(v.hmp(line)) == normalise_hmp(q.hmp(line)), line


def test_internal_snapshots_and_vm_snapshots(daemons: Daemons, cluster: ceph.CephCluster,  # noqa: F811
                                             tmp_path: Path) -> None:
    base = cluster.unique("snaps")
    qi, vi = f"q-{base}", f"v-{base}"
    for name in (qi, vi):
        _image(cluster, name)
        cluster.rbd("snap", "create", f"rbd/{name}@keep1")
        cluster.rbd("snap", "create", f"rbd/{name}@victim")

    def args(image: str) -> list[str]:
        return ["-drive", f"file={cluster.name(image)},format=raw,if=none,id=d0",
                "-drive", f"file={cluster.name(image + '@keep1')},format=raw,if=none,id=ro0,readonly=on"]

    q, v = _pair(daemons, args(qi), args(vi), tmp_path)

    def same_qmp(name: str, arguments: dict[str, str]) -> None:
        assert normalise(v.cmd_line(name, arguments)).replace(vi, qi) == normalise(q.cmd_line(name, arguments))

    def same_hmp(line: str) -> str:
        answer = normalise_hmp(q.hmp(line))
        assert normalise_hmp(v.hmp(line)).replace(vi, qi) == answer, line
        return answer

    same_qmp("blockdev-snapshot-internal-sync", {"device": "d0", "name": "qs1"})
    same_qmp("blockdev-snapshot-internal-sync", {"device": "d0", "name": "qs1"})  # exists
    same_hmp("snapshot_blkdev_internal d0 hs1")
    same_qmp("blockdev-snapshot-internal-sync", {"device": "ro0", "name": "bd2"})  # read only
    same_hmp("info block -v")
    same_qmp("blockdev-snapshot-delete-internal-sync", {"device": "d0", "name": "qs1"})
    same_qmp("blockdev-snapshot-delete-internal-sync", {"device": "d0", "name": "nosuch"})
    same_qmp("blockdev-snapshot-delete-internal-sync", {"device": "d0", "id": "hs1"})
    same_qmp("blockdev-snapshot-delete-internal-sync", {"device": "d0", "id": "hs1", "name": "hs1"})
    same_hmp("snapshot_delete_blkdev_internal d0 cli-snap")
    same_hmp("info snapshots")
    same_qmp("query-block", {})

    # savevm: both fail with QEMU's text; QEMU has deleted 'victim' first, vdkit has not
    error = "Error: Error while writing VM state: Input/output error\r\n"
    assert v.hmp("savevm victim") == q.hmp("savevm victim") == error
    assert "victim" in cluster.rbd("snap", "ls", f"rbd/{vi}").stdout
    assert "victim" not in cluster.rbd("snap", "ls", f"rbd/{qi}").stdout
    # loadvm: QEMU rolls the disk back and then fails; vdkit fails with QEMU's last line and keeps the data
    for name in (qi, vi):
        cluster.qemu_io(name, "write -P 0x77 0 64k")
    qa, va = q.hmp("loadvm keep1"), v.hmp("loadvm keep1")
    assert qa.splitlines()[-1] == va.strip() == "Error: Error -22 while loading VM state"
    assert "Pattern verification failed" not in qemu_io("-f", "raw", "-c", "read -P 0x77 0 64k",
                                                        cluster.name(vi)).stdout
    assert "Pattern verification failed" not in qemu_io("-f", "raw", "-c", "read -P 0x11 0 64k",
                                                        cluster.name(qi)).stdout
    same_hmp("delvm keep1")
    same_hmp("delvm nosuch")
    same_hmp("delvm victim")  # still there in vdkit only (see savevm above)
    same_hmp("info snapshots")


def test_nbd_export_of_an_rbd_drive(daemons: Daemons, cluster: ceph.CephCluster, tmp_path: Path) -> None:  # noqa: F811
    image = cluster.unique("exp")
    _image(cluster, image, "8M")
    sock = short_sock("rbd.sock")
    _, vpath, _ = daemons.vdkit(["-drive", f"file={cluster.name(image)},format=raw,if=none,id=d0"], tmp_path,
                                extra=["-nbd", f"unix:{sock}"])
    daemons.monitor(vpath).negotiate()
    export = f"nbd+unix:///d0?socket={sock}"
    r = qemu_img("compare", "-f", "raw", "-F", "raw", export, cluster.name(image))
    assert r.returncode == 0, r.stdout + r.stderr
    qemu_io_script(None, export, ["write -P 0x42 4M 64k"], "raw")
    r = qemu_io("-f", "raw", "-c", "read -P 0x42 4M 64k", cluster.name(image))
    assert "Pattern verification failed" not in r.stdout and r.returncode == 0


def test_daemonized_daemon_serves_an_rbd_drive(cluster: ceph.CephCluster, tmp_path: Path) -> None:
    """--daemonize with an rbd drive: the fork comes before librados starts its threads (forked after
    them, the child had none and hung on the first request), as QEMU daemonizes before opening drives."""
    image = cluster.unique("fork")
    _image(cluster, image, "8M")
    sock, pidfile = short_sock("fork.sock"), tmp_path / "d.pid"
    r = subprocess.run([sys.executable, "-m", "vdkit.daemon.main", "-drive",
                        f"file={cluster.name(image)},format=raw,if=none,id=d0", "-nbd", f"unix:{sock}",
                        "--pidfile", str(pidfile), "--daemonize"],
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    try:  # a hung child fails the test in a minute (the helpers' qemu_img waits five)
        c = subprocess.run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw",
                            f"nbd+unix:///d0?socket={sock}", cluster.name(image)], capture_output=True, timeout=60)
        assert c.returncode == 0, c.stdout + c.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while pidfile.exists() and time.monotonic() < deadline:  # removed once the drive is closed
            time.sleep(0.05)
        if pidfile.exists():
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the daemon did not end on SIGTERM")


def test_probing_warning_names_the_rbd_node(cluster: ceph.CephCluster, tmp_path: Path) -> None:
    """A -drive on an rbd name without format= warns once with the rbd node's json: name, as QEMU."""
    import subprocess
    import sys

    from tests.conftest import require_tool
    from tests.daemon.conftest import _ENV, QEMU_BASE

    image = cluster.unique("warn")
    cluster.rbd("create", "--size", "1M", f"rbd/{image}")
    drive = ["-drive", f"file={cluster.name(image)},if=none,id=d0"]
    out = []
    for cmd in ([require_tool("qemu-system-x86_64"), *QEMU_BASE], [sys.executable, "-m", "vdkit.daemon.main", "-S"]):
        p = subprocess.Popen([*cmd, *drive, "-qmp", f"unix:{tmp_path}/q{len(out)}.sock,server=on,wait=off"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV,
                             cwd=tmp_path)
        assert p.stderr is not None
        lines = [p.stderr.readline().decode() for _ in range(3)]
        p.kill()
        p.wait()
        p.stderr.close()
        out.append(lines)
    assert out[0] == out[1]
    assert f'"image": "{image}"' in out[0][0]


def test_blockdev_rbd_nodes(daemons: Daemons, cluster: ceph.CephCluster, tmp_path: Path) -> None:  # noqa: F811
    """-blockdev driver=rbd (dotted keys, and JSON with a server list under raw) in the node queries."""
    image = cluster.unique("bd")
    _image(cluster, image, "8M")
    args = ["-blockdev", f"driver=rbd,node-name=n0,pool=rbd,image={image},conf={cluster.conf}",
            "-blockdev", '{"driver": "raw", "node-name": "r0", "read-only": true, "file": {"driver": "rbd", '
                         f'"pool": "rbd", "image": "{image}", "snapshot": "cli-snap", '
                         f'"server": [{{"host": "127.0.0.1", "port": "{cluster.port}"}}]}}}}']
    q, v = _pair(daemons, args, args, tmp_path)
    assert normalise(v.cmd_line("query-named-block-nodes")) == normalise(q.cmd_line("query-named-block-nodes"))
    assert normalise(v.cmd_line("query-block")) == normalise(q.cmd_line("query-block"))
    assert normalise_hmp(v.hmp("info block -n")) == normalise_hmp(q.hmp("info block -n"))
    bad = {"driver": "rbd", "node-name": "n1", "pool": "rbd"}
    assert v.cmd_line("blockdev-add", bad) == q.cmd_line("blockdev-add", bad)


def test_no_image_locking(daemons: Daemons, cluster: ceph.CephCluster, tmp_path: Path) -> None:  # noqa: F811
    """QEMU takes no lock on rbd images: while a daemon (QEMU's or vdkit's) holds one writable, both
    tools read it without -U, take snapshots of it and write to it; query-snapshots lists them."""
    from tests.conftest import vdkit_img

    image = cluster.unique("lock")
    _image(cluster, image, "4M")
    drive = ["-drive", f"file={cluster.name(image)},format=raw,if=none,id=d0"]
    (tmp_path / "q").mkdir()
    (tmp_path / "v").mkdir()
    _, qpath, _ = daemons.qemu(drive, tmp_path / "q")
    _, vpath, _ = daemons.vdkit(drive, tmp_path / "v")
    v = daemons.monitor(vpath).negotiate()
    daemons.monitor(qpath).negotiate()
    for n, tool in enumerate((qemu_img, vdkit_img)):
        assert tool("info", cluster.name(image)).returncode == 0
        r = tool("snapshot", "-c", f"while-held-{n}", cluster.name(image))
        assert r.returncode == 0, r.stderr
    cluster.qemu_io(image, "write -P 0x5 0 4k")
    names = [s["name"] for s in v.cmd("query-snapshots")["return"]]
    assert names == ["cli-snap", "while-held-0", "while-held-1"]


def test_internal_snapshots_on_blockdev_nodes(daemons: Daemons, cluster: ceph.CephCluster,  # noqa: F811
                                              tmp_path: Path) -> None:
    """blockdev-snapshot-internal-sync/-delete-internal-sync by node name on -blockdev nodes: an rbd node,
    raw over rbd, a qcow2 node, a file node (no snapshots) and non-root nodes, as QEMU answers."""
    base = cluster.unique("gsnap")
    for side in ("q", "v"):
        _image(cluster, f"{side}-{base}", "8M")
        (tmp_path / side).mkdir()
        assert qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / side / "a.qcow2"), "8M").returncode == 0
        assert qemu_img("create", "-q", "-f", "raw", str(tmp_path / side / "b.raw"), "8M").returncode == 0

    def args(image: str) -> list[str]:
        conf = cluster.conf
        return ["-blockdev", f"driver=rbd,node-name=n0,pool=rbd,image={image},conf={conf}",
                "-blockdev", "driver=file,node-name=f0,filename=a.qcow2",
                "-blockdev", "driver=qcow2,node-name=q0,file=f0",
                "-blockdev", "driver=file,node-name=f1,filename=b.raw",
                "-blockdev", f"driver=raw,node-name=r1,file.driver=rbd,file.pool=rbd,file.image={image}-2,"
                             f"file.conf={conf},file.node-name=n1"]

    for side in ("q", "v"):
        _image(cluster, f"{side}-{base}-2", "8M")
    _, qpath, _ = daemons.qemu(args(f"q-{base}"), tmp_path / "q")
    _, vpath, _ = daemons.vdkit(args(f"v-{base}"), tmp_path / "v")
    q, v = daemons.monitor(qpath).negotiate(), daemons.monitor(vpath).negotiate()
    steps = [("blockdev-snapshot-internal-sync", {"device": d, "name": "g1"})
             for d in ("n0", "q0", "f0", "f1", "r1", "n1", "nosuch", "n0", "r1")]
    steps += [("blockdev-snapshot-delete-internal-sync", {"device": d, "name": "g1"})
              for d in ("n0", "q0", "f0", "f1", "r1", "n1", "n0")]
    steps += [("blockdev-snapshot-delete-internal-sync", {"device": "n0", "name": "cli-snap", "id": "x"})]
    for cmd, arguments in steps:
        theirs = normalise(q.cmd_line(cmd, arguments))
        ours = normalise(v.cmd_line(cmd, arguments)).replace(f"v-{base}", f"q-{base}")
        assert ours == theirs, (cmd, arguments)
    for image in (base, f"{base}-2"):  # the RBD images' own snapshot lists ended alike
        names = [[line.split()[1] for line in cluster.rbd("snap", "ls", f"rbd/{side}-{image}").stdout.splitlines()[1:]]
                 for side in ("q", "v")]
        assert names[0] == names[1]
