"""bochs, cloop and dmg drives in vdkit-daemon against qemu-system-x86_64 7.2: queries and NBD reads.

QEMU opens a drive of a format that can only be read read-only even without
``readonly=on`` (auto-read-only) and reports ``"ro": true``; so does vdkit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import qemu_img
from tests.daemon.conftest import Daemons, daemons, normalise  # noqa: F401  (daemons: fixture)
from tests.formats.images import bochs_image, cloop_image, dmg_image
from tests.formats.test_bochs import pattern
from tests.nbd.conftest import short_sock

DRIVES = ["-drive", "file=b.bochs,format=bochs,if=none,id=d0,readonly=on",
          "-drive", "file=c.cloop,if=none,id=d1",
          "-drive", "file=d.dmg,format=dmg,if=none,id=d2"]


def setup(d: Path) -> None:
    disk = pattern(1 << 20)
    (d / "src.raw").write_bytes(disk)
    bochs_image(d / "b.bochs", disk)
    cloop_image(d / "c.cloop", disk)
    dmg_image(d / "d.dmg", disk)


def test_queries_and_nbd(daemons: Daemons) -> None:  # noqa: F811
    q, v = daemons.pair(DRIVES, setup)
    answers = []
    for m in (q, v):
        answers.append([normalise(m.cmd_line(c)) for c in ("query-block", "query-named-block-nodes")]
                       + [normalise(m.hmp("info block -v"))])
    assert answers[1] == answers[0]
    # vdkit's drives read over NBD as the source data
    sock = short_sock("n.sock")
    assert json.loads(v.cmd_line("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})) == {
        "return": {}}
    for dev in ("d0", "d1", "d2"):
        r: dict[str, Any] = v.cmd("nbd-server-add", {"device": dev})
        assert r == {"return": {}}, r
        c = qemu_img("compare", "-f", "raw", "-F", "raw", f"nbd+unix:///{dev}?socket={sock}",
                     str(daemons.tmp / "v" / "src.raw"))
        assert (c.returncode, c.stdout) == (0, "Images are identical.\n"), c.stderr
