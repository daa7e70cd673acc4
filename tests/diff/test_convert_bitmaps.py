"""``vdkit-img convert --bitmaps`` against ``qemu-img convert --bitmaps``: twin folders, the same commands.

The source has two persistent bitmaps (one disabled, another granularity) with dirty bits from writes
made after they were added; another copy has them marked in use, as a crashed writer leaves them.
Every case must give the same output, exit code and files (the converted image byte for byte, or the
file qemu-img leaves when it refuses after creating it), and a converted image must check clean.  An
existing target's recording bitmaps mark every range convert writes (data and zeros), with or
without --bitmaps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, qemu_io
from tests.helpers.patching import set_bitmap_in_use

CASES = [
    "--bitmaps -O qcow2 s.qcow2 out.qcow2",
    "--bitmaps -c -O qcow2 s.qcow2 out.qcow2",
    "--bitmaps -O qcow2 -o cluster_size=4k s.qcow2 out.qcow2",  # another granularity default, same bitmaps
    "--bitmaps -O raw s.qcow2 out.raw",  # refused after the target is created
    "--bitmaps -O qcow2 -o compat=0.10 s.qcow2 out.qcow2",  # a v2 target stores no bitmaps
    "--skip-broken-bitmaps -O qcow2 s.qcow2 out.qcow2",
    "--bitmaps -O qcow2 s.qcow2 s.qcow2 out.qcow2",
    "--bitmaps -f raw -O qcow2 r.raw out.qcow2",
    "--bitmaps -O qcow2 v2.qcow2 out.qcow2",
    "--bitmaps -O foo s.qcow2 s.qcow2 out.qcow2",  # the format is checked first
    "--bitmaps -O qcow2 inc.qcow2 out.qcow2",  # refused before anything is created
    "--bitmaps --skip-broken-bitmaps -O qcow2 inc.qcow2 out.qcow2",
    "--bitmaps -O qcow2 half.qcow2 out.qcow2",  # one of two in use
    "--bitmaps --skip-broken-bitmaps -O qcow2 half.qcow2 out.qcow2",
    "-n --bitmaps -O qcow2 s.qcow2 ex.qcow2",  # into an existing image: its bitmaps are kept
    "-n --bitmaps -O qcow2 s.qcow2 has.qcow2",  # which already has one of the names
    "--bitmaps -O qcow2 nob.qcow2 out.qcow2",  # no bitmaps: nothing to copy
    "-n -O qcow2 s.qcow2 ex.qcow2",  # the target's recording bitmap marks what convert writes
    "-n -c -O qcow2 s.qcow2 ex.qcow2",
    "-n -S 0 -O qcow2 s.qcow2 ex.qcow2",
]


def _setup(d: Path) -> None:
    d.mkdir()
    s = d / "s.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(s), "64M")
    assert qemu_io("-c", "write -P 1 0 1M", str(s)).returncode == 0
    check_ok("bitmap", "--add", str(s), "b1")
    check_ok("bitmap", "--add", "-g", "128k", "--disable", str(s), "b2")
    assert qemu_io("-c", "write -P 2 4M 1M", "-c", "write -P 3 40M 300k", str(s)).returncode == 0
    check_ok("bitmap", "--enable", str(s), "b2")
    assert qemu_io("-c", "write -P 4 10M 64k", str(s)).returncode == 0
    check_ok("bitmap", "--disable", str(s), "b2")
    for name, in_use in (("inc.qcow2", ("b1", "b2")), ("half.qcow2", ("b1",))):
        (d / name).write_bytes(s.read_bytes())
        for b in in_use:
            set_bitmap_in_use(d / name, b)
    check_ok("create", "-q", "-f", "qcow2", str(d / "ex.qcow2"), "64M")
    check_ok("bitmap", "--add", str(d / "ex.qcow2"), "mine")
    check_ok("create", "-q", "-f", "qcow2", str(d / "has.qcow2"), "64M")
    check_ok("bitmap", "--add", str(d / "has.qcow2"), "b1")
    check_ok("create", "-q", "-f", "qcow2", str(d / "nob.qcow2"), "8M")
    check_ok("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(d / "v2.qcow2"), "8M")
    check_ok("create", "-q", "-f", "raw", str(d / "r.raw"), "8M")


@pytest.mark.parametrize("case", CASES)
def test_convert_bitmaps(tmp_path: Path, case: str) -> None:
    q, v = tmp_path / "q", tmp_path / "v"
    _setup(q)
    _setup(v)
    # (the hint names the program to run: vdkit-img's own name, as in its other hints)
    assert_same(["convert", *case.split()], q, vdkit_cwd=v, mask=lambda e: e.replace("'vdkit-img ", "'qemu-img "))
    names = sorted(p.name for p in q.iterdir())
    assert names == sorted(p.name for p in v.iterdir())
    for name in names:
        assert (v / name).read_bytes() == (q / name).read_bytes(), f"{name} after {case}"
    for name in ("out.qcow2", "ex.qcow2"):
        if (v / name).exists() and "compat=0.10" not in case:
            r = qemu_img("check", str(v / name))
            assert r.returncode == 0 and "No errors were found" in r.stdout, r.stdout
