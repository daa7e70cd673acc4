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


@pytest.mark.parametrize("where", ["file", "nested-backing", "data-file"])
def test_json_backing_name_is_held_to_the_policy(tree: Path, where: str) -> None:
    """A header's json:{...} backing name (which QEMU writes and opens) names files the image chose: each
    of them, nested backing and data file included, is allowed only where a plainly named one would be."""
    out, inside = tree / "outside" / "base.qcow2", tree / "inside" / "mid.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(inside), "1M")
    spec: dict[str, object] = {"driver": "qcow2", "file": {"driver": "file", "filename": str(inside)}}
    if where == "file":
        spec["file"] = {"driver": "file", "filename": str(out)}
    elif where == "nested-backing":
        spec["backing"] = {"driver": "qcow2", "file": {"driver": "file", "filename": str(out)}}
    else:
        spec["data-file"] = {"driver": "file", "filename": str(tree / "outside" / "d.raw")}
    import json

    img = tree / "inside" / "j.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "1M")
    check_ok("rebase", "-u", "-b", "json:" + json.dumps(spec), "-F", "qcow2", str(img))
    with pytest.raises(PolicyError, match="outside the allowed folders"):
        vdkit.open(img, policy=OpenPolicy.restricted_to(tree / "inside"))
    r = vdkit_img("--allow-dir", "inside", "map", "inside/j.qcow2", cwd=tree)
    assert r.returncode == 1 and "outside the allowed folders" in r.stderr, r.stderr


def test_json_backing_name_naming_a_protocol_is_refused(tree: Path) -> None:
    """A protocol driver anywhere in a header's json: backing name is refused as a protocol name is."""
    img = tree / "inside" / "j.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "1M")
    spec = 'json:{"driver": "qcow2", "file": {"driver": "nbd", "server": {"type": "unix", "path": "/x"}}}'
    check_ok("rebase", "-u", "-b", spec, "-F", "qcow2", str(img))
    with pytest.raises(PolicyError, match="uses a protocol"):
        vdkit.open(img)
    r = vdkit_img("map", str(img))
    assert r.returncode == 1 and "uses a protocol, which is not allowed" in r.stderr, r.stderr
