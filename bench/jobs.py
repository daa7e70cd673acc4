#!/usr/bin/env python3
"""Benchmark block jobs of 1 GiB, vdkit-daemon against qemu-system-x86_64: mirror, commit, stream.

Every job moves the same data: a qcow2 image of 1 GiB virtual, 3/4 of it
allocated (random data, zeros written as data, holes; bench/harness.make_data_raw),
in a chain ``base.qcow2`` (empty) <- ``mid.qcow2`` (the data) <- ``top.qcow2``
(empty), relative header names.  The jobs, each with ``speed`` 0:

* ``mirror``: ``drive-mirror`` sync full of ``mid.qcow2`` (opened alone, its base
  empty) to a new qcow2 target; ready, ``block-job-complete``;
* ``commit``: intermediate ``block-commit`` of ``mid`` into ``base`` (drive on ``top``);
* ``active commit``: ``block-commit`` of the active image ``mid`` into ``base``
  (drive on ``mid``); ready, ``block-job-complete``;
* ``stream``: ``block-stream`` of the whole chain into ``top`` (drive on ``top``).

Daemons are opened with ``-drive file=...,if=none,id=disk0`` (QEMU as
``qemu-system-x86_64 -machine q35,accel=tcg -S -display none -nodefaults``).  One
sample: fresh copies of the pristine chain, ``sync``, start the daemon, run the
same job on a small chain first (a warm-up: a fresh vdkit-daemon's first job
imports its modules), then the job of 1 GiB, quit.  The time is the daemon's own
clock: from the job's ``created`` event to ``BLOCK_JOB_READY`` (jobs with a ready
phase: the copy) and to ``BLOCK_JOB_COMPLETED``, from the events' timestamps, so
process start-up and client latency do not count.  Samples of the two daemons
alternate (bench/harness.py).  After every sample the image the job wrote is
compared with the pristine data image (``qemu-img compare``) before any figure
is printed.

**Page state.**  On this kind of VM (virtio-balloon free page reporting) the
host takes back guest memory that has stayed free for about two seconds, and the
first touch of such a page costs a host fault (6-8 us per 4 KiB page, counted as
system time of the thread that touches it: ``copy_folio_from_iter_atomic`` in
the job's writes).  A job writes 3/4 GiB into new page-cache pages, so its CPU
doubles when they come from reported memory (seen for both daemons).  Each
sample therefore copies its chain into a new folder and deletes the previous
sample's images only after the ``sync``, just before its daemon starts: both
daemons' jobs then begin writing within their start-up and warm-up (well under
the two seconds on a quiet machine) of that free, onto pages still backed.
(Before, ``fresh_chain`` overwrote the previous images before the sync: whether a
job still found the freed pages backed then depended on the sync's duration plus
the daemon's start-up and warm-up, 0.35-0.66 s for vdkit against 0.10-0.18 s for
QEMU, the likely cause of the commit's CPU being bimodal from run to run, 0.26-0.37
s or 0.60-0.78 s.)  On a loaded machine other processes' frees start reporting
passes at any moment, and both daemons' figures still swing.

**query-block latency.**  One more run of each job per daemon and round sends
``query-block`` every 20 ms (client round trip, ``perf_counter``) while the
daemon is idle (before the job) and while the job runs; the medians and the
90th percentiles of both are printed with their ratio (the target: within 2x of idle).

Ratios are QEMU's time / vdkit's (above 1: vdkit faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import harness as h

QEMU_ARGS = ["-machine", "q35,accel=tcg", "-S", "-display", "none", "-nodefaults"]
GiB = 1 << 30
CHAIN = ("base.qcow2", "mid.qcow2", "top.qcow2")
PROBE_EVERY = 0.02  # seconds between query-block probes


class Qmp:
    """A small synchronous QMP client that keeps the events it reads."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(600)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock.connect(str(path))
                break
            except ConnectionRefusedError:  # QEMU binds its socket before it listens on it
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.buf = b""
        self.events: list[dict[str, object]] = []
        self._line()
        self.cmd("qmp_capabilities")

    def _line(self) -> dict[str, object]:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("daemon closed the monitor")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def cmd(self, name: str, args: dict[str, object] | None = None) -> dict[str, object]:
        req: dict[str, object] = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode())
        while True:
            msg = self._line()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                sys.exit(f"{name}: {msg['error']}")
            return msg

    def seen(self, event: str) -> float | None:
        """The timestamp (seconds) of the first ``event`` read so far, or None."""
        for e in self.events:
            if e["event"] == event:
                ts = e["timestamp"]
                assert isinstance(ts, dict)
                return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
        return None

    def wait(self, event: str) -> float:
        """The timestamp (seconds) of the first ``event`` (reading events as they come)."""
        while True:
            ts = self.seen(event)
            if ts is not None:
                return ts
            msg = self._line()
            if "event" in msg:
                self.events.append(msg)

    def created(self) -> float:
        for e in self.events:
            data = e.get("data")
            if e["event"] == "JOB_STATUS_CHANGE" and isinstance(data, dict) and data.get("status") == "created":
                ts = e["timestamp"]
                assert isinstance(ts, dict)
                return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
        raise AssertionError("no created event")


@dataclass(frozen=True)
class Job:
    """One kind of job: the drive's image, the command (``DIR`` stands for the folder), whether it has a
    ready phase (completed by ``block-job-complete``) and the image it leaves with the data."""

    label: str
    drive: str
    command: str
    args: dict[str, object]
    ready: bool
    result: str


JOBS = [
    Job("mirror full", "mid.qcow2", "drive-mirror",
        {"target": "DIR/dst.qcow2", "sync": "full", "format": "qcow2"}, True, "dst.qcow2"),
    Job("commit", "top.qcow2", "block-commit", {"top": "DIR/mid.qcow2", "base": "DIR/base.qcow2"}, False,
        "base.qcow2"),
    Job("active commit", "mid.qcow2", "block-commit", {}, True, "base.qcow2"),
    Job("stream", "top.qcow2", "block-stream", {}, False, "top.qcow2"),
]


def fresh_chain(pristine: Path, folder: Path) -> None:
    """Copies of the pristine chain (and no leftover mirror target) in ``folder``."""
    folder.mkdir(exist_ok=True)
    for name in CHAIN:
        shutil.copyfile(pristine / name, folder / name)
    (folder / "dst.qcow2").unlink(missing_ok=True)


def sample_folder(folder: Path) -> tuple[Path, list[Path]]:
    """A new folder for a sample's chain in ``folder`` and the previous samples' folders (to delete after
    the sync: see the module doc's "Page state")."""
    old = [p for p in folder.iterdir() if p.is_dir()]
    return folder / ("b" if (folder / "a").exists() else "a"), old


def run_job(q: Qmp, job: Job, folder: Path, device: str, job_id: str,
            probe: list[float] | None = None) -> tuple[float | None, float]:
    """Run ``job`` on ``device``; (ready timestamp or None, completed timestamp).  With ``probe``: a
    query-block round trip every PROBE_EVERY seconds until the job completed, their times appended."""
    args = json.loads(json.dumps(job.args).replace("DIR", str(folder)))
    q.cmd(job.command, {"device": device, "job-id": job_id, **args})
    completed = False
    while True:
        if job.ready and not completed and q.seen("BLOCK_JOB_READY") is not None:
            q.cmd("block-job-complete", {"device": job_id})
            completed = True
        if q.seen("BLOCK_JOB_COMPLETED") is not None:
            break
        if probe is None:
            q.wait("BLOCK_JOB_READY" if job.ready and not completed else "BLOCK_JOB_COMPLETED")
            continue
        t0 = time.perf_counter()
        q.cmd("query-block")
        probe.append(time.perf_counter() - t0)
        time.sleep(PROBE_EVERY)
    done = q.wait("BLOCK_JOB_COMPLETED")
    return (q.wait("BLOCK_JOB_READY") if job.ready else None), done


def job_once(cmd: list[str], folder: Path, pristine: Path, warm: Path, job: Job,
             latency: tuple[list[float], list[float]] | None = None) -> tuple[h.Sample, h.Sample]:
    """One job on a fresh daemon: (time to READY or COMPLETED, time to COMPLETED), from the job's events.

    ``latency``: (idle, busy) lists that get query-block round trips before and during the job."""
    folder, old = sample_folder(folder)
    fresh_chain(pristine, folder)
    fresh_chain(warm, folder / "w")
    subprocess.run(["sync"], check=True)
    for p in old:
        shutil.rmtree(p)
    sock = folder / "qmp.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen([*cmd, "-drive", f"file={folder / job.drive},if=none,id=disk0",
                             "-drive", f"file={folder / 'w' / job.drive},if=none,id=disk1", "-qmp",
                             f"unix:{sock},server=on,wait=off"], cwd=folder, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        h.wait_for_socket(sock, proc)
        q = Qmp(sock)
        # the same job on a small chain first: a fresh daemon's first job pays one-time costs (vdkit's
        # lazy imports) that a daemon serving for days does not
        run_job(q, job, folder / "w", "disk1", "w")
        q.events.clear()
        if latency is not None:
            for _ in range(25):
                t0 = time.perf_counter()
                q.cmd("query-block")
                latency[0].append(time.perf_counter() - t0)
                time.sleep(PROBE_EVERY)
        cpu0 = h.proc_cpu(proc.pid)
        ready, done = run_job(q, job, folder, "disk0", "j", probe=None if latency is None else latency[1])
        created = q.created()
        cpu = h.proc_cpu(proc.pid) - cpu0
        rss = h.peak_rss_kib(proc.pid)
        q.cmd("quit")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            h.stop(proc)
    r = subprocess.run([h.tool("qemu-img"), "compare", str(pristine / "mid.qcow2"), str(folder / job.result)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} {job.label}: {job.result} differs from the data: {r.stdout}{r.stderr}")
    first = ready if ready is not None else done
    return h.Sample(first - created, cpu, rss), h.Sample(done - created, cpu, rss)


def make_chain(folder: Path, data: Path | None, size: int) -> None:
    """base (empty) <- mid (``data`` converted, or 8 MiB of a pattern) <- top (empty), relative names."""
    img, io = h.tool("qemu-img"), h.tool("qemu-io")
    folder.mkdir()
    subprocess.run([img, "create", "-q", "-f", "qcow2", "base.qcow2", str(size)], cwd=folder, check=True)
    if data is not None:
        subprocess.run([img, "convert", "-O", "qcow2", str(data), "mid.qcow2"], cwd=folder, check=True)
        subprocess.run([img, "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"], cwd=folder,
                       check=True)
    else:
        subprocess.run([img, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"],
                       cwd=folder, check=True)
        subprocess.run([io, "-c", "write -P 0x5a 0 8M", "mid.qcow2"], cwd=folder, check=True,
                       stdout=subprocess.DEVNULL)
    subprocess.run([img, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
                   cwd=folder, check=True)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def latency_line(label: str, who: str, idle: list[float], busy: list[float]) -> str:
    mi, mb = statistics.median(idle), statistics.median(busy)
    return (f"{label + ' query-block':<34} {who:<5} idle {mi * 1e3:6.2f} ms (p90 {pct(idle, 0.9) * 1e3:6.2f})  "
            f"running {mb * 1e3:6.2f} ms (p90 {pct(busy, 0.9) * 1e3:6.2f}, n={len(busy)})  "
            f"ratio {mb / mi:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    h.add_common_args(ap, repeat=3)
    ap.add_argument("--size", type=int, default=1, help="virtual size in GiB (default 1)")
    ap.add_argument("--jobs", default=",".join(j.label for j in JOBS),
                    help="comma-separated job labels to run (default: all)")
    ap.add_argument("--no-latency", action="store_true", help="skip the query-block latency runs")
    args = ap.parse_args()
    print(h.install_note())
    daemons = {"qemu": [h.tool("qemu-system-x86_64"), *QEMU_ARGS], "vdkit": h.vdkit_bin("vdkit-daemon")}
    wanted = [j for j in JOBS if j.label in args.jobs.split(",")]
    with tempfile.TemporaryDirectory(prefix="vdkit-bench-jobs-", dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        raw = h.make_data_raw(root / "data.raw", args.size * GiB)
        make_chain(root / "pristine", raw, args.size * GiB)
        make_chain(root / "warm", None, 16 << 20)
        raw.unlink()
        folders = {"qemu": root / "q", "vdkit": root / "v"}
        for f in folders.values():
            f.mkdir()
        nbytes = args.size * GiB * 3 // 4
        for label in h.rounds(args.rounds):
            print(f"[{label}]")
            for job in wanted:
                # samples are filled in here (each one restarts a daemon), not by Case.sample
                first = {w: h.Case(w, []) for w in daemons}
                total = {w: h.Case(w, []) for w in daemons}
                for i in range(args.repeat):
                    for who in (["qemu", "vdkit"] if i % 2 == 0 else ["vdkit", "qemu"]):
                        a, b = job_once(daemons[who], folders[who], root / "pristine", root / "warm", job)
                        first[who].samples.append(a)
                        total[who].samples.append(b)
                if job.ready:
                    print(h.ratio_line(f"{job.label} {args.size} GiB to ready", first["qemu"], first["vdkit"],
                                       nbytes=nbytes))
                print(h.ratio_line(f"{job.label} {args.size} GiB completed", total["qemu"], total["vdkit"],
                                   nbytes=nbytes), flush=True)
                if args.no_latency:
                    continue
                for who in daemons:
                    lat: tuple[list[float], list[float]] = ([], [])
                    job_once(daemons[who], folders[who], root / "pristine", root / "warm", job, lat)
                    print(latency_line(job.label, who, *lat), flush=True)


if __name__ == "__main__":
    main()
