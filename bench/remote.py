#!/usr/bin/env python3
"""Benchmark images over the network: vdkit-img against qemu-img, same servers, same data, same run.

Cases (issue 13, "Speed"), on one raw image of ``--size-mib`` (default 1 GiB: 1/2 random data,
1/4 zeros written as data, 1/4 holes, ``harness.make_data_raw``):

* ``convert`` to a local raw file from NBD (a read-only ``qemu-nbd`` export on a unix socket) and
  from HTTP (``nginx`` on 127.0.0.1); target: ratio >= 0.7 (0.7x qemu-img's throughput);
* ``info`` over each protocol; target: vdkit's time within 2x qemu-img's plus a bare interpreter
  start (``python -c pass`` of the same venv), printed as ``vdkit / (2 * qemu + bare) <= 1``.

and for RBD (a throwaway single-node Ceph cluster, ``tests/helpers/ceph-test-cluster.sh``, started here):

* ``convert`` to a local raw file from an RBD image and from the local raw file to a new RBD image (the
  target is removed, untimed, before every sample); target: ratio >= 0.7.

Outputs are compared first (the
converted files byte for byte with the source, the ``info`` texts equal).  qemu-img 7.2's curl driver
hangs in ``convert`` on a healthy nginx most of the time with its default 8 parallel requests (4 runs
of 5 on a loaded machine; ``tests/protocols/test_http.py``), never with ``-m 1``: the HTTP case runs
both tools with ``-m 1`` (vdkit's requests are sequential anyway).  Every sample still runs under
``timeout``: a hung one is killed after ``HANG_SECONDS`` and retried, and the hang is reported.
Timing rules and output format are ``bench/harness.py``'s (interleaved samples, idle and busy rounds).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import harness as h

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after site-packages: the installed vdkit stays the one measured
from tests.helpers import net, nginx  # noqa: E402  (the tests' nginx set-up; it needs no pytest)

HANG_SECONDS = 120
MODE: dict[str, list[str]] = {"nbd": [], "http": ["-m", "1"], "rbd": []}
CEPH_SCRIPT = ROOT / "tests" / "helpers" / "ceph-test-cluster.sh"
"""Extra convert options per protocol: one request at a time over HTTP (see the module doc)."""
RBD_OPTS = ""
"""librados options appended to every rbd: name (``--rbd-delay``: the messenger's injected delay, which
makes the local cluster latency bound like one across a network)."""

def guarded(cmd: list[str], out: Path | None, cwd: Path) -> Callable[[], h.Sample]:
    """A sample of ``cmd`` under ``timeout``; a hang (qemu-img's curl driver) is killed and retried."""

    def sample() -> h.Sample:
        for _ in range(3):
            try:
                return h.run(["timeout", "-s", "KILL", str(HANG_SECONDS), *cmd], cwd=cwd, out=out)
            except SystemExit as exc:
                if "failed (-9)" not in str(exc) and "failed (137)" not in str(exc):
                    raise
                print(f"hung for {HANG_SECONDS} s, killed and retried: {' '.join(cmd)}", flush=True)
        sys.exit(f"three hangs in a row: {' '.join(cmd)}")

    return sample


def start_rbd(folder: Path, src: Path, size: int) -> str:
    """A one-node cluster in ``folder`` holding ``src`` as image ``src`` (its memory: the data, twice over)."""
    import random

    env = dict(os.environ, CEPH_PORT=str(random.randrange(20000, 60000, 100)),
               CEPH_MEM_BYTES=str(max(4 << 30, 6 * size)))
    env.pop("CEPH_CONF", None)
    p = subprocess.run([str(CEPH_SCRIPT), "start", str(folder)], env=env, capture_output=True, text=True,
                       timeout=180)
    if p.returncode != 0:
        sys.exit(f"the Ceph cluster did not start: {p.stderr[-2000:]}")
    name = f"rbd:rbd/src:conf={folder}/ceph.conf{RBD_OPTS}"
    subprocess.run([h.tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", str(src), name], check=True,
                   timeout=HANG_SECONDS)
    return name


def to_rbd(cmd: list[str], src: Path, target: str, conf: str, cwd: Path) -> Callable[[], h.Sample]:
    """A sample of ``convert`` from ``src`` into a new RBD image ``target`` (removed first, untimed)."""

    def sample() -> h.Sample:
        subprocess.run(["rbd", "-c", conf, "rm", f"rbd/{target}"], capture_output=True, timeout=HANG_SECONDS)
        return guarded([*cmd, "convert", "-f", "raw", "-O", "raw", str(src), f"rbd:rbd/{target}:conf={conf}{RBD_OPTS}"],
                       None, cwd)()

    return sample


def text_of(cmd: list[str], cwd: Path) -> str:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True, timeout=HANG_SECONDS).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the image (default 1024)")
    ap.add_argument("--only", choices=["nbd", "http", "rbd"], help="run one protocol")
    ap.add_argument("--rbd-delay", type=float, default=0.0, metavar="SECONDS",
                    help="librados' injected messenger delay (up to SECONDS per message to the OSD), for both tools")
    h.add_common_args(ap, repeat=3)
    a = ap.parse_args()
    if a.rbd_delay:
        global RBD_OPTS
        RBD_OPTS = (":ms_inject_delay_type=osd:ms_inject_delay_probability=1"
                    f":ms_inject_delay_max={a.rbd_delay}")
    print(h.install_note(), flush=True)
    qi, vd = h.tool("qemu-img"), h.vdkit_bin()
    bare = [sys.executable, "-c", "pass"]
    servers: list[subprocess.Popen[bytes]] = []
    nbd_pid: int | None = None
    ceph_dir: Path | None = None
    with tempfile.TemporaryDirectory(prefix="vdkit-bench-remote-") as tmp:
        d = Path(tmp)
        www = d / "www"
        www.mkdir()
        size = a.size_mib << 20
        src = h.make_data_raw(www / "src.raw", size)
        names: dict[str, str] = {}
        try:
            if a.only in (None, "rbd"):
                ceph_dir = d / "ceph"
                names["rbd"] = start_rbd(ceph_dir, src, size)
            if a.only in (None, "nbd"):
                sock = d / "nbd.sock"
                subprocess.run([h.tool("qemu-nbd"), "-r", "-t", "-e", "4", "--fork", "--pid-file", str(d / "nbd.pid"),
                                "-k", str(sock), "-x", "src", "-f", "raw", str(src)], check=True, timeout=30)
                nbd_pid = int((d / "nbd.pid").read_text())
                names["nbd"] = f"nbd+unix:///src?socket={sock}"
            if a.only in (None, "http"):
                port = net.free_port()
                try:
                    servers.append(nginx.start(d, www, port, access_log=False))
                except nginx.NginxError as exc:
                    sys.exit(str(exc))
                names["http"] = f"http://127.0.0.1:{port}/src.raw"
            print(f"image: {a.size_mib} MiB raw ({a.size_mib // 2} MiB random data); protocols: {', '.join(names)}",
                  flush=True)
            for proto, name in names.items():  # outputs first: equal or no timings
                q_out, v_out = d / f"q-{proto}.raw", d / f"v-{proto}.raw"
                conv = ["convert", *MODE[proto], "-f", "raw", "-O", "raw", name]
                guarded([qi, *conv, str(q_out)], q_out, d)()
                guarded([*vd, *conv, str(v_out)], v_out, d)()
                if not (h.same_file(q_out, src) and h.same_file(v_out, src)):
                    sys.exit(f"convert from {proto}: outputs differ from the source")
                if text_of([qi, "info", name], d) != text_of([*vd, "info", name], d):
                    sys.exit(f"info over {proto}: outputs differ")
            if "rbd" in names:  # and into a new RBD image: equal to the source
                conf = names["rbd"].split(":conf=", 1)[1].split(":", 1)[0]
                for cmd, target in (([qi], "q-dst"), (list(vd), "v-dst")):
                    to_rbd(cmd, src, target, conf, d)()
                    back = d / f"{target}.raw"
                    subprocess.run([qi, "convert", "-f", "raw", "-O", "raw", f"rbd:rbd/{target}:conf={conf}",
                                    str(back)], check=True, timeout=HANG_SECONDS)
                    if not h.same_file(back, src):
                        sys.exit(f"convert to rbd ({target}): the image differs from the source")
                    back.unlink()
            for rnd in h.rounds(a.rounds):
                for proto, name in names.items():
                    q_out, v_out = d / f"q-{proto}.raw", d / f"v-{proto}.raw"
                    conv = ["convert", *MODE[proto], "-f", "raw", "-O", "raw", name]
                    q = h.Case("qemu-img", guarded([qi, *conv, str(q_out)], q_out, d))
                    v = h.Case("vdkit", guarded([*vd, *conv, str(v_out)], v_out, d))
                    h.interleave([q, v], a.repeat)
                    print(f"[{rnd}] " + h.ratio_line(f"convert {proto} -> raw", q, v, nbytes=size)
                          + "  (target >= 0.7)", flush=True)
                    qi_case = h.Case("qemu-img", [qi, "info", name], cwd=d)
                    vi_case = h.Case("vdkit", [*vd, "info", name], cwd=d)
                    b_case = h.Case("python", bare, cwd=d)
                    h.interleave([qi_case, vi_case, b_case], a.repeat * 3)
                    tq, tv, tb = h.med(qi_case.samples), h.med(vi_case.samples), h.med(b_case.samples)
                    print(f"[{rnd}] " + h.ratio_line(f"info {proto}", qi_case, vi_case)
                          + f"  vdkit / (2*qemu + bare {tb * 1e3:.1f} ms) = {tv / (2 * tq + tb):.2f} (target <= 1)",
                          flush=True)
                    if proto == "rbd":
                        conf = name.split(":conf=", 1)[1].split(":", 1)[0]
                        q = h.Case("qemu-img", to_rbd([qi], src, "q-dst", conf, d))
                        v = h.Case("vdkit", to_rbd(list(vd), src, "v-dst", conf, d))
                        h.interleave([q, v], a.repeat)
                        print(f"[{rnd}] " + h.ratio_line("convert raw -> rbd", q, v, nbytes=size)
                              + "  (target >= 0.7)", flush=True)
        finally:
            if ceph_dir is not None:
                subprocess.run([str(CEPH_SCRIPT), "destroy", str(ceph_dir)], capture_output=True, timeout=120)
            for proc in servers:
                h.stop(proc)
            if nbd_pid is not None:
                try:
                    os.kill(nbd_pid, 15)
                except ProcessLookupError:
                    pass


if __name__ == "__main__":
    main()
