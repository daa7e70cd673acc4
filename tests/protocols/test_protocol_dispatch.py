"""Which protocol's options are checked first when two protocols meet in one option set.

``--image-opts`` and ``-drive`` send a protocol driver's options through the protocol registry
(``vdkit.protocols.registry``): the top node's protocol first, then the protocol of its ``file``
child.  QEMU opens the top protocol first too, so its first error wins; these are the cases where both
tools answer while parsing, before anything is connected (qemu-img and qemu-system-x86_64 are the
oracles, no server needed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, qemu_img, require_tool, vdkit_img
from tests.daemon.conftest import QEMU_BASE

IMAGE_OPTS = [
    "driver=nbd,file.driver=rbd",
    "driver=nbd,file.driver=rbd,file.pool=p,file.image=i",
    "driver=rbd,file.driver=nbd",
    "driver=nbd,file.driver=http,file.url=http://127.0.0.1:1/x",
]


@pytest.mark.parametrize("spec", IMAGE_OPTS)
def test_image_opts_top_protocol_first(spec: str) -> None:
    q = qemu_img("info", "--image-opts", spec)
    v = vdkit_img("info", "--image-opts", spec)
    assert q.returncode == 1 and v.returncode == 1
    assert v.stderr.replace("vdkit-img:", "qemu-img:") == q.stderr


DRIVES = [
    "format=http,file.driver=nbd,file.server.type=unix,file.server.path=/nonexistent/s,if=none",
    "format=rbd,file.driver=nbd,if=none",
    "format=nbd,file.driver=rbd,file.pool=p,file.image=i,if=none",
]


@pytest.mark.parametrize("drive", DRIVES)
def test_drive_top_protocol_first(drive: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = []
    for name, cmd in (("qemu-system-x86_64", [require_tool("qemu-system-x86_64"), *QEMU_BASE]),
                      ("vdkit-daemon", [sys.executable, "-m", "vdkit.daemon.main", "-S"])):
        r = subprocess.run([*cmd, "-drive", drive], cwd=tmp_path, env=env, capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        out.append((r.returncode, r.stderr.decode().replace(f"{name}: ", "")))
    assert out[0][0] == 1
    assert out[1] == out[0]
