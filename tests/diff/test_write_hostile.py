"""Writing commands on randomly damaged qcow2 images, against qemu-img: damaged images are not made worse.

The images are the ones the ``check`` sweep damages (:func:`tests.diff.test_check_hostile.damaged_image`:
1/2/16-bit refcounts, 512/4096/65536-byte clusters, a few damaged bytes in header fields, L1/L2
entries, refcount tables and blocks and snapshot tables).  For each seed and writer, one copy goes
to ``qemu-img WRITER`` and one to ``vdkit-img WRITER``; then

* exit code, stdout and stderr must agree (vdkit refuses exactly where qemu-img refuses, with its
  text);
* ``qemu-img check`` of vdkit's result must count no more corruptions, leaks or check errors than
  the damaged input had (the rule of docs/snapshot-writes.md).  qemu-img's own result is not the
  bar: a failed qemu-img write may leak what its attempt allocated, vdkit's leaves the file alone.

Writers: ``snapshot -c/-d/-a``, ``resize`` (grow past the L1 table, shrink), ``commit`` of a clean
overlay into the damaged image and a safe ``rebase`` of the damaged image onto a clean base.  The
daemon's ``snapshot-*``/``savevm``/``delvm`` commands run the same driver code as ``snapshot``.

``python -m tests.diff.test_write_hostile FIRST COUNT [WRITER...]`` runs a longer sweep by hand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _ENV, check_ok, qemu_io, require_tool
from tests.diff.test_check_hostile import damaged_image

# name -> (argv after the command, needs a clean overlay/base next to the image)
WRITERS: dict[str, list[str]] = {
    "snapshot-c": ["snapshot", "-c", "new", "{img}"],
    "snapshot-d": ["snapshot", "-d", "s1", "{img}"],
    "snapshot-a": ["snapshot", "-a", "s1", "{img}"],
    "resize-grow": ["resize", "{img}", "64M"],
    "resize-shrink": ["resize", "--shrink", "{img}", "1M"],
    "commit": ["commit", "{top}"],
    "rebase": ["rebase", "-F", "qcow2", "-b", "{base}", "{img}"],
}


def _run(cmd: list[str], cwd: Path) -> tuple[int, str, str]:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=120, env=_ENV)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def check_counts(path: Path) -> tuple[int, int, int] | str:
    """(corruptions, leaks, check errors) as ``qemu-img check`` counts them, or its error text."""
    rc, out, err = _run([require_tool("qemu-img"), "check", "--output=json", path.name], path.parent)
    try:
        j = json.loads(out)
    except ValueError:
        return f"rc {rc}: {err.strip()}"
    return j.get("corruptions", 0), j.get("leaks", 0), j.get("check-errors", 0)


def _no_worse(before: tuple[int, int, int] | str, after: tuple[int, int, int] | str,
              qafter: tuple[int, int, int] | str) -> bool:
    """Each count of vdkit's result at most the input's, or at most what qemu-img's own run left."""
    if isinstance(before, str):  # check could not even open the input
        return True
    if isinstance(after, str):
        return False
    bar = before if isinstance(qafter, str) else tuple(max(b, q) for b, q in zip(before, qafter, strict=True))
    return all(a <= b for a, b in zip(after, bar, strict=True))


def _prepare(tmp: Path, who: str, src: Path, writer: str) -> dict[str, str]:
    """A private copy of the damaged image (plus a clean overlay or base) for one tool."""
    d = tmp / who
    d.mkdir()
    img = d / "img.qcow2"
    shutil.copy(src, img)
    names = {"img": img.name, "top": "top.qcow2", "base": "base.qcow2"}
    if writer == "commit":  # (the backing file is attached last: set-up must not open the damaged image)
        check_ok("create", "-q", "-f", "qcow2", "top.qcow2", "4M", cwd=d)
        qemu_io("-f", "qcow2", "-c", "write -P 0x5a 4k 8k", "-c", "write -z 1M 64k", "-c",
                "write -P 0x11 3M 100k", str(d / "top.qcow2"))
        check_ok("rebase", "-u", "-F", "qcow2", "-b", img.name, "top.qcow2", cwd=d)
    elif writer == "rebase":
        check_ok("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
        qemu_io("-f", "qcow2", "-c", "write -P 0x77 0 64k", "-c", "write -P 0x66 2M 1M", str(d / "base.qcow2"))
    return names


def sweep_case(tmp: Path, seed: int, writers: list[str] | None = None) -> list[str]:
    """Differences (and images made worse) on one random image, for each writer (empty: none)."""
    path, desc = damaged_image(tmp, seed)
    before = check_counts(path)
    qimg = require_tool("qemu-img")
    vimg = [sys.executable, "-m", "vdkit.cli.main"]
    out: list[str] = []
    for writer in writers or list(WRITERS):
        wdir = tmp / writer
        wdir.mkdir()
        res = {}
        for who, cmd in (("q", [qimg]), ("v", vimg)):
            names = _prepare(wdir, who, path, writer)
            argv = [a.format(**names) for a in WRITERS[writer]]
            res[who] = _run(cmd + argv, wdir / who)
        q, v = res["q"], res["v"]
        v = (v[0], v[1], v[2].replace("vdkit-img:", "qemu-img:"))
        head = f"seed {seed} {desc} {writer}"
        if q != v:
            out.append(f"{head}:\n  qemu:  {q}\n  vdkit: {v}")
        after = check_counts(wdir / "v" / "img.qcow2")
        qafter = check_counts(wdir / "q" / "img.qcow2")
        if not _no_worse(before, after, qafter):
            out.append(f"{head}: check before {before}, after vdkit {after} (after qemu-img {qafter})")
    return out


# Seeds whose damage once made vdkit's writers disagree or leave more errors, then a plain range.
SEEDS = sorted(set(range(24)))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_damage_writers(tmp_path: Path, seed: int) -> None:
    diffs = sweep_case(tmp_path, seed)
    assert not diffs, "\n".join(diffs)


if __name__ == "__main__":
    import tempfile

    first, count = int(sys.argv[1]), int(sys.argv[2])
    only = sys.argv[3:] or None
    bad = 0
    for s in range(first, first + count):
        with tempfile.TemporaryDirectory() as d:
            try:
                diffs = sweep_case(Path(d), s, only)
            except Exception as exc:  # noqa: BLE001 - a sweep reports and goes on
                diffs = [f"seed {s}: {exc!r}"]
        for line in diffs:
            print(line[:3000], flush=True)
        bad += bool(diffs)
    print(f"done {count} bad {bad}")
