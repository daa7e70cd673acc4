"""qcow2 data writes in flight (``Qcow2IO.start_pipeline``, used by ``convert -O qcow2``).

The engine allocates and sets L2 entries in memory at once but lets a few threads write the data;
what reaches the disk must keep the crash order of synchronous writes: no L2 table naming a cluster
is written before that cluster's data, counts before tables.  Checked here:

* the order itself: a table write waits for the data in flight (a data write held until the writer
  is seen waiting, so the test needs no timing);
* a process killed (SIGKILL) mid-convert with writes in flight, and L2 tables going out meanwhile
  (a one-table cache): ``qemu-img check`` finds no corruption and every cluster the image maps holds
  the source's bytes;
* an injected write failure mid-convert: qemu-img's message with the failed write's offset, an image
  ``qemu-img check`` finds clean (the failed clusters given back) and whose mapped data is the source's;
* a file-size limit hit mid-convert, against qemu-img: the same message and exit status, and the same
  ``check`` and ``map`` of the two images.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT, check_ok, qemu_img, tool_env, vdkit_img
from vdkit.block import io as bio
from vdkit.block.node import open_image
from vdkit.io.inflight import InFlight


def _source(path: Path, mib: int, seed: int = 3) -> bytes:
    """Random data in 1 MiB stripes: data, zeros written as data, data, a hole (as bench/harness)."""
    rnd = random.Random(seed)
    out = bytearray(mib << 20)
    for i in range(mib):
        if i % 4 in (0, 2):
            out[i << 20 : (i + 1) << 20] = rnd.randbytes(1 << 20)
    path.write_bytes(bytes(out))
    return bytes(out)


def _mapped_data_is_source(img: Path, src: bytes) -> int:
    """Every data range ``qemu-img map`` shows reads (through qemu-img) as the source; the bytes mapped."""
    raw = img.with_suffix(".raw")
    check_ok("convert", "-O", "raw", str(img), str(raw))
    got = raw.read_bytes()
    mapped = 0
    for ext in json.loads(check_ok("map", "--output=json", str(img)).stdout):
        if ext["data"]:
            s, n = ext["start"], ext["length"]
            assert got[s : s + n] == src[s : s + n], f"{img.name}: mapped data at {s} is not the source's"
            mapped += n
    return mapped


def test_table_write_waits_for_data_in_flight(tmp_path: Path, table_backend: str) -> None:
    img = tmp_path / "t.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "8M")
    node = open_image(str(img), "qcow2", readonly=False)
    log: list[tuple[str, int]] = []
    waiting = threading.Event()
    real_wait = InFlight.wait

    def wait(self: InFlight) -> list:  # type: ignore[type-arg]
        waiting.set()
        return real_wait(self)

    try:
        drv = node.driver
        f = drv.file
        real_pwrite, real_pwritev = f.pwrite, f.pwritev

        def pwrite(off: int, data: bytes | bytearray | memoryview) -> None:
            log.append(("table or count", off))
            real_pwrite(off, data)

        def pwritev(off: int, bufs: list[bytes | bytearray | memoryview]) -> None:
            if threading.current_thread() is not threading.main_thread():
                assert waiting.wait(30), "the writer never waited for the data in flight"
            real_pwritev(off, bufs)
            log.append(("data done", off))

        f.pwrite, f.pwritev = pwrite, pwritev  # type: ignore[method-assign]
        InFlight.wait = wait  # type: ignore[method-assign]
        io = drv.io
        io.start_pipeline()
        for k in range(3):
            io.write(k * 200_000 + 8192, bytes([k + 1]) * 100_000)  # partial clusters at both ends
        assert not any(kind == "data done" for kind, _ in log)  # nothing written yet: all in flight
        drv.clusters.l2.flush()  # must wait for the three writes
        l2 = int(drv.clusters.l1[0]) & ((1 << 56) - 4096)
        writes = [i for i, e in enumerate(log) if e == ("table or count", l2)]
        # the empty table, written before it was named in the L1 (no entry set yet), then the flush's
        assert len(writes) == 2, log
        assert [kind for kind, _ in log[: writes[1]]].count("data done") == 3, log
        io.stop_pipeline()
    finally:
        InFlight.wait = real_wait  # type: ignore[method-assign]
        node.close()
    r = qemu_img("check", str(img))
    assert r.returncode == 0, r.stdout + r.stderr
    want = bytearray(8 << 20)
    for k in range(3):
        want[k * 200_000 + 8192 : k * 200_000 + 8192 + 100_000] = bytes([k + 1]) * 100_000
    node = open_image(str(img), "qcow2")
    try:
        assert bio.read(node, 0, 8 << 20) == bytes(want)
    finally:
        node.close()


_SCRIPT = r"""
import os, signal, sys, threading
from vdkit.formats.qcow2 import cluster
from vdkit.io.file import ImageFile

mode, nth, target = sys.argv[1], int(sys.argv[2]), os.path.abspath(sys.argv[4])
real_init = cluster.L2Cache.__init__

def small_cache(self, *a, **k):
    real_init(self, *a, **k)
    self._capacity = 1  # every new table evicts the last one: tables go out while data is in flight

cluster.L2Cache.__init__ = small_cache
real_write_parts, real_pwrite = ImageFile.write_parts, ImageFile.pwrite
count = 0
tables = 0
lock = threading.Lock()

def pwrite(self, off, data):
    global tables
    if os.path.abspath(self.filename) == target and len(data) == 4096:
        tables += 1
    real_pwrite(self, off, data)

def write_parts(self, off, parts):  # (the writer thread's every data write: buffers or file copies)
    global count
    if os.path.abspath(self.filename) == target and threading.current_thread() is not threading.main_thread():
        with lock:
            count += 1
            hit = count == nth
        if hit:
            with open(target + ".seen", "w") as f:  # tables written so far, the kinds of this write's parts
                f.write(" ".join([str(tables), *sorted({type(p).__name__ for p in parts})]))
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(5, "Input/output error")
    real_write_parts(self, off, parts)

ImageFile.write_parts, ImageFile.pwrite = write_parts, pwrite
from vdkit.cli.main import main
sys.exit(main(["convert", *sys.argv[5:], "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", sys.argv[3],
               sys.argv[4]]))
"""


@pytest.mark.parametrize("source", ["mapped", "read"])
@pytest.mark.parametrize("mode", ["kill", "fail"])
def test_convert_interrupted_with_writes_in_flight(tmp_path: Path, table_backend: str, mode: str,
                                                   source: str) -> None:
    """``mapped``: the data goes as views of the mapped source (``FileBytes``: copied by the kernel where
    the file system shares extents, else written from the mapping); ``read`` (``-U``: the source is not
    locked against resizing, so not mapped): written from buffers."""
    src = _source(tmp_path / "src.raw", 24)
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    share = ["-U"] if source == "read" else []
    for nth in (2, 6, 11):  # of 12 data writes (1 MiB each)
        out = tmp_path / f"{mode}{nth}.qcow2"
        p = subprocess.run([sys.executable, str(script), mode, str(nth), "src.raw", out.name, *share], cwd=tmp_path,
                           capture_output=True, text=True, env=tool_env({"PYTHONPATH": str(ROOT)}), timeout=300)
        tables, *kinds = (tmp_path / f"{out.name}.seen").read_text().split()
        assert kinds == (["FileBytes"] if source == "mapped" else ["memoryview"])
        if mode == "kill":
            assert p.returncode == -9, p.stderr
            # tables went out while data was in flight (else the barrier was never tested)
            assert int(tables) > 0
            r = qemu_img("check", str(out))
            assert r.returncode in (0, 3), r.stdout + r.stderr  # leaked clusters at most: no corruption
            assert "ERROR" not in r.stdout + r.stderr
        else:
            assert p.returncode == 1, p.stderr
            assert p.stderr.startswith("vdkit-img: error while writing at byte "), p.stderr
            assert p.stderr.endswith(": Input/output error\n"), p.stderr
            r = qemu_img("check", str(out))
            assert r.returncode == 0, r.stdout + r.stderr  # the failed write's clusters were given back
        mapped = _mapped_data_is_source(out, src)
        if mode == "fail":
            failed_at = int(p.stderr.split("byte ")[1].split(":")[0])
            assert 0 < failed_at < len(src) and mapped <= failed_at + (1 << 20)


@pytest.mark.parametrize("limit", [3 << 20, (6 << 20) + 4096, 8 << 20])
def test_convert_past_a_file_size_limit_like_qemu_img(tmp_path: Path, table_backend: str, limit: int) -> None:
    """Writes past RLIMIT_FSIZE fail with EFBIG (SIGXFSZ ignored) while others are in flight."""
    src = _source(tmp_path / "src.raw", 16)
    under = ["sh", "-c", f'trap "" XFSZ; exec prlimit --fsize={limit} "$@"', "sh"]
    args = ["convert", "-f", "raw", "-O", "qcow2", "src.raw"]
    q = subprocess.run([*under, "qemu-img", *args, "q.qcow2"], cwd=tmp_path, capture_output=True, text=True)
    v = subprocess.run([*under, sys.executable, "-m", "vdkit.cli.main", *args, "v.qcow2"], cwd=tmp_path,
                       capture_output=True, text=True, env=tool_env())
    assert (v.returncode, v.stderr.replace("vdkit-img:", "qemu-img:")) == (q.returncode, q.stderr)
    assert q.returncode == 1
    assert check_ok("map", "--output=json", "v.qcow2", cwd=tmp_path).stdout == \
        check_ok("map", "--output=json", "q.qcow2", cwd=tmp_path).stdout
    cq, cv = qemu_img("check", "q.qcow2", cwd=tmp_path), qemu_img("check", "v.qcow2", cwd=tmp_path)
    assert (cv.returncode, cv.stdout) == (cq.returncode, cq.stdout)
    _mapped_data_is_source(tmp_path / "v.qcow2", src)
    assert vdkit_img("compare", "q.qcow2", "v.qcow2", cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("seed", range(6))
def test_writes_in_flight_leave_the_file_synchronous_writes_leave(tmp_path: Path, table_backend: str,
                                                                   seed: int) -> None:
    """Random overlapping writes (partial clusters, in place over clusters whose data is still in flight,
    new and in-place clusters in one write), zero writes and discards, with the writer threads finishing
    in a shuffled order: the image reads as the model and its file is byte for byte the one the same
    operations give without writes in flight (allocation stays in the caller's order)."""
    import time

    rnd = random.Random(seed)
    cs = rnd.choice([4096, 65536])
    size = 64 * cs
    ops = []
    for _ in range(40):
        kind = rnd.choices(["write", "zero", "discard"], [8, 1, 1])[0]
        off = rnd.randrange(size)
        n = min(size - off, rnd.choice([1, 512, cs // 2, cs, 3 * cs + 7, 9 * cs]))
        ops.append((kind, off, n, rnd.randrange(1, 256)))
    files = {}
    for mode in ("sync", "pipelined"):
        img = tmp_path / f"{mode}.qcow2"
        check_ok("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", str(img), str(size))
        node = open_image(str(img), "qcow2", readonly=False)
        model = bytearray(size)
        try:
            io = node.driver.io
            if mode == "pipelined":
                f = node.driver.file
                real = f.pwritev
                delays = random.Random(seed + 100)

                def shuffled(off: int, bufs: list[bytes | bytearray | memoryview], real=real,  # type: ignore[no-untyped-def]
                             delays=delays) -> None:
                    if threading.current_thread() is not threading.main_thread():
                        time.sleep(delays.random() / 500)  # (completion order, not a timing assertion)
                    real(off, bufs)

                f.pwritev = shuffled  # type: ignore[method-assign]
                io.start_pipeline(3, 1 << 20)
            for kind, off, n, byte in ops:
                if kind == "write":
                    io.write(off, bytes([byte]) * n)
                    model[off : off + n] = bytes([byte]) * n
                elif kind == "zero":
                    io.write_zeroes(off, n, unmap=bool(byte & 1))
                    model[off : off + n] = bytes(n)
                else:
                    io.discard(off, n)  # (whole clusters: they read as zeros, v3)
                    lo, hi = off + (-off) % cs, (off + n) - (off + n) % cs
                    if hi > lo:
                        model[lo:hi] = bytes(hi - lo)
            assert io.read(0, size) == bytes(model)
            io.stop_pipeline()
        finally:
            node.close()
        r = qemu_img("check", str(img))
        assert r.returncode == 0, r.stdout + r.stderr
        files[mode] = img.read_bytes()
    assert files["pipelined"] == files["sync"]
