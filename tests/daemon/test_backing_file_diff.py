"""``backing_file`` (query-block, query-named-block-nodes) and ``Backing file:`` (HMP ``info block``).

QEMU reports the backing *node's* filename: the header's name resolved against the overlay's
filename without normalisation (``img/mid/../bases/l1.qcow2``), not the stored name
(``block-jobs.md`` §1.1).  Chains of 2 to 4 images with relative names in subfolders, a raw base,
an absolute header name and drive paths given relative, unnormalised and absolute; compared with
``qemu-system-x86_64`` on identical trees (absolute paths blanked to ``DIR``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import check_ok
from tests.daemon.conftest import Daemons, Monitor, normalise, normalise_hmp


def _setup(d: Path) -> None:
    img = d / "img"
    (img / "bases").mkdir(parents=True)
    (img / "mid").mkdir()

    def create(name: str, backing: str | None = None, fmt: str = "qcow2", bfmt: str = "qcow2") -> None:
        args = ["-b", backing, "-F", bfmt] if backing else []
        check_ok("create", "-q", "-f", fmt, *args, name, *([] if backing else ["4M"]), cwd=img)

    create("bases/l1.qcow2")
    create("bases/l2.qcow2", "l1.qcow2")                # 2: name relative to its own folder
    create("top2.qcow2", "bases/l2.qcow2")              # 3: into a subfolder
    create("mid/t4.qcow2", "../top2.qcow2")             # 4: up and down again
    create("c2.qcow2", "bases/l1.qcow2")                # 2
    create("bases/r.raw", fmt="raw")
    create("mid/onraw.qcow2", "../bases/r.raw", bfmt="raw")
    create("abs.qcow2", str(img / "bases" / "l2.qcow2"))  # absolute header name


def _drives(d: Path) -> list[str]:
    files = ["img/top2.qcow2", "img/mid/t4.qcow2", "./img/../img/c2.qcow2", "img/mid/onraw.qcow2",
             "img/abs.qcow2", str(d / "img" / "mid" / "t4.qcow2")]
    out = []
    for i, f in enumerate(files):
        # top2 and t4 are the top of one drive and in the chain of another: read-only, or they would clash
        ro = ",readonly=on" if i in (0, 1, 5) else ""
        out += ["-drive", f"file={f},if=none,id=d{i}{ro}"]
    return out


@pytest.fixture
def monitors(daemons: Daemons) -> dict[str, tuple[Monitor, Path]]:
    """QEMU and vdkit-daemon, each on its own identical tree: ``{who: (monitor, tree)}``."""
    out = {}
    for who in ("qemu", "vdkit"):
        d = daemons.tmp / who
        d.mkdir()
        _setup(d)
        _, path, _ = getattr(daemons, who)(_drives(d), d)
        out[who] = (daemons.monitor(path).negotiate(), d)
    return out


def _blank(text: str, d: Path) -> str:
    return text.replace(str(d), "DIR")


@pytest.mark.parametrize("cmd", [("query-block", None), ("query-named-block-nodes", None),
                                 ("query-named-block-nodes", {"flat": True})])
def test_qmp_backing_file(monitors: dict[str, tuple[Monitor, Path]],
                          cmd: tuple[str, dict[str, object] | None]) -> None:
    lines = {who: _blank(normalise(m.cmd_line(*cmd)), d) for who, (m, d) in monitors.items()}
    assert lines["vdkit"] == lines["qemu"]
    # the point of the test: resolved names, not header names
    assert '"backing_file": "./img/../img/bases/l1.qcow2"' in lines["qemu"]
    assert '"backing_file": "DIR/img/mid/../top2.qcow2"' in lines["qemu"]


@pytest.mark.parametrize("line", ["info block", "info block -n", "info block -v d1", "info block d2"])
def test_hmp_backing_file(monitors: dict[str, tuple[Monitor, Path]], line: str) -> None:
    out = {who: _blank(normalise_hmp(m.hmp(line)), d) for who, (m, d) in monitors.items()}
    assert out["vdkit"] == out["qemu"]
    assert "Backing file:" in out["qemu"]
