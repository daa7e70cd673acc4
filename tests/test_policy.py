"""The untrusted-image policy: which backing and data files an image may make vdkit open.

Images are built with the real qemu-img; the refusals are vdkit's own
behaviour (qemu-img has no such policy), so they are asserted directly,
while what *is* opened must still agree with qemu-img.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import vdkit
from tests.conftest import check_ok, qemu_img, vdkit_img
from vdkit.block.chain import OpenPolicy
from vdkit.errors import PolicyError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``outside/base.qcow2`` <- ``inside/top.qcow2`` (relative ``../outside``), plus a data-file image."""
    (tmp_path / "inside").mkdir()
    (tmp_path / "outside").mkdir()
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "outside" / "base.qcow2"), "1M")
    check_ok("create", "-q", "-f", "qcow2", "-b", "../outside/base.qcow2", "-F", "qcow2",
             str(tmp_path / "inside" / "top.qcow2"))
    check_ok("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'outside' / 'd.raw'}",
             str(tmp_path / "inside" / "df.qcow2"), "1M")
    return tmp_path


def test_backing_false_opens_only_the_image(tree: Path) -> None:
    with vdkit.open(tree / "inside" / "top.qcow2", backing=False) as node:
        assert node.backing is None
        assert vdkit.image_info(node).backing_filename == "../outside/base.qcow2"


def test_default_follows_the_chain(tree: Path) -> None:
    with vdkit.open(tree / "inside" / "top.qcow2") as node:
        assert [n.format for n in node.chain()] == ["qcow2", "qcow2"]


def test_allow_list_refuses_backing_outside_and_names_it(tree: Path) -> None:
    policy = OpenPolicy.restricted_to(tree / "inside")
    with pytest.raises(PolicyError) as exc:
        vdkit.open(tree / "inside" / "top.qcow2", policy=policy)
    msg = str(exc.value)
    assert "'../outside/base.qcow2'" in msg and "outside the allowed folders" in msg
    assert msg.startswith(f"Could not open '{tree / 'inside' / 'top.qcow2'}': Backing file ")
    assert str(tree / "outside" / "base.qcow2") in msg  # the resolved file, too


def test_allow_list_admits_files_inside(tree: Path) -> None:
    with vdkit.open(tree / "inside" / "top.qcow2", policy=OpenPolicy.restricted_to(tree)) as node:
        assert node.backing is not None


def test_symlink_escaping_the_allowed_folder_is_refused(tree: Path) -> None:
    (tree / "inside" / "link.qcow2").symlink_to(tree / "outside" / "base.qcow2")
    check_ok("create", "-q", "-f", "qcow2", "-b", "link.qcow2", "-F", "qcow2", str(tree / "inside" / "t2.qcow2"))
    with pytest.raises(PolicyError, match="outside the allowed folders"):
        vdkit.open(tree / "inside" / "t2.qcow2", policy=OpenPolicy.restricted_to(tree / "inside"))


def test_data_file_policy(tree: Path) -> None:
    img = tree / "inside" / "df.qcow2"
    with pytest.raises(PolicyError, match="Data file .* outside the allowed folders"):
        vdkit.open(img, policy=OpenPolicy.restricted_to(tree / "inside"))
    with pytest.raises(PolicyError, match="following data files is disabled"):
        vdkit.open(img, policy=OpenPolicy(follow_data_file=False))
    with vdkit.open(img) as node:
        assert node.driver.extra_files()


def test_cli_allow_dir(tree: Path) -> None:
    args = ["info", "--backing-chain", "inside/top.qcow2"]
    r = vdkit_img("--allow-dir", "inside", *args, cwd=tree)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "outside the allowed folders" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # allowed: identical to qemu-img
    q = qemu_img(*args, cwd=tree)
    v = vdkit_img(f"--allow-dir={tree}", *args, cwd=tree)
    assert (v.returncode, v.stdout) == (q.returncode, q.stdout) == (0, q.stdout)
    # without --backing-chain nothing is followed, so nothing is refused
    assert vdkit_img("--allow-dir", "inside", "info", "inside/top.qcow2", cwd=tree).returncode == 0


def test_cli_allow_dir_applies_to_chain_opening_commands(tree: Path) -> None:
    r = vdkit_img("--allow-dir", "inside", "map", "inside/top.qcow2", cwd=tree)
    assert r.returncode == 1 and "outside the allowed folders" in r.stderr, r.stderr
    assert vdkit_img("--allow-dir", str(tree), "map", "inside/top.qcow2", cwd=tree).returncode == 0
