"""Images whose header names their backing file by a ``json:{...}`` name, against qemu-img 7.2.

QEMU writes such a name when the backing node it records was itself named so (a drive-backup or
drive-mirror ``sync: top`` of a ``-blockdev`` chain whose backing was given by reference), and opens it
as the options say: the file it names (a relative one from the working directory, not the image's
folder), a nested ``backing`` object as that node's backing, or its own header's.  ``info
--backing-chain`` opens each image without its backing, so a nested ``backing`` is refused there, as
qemu-img refuses it; ``map``, ``convert``, ``compare`` and ``check`` read through the chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_io


def _name(d: Path, **kw: object) -> str:
    return "json:" + json.dumps(kw)


CASES = {
    "absolute": lambda d: _name(d, driver="qcow2", file={"driver": "file", "filename": str(d / "mid.qcow2")}),
    "relative": lambda d: _name(d, driver="qcow2", file={"driver": "file", "filename": "mid.qcow2"}),
    "nested-backing": lambda d: _name(d, backing={"driver": "qcow2", "file": {"driver": "file", "filename":
                                                                                str(d / "base.qcow2")}},
                                      driver="qcow2", file={"driver": "file", "filename": str(d / "mid.qcow2")}),
    "backing-null": lambda d: _name(d, backing=None, driver="qcow2",
                                    file={"driver": "file", "filename": str(d / "mid.qcow2")}),
    "dotted": lambda d: f'json:{{"driver": "qcow2", "file.driver": "file", "file.filename": "{d / "mid.qcow2"}"}}',
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_json_backing_name_in_a_header(tmp_path: Path, case: str) -> None:
    d = tmp_path
    check_ok("create", "-q", "-f", "qcow2", "base.qcow2", "4M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2", cwd=d)
    for image, cmd in (("base.qcow2", "write -P 0x11 0 1M"), ("mid.qcow2", "write -P 0x22 1M 1M")):
        assert qemu_io("-c", cmd, str(d / image)).returncode == 0
    check_ok("create", "-q", "-f", "qcow2", "top.qcow2", "4M", cwd=d)
    assert qemu_io("-c", "write -P 0x33 2M 1M", str(d / "top.qcow2")).returncode == 0
    check_ok("rebase", "-u", "-b", CASES[case](d), "-F", "qcow2", "top.qcow2", cwd=d)
    for args in (["info", "--backing-chain", "top.qcow2"], ["info", "--output=json", "--backing-chain", "top.qcow2"],
                 ["map", "top.qcow2"], ["map", "--output=json", "top.qcow2"], ["check", "top.qcow2"],
                 ["compare", "top.qcow2", "top.qcow2"], ["convert", "-O", "raw", "top.qcow2", "out.raw"]):
        assert_same(args, d)
