"""Run a tool under an address-space limit, as the damage sweeps run vdkit-img.

A hostile header must not make vdkit allocate in proportion to the numbers it
claims: under ``RLIMIT_AS`` such an allocation fails (MemoryError, a clean
error or a crash the sweep sees) instead of passing unnoticed on a big machine.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import _ENV, data_extents

AS_LIMIT = 1 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_limited(cmd: list[str], cwd: Path, limit: bool = False) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``cmd``; with ``limit`` under a 1 GiB address space."""
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=120, env=_ENV,
                       preexec_fn=_limit_memory if limit else None)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


Outcome = tuple[int, str, str]


class Sweep:
    """The damage sweeps' comparisons of one format: qemu-img as it is, vdkit-img under the address-space
    limit; every difference is collected (:meth:`done` lists all seeds' at once, not only the first).

    ``OUT`` in arguments becomes ``q`` for qemu-img and ``v`` for vdkit-img (their own output files);
    vdkit's stderr is compared in qemu-img's name.  Set :attr:`label` (seed and damage) per image.
    """

    def __init__(self, cwd: Path) -> None:
        from tests.conftest import require_tool

        self.cwd = cwd
        self.label = ""
        self.diffs: list[str] = []
        self._qemu_img = require_tool("qemu-img")

    def qemu(self, args: list[str]) -> Outcome:
        return run_limited([self._qemu_img, *[a.replace("OUT", "q") for a in args]], self.cwd)

    def vdkit(self, args: list[str], *, rename: tuple[str, str] = ("", "")) -> Outcome:
        """vdkit-img's outcome, which must not be a traceback; ``rename``: a name replaced in its output."""
        code, out, err = run_limited([sys.executable, "-m", "vdkit.cli.main",
                                      *[a.replace("OUT", "v") for a in args]], self.cwd, limit=True)
        assert "Traceback" not in err and "internal error" not in err, f"{self.label} {args}: {err}"
        err = err.replace("vdkit-img:", "qemu-img:")
        if rename[0]:
            out, err = out.replace(*rename), err.replace(*rename)
        return code, out, err

    def compare(self, what: object, q: Outcome, v: Outcome) -> None:
        if q != v:
            self.diffs.append(f"{self.label} {what}:\n  qemu:  {q}\n  vdkit: {v}")

    def both(self, args: list[str]) -> Outcome:
        """Both tools on ``args``, compared; qemu-img's outcome."""
        q = self.qemu(args)
        self.compare(args, q, self.vdkit(args))
        return q

    def read_write_case(self, data: bytes, suffix: str, *, keep_if_big: int) -> None:
        """The writable formats' case: ``data`` as ``s<suffix>``; info, map, check and a conversion to raw
        compared (a qemu-img that died on an assertion is not), and once ``info`` says the virtual size is
        over 64 MiB only the first ``keep_if_big`` of them; the converted bytes alike when all four ran and
        the conversion succeeded (a failed one is compared by its error only: qemu-img has copied the data
        before the bad entry by then, vdkit, whose copier reads block status first, has not); then
        :meth:`repair_alike`."""
        name = f"s{suffix}"
        (self.cwd / name).write_bytes(data)
        runs = [["info", "--output=json", name], ["map", "--output=json", name], ["check", name],
                ["convert", "-O", "raw", name, "OUT.raw"]]
        rcs = []
        for args in list(runs):
            if args not in runs:  # cut by a big size
                break
            q = self.qemu(args)
            if args[0] == "info" and q[0] == 0 and json.loads(q[1])["virtual-size"] > 64 << 20:
                del runs[keep_if_big:]
            if q[0] < 0:  # qemu-img died on an assertion: nothing to compare with
                continue
            self.compare(args, q, self.vdkit(args))
            rcs.append(q[0])
        qo, vo = self.cwd / "q.raw", self.cwd / "v.raw"
        if len(rcs) == 4 and rcs[-1] == 0 and qo.read_bytes() != vo.read_bytes():
            self.diffs.append(f"{self.label}: converted data differs")
        for p in (qo, vo):
            p.unlink(missing_ok=True)
        self.repair_alike(data, suffix)

    def conversions_alike(self, *, extents: bool, max_bytes: int | None = None) -> None:
        """The two tools' ``OUT.raw`` (made by a ``convert`` of both): made by both or neither, with the same
        data extents (``extents``) and bytes (up to ``max_bytes`` long); removed afterwards."""
        qo, vo = self.cwd / "q.raw", self.cwd / "v.raw"
        if qo.exists() != vo.exists() or qo.exists() and (
                extents and data_extents(qo) != data_extents(vo)
                or (max_bytes is None or qo.stat().st_size <= max_bytes) and qo.read_bytes() != vo.read_bytes()):
            self.diffs.append(f"{self.label}: converted data differs")
        for p in (qo, vo):
            p.unlink(missing_ok=True)

    def repair_alike(self, data: bytes, suffix: str) -> None:
        """``check -r all`` on two copies of ``data``: the same report and the same repaired file (not
        compared where qemu-img died on an assertion)."""
        qf, vf = self.cwd / f"q{suffix}", self.cwd / f"v{suffix}"
        qf.write_bytes(data)
        vf.write_bytes(data)
        q = self.qemu(["check", "-r", "all", qf.name])
        if q[0] < 0:
            return
        self.compare("check -r all", q, self.vdkit(["check", "-r", "all", vf.name], rename=(vf.name, qf.name)))
        if qf.stat().st_size != vf.stat().st_size or (
                qf.stat().st_size <= 64 << 20 and qf.read_bytes() != vf.read_bytes()):
            self.diffs.append(f"{self.label}: files differ after check -r all")

    def done(self) -> None:
        assert not self.diffs, "\n".join(self.diffs)


def sweep_seeds(case: Callable[[Path, int], list[str]], first: int, count: int) -> int:
    """Run a sweep's ``case(folder, seed)`` by hand over seeds ``first``.. (each in a fresh temporary folder),
    printing every difference (an exception is one too: a sweep reports and goes on) and a summary line;
    the number of seeds with differences."""
    import tempfile

    bad = 0
    for s in range(first, first + count):
        with tempfile.TemporaryDirectory() as d:
            try:
                diffs = case(Path(d), s)
            except Exception as exc:  # noqa: BLE001 - a sweep reports and goes on
                diffs = [f"seed {s}: {exc!r}"]
        for line in diffs:
            print(line[:3000], flush=True)
        bad += bool(diffs)
    print(f"done {count} bad {bad}")
    return bad
