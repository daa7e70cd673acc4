"""Options qemu-img checks although they cannot change vdkit's result (cache modes, rate limits).

A bad value must fail exactly as in qemu-img (message, exit status, and which error wins when the
arguments have another problem too); a good value must change nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_img, qemu_io, vdkit_img

CASES = [
    ["check", "-T", "bogus"],
    ["check", "-T", "bogus", "nosuch"],
    ["check", "-T", "bogus", "--image-opts", "-f", "qcow2", "x"],
    ["check", "-T", "off", "img.qcow2"],
    ["compare", "-T", "bogus", "img.qcow2"],
    ["compare", "-T", "bogus", "img.qcow2", "nosuch"],
    ["compare", "-T", "bogus", "--image-opts", "-f", "qcow2", "x", "y"],
    ["compare", "-T", "writeback", "img.qcow2", "img.qcow2"],
    ["commit", "-t", "bogus"],
    ["commit", "-t", "bogus", "nosuch"],
    ["commit", "-t", "bogus", "--image-opts", "-f", "qcow2", "x"],
    ["commit", "-r", "abc"],
    ["commit", "-r", "abc", "nosuch"],
    ["commit", "-r", "1k", "-t", "unsafe", "img.qcow2"],
    ["rebase", "-t", "bogus", "nosuch"],
    ["rebase", "-t", "bogus", "-u", "-b", "x"],
    ["rebase", "-t", "bogus", "-u", "-b", "x", "nosuch"],
    ["rebase", "-T", "bogus", "-u", "-b", "x", "nosuch"],
    ["rebase", "-t", "bogus", "-T", "bogus2", "-u", "-b", "x", "nosuch"],
    ["rebase", "-t", "bogus", "--image-opts", "-f", "qcow2", "-u", "-b", "x", "x"],
    ["rebase", "-t", "directsync", "-T", "none", "-u", "-b", "", "img.qcow2"],
]


@pytest.mark.parametrize("args", CASES, ids=lambda a: " ".join(a))
def test_checked_options_match_qemu(tmp_path: Path, args: list[str]) -> None:
    for who in ("q", "v"):
        d = tmp_path / who
        d.mkdir()
        check_ok("create", "-q", "-f", "qcow2", str(d / "img.qcow2"), "1M")
        assert qemu_io("-c", "write -P 5 0 64k", str(d / "img.qcow2")).returncode == 0
    q = qemu_img(*args, cwd=tmp_path / "q")
    v = vdkit_img(*args, cwd=tmp_path / "v")
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    assert (tmp_path / "v" / "img.qcow2").read_bytes() == (tmp_path / "q" / "img.qcow2").read_bytes()
