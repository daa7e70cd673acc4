"""Shared test machinery: run the real QEMU tools and vdkit side by side.

Tests that need QEMU tools *fail* when the tools are missing (they are the
oracle; a skipped oracle is a defect).  ``make test`` installs them.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QEMU_TOOLS = ("qemu-img", "qemu-io", "qemu-system-x86_64")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def normalized_stderr(self) -> str:
        return self.stderr.replace("vdkit-img:", "qemu-img:").replace("'vdkit-img --help'", "'qemu-img --help'")


def _run(cmd: list[str], cwd: Path | str | None = None, env: dict[str, str] | None = None,
         input: bytes | None = None) -> Result:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, env=env, input=input, timeout=300)
    return Result(p.returncode, p.stdout.decode("utf-8", "surrogateescape"),
                  p.stderr.decode("utf-8", "surrogateescape"))


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; run 'make test' (it installs qemu-utils/qemu-system-x86)")
    return path


def venv_tool(name: str) -> str:
    """A console script installed by pip next to the running interpreter (``qmp-shell`` from qemu.qmp).

    Looked up in ``sys.executable``'s folder, not on ``PATH``: ``.venv/bin/python -m pytest`` does not put
    ``.venv/bin`` on ``PATH``, and a copy left on ``PATH`` by an earlier install must not stand in for it.
    """
    path = Path(sys.executable).parent / name  # not resolved: the venv's bin/, not the base interpreter's
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} is not installed next to {sys.executable}; run 'make test' (it pip-installs .[test])")
    return str(path)


def qemu_img(*args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None) -> Result:
    return _run([require_tool("qemu-img"), *args], cwd=cwd, env=env)


PBKDF_FLAKE = "Unable to get accurate CPU usage"


def qemu_img_pbkdf(*args: str, cwd: Path | str | None = None) -> Result:
    """qemu-img creating LUKS key material, with nettle's plain C code (``NETTLE_FAT_OVERRIDE=none``).

    qemu-img calibrates PBKDF2 on its thread's ``ru_utime`` and refuses with PBKDF_FLAKE when a first round
    of 32768 iterations shows no CPU time.  On a tick-accounted kernel (``CONFIG_TICK_CPU_ACCOUNTING``,
    HZ=250) a running thread's time only moves at a tick or a context switch, and with SHA-NI that round
    takes about 2 ms: 9 create runs in 10 failed on an idle machine.  The portable code takes long enough
    for a tick to land (0 failures in 80); the key material is the same bytes either way.  A retry remains
    for a machine busier still; any other result is returned at once."""
    import time

    env = dict(os.environ, NETTLE_FAT_OVERRIDE="none")
    for attempt in range(4):
        r = _run([require_tool("qemu-img"), *args], cwd=cwd, env=env)
        if r.returncode == 0 or PBKDF_FLAKE not in r.stderr:
            break
        time.sleep(0.5 * (attempt + 1))
    return r


def qemu_io(*args: str, cwd: Path | str | None = None) -> Result:
    return _run([require_tool("qemu-io"), *args], cwd=cwd)


_ENV = dict(os.environ, TZ=os.environ.get("TZ", "UTC"), PYTHONPATH=str(ROOT))


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment both tools get when a test sets variables (``TZ``): this checkout's vdkit, no
    ``VDKIT_DEBUG`` (its tracebacks are not qemu-img's output), the test's variables on top."""
    env = dict(os.environ)
    env.setdefault("TZ", "UTC")
    env["PYTHONPATH"] = str(ROOT)
    env.pop("VDKIT_DEBUG", None)
    env.update(extra or {})
    return env


def vdkit_img(*args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None) -> Result:
    return _run([sys.executable, "-m", "vdkit.cli.main", *args], cwd=cwd, env=_ENV if env is None else env)


def check_ok(*args: str, cwd: Path | str | None = None) -> Result:
    """Run qemu-img and insist it succeeded (test set-up steps)."""
    r = qemu_img(*args, cwd=cwd)
    assert r.returncode == 0, f"qemu-img {' '.join(args)} failed: {r.stderr}"
    return r


def _diff(a: str, b: str) -> str:
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), "qemu-img", "vdkit-img"))


def _settle(args: Sequence[str], cwd: Path | str | None) -> None:
    """fsync the files ``args`` names, so both tools see the same ``disk size``.

    ext4 allocates a freshly written file's blocks (and extent-tree blocks) at writeback: a file's
    ``st_blocks`` can grow by a block between the two tools' runs if writeback happens in between."""
    for arg in args:
        path = Path(cwd or ".") / arg
        try:
            if not path.is_file():
                continue
            fd = os.open(path, os.O_RDONLY)
        except (OSError, ValueError):
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def assert_same(args: Sequence[str], cwd: Path | str | None = None, *, vdkit_cwd: Path | str | None = None,
                env: dict[str, str] | None = None, mask: Callable[[str], str] | None = None) -> Result:
    """Run ``qemu-img ARGS`` and ``vdkit-img ARGS``; stdout, stderr and exit code must agree.  qemu-img's result.

    The one command-line differential of the suites.  ``vdkit_cwd``: vdkit-img runs there instead of in
    ``cwd`` (twin trees, for commands that write); ``env``: variables both tools get (``tool_env``);
    ``mask``: applied to both stderr texts, for what legitimately varies between runs (libcurl's timings,
    a TLS channel's way of failing).  vdkit's own failures (a traceback, an internal error) are named
    first; a difference comes with a unified diff, what a case in a long matrix needs."""
    full_env = None if env is None else tool_env(env)
    _settle(args, cwd)
    q = qemu_img(*args, cwd=cwd, env=full_env)
    v = vdkit_img(*args, cwd=cwd if vdkit_cwd is None else vdkit_cwd, env=full_env)
    assert "Traceback" not in v.stderr, v.stderr
    assert "internal error" not in v.stderr or "internal error" in q.stderr, v.stderr
    qe, ve = q.stderr, v.normalized_stderr()
    if mask is not None:
        qe, ve = mask(qe), mask(ve)
    assert v.stdout == q.stdout, f"stdout differs for {list(args)}:\n{_diff(q.stdout, v.stdout)}"
    assert ve == qe, f"stderr differs for {list(args)}:\n{_diff(qe, ve)}"
    assert v.returncode == q.returncode, f"exit code differs for {list(args)}: {q.returncode} vs {v.returncode}"
    return q


@pytest.fixture(scope="session", autouse=True)
def _utc() -> None:
    os.environ.setdefault("TZ", "UTC")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(params=["small", "numpy"])
def table_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once on each table backend of ``vdkit.io.tables`` (lists, numpy), in this process
    and in the ``vdkit-img`` processes it starts: the qcow2 allocator must behave alike on both."""
    from vdkit.io import tables

    monkeypatch.setattr(tables, "FORCE", request.param)
    monkeypatch.setenv("VDKIT_TABLES", request.param)
    monkeypatch.setitem(_ENV, "VDKIT_TABLES", request.param)
    return str(request.param)


@contextlib.contextmanager
def held_by_qemu_io(image: Path, fmt: str | None = None) -> Iterator[None]:
    """A qemu-io process holding ``image`` open read-write (QEMU's locks) for the ``with`` body.

    Waits until ``qemu-img info`` is refused twice in a row with qemu-io still running.  That probe
    takes a shared lock itself, so a qemu-io opening at the same moment can fail to get its write lock
    and exit while the probe is refused too (both saw the other's lock): one refusal does not prove
    the lock is held.  A qemu-io that exited is started again.
    """
    import time

    cmd = [require_tool("qemu-io"), *(["-f", fmt] if fmt else []), "-c", "sleep 600000", str(image)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def locked_by_live_qemu_io() -> bool:
        if qemu_img("info", str(image)).returncode == 0:
            return False
        time.sleep(0.1)  # a qemu-io that lost the race exits at once
        return proc.poll() is None

    try:
        deadline = time.monotonic() + 60
        refusals = 0
        while refusals < 2:
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            refusals = refusals + 1 if locked_by_live_qemu_io() else 0
            if proc.poll() is not None:
                proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if refusals == 0:
                time.sleep(0.05)
        yield
        assert proc.poll() is None, "qemu-io stopped holding the image during the test"
    finally:
        proc.kill()
        proc.wait()


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The file's non-hole ranges (SEEK_DATA/SEEK_HOLE)."""
    out = []
    with path.open("rb") as f:
        fd, pos, end = f.fileno(), 0, path.stat().st_size
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, pos))
    return out
