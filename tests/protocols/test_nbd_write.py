"""Writing over NBD: ``convert`` to an export, ``create`` on an NBD name, library writes.

Each case runs qemu-img (or qemu-io) and vdkit on the same export, reset in
between, and compares what they print, what the export holds afterwards and,
where nbdkit's ``log`` filter records it, the requests they sent
(``shared/reference/protocols.md`` §1.7 and §1.9).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_img, qemu_io, require_tool, vdkit_img
from tests.nbd.conftest import free_port, short_sock
from tests.protocols.test_nbd_client import QemuNbd, qnbd  # noqa: F401  (fixture)

SIZE = 16 << 20


class Nbdkit:
    """A writable 16 MiB nbdkit export of ``k.raw`` (file plugin) with a request log."""

    def __init__(self, tmp: Path, *filters: str, params: tuple[str, ...] = ()) -> None:
        self.image = tmp / "k.raw"
        self.log = tmp / "k.log"
        self.sock = short_sock("k.sock")
        self.uri = f"nbd+unix:///kx?socket={self.sock}"
        self.fill(0x77)
        args = [require_tool("nbdkit"), "-f", "-U", self.sock, "-e", "kx", "--filter=log", *filters,
                "file", str(self.image), f"logfile={self.log}", *params]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)

    def fill(self, byte: int) -> None:
        self.image.write_bytes(bytes([byte]) * SIZE)

    def requests(self) -> list[str]:
        """The logged requests, without times, connection numbers and replies; the log is reset."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = re.search(r"connection=\d+ (\w+ id=\d+.*?) \.\.\.$", line)
            if m:
                out.append(m.group(1))
        self.log.write_text("")
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def kit(tmp_path: Path) -> Iterator[Nbdkit]:
    k = Nbdkit(tmp_path)
    yield k
    k.stop()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """r.raw: 16 MiB, data at [0, 64k) and [1M, 1M+128k), zeros elsewhere (sparse)."""
    r = tmp_path / "r.raw"
    check_ok("create", "-q", "-f", "raw", str(r), "16M")
    assert qemu_io("-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 128k", str(r)).returncode == 0
    return r


def _both(kit: Nbdkit, args: list[str], fill: int = 0x77) -> tuple[bytes, list[str]]:
    """Run ``args`` with qemu-img then vdkit-img on a freshly filled export; same output, bytes, requests."""
    kit.fill(fill)
    kit.requests()
    q = qemu_img(*args)
    q_bytes, q_reqs = kit.image.read_bytes(), kit.requests()
    kit.fill(fill)
    v = vdkit_img(*args)
    assert "Traceback" not in v.stderr, v.stderr
    assert (v.stdout, v.normalized_stderr(), v.returncode) == (q.stdout, q.stderr, q.returncode), args
    v_bytes, v_reqs = kit.image.read_bytes(), kit.requests()
    return q_bytes if q_bytes == v_bytes else b"", [f"qemu: {r}" for r in q_reqs] + [f"vdkit: {r}" for r in v_reqs] \
        if q_reqs != v_reqs else q_reqs


def test_convert_raw_to_nbd_writes_data_zeroes_holes_and_flushes_once(kit: Nbdkit, src: Path) -> None:
    spec = f"driver=nbd,server.type=unix,server.path={kit.sock},export=kx"  # the export without format layer
    for args in (["-O", "raw", kit.uri], ["-n", "-O", "raw", kit.uri], ["-n", "--target-image-opts", spec]):
        data, reqs = _both(kit, ["convert", "-f", "raw", *args[:-1], str(src), args[-1]])
        assert data == src.read_bytes()
        assert all(not r.startswith(("qemu:", "vdkit:")) for r in reqs), reqs
        assert [r.split()[0] for r in reqs][-5:] == ["Write", "Zero", "Write", "Zero", "Flush"], reqs
        assert all("trim=1" in r for r in reqs if r.startswith("Zero")), reqs


def test_convert_qcow2_to_nbd(kit: Nbdkit, src: Path, tmp_path: Path) -> None:
    # on a zeroed export the bytes agree; on a used one what qemu-img reads back does
    data, _ = _both(kit, ["convert", "-O", "qcow2", str(src), kit.uri], fill=0)
    assert data, "exports differ after convert -O qcow2"
    for fill in (0x77, 0):
        kit.fill(fill)
        q = qemu_img("convert", "-O", "qcow2", str(src), kit.uri)
        q_out = [qemu_img(*a, kit.uri).stdout for a in (["info"], ["check"], ["map", "--output=json"])]
        q_cmp = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(src), kit.uri)
        kit.fill(fill)
        v = vdkit_img("convert", "-O", "qcow2", str(src), kit.uri)
        assert (q.returncode, q.stderr, v.returncode, v.stderr) == (0, "", 0, "")
        assert [qemu_img(*a, kit.uri).stdout for a in (["info"], ["check"], ["map", "--output=json"])] == q_out
        v_cmp = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(src), kit.uri)
        assert (v_cmp.stdout, v_cmp.returncode) == (q_cmp.stdout, q_cmp.returncode) == ("Images are identical.\n", 0)


@pytest.mark.parametrize("args", [
    ["create", "-f", "raw", "{k}", "1M"],
    ["create", "-f", "raw", "{k}", "16M"],
    ["create", "-f", "raw", "{k}", "1G"],                       # Cannot grow NBD nodes
    ["create", "-f", "raw", "-o", "preallocation=full", "{k}", "1M"],
    ["create", "-f", "qcow2", "{k}", "1G"],                     # qcow2 needs only its metadata in the export
    ["create", "-f", "qcow2", "-o", "cluster_size=4096,lazy_refcounts=on", "{k}", "4G"],
    ["create", "-f", "qcow2", "-o", "preallocation=metadata", "{k}", "2M"],
])
def test_create_on_nbd(kit: Nbdkit, args: list[str]) -> None:
    args = [a.replace("{k}", kit.uri) for a in args]
    for fill in (0, 0x55):
        data, reqs = _both(kit, args, fill=fill)
        if fill == 0 or args[2] == "raw":  # qcow2 leaves old bytes in the unused parts of its clusters
            assert data, f"exports differ after {args}"
        if args[2] == "raw":
            assert all(not r.startswith(("qemu:", "vdkit:")) for r in reqs), reqs


def test_refusals(qnbd: QemuNbd, kit: Nbdkit, src: Path, tmp_path: Path) -> None:  # noqa: F811
    big = tmp_path / "big.raw"
    check_ok("create", "-q", "-f", "raw", str(big), "64M")
    ro = short_sock("ro.sock")
    qnbd.start(src, "-k", ro, "-x", "ro", "-r", "-f", "raw")
    q = short_sock("q.sock")
    qnbd.start(big, "-k", q, "-x", "d", "-f", "raw")
    ro_uri, big_uri, dead = f"nbd+unix:///ro?socket={ro}", f"nbd+unix:///d?socket={q}", f"nbd://127.0.0.1:{free_port()}/r"
    for args in (["convert", "-O", "raw", big_uri, kit.uri],        # error while converting raw: Cannot grow
                 ["convert", "-n", "-O", "raw", big_uri, kit.uri],  # output file is smaller than input file
                 ["convert", "-n", "-O", "raw", str(src), ro_uri],  # Could not open ...: Permission denied
                 ["convert", "-O", "raw", str(src), ro_uri],
                 ["convert", "-O", "qcow2", str(src), ro_uri],
                 ["convert", "-O", "raw", str(src), dead],
                 ["create", "-f", "raw", ro_uri, "16M"],
                 ["create", "-f", "qcow2", ro_uri, "16M"],
                 ["create", "-f", "raw", dead, "64M"],
                 ["create", "-f", "raw", "-o", "preallocation=falloc", kit.uri, "1M"]):
        _both(kit, args)
    assert src.read_bytes()[:65536] == b"\x11" * 65536


def test_library_writes_honour_block_size(tmp_path: Path) -> None:
    """A 4 KiB-block export: unaligned writes become read-modify-write of whole blocks, as qemu-io's."""
    import vdkit

    kit = Nbdkit(tmp_path, "--filter=blocksize-policy", params=("blocksize-minimum=4096", "blocksize-maximum=1M",
                                                               "blocksize-error-policy=error"))
    try:
        ops = [("write", 100, b"\x42" * 512), ("write", 8192, b"\x43" * (3 << 20)), ("zero", 5000, 10000),
               ("write", SIZE - 700, b"\x44" * 700)]
        kit.requests()
        cmds = []
        for op, off, arg in ops:
            cmds += ["-c", f"write -P 0x{arg[0]:02x} {off} {len(arg)}" if op == "write" else f"write -z {off} {arg}"]
        r = qemu_io("-f", "raw", *cmds, kit.uri)
        assert r.returncode == 0, r.stderr
        q_bytes, q_reqs = kit.image.read_bytes(), kit.requests()
        kit.fill(0x77)
        with vdkit.open(kit.uri, "raw", readonly=False) as node:
            for op, off, arg in ops:
                if op == "write":
                    node.write(off, arg)  # type: ignore[arg-type]
                else:
                    node.write_zeroes(off, arg)  # type: ignore[arg-type]
        assert kit.image.read_bytes() == q_bytes
        v_reqs = kit.requests()
        # the same block-aligned writes (qemu-io writes through: FUA, which a library node does not set)
        def writes(reqs: list[str]) -> list[str]:
            return [re.sub(r"id=\d+ | fua=\d", "", r) for r in reqs if r.startswith(("Write", "Zero"))]

        assert writes(v_reqs) == writes(q_reqs), (q_reqs, v_reqs)
    finally:
        kit.stop()


def test_read_only_export_refuses_writers(qnbd: QemuNbd, src: Path) -> None:  # noqa: F811
    import vdkit
    from vdkit.errors import OpenError

    ro = short_sock("ro.sock")
    qnbd.start(src, "-k", ro, "-x", "ro", "-r", "-f", "raw")
    uri = f"nbd+unix:///ro?socket={ro}"
    q = qemu_io("-f", "raw", "-c", "write 0 512", uri)
    assert q.returncode == 1 and q.stderr.endswith("Could not open image: Permission denied\n"), q.stderr
    with pytest.raises(OpenError, match="Could not open image: Permission denied$"):
        vdkit.open(uri, "raw", readonly=False)
    with vdkit.open(uri, "raw") as node:
        assert node.read(0, 4) == b"\x11" * 4


def test_resize_refused_unless_the_size_stays(kit: Nbdkit) -> None:
    spec = f"driver=nbd,server.type=unix,server.path={kit.sock},export=kx"
    for args in (["resize", kit.uri, "32M"], ["resize", "--shrink", kit.uri, "8M"], ["resize", kit.uri, "16M"],
                 ["resize", "-f", "raw", kit.uri, "+1M"], ["resize", "--image-opts", spec, "+1M"],
                 ["resize", "--image-opts", spec, "16M"]):
        data, _ = _both(kit, args)
        assert data == bytes([0x77]) * SIZE, args
