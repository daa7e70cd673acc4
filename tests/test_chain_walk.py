"""One backing-chain walker: every command that follows backing files honours the open policy.

``vdkit-img --allow-dir A CMD A/top.qcow2`` where ``top``'s backing file lies
outside ``A`` must be refused by every command, and must leave the outside
file untouched; with the folder allowed, the same command must do what
qemu-img does (checked against the real tool where the command writes).
Also: loops are found by file identity (a hard link cannot hide one) and the
depth limit holds for ``info --backing-chain`` as for opening a chain.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_img, qemu_io, vdkit_img


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``outside/base.qcow2`` <- ``inside/top.qcow2`` (backing named ``../outside/base.qcow2``)."""
    (tmp_path / "inside").mkdir()
    (tmp_path / "outside").mkdir()
    base = tmp_path / "outside" / "base.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(base), "1M")
    assert qemu_io("-c", "write -P 0x11 0 64k", str(base)).returncode == 0
    top = tmp_path / "inside" / "top.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-b", "../outside/base.qcow2", "-F", "qcow2", str(top))
    assert qemu_io("-c", "write -P 0x22 64k 64k", str(top)).returncode == 0
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "inside" / "other.qcow2"), "1M")
    return tmp_path


COMMANDS = {
    "info": ["info", "--backing-chain", "{top}"],
    "commit": ["commit", "{top}"],
    "rebase": ["rebase", "-b", "{other}", "-F", "qcow2", "{top}"],
    "convert-B": ["convert", "-O", "qcow2", "-B", "{base}", "-F", "qcow2", "{top}", "{out}"],
    "compare": ["compare", "{top}", "{other}"],
    "map": ["map", "{top}"],
    "check": ["check", "{top}"],
}


def _args(tree: Path, name: str) -> list[str]:
    values = {"top": str(tree / "inside" / "top.qcow2"), "other": str(tree / "inside" / "other.qcow2"),
              "base": str(tree / "outside" / "base.qcow2"), "out": str(tree / "inside" / "out.qcow2")}
    return [a.format(**values) for a in COMMANDS[name]]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_backing_outside_allowed_folder_is_refused(tree: Path, name: str) -> None:
    base = tree / "outside" / "base.qcow2"
    before = _digest(base)
    r = vdkit_img("--allow-dir", str(tree / "inside"), *_args(tree, name))
    assert r.returncode == (2 if name == "compare" else 1), (r.stdout, r.stderr)  # compare: 2 = error
    assert "outside the allowed folders" in r.stderr and "'../outside/base.qcow2'" in r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert "Image committed" not in r.stdout
    assert _digest(base) == before, "a refused chain was written"


@pytest.mark.parametrize("name", ["commit", "rebase", "info", "compare", "map"])
def test_allowed_chain_behaves_as_qemu_img(tmp_path: Path, name: str) -> None:
    """With the whole tree allowed, vdkit's result equals qemu-img's on a copy of the same tree."""
    import shutil

    results = []
    for tool in ("qemu", "vdkit"):
        root = tmp_path / tool
        root.mkdir()
        (root / "inside").mkdir()
        (root / "outside").mkdir()
        base = root / "outside" / "base.qcow2"
        check_ok("create", "-q", "-f", "qcow2", str(base), "1M")
        assert qemu_io("-c", "write -P 0x11 0 64k", str(base)).returncode == 0
        top = root / "inside" / "top.qcow2"
        check_ok("create", "-q", "-f", "qcow2", "-b", "../outside/base.qcow2", "-F", "qcow2", str(top))
        assert qemu_io("-c", "write -P 0x22 64k 64k", str(top)).returncode == 0
        check_ok("create", "-q", "-f", "qcow2", str(root / "inside" / "other.qcow2"), "1M")
        args = [a.replace(str(root), "ROOT") for a in _args(root, name)]
        args = [a.replace("ROOT", str(root)) for a in args]
        r = qemu_img(*args) if tool == "qemu" else vdkit_img("--allow-dir", str(root), *args)
        results.append((r.returncode, r.stdout.replace(str(root), "ROOT"), _digest(base), _digest(top)))
        shutil.rmtree(root / "inside" / "out.qcow2", ignore_errors=True)
    assert results[0][:2] == results[1][:2]
    if name in ("commit", "rebase"):
        # data equal; the files themselves are compared through qemu-img compare
        q, v = tmp_path / "qemu", tmp_path / "vdkit"
        for rel in ("outside/base.qcow2", "inside/top.qcow2"):
            r = qemu_img("compare", str(q / rel), str(v / rel))
            assert r.returncode == 0, (rel, r.stdout, r.stderr)


def test_loop_through_a_hard_link_is_found(tmp_path: Path) -> None:
    """a -> b -> a2 where a2 is a hard link of a: names differ, the file is the same.

    Opening the chain (map) finds it by file identity; info --backing-chain finds
    it by name one step later, exactly as qemu-img's info does.
    """
    a = tmp_path / "a.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(a), "1M")
    check_ok("create", "-q", "-f", "qcow2", "-b", "a2.qcow2", "-F", "qcow2", "-u", str(tmp_path / "b.qcow2"), "1M")
    check_ok("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a))
    os.link(a, tmp_path / "a2.qcow2")
    r = vdkit_img("map", str(a))
    assert r.returncode == 1 and "a2.qcow2' creates an infinite loop" in r.stderr, r.stderr
    args = ["info", "--backing-chain", "a.qcow2"]
    q, v = qemu_img(*args, cwd=tmp_path), vdkit_img(*args, cwd=tmp_path)
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)


def test_chain_depth_is_limited_when_opened(tmp_path: Path) -> None:
    """A chain of 300 images: opening it stops at the limit; info --backing-chain (one image at a
    time, as qemu-img) lists all 300 as qemu-img does."""
    prev = None
    for i in range(300):
        name = tmp_path / f"l{i}.qcow2"
        if prev is None:
            check_ok("create", "-q", "-f", "qcow2", str(name), "64k")
        else:
            check_ok("create", "-q", "-f", "qcow2", "-u", "-b", prev.name, "-F", "qcow2", str(name), "64k")
        prev = name
    assert prev is not None
    r = vdkit_img("map", str(prev))
    assert r.returncode == 1 and "Backing chain is deeper than 256 images" in r.stderr, r.stderr[-300:]
    args = ["info", "--backing-chain", "--output=json", prev.name]
    q, v = qemu_img(*args, cwd=tmp_path), vdkit_img(*args, cwd=tmp_path)
    assert q.returncode == 0 and (v.returncode, v.stdout) == (q.returncode, q.stdout)
