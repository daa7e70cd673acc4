"""The benchmark harness every ``bench/*.py`` script shares: measure vdkit the way a user meets it.

Why each rule (issue 14: the old figures came from an editable venv on an idle machine):

* **Installed, not editable.**  ``make bench`` builds a fresh virtualenv with ``pip install .``
  and runs every script with its interpreter; :func:`vdkit_bin` is that venv's console script.
  An editable install adds its finder to every start, so :func:`install_note` says which kind ran.
* **Whole processes**, timed from ``fork`` to ``wait4``, with their CPU time and max RSS from the
  kernel's rusage of that child (:func:`run`).
* **Same machine for both tools.**  Samples of the commands compared are interleaved, the order
  rotating every round (:func:`interleave`); medians are reported with the spread of the per-round
  ratios, so a burst of load from another process hits both sides alike.
* **No writeback debt.**  Before a sample that writes, the previous output is deleted and ``sync``
  runs, so no tool pays for the other's dirty pages.
* **Busy machines.**  :func:`rounds` runs each case idle and again with one core kept busy by a
  spinning process (users' machines are busy; thread hand-offs show up there).

A ratio is always "how many times vdkit's throughput": the other tool's median time divided by
vdkit's (above 1: vdkit is faster).  Scripts import this module by name (``bench/`` is the
script's ``sys.path[0]``), never ``vdkit`` from the checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIME = "/usr/bin/time"  # GNU time (Debian package time): max RSS of a child, see run()


def tool(name: str) -> str:
    """Path of a system tool the benchmark compares with (missing: stop, never skip)."""
    path = shutil.which(name)
    if path is None:
        sys.exit(f"{name} is required (make system-deps)")
    return path


def vdkit_bin(name: str = "vdkit-img") -> list[str]:
    """The console script of the interpreter's venv, as a user runs it."""
    path = BIN / name
    if not path.exists():
        sys.exit(f"{path} not found: run the benchmarks through 'make bench' (or a venv where vdkit is installed)")
    return [str(path)]


def install_note() -> str:
    """Which vdkit the scripts measure: an installed copy or an editable checkout (not representative)."""
    out = subprocess.run([sys.executable, "-c", "import vdkit; print(vdkit.__file__)"], capture_output=True,
                         text=True, check=True, cwd="/").stdout.strip()
    kind = "EDITABLE checkout (start-up not representative)" if out.startswith(str(ROOT / "vdkit")) else "installed"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"vdkit: {kind} at {Path(out).parent}; python {sys.version.split()[0]}; load average {load}"


@dataclass
class Sample:
    wall: float  # seconds
    cpu: float  # user + system seconds of the process (and its waited-for children)
    rss: int  # max resident set, KiB
    server_cpu: float = 0.0  # CPU seconds the server (a daemon the command talks to) spent meanwhile


def run(cmd: Sequence[str], *, cwd: Path | None = None, out: Path | None = None, sync: bool = False,
        env: dict[str, str] | None = None) -> Sample:
    """One whole process: ``sync`` then ``out`` deleted first when asked; its wall time, CPU and max RSS.

    The command runs under ``/usr/bin/time``: a child's rusage counts the memory of the process it
    was forked from (the pages a fork copies and ``exec`` drops), so a large benchmark script would
    inflate every figure; ``time`` is a small parent and reports its child's own peak.
    """
    if sync or out is not None:
        os.sync()
    if out is not None:
        # deleted after the sync, just before the run: the page-cache pages it frees are the ones the
        # run's writes take, as on any machine.  This VM's balloon reports freed memory to the host
        # about 2 s after it is freed and a touch then costs a host fault (512 MiB into a new file:
        # 0.12 s of system time right after a delete, 0.6-1.2 s after 2-5 s); deleted before a sync
        # of a few seconds, a sample's speed depended on how long that sync took (see bench/jobs.py)
        out.unlink(missing_ok=True)
    rss_file = Path(tempfile.gettempdir()) / f"vdkit-bench-rss.{os.getpid()}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([TIME, "-q", "-f", "%M", "-o", str(rss_file), *cmd], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    rss = int(rss_file.read_text().split()[-1])
    rss_file.unlink()
    return Sample(wall, ru.ru_utime + ru.ru_stime, rss)


@dataclass
class Case:
    """One command of a comparison; ``out``: its output file (deleted and synced before each sample)."""

    name: str
    cmd: Sequence[str] | Callable[[], Sample]
    out: Path | None = None
    cwd: Path | None = None
    server_pid: int | None = None  # a daemon serving the command: its CPU time is sampled too
    samples: list[Sample] = field(default_factory=list)

    def sample(self) -> Sample:
        before = proc_cpu(self.server_pid) if self.server_pid else 0.0
        s = self.cmd() if callable(self.cmd) else run(self.cmd, cwd=self.cwd, out=self.out)
        if self.server_pid:
            s.server_cpu = proc_cpu(self.server_pid) - before
        self.samples.append(s)
        return s


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used so far.

    On a loaded machine a server's CPU per request is a steadier measure of its efficiency
    than the client's wall time, which includes waiting for a core."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def instructions(cmd: Sequence[str], cwd: Path | None = None) -> int:
    """User-space instructions of one whole process, counted by callgrind: the figure the load of a
    shared machine does not move (a script's ``#!`` line is not followed: give its interpreter)."""
    out = subprocess.run([tool("valgrind"), "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
                         cwd=cwd, capture_output=True, text=True, check=True).stderr
    return int(next(line for line in out.splitlines() if "Collected" in line).split()[-1])


def interleave(cases: Sequence[Case], repeat: int) -> None:
    """``repeat`` samples of every case, one of each per round, the order rotated every round."""
    for c in cases:
        c.samples.clear()
    for i in range(repeat):
        k = i % len(cases)
        for c in [*cases[k:], *cases[:k]]:
            c.sample()


def med(samples: Sequence[Sample], attr: str = "wall") -> float:
    return statistics.median(getattr(s, attr) for s in samples)


def ratio_line(label: str, theirs: Case, ours: Case, *, nbytes: int = 0) -> str:
    """``label``: both medians, the ratio (their time / ours), per-round spread, CPU and max RSS."""
    t, o = med(theirs.samples), med(ours.samples)
    per_round = sorted(a.wall / b.wall for a, b in zip(theirs.samples, ours.samples, strict=True))
    rate = f"  MiB/s {nbytes / t / (1 << 20):.0f}/{nbytes / o / (1 << 20):.0f}" if nbytes else ""
    return (f"{label:<34} {theirs.name} {t * 1e3:8.1f} ms  vdkit {o * 1e3:8.1f} ms  ratio {t / o:5.2f}"
            f"{rate}  (rounds {per_round[0]:.2f}..{per_round[-1]:.2f}, n={len(per_round)}; "
            f"CPU {med(theirs.samples, 'cpu'):.3f}/{med(ours.samples, 'cpu'):.3f} s; "
            f"max RSS {med(theirs.samples, 'rss') / 1024:.0f}/{med(ours.samples, 'rss') / 1024:.0f} MB"
            + (f"; server CPU {med(theirs.samples, 'server_cpu'):.3f}/{med(ours.samples, 'server_cpu'):.3f} s"
               if ours.samples and ours.samples[0].server_cpu else "") + ")")


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """One core kept busy by another process (a spinning interpreter) while the block runs."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.2)  # let it get scheduled before the first sample
        yield
    finally:
        spin.kill()
        spin.wait()


def rounds(which: str = "both") -> Iterator[str]:
    """Yield ``"idle"`` then ``"busy"`` (with :func:`busy_core` held around the busy round)."""
    if which in ("both", "idle"):
        yield "idle"
    if which in ("both", "busy"):
        with busy_core():
            yield "busy"


def add_common_args(ap: argparse.ArgumentParser, repeat: int = 5) -> None:
    """The options every script takes: ``--rounds idle|busy|both`` and ``--repeat``."""
    ap.add_argument("--rounds", choices=["idle", "busy", "both"], default="both",
                    help="idle machine, one core kept busy by another process, or both (default)")
    ap.add_argument("--repeat", type=int, default=repeat, help=f"interleaved samples per case (default {repeat})")


def same_file(a: Path, b: Path) -> bool:
    """Byte comparison in 16 MiB pieces (outputs are gigabytes)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def make_data_raw(path: Path, size: int, seed: int = 5) -> Path:
    """A raw file of 1/2 random data, 1/4 zeros written as data, 1/4 holes, in 1 MiB stripes."""
    import random

    rnd = random.Random(seed)
    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // mib):
            kind = i % 4
            if kind in (0, 2):
                f.seek(i * mib)
                f.write(rnd.randbytes(mib))
            elif kind == 1:
                f.seek(i * mib)
                f.write(bytes(mib))
    return path


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait until a daemon's unix socket exists (the daemon dying first ends the benchmark)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"daemon did not start: {proc.args}")
        time.sleep(0.02)


def peak_rss_kib(pid: int) -> int:
    """A running process's max resident set so far (VmHWM), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
