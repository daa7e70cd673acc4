"""The library as a Python user meets it: the README's calls, request checks, snapshot calls, docstrings.

Where QEMU has an answer it is the oracle: request checks against qemu-io's on the same image, the
human info text against ``qemu-img info``, snapshot results against ``qemu-img snapshot -l`` and
qemu-io's reads.
"""

from __future__ import annotations

import errno
import inspect
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import vdkit
from tests.conftest import ROOT, check_ok, qemu_img, qemu_io
from vdkit.block.node import Node
from vdkit.errors import SnapshotNotFoundError, VdkitError

SIZE = 1 << 20


def _image(tmp: Path, name: str = "a.qcow2") -> Path:
    img = tmp / name
    check_ok("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    r = qemu_io("-c", "write -P 0x11 0 64k", str(img))
    assert r.returncode == 0, r.stderr
    return img


def test_readme_render_calls_after_bare_import(tmp_path: Path) -> None:
    """``import vdkit`` then ``vdkit.info.render_human.image_info(info)`` as the README shows, in a fresh
    interpreter (nothing imported beforehand); the text is ``qemu-img info``'s."""
    img = _image(tmp_path)
    code = (
        "import sys, vdkit\n"
        "with vdkit.open(sys.argv[1]) as node:\n"
        "    info = vdkit.image_info(node, nested=True)\n"
        "    sys.stdout.write(vdkit.info.render_human.image_info(info))\n"
        "    sys.stdout.write(vdkit.info.render_json.render_pretty(info))\n"
        "    vdkit.block.chain.OpenPolicy.restricted_to(sys.argv[1])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(img)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    human = qemu_img("info", str(img)).stdout
    js = qemu_img("info", "--output=json", str(img)).stdout
    assert r.stdout == human + js


def test_lazy_attributes_are_modules_or_attribute_errors() -> None:
    assert vdkit.info.model.SnapshotInfo.__name__ == "SnapshotInfo"
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        vdkit.nosuch  # noqa: B018
    with pytest.raises(AttributeError):
        vdkit.info.nosuch  # noqa: B018
    assert not hasattr(vdkit, "__wrapped__")


# (offset, length) pairs; qemu-io's answer for each is the oracle (negative values it cannot parse)
REQUESTS = [(0, 4), (SIZE - 4, 4), (SIZE - 2, 4), (SIZE, 1), (SIZE, 0), (SIZE + 512, 0), (SIZE - 512, 512),
            (SIZE + 4096, 512), (1 << 62, 512)]


@pytest.mark.parametrize(("offset", "length"), REQUESTS)
def test_request_checks_like_qemu_io(tmp_path: Path, offset: int, length: int) -> None:
    img = _image(tmp_path)
    for op, cmd in (("read", f"read {offset} {length}"), ("write", f"write -P 0x22 {offset} {length}"),
                    ("write", f"write -z {offset} {length}"), ("discard", f"discard {offset} {length}")):
        q = qemu_io("-c", cmd, str(img))
        with vdkit.open(img, readonly=op == "read") as node:
            try:
                if cmd.startswith("read"):
                    node.read(offset, length)
                elif "-z" in cmd:
                    node.write_zeroes(offset, length)
                elif op == "write":
                    node.write(offset, b"\x22" * length)
                else:
                    node.discard(offset, length)
            except VdkitError as exc:
                assert q.returncode == 1, f"{cmd}: qemu-io succeeded, vdkit raised {exc}"
                assert q.stdout == f"{exc}\n" == f"{op} failed: Input/output error\n"
                assert exc.errno == errno.EIO
            else:
                assert q.returncode == 0, f"{cmd}: qemu-io failed with {q.stdout!r}, vdkit succeeded"
    assert qemu_img("check", str(img)).returncode == 0


@pytest.mark.parametrize(("offset", "length"), [(-1, 4), (-512, 512), (0, -1), (-1, 0)])
def test_negative_requests_fail_with_eio(tmp_path: Path, offset: int, length: int) -> None:
    """QEMU's request check refuses negative offsets and lengths with EIO (qemu-io cannot even send them)."""
    img = _image(tmp_path)
    with vdkit.open(img, readonly=False) as node:
        for call in (lambda: node.read(offset, length), lambda: node.write_zeroes(offset, length),
                     lambda: node.discard(offset, length)):
            with pytest.raises(VdkitError) as e:
                call()
            assert e.value.errno == errno.EIO and "outside" in (e.value.hint or "")
        if length >= 0:
            with pytest.raises(VdkitError):
                node.write(offset, b"x" * length)
    r = qemu_io("-c", "read -P 0x11 0 64k", "-c", "read -P 0 64k 960k", str(img))
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout


def _qemu_snapshots(img: Path) -> list[dict[str, object]]:
    return list(json.loads(check_ok("info", "--output=json", str(img)).stdout).get("snapshots", []))


def test_snapshot_create_defaults_to_now(tmp_path: Path) -> None:
    """``node.snapshot_create("x")`` needs no dates: now, vm clock 0, as ``qemu-img snapshot -c`` records."""
    img = _image(tmp_path)
    check_ok("snapshot", "-c", "by-qemu", str(img))
    before = time.time()
    with vdkit.open(img, readonly=False) as node:
        node.snapshot_create("by-vdkit")
    after = time.time()
    q, v = _qemu_snapshots(img)
    assert v["name"] == "by-vdkit" and v["id"] == "2"
    assert before - 1 <= v["date-sec"] <= after  # type: ignore[operator]
    assert v["date-nsec"] % 1000 == 0  # type: ignore[operator]  # microseconds, as qemu-img's clock
    assert (v["vm-clock-sec"], v["vm-clock-nsec"], v["vm-state-size"]) == (0, 0, 0)
    assert q["vm-clock-sec"] == q["vm-clock-nsec"] == 0
    assert qemu_img("check", str(img)).returncode == 0


def test_snapshot_revert_and_delete_take_what_snapshots_returns(tmp_path: Path) -> None:
    img = _image(tmp_path)
    with vdkit.open(img, readonly=False) as node:
        node.snapshot_create("one")
        node.write(0, b"\x22" * 65536)
        node.snapshot_create("two")
        node.write(0, b"\x33" * 65536)
        node.snapshot_create("three")
        infos = node.snapshots()
        assert [(s.id, s.name) for s in infos] == [("1", "one"), ("2", "two"), ("3", "three")]
        node.snapshot_revert(infos[0])  # SnapshotInfo
        assert node.read(0, 4) == b"\x11" * 4
        node.snapshot_revert("2")  # an ID
        assert node.read(0, 4) == b"\x22" * 4
        node.snapshot_revert("three")  # a name
        assert node.read(0, 4) == b"\x33" * 4
        assert node.read_vmstate(infos[2]) == b""
        deleted = node.snapshot_delete(infos[1])
        assert deleted.name == "two"
        node.snapshot_delete("1")  # ID first, as revert looks it up
        with pytest.raises(SnapshotNotFoundError) as e:
            node.snapshot_revert("two")
        assert e.value.errno == errno.ENOENT
        with pytest.raises(SnapshotNotFoundError):
            node.snapshot_delete(infos[0])
        with pytest.raises(TypeError):
            node.snapshot_delete("three", name="three")
    assert [s["name"] for s in _qemu_snapshots(img)] == ["three"]
    assert qemu_img("check", str(img)).returncode == 0
    r = qemu_io("-c", "read -P 0x33 0 64k", str(img))
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout


def test_snapshot_lookup_on_raw_is_unsupported(tmp_path: Path) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(SIZE))
    with vdkit.open(raw, "raw", readonly=False) as node:
        assert node.snapshots() == []
        with pytest.raises(VdkitError, match="does not support snapshots"):
            node.snapshot_revert("x")


def _public(cls: type) -> list[str]:
    return [n for n, _ in inspect.getmembers(cls) if not n.startswith("_")]


def test_public_api_has_docstrings() -> None:
    missing = [f"Node.{n}" for n in _public(Node) if not (inspect.getattr_static(Node, n).__doc__ or "").strip()]
    missing += [f"vdkit.{n}" for n in vdkit.__all__ if not (getattr(vdkit, n).__doc__ or "").strip()]
    assert not missing, missing


def test_py_typed_is_shipped() -> None:
    """PEP 561 marker in the package and in the package data a wheel gets."""
    assert (ROOT / "vdkit" / "py.typed").is_file()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in cfg["tool"]["setuptools"]["package-data"]["vdkit"]
