"""A ``backing`` child given in ``json:``/``--image-opts``: what qemu-img 7.2 accepts, opens and refuses.

The member comes as a nested object, as dotted ``backing.*`` keys, as a node
name (a string), as ``null`` (or QEMU's deprecated ``""``), or as any other
scalar.  ``info`` opens images without their backing, so it refuses any of
them but ``null`` by the first key in QEMU's hash order; ``map``,
``convert`` and ``compare`` open the backing the options describe, with the
image's own backing name filled in where the object names no file (so an
NBD node still cannot resolve it, and an nbd/curl backing node meets it as
its file name).  Every case runs through qemu-img and vdkit-img and the
outputs are compared; converted images are compared with ``qemu-img compare``.
Images live on local files, on qemu-nbd exports and on a real nginx.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, qemu_io, vdkit_img
from tests.nbd.conftest import free_port
from tests.protocols.test_http import Web, _qemu_convert, web  # noqa: F401  (web: fixture)
from tests.protocols.test_nbd_client import QemuNbd, qnbd  # noqa: F401  (qnbd: fixture)


def _same(args: list[str], cwd: Path) -> str:
    q = assert_same(args, cwd)
    return q.stdout + q.stderr


def chain_files(d: Path, *, absolute_backing: bool = False) -> Path:
    """top.qcow2 (0x44 at 3M) over base.qcow2 (0x11 at [0,1M), its name stored relative, or absolute
    where top.qcow2's bytes are read without its folder: an NBD export); base2.qcow2 (0x22 at [0,2M),
    no backing); r.raw (0x33 at [1M,2M))."""
    check_ok("create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "4M")
    assert qemu_io("-c", "write -P 0x11 0 1M", str(d / "base.qcow2")).returncode == 0
    check_ok("create", "-q", "-f", "qcow2", str(d / "base2.qcow2"), "4M")
    assert qemu_io("-c", "write -P 0x22 0 2M", str(d / "base2.qcow2")).returncode == 0
    check_ok("create", "-q", "-f", "raw", str(d / "r.raw"), "4M")
    assert qemu_io("-f", "raw", "-c", "write -P 0x33 1M 1M", str(d / "r.raw")).returncode == 0
    base = str(d / "base.qcow2") if absolute_backing else "base.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", str(d / "top.qcow2"), "4M", cwd=d)
    assert qemu_io("-c", "write -P 0x44 3M 64k", str(d / "top.qcow2")).returncode == 0
    return d


@pytest.fixture
def files(tmp_path: Path) -> Path:
    return chain_files(tmp_path)


def _file(name: str) -> dict[str, object]:
    return {"driver": "file", "filename": name}


def _qcow2(name: str, **more: object) -> dict[str, object]:
    return {"driver": "qcow2", "file": _file(name), **more}


def _name(node: dict[str, object]) -> str:
    return "json:" + json.dumps(node, separators=(",", ":"))


# backing members: accepted (object, dotted keys, null, "", a number, {} over an image with a backing
# file) and refused (a node name, a list, bad options, no file for an image without backing name...)
BACKINGS: list[object] = [
    _qcow2("base2.qcow2"), {"file": {"filename": "base2.qcow2"}}, {"driver": "raw", "file": _file("r.raw")},
    {"driver": "raw"}, {"driver": "raw", "file": {"driver": "file"}}, None, "", 1, True, {}, "base2.qcow2", [1],
    _qcow2("nosuch"), {"driver": "qcow2", "bogus": 1, "file": _file("base2.qcow2")}, {"driver": "qcow2", "bogus": 1},
    {"bogus": 1}, {"driver": "nosuch"},
    {"file": {"filename": "x"}, "driver": "qcow2", "node-name": "a", "read-only": "on"},
    _qcow2("base.qcow2", backing={"driver": "raw", "file": _file("r.raw")}),  # the backing's own backing
]


def test_backing_members(files: Path) -> None:
    for backing in BACKINGS:
        name = _name({**_qcow2("top.qcow2"), "backing": backing})
        _same(["info", name], files)
        _same(["map", "--output=json", name], files)
    for backing in ({}, 1, {"driver": "raw"}, {"driver": "raw", "file": _file("r.raw")}):  # no backing name
        _same(["map", "--output=json", _name({**_qcow2("base2.qcow2"), "backing": backing})], files)
    raw = {"driver": "raw", "file": _file("r.raw")}
    for backing in (_qcow2("base2.qcow2"), None, {}, 1, "x"):  # raw has no backing child
        _same(["map", _name({**raw, "backing": backing})], files)
    _same(["info", _name({**raw, "backing": {"driver": "raw"}})], files)
    for extra in ({"backing": None, "backing.driver": "qcow2"},  # the dotted key is left over
                  {"backing": _qcow2("base2.qcow2"), "backing.driver": "raw"},  # the nested spelling wins
                  {"backing.driver": "qcow2", "backing.file.filename": "base2.qcow2"}):
        _same(["info", _name({**_qcow2("top.qcow2"), **extra})], files)
        _same(["map", _name({**_qcow2("top.qcow2"), **extra})], files)
    for spec in ("backing=", "backing.driver=qcow2,backing.file.filename=base2.qcow2",
                 "backing.file.filename=base2.qcow2", "backing=base2.qcow2"):
        _same(["info", "--image-opts", f"driver=qcow2,file.filename=top.qcow2,{spec}"], files)
        _same(["map", "--image-opts", f"driver=qcow2,file.filename=top.qcow2,{spec}"], files)
    over = _name({**_qcow2("top.qcow2"), "backing": _qcow2("base2.qcow2")})
    _same(["info", "--backing-chain", over], files)
    _same(["info", "--backing-chain", _name({**_qcow2("top.qcow2"), "backing": None})], files)
    _same(["map", _name({"file": _file("top.qcow2"), "backing": _qcow2("base2.qcow2")})], files)  # probed
    _same(["check", over], files)
    _same(["bitmap", "--add", over, "b0"], files)
    # a plain name next to a spec for the same file keeps the image's own backing
    _same(["compare", over, "top.qcow2"], files)
    _same(["compare", "top.qcow2", over], files)
    _same(["compare", _name({**_qcow2("top.qcow2"), "backing": None}), "top.qcow2"], files)
    _same(["compare", over, _name({**_qcow2("top.qcow2"), "backing": _qcow2("base2.qcow2")})], files)
    for src in (over, _name({**_qcow2("base2.qcow2"), "backing": {"driver": "raw", "file": _file("r.raw")}})):
        for tool, out in ((qemu_img, "q.qcow2"), (vdkit_img, "v.qcow2")):
            r = tool("convert", "-O", "qcow2", src, out, cwd=files)
            assert r.returncode == 0, r.stderr
        assert qemu_img("compare", "q.qcow2", "v.qcow2", cwd=files).returncode == 0
        _same(["map", "--output=json", "v.qcow2"], files)


def test_backing_members_over_nbd(qnbd: QemuNbd, files: Path) -> None:  # noqa: F811
    """A qcow2 image on an NBD export (its relative backing name cannot be resolved there) and NBD
    exports as backing nodes."""
    tsock, bport = str(files / "t.sock"), free_port()
    qnbd.start(files / "top.qcow2", "-k", tsock, "-x", "top", "-f", "raw", "-r")
    qnbd.start(files / "base2.qcow2", "-p", str(bport), "-b", "127.0.0.1", "-x", "b", "-f", "qcow2", "-r")
    export = {"driver": "nbd", "server": {"type": "unix", "path": tsock}, "export": "top"}
    b_export = {"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": str(bport)}, "export": "b"}
    top = {"driver": "qcow2", "file": export}
    local_base = _qcow2(str(files / "base2.qcow2"))
    for backing in (local_base, {"driver": "raw", "file": b_export}, b_export, None, {"driver": "qcow2"},
                    {"file": {"filename": str(files / "base2.qcow2")}}):
        _same(["map", "--output=json", _name({**top, "backing": backing})], files)
    for backing in ({"driver": "raw"}, None, "x"):  # the export as the top node: no backing child
        _same(["map", _name({**export, "backing": backing})], files)
        _same(["info", _name({**export, "backing": backing})], files)
    # an image with a backing name: the nbd node meets it as its file name; without one it opens
    for image in ("top.qcow2", "base2.qcow2"):
        for backing in (b_export, {"driver": "raw", "file": b_export}, {"driver": "nbd", "export": "b"},
                        {"driver": "raw", "file": {"driver": "nbd", "host": "127.0.0.1", "port": str(bport),
                                                   "export": "b"}}):
            _same(["map", "--output=json", _name({**_qcow2(image), "backing": backing})], files)
    _same(["map", "--image-opts", f"driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={tsock},"
                                  f"file.export=top,backing.driver=qcow2,backing.file.filename=base2.qcow2"], files)
    pairs = (_name({**top, "backing": local_base}),
             _name({**_qcow2("base2.qcow2"), "backing": {"driver": "raw", "file": b_export}}))
    _same(["compare", *pairs], files)
    for tool, out in ((qemu_img, "q.raw"), (vdkit_img, "v.raw")):
        assert tool("convert", "-O", "raw", pairs[0], out, cwd=files).returncode == 0
    assert (files / "q.raw").read_bytes() == (files / "v.raw").read_bytes()


def test_backing_members_over_http(web: Web, files: Path) -> None:  # noqa: F811
    """top.qcow2 served by nginx (its backing name resolves against the URL) with its backing replaced,
    and curl nodes as backing nodes (the image's backing name becomes their URL)."""
    top = {"driver": "qcow2", "file": {"driver": "http", "url": f"{web.http}/top.qcow2"}}
    for backing in (_qcow2(str(files / "base2.qcow2")), None, {"driver": "qcow2"}, {"driver": "raw"},
                    {"driver": "qcow2", "file": {"driver": "http", "url": f"{web.http}/sub/base.qcow2"}},
                    {"driver": "qcow2", "file": {"driver": "http", "filename": f"{web.http}/sub/base.qcow2"}}):
        _same(["map", "--output=json", _name({**top, "backing": backing})], files)
    _same(["info", _name({**top, "backing": {"driver": "qcow2"}})], files)
    curl = {"driver": "qcow2", "file": {"driver": "http", "url": f"{web.http}/base.qcow2"}}
    for image in ("top.qcow2", "base2.qcow2"):  # the local name as a URL, or no name at all
        _same(["map", "--output=json", _name({**_qcow2(image), "backing": curl})], files)
    src = _name({**top, "backing": _qcow2(str(files / "base2.qcow2"))})
    _qemu_convert("-O", "raw", src, str(files / "q.raw"))
    assert vdkit_img("convert", "-O", "raw", src, "v.raw", cwd=files).returncode == 0
    assert (files / "q.raw").read_bytes() == (files / "v.raw").read_bytes()
    _same(["compare", src, str(files / "v.raw")], files)


def test_rebase_under_a_replaced_backing(files: Path) -> None:
    """QEMU names an image whose backing the options replaced json:{"backing": ..., ...} (not when the
    object names the image's own backing file, nor for null over an image without one), and a json:
    name cannot resolve a relative new backing name; an absolute one rebases.  Images compared after."""
    check_ok("create", "-q", "-f", "qcow2", str(files / "solo.qcow2"), "4M")
    cases = [("top.qcow2", _qcow2("base2.qcow2"), "base.qcow2"), ("top.qcow2", None, "base.qcow2"),
             ("top.qcow2", _qcow2("base2.qcow2"), str(files / "base.qcow2")), ("top.qcow2", {"driver": "qcow2"},
                                                                              "base.qcow2"),
             ("top.qcow2", _qcow2("base.qcow2"), "base.qcow2"), ("solo.qcow2", None, "base.qcow2"),
             ("top.qcow2", _qcow2("base2.qcow2", backing=None), "base.qcow2"),
             ("top.qcow2", _qcow2("top.qcow2", backing={"driver": "raw", "file": _file("r.raw")}), "base.qcow2")]
    for image, backing, new in cases:
        outcomes = []
        for tool in (qemu_img, vdkit_img):
            (files / "t.qcow2").write_bytes((files / image).read_bytes())
            r = tool("rebase", "-F", "qcow2", "-b", new, _name({**_qcow2("t.qcow2"), "backing": backing}), cwd=files)
            outcomes.append((r.returncode, r.stdout, r.stderr.split(": ", 1)[-1],
                             qemu_img("map", "--output=json", "t.qcow2", cwd=files).stdout,
                             [x for x in qemu_img("info", "t.qcow2", cwd=files).stdout.splitlines()
                              if x.startswith("backing")]))
        assert outcomes[0] == outcomes[1], (image, backing, new)
