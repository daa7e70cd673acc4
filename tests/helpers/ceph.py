"""A throwaway single-node Ceph cluster for the RBD tests (``ceph-test-cluster.sh`` next to this file).

One monitor and one memstore OSD on 127.0.0.1, everything in a temporary folder; it starts in about
7 s and is stopped by the session fixture's finaliser (``shared/reference/ceph-rbd.md`` §1).  A cluster
that cannot start fails the tests that need it: Ceph is an oracle's dependency, never a reason to skip.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ceph-test-cluster.sh")


class CephCluster:
    """A running test cluster: its folder, conf file and monitor port, and a few CLI helpers."""

    def __init__(self, folder: Path, port: int, auth: str) -> None:
        self.dir = folder
        self.conf = folder / "ceph.conf"
        self.port = port
        self.auth = auth
        self._count = 0

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, CEPH_CONF=str(self.conf))

    def rbd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the ``rbd`` CLI against this cluster."""
        p = subprocess.run(["rbd", *args], env=self.env, capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            pytest.fail(f"rbd {' '.join(args)} failed: {p.stderr}")
        return p

    def qemu_io(self, image: str, *cmds: str) -> None:
        """qemu-io commands on an image of pool ``rbd`` opened raw; every one must succeed."""
        from tests.helpers.qemu_io import qemu_io_script

        qemu_io_script(None, self.name(image), cmds, "raw")

    def name(self, image: str, extra: str = "", pool: str = "rbd") -> str:
        """``rbd:POOL/IMAGE:conf=CONF`` (``extra``: more ``:key=value`` text after it)."""
        return f"rbd:{pool}/{image}:conf={self.conf}{extra}"

    def unique(self, stem: str) -> str:
        """An image name no other test uses (the cluster lives for the whole session)."""
        self._count += 1
        return f"{stem}-{os.getpid()}-{self._count}"

    def key(self, user: str = "admin") -> str:
        """client.USER's base64 key (cephx clusters)."""
        p = subprocess.run(["ceph", "auth", "get-key", f"client.{user}"], env=self.env, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()


def _ports_free(base: int) -> bool:
    for port in (base, base + 1, base + 10, base + 11):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def start(folder: Path, *, auth: str = "none") -> CephCluster:
    """Start a cluster in ``folder`` (which must not exist yet) on free ports; fail the test if it cannot."""
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing")
    errors = []
    for attempt in range(3):
        base = random.randrange(20000, 60000, 100)
        if not _ports_free(base):
            continue
        where = folder.with_name(f"{folder.name}-{attempt}")
        env = dict(os.environ, CEPH_PORT=str(base), CEPH_AUTH=auth, CEPH_MEM_BYTES=str(2 << 30))
        env.pop("CEPH_CONF", None)
        p = subprocess.run([str(SCRIPT), "start", str(where)], env=env, capture_output=True, text=True, timeout=180)
        if p.returncode == 0 and "ready" in p.stdout:
            return CephCluster(where, base, auth)
        errors.append(p.stderr[-2000:])
        subprocess.run([str(SCRIPT), "destroy", str(where)], capture_output=True, timeout=120)
    pytest.fail("the Ceph test cluster did not start (make system-deps installs ceph-mon ceph-osd ceph-common):\n"
                + "\n".join(errors))


def stop(cluster: CephCluster) -> None:
    """Stop the daemons (by their pid files) and remove the folder."""
    subprocess.run([str(SCRIPT), "destroy", str(cluster.dir)], capture_output=True, timeout=120)


_clusters: dict[str, CephCluster] = {}


def session_cluster(factory: pytest.TempPathFactory, request: pytest.FixtureRequest, auth: str = "none") -> CephCluster:
    """The session's cluster with ``auth`` (started on first use, stopped when the session ends).

    Several test modules share it: each may declare a session fixture calling this.
    """
    cluster = _clusters.get(auth)
    if cluster is None:
        cluster = start(factory.mktemp("ceph") / auth, auth=auth)
        _clusters[auth] = cluster

        def finish() -> None:
            if _clusters.pop(auth, None) is not None:
                stop(cluster)

        request.addfinalizer(finish)
    return cluster
