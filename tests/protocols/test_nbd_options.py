"""``--image-opts`` and ``json:`` names: the nbd driver's options and QEMU's json: grammar.

Every case runs qemu-img and vdkit-img on the same images and exports and
compares stdout, stderr and exit code (``shared/reference/protocols.md`` §1.4,
§1.10, §2).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_io
from tests.nbd.conftest import free_port, short_sock
from tests.protocols.test_nbd_client import QemuNbd, _same, qnbd  # noqa: F401  (fixture)


@pytest.fixture
def served(qnbd: QemuNbd, tmp_path: Path) -> tuple[Path, str]:  # noqa: F811
    """(folder, socket): r.raw (data at 0 and 1M), top.qcow2 over r.raw, d.raw exported as 'd' on the socket."""
    r = tmp_path / "r.raw"
    check_ok("create", "-q", "-f", "raw", str(r), "16M")
    assert qemu_io("-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 128k", str(r)).returncode == 0
    check_ok("create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", str(tmp_path / "top.qcow2"))
    assert qemu_io("-c", "write -P 0x33 2M 64k", str(tmp_path / "top.qcow2")).returncode == 0
    d = tmp_path / "d.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(d), "64M")
    assert qemu_io("-c", "write -P 0xab 0 1M", "-c", "write -z 4M 1M", str(d)).returncode == 0
    sock = short_sock("q.sock")
    qnbd.start(d, "-k", sock, "-x", "d", "-f", "qcow2", "-r", "-e", "4")
    return tmp_path, sock


def test_image_opts_for_nbd(served: tuple[Path, str]) -> None:
    tmp, q = served
    dead = free_port()
    specs = [
        f"driver=nbd,server.type=unix,server.path={q},export=d",
        f"driver=nbd,path={q},export=d",
        f"driver=nbd,path={q},export=d,open-timeout=2,reconnect-delay=3",
        f"driver=raw,file.driver=nbd,file.path={q},file.export=d",
        f"file.driver=nbd,file.server.type=unix,file.server.path={q},file.export=d",
        f"driver=qcow2,file.driver=nbd,file.path={q},file.export=d",  # not a qcow2
        # errors, in QEMU's order
        f"driver=nbd,server.path={q},export=d", "driver=nbd,server.type=unix,export=d", "driver=nbd,export=d,foo=bar",
        f"driver=nbd,server.type=unix,server.path={q},export=d,foo=bar",
        f"driver=nbd,server.type=bogus,server.path={q}",
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=abc", f"driver=nbd,host=127.0.0.1,port={dead}",
        "driver=nbd,server.type=inet,server.port=1", "driver=nbd,server.type=inet,server.host=127.0.0.1",
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={dead},server.path=x",
        f"driver=nbd,path={q},export=d,open-timeout=abc", f"driver=nbd,server.type=unix,server.path={q},path={q}",
        f"driver=nbd,path={q},host=x", f"driver=nbd,path={q},port=5", "driver=nbd,port=10809",
        f"driver=nbd,path={q},export=d,file.filename=x", f"driver=nbd,filename=nbd+unix:///d?socket={q}",
        f"driver=raw,file.driver=nbd,file.path={q},file.export=d,file.bogus=1", f"driver=nbd,path={q},export=nope",
    ]
    for spec in specs:
        _same(["info", "--image-opts", spec])
    nbd = specs[1]
    for args in (["info", "--output=json"], ["map"], ["map", "--output=json"], ["check"], ["check", "--output=json"]):
        _same([*args, "--image-opts", nbd])
    _same(["info", "-f", "nbd", f"nbd+unix:///d?socket={q}"])
    _same(["info", "-f", "nbd", str(tmp / "r.raw")])  # File name string for NBD must start with 'nbd:'
    _same(["create", "-f", "nbd", str(tmp / "x.img"), "1M"])
    assert not (tmp / "x.img").exists()


def _j(tree: object) -> str:
    return "json:" + json.dumps(tree)


def test_json_names(served: tuple[Path, str]) -> None:
    tmp, q = served
    nbd = {"driver": "nbd", "server": {"type": "unix", "path": q}, "export": "d"}
    names = [
        # grammar errors
        'json:{"driver":"qcow2",}', 'json:{"driver":"qcow2","file":{', "json:", "json:  ", "json:{} x", "json:{}{}",
        "json:[1,2]", 'json:"x"', "json:{}", 'json:{"driver":"raw"}', 'json:{"driver": 1}', 'json:{"a":{"b":[1]}}',
        'json:{"driver":"nosuch","file":{"filename":"r.raw"}}',
        'json:{"driver":"raw","file":{"driver":"nosuch","filename":"r.raw"}}', 'json:{"file":"r.raw"}',
        'json:{"driver":"raw","file":{"filename":"r.raw"},"bogus":1}',
        'json:{"driver":"raw","file":{"filename":"r.raw","bogus":1}}', 'json:{"file":{"driver":"file"}}',
        'json:{"file":{"filename":123}}', 'json:{"driver":"qcow2","file":{"filename":"r.raw"}}',
        'json:{"driver":"raw","file":{"filename":"r.raw"},"x":{"a":[1]}}', 'json:{"file":{"filename":"nosuch.raw"}}',
        # QEMU's parser (the one QMP is read with): its texts, the first error in the text winning
        'json:{"driver":raw}', 'json:{"a":@}', 'json:{"a":01}', 'json:{"a" 1}', "json:{1:2}", 'json:{"a":tru}',
        'json:{"a":"x', 'json:{"a":-}', 'json:{"a":"\\x"}', 'json:{"a":1,"a":2', 'json:{"a":{"b":1,"b":2},',
        'json:{"driver":"raw","driver":"raw","file":{"filename":"r.raw"}}', 'json:{"a":1} @', 'json:{"a":"\\ud800"}',
        'json:{"a":1.}', "json:1", "json:{'driver':'raw','file.filename':'r.raw','x':'\\'a'}",
        # names that stay plain
        "json:{'driver':'raw','file':{'filename':'r.raw'}}", 'json: {"file.filename":"r.raw"}',
        'json:{"driver":"raw","file.filename":"r.raw","file":{"driver":"file"}}',
        'json:{"driver":"raw","file":{"filename":"r.raw"},"file.filename":"zz"}',
        'json:{"driver":"raw","file":{"filename":"r.raw","locking":"off","aio":"threads"},"cache":{"direct":false}}',
        'json:{"driver":"qcow2","l2-cache-size":"1M","file":{"driver":"file","filename":"top.qcow2"},"backing":null}',
        # nbd
        _j(nbd), _j({"file": {"driver": "nbd", "server.type": "unix", "server.path": q, "export": "d"}}),
        _j({"driver": "nbd", "path": q, "export": "d", "open-timeout": 1}),
        _j({"driver": "nbd", "filename": f"nbd+unix:///d?socket={q}"}),
        _j({"file": {"filename": f"nbd+unix:///d?socket={q}"}}),  # a local file name
        _j({"driver": "nbd", "host": "127.0.0.1", "port": free_port()}),
    ]
    for name in names:
        _same(["info", name], cwd=tmp)
    _same(["info", "--output=json", _j(nbd)], cwd=tmp)
    _same(["info", "-f", "raw", 'json:{"file":{"filename":"r.raw"}}'], cwd=tmp)
    top = {"driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}}
    for tree in (top, {**top, "backing": None}):  # "backing": null ends the chain for map and convert
        _same(["map", "--output=json", _j(tree)], cwd=tmp)
        _same(["compare", _j(tree), "r.raw"], cwd=tmp)
    _same(["compare", _j(nbd), f"nbd+unix:///d?socket={q}"], cwd=tmp)
    _same(["convert", "-O", "raw", _j(nbd), "out.raw"], cwd=tmp)
    _same(["compare", "out.raw", _j(nbd)], cwd=tmp)
    _same(["create", "-f", "raw", 'json:{"file":{"filename":"n.raw"}}', "1M"], cwd=tmp)  # Unknown protocol 'json'


def test_open_timeout_retries_then_reports_the_last_error(tmp_path: Path) -> None:
    """open-timeout=N: the connection is retried for N seconds (a server started late is reached)."""
    import threading

    from tests.conftest import vdkit_img

    path = short_sock("late.sock")
    r = vdkit_img("info", "--image-opts", f"driver=nbd,path={path},open-timeout=1")
    assert r.returncode == 1 and r.stderr.endswith(f"Failed to connect to '{path}': No such file or directory\n")
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(path)
    mute.listen(1)
    start = time.monotonic()
    r = vdkit_img("info", "--image-opts", f"driver=nbd,path={path},open-timeout=1")
    assert r.stderr.endswith("Connection attempt cancelled by timeout\n"), r.stderr
    assert 0.9 < time.monotonic() - start < 20
    mute.close()
    import os

    os.unlink(path)
    img = tmp_path / "late.raw"
    check_ok("create", "-q", "-f", "raw", str(img), "1M")

    def start_late() -> None:
        import subprocess

        time.sleep(1.0)
        subprocess.run(["qemu-nbd", "-k", path, "-f", "raw", "-r", "--fork", "-t", "--pid-file",
                        str(tmp_path / "late.pid"), str(img)], check=True)

    t = threading.Thread(target=start_late)
    t.start()
    try:
        r = vdkit_img("info", "--image-opts", f"driver=nbd,path={path},open-timeout=10")
        assert r.returncode == 0 and "virtual size: 1 MiB" in r.stdout, r.stderr
    finally:
        t.join()
        pid_file = tmp_path / "late.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 15)
