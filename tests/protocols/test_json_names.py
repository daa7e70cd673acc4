"""``json:{...}`` names QEMU gives nodes with strong options, and raw's ``offset``/``size`` windows.

qemu-img names a node by its options when the plain file name cannot say what
the node is (``shared/reference/protocols.md`` §2.3): raw's ``offset``/``size``
(even ``offset: 0``), a raw node over another raw node, a format over a
windowed raw node.  The rendering keeps QEMU's key order (its hash order) and
the value types as given (``--image-opts`` values are strings).  The windows
change the data, so they are exercised through every command that reads or
writes them; every case runs through qemu-img and vdkit-img and the outputs
are compared.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, qemu_io, vdkit_img
from tests.daemon.conftest import Daemons, daemons, normalise, normalise_hmp  # noqa: F401  (fixture)


def _same(args: list[str], cwd: Path) -> str:
    q = assert_same(args, cwd)
    return q.stdout + q.stderr


@pytest.fixture
def files(tmp_path: Path) -> Path:
    check_ok("create", "-q", "-f", "raw", str(tmp_path / "d.raw"), "16M")
    assert qemu_io("-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 8M 64k",
                   str(tmp_path / "d.raw")).returncode == 0
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "4M")
    assert qemu_io("-c", "write -P 0x11 0 64k", str(tmp_path / "b.qcow2")).returncode == 0
    (tmp_path / "src.raw").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    return tmp_path


def _raw(**opts: object) -> str:
    import json

    inner = opts.pop("file", {"driver": "file", "filename": "d.raw"})
    return "json:" + json.dumps({"driver": "raw", **opts, "file": inner})


def test_windows_and_names(files: Path) -> None:
    names = [
        _raw(offset=512, size=1024),
        _raw(offset=0),
        _raw(size=0),
        _raw(offset="1k"),
        _raw(offset=1),
        _raw(offset=16 << 20),
        _raw(size=1 << 20, offset=4096),  # the given order does not matter: QEMU's hash order
        _raw(file={"driver": "raw", "file": {"driver": "file", "filename": "d.raw"}}),
        _raw(file={"offset": 512, "driver": "raw", "file": {"driver": "file", "filename": "d.raw"}}),
        _raw(offset=1024, file={"offset": 512, "size": 2 << 20, "driver": "raw",
                                "file": {"driver": "file", "filename": "d.raw"}}),
        'json:{"driver":"qcow2","file":{"driver":"raw","offset":0,"file":{"driver":"file","filename":"b.qcow2"}}}',
        'json:{"driver":"raw","file.driver":"raw","file.file.filename":"d.raw","offset":"8M"}',
    ]
    for name in names:
        assert "json:" in _same(["info", name], files)
        _same(["info", "--output=json", name], files)
        if name != _raw(offset=1):  # qemu-img 7.2 asserts on a window not aligned to sectors
            _same(["map", "--output=json", name], files)
            _same(["map", name], files)
    for spec in ("driver=raw,offset=512,size=1024,file.filename=d.raw",
                 "driver=raw,size=1M,offset=4k,file.driver=file,file.filename=d.raw",
                 "driver=raw,offset=0,file.filename=d.raw,file.locking=off,cache.direct=off"):
        _same(["info", "--image-opts", spec], files)
    _same(["compare", _raw(offset=8 << 20, size=64 << 10), _raw(offset=8 << 20, size=64 << 10)], files)
    _same(["compare", _raw(offset=1 << 20), "d.raw"], files)
    _same(["compare", "-f", "raw", "-F", "raw", _raw(offset=0, size=1 << 20), "d.raw"], files)
    for tool, out in ((qemu_img, "q.qcow2"), (vdkit_img, "v.qcow2")):
        assert tool("convert", "-O", "qcow2", _raw(offset=512, size=8 << 20), out, cwd=files).returncode == 0
    assert qemu_img("compare", "q.qcow2", "v.qcow2", cwd=files).returncode == 0


def test_window_errors(files: Path) -> None:
    for name in (_raw(offset=17000000), _raw(size=1000), _raw(offset=8 << 20, size=(8 << 20) + 1),
                 _raw(offset=8 << 20, size=(8 << 20) + 512), _raw(offset="1.5"), _raw(size=-1), _raw(offset=True),
                 _raw(offset=1.5), _raw(offset=512, bogus=1),
                 _raw(offset=512, file={"driver": "file", "filename": "d.raw", "bogus": 1}),
                 _raw(offset=512, file={"driver": "file"}), _raw(offset=512, file={"driver": "file",
                                                                                    "filename": "nosuch.raw"}),
                 _raw(file={"offset": 17000000, "driver": "raw", "file": {"driver": "file", "filename": "d.raw"}})):
        assert "qemu-img: " in _same(["info", name], files), name
    _same(["info", "--image-opts", "driver=raw,offset=abc,file.filename=d.raw"], files)


def test_writes_through_windows(files: Path) -> None:
    """convert -n into a window and resize of windows: the file's bytes end up as qemu-img leaves them."""
    window = '{"driver":"raw","offset":1024,"size":1048576,"file":{"driver":"file","filename":"%s"}}'
    for src in ("src.raw", "d.raw"):  # fits; larger than the window ("output file is smaller")
        results = []
        for tool, copy in ((qemu_img, "w1.raw"), (vdkit_img, "w2.raw")):
            (files / copy).write_bytes((files / "d.raw").read_bytes())
            r = tool("convert", "-n", "-f", "raw", src, "json:" + window % copy, cwd=files)
            results.append((r.returncode, r.stderr.split(": ", 1)[-1], (files / copy).read_bytes()))
        assert results[0] == results[1], src
    for name, size in ((window % "w1.raw", "2M"), ('{"driver":"raw","offset":512,"file":{"driver":"file",'
                                                   '"filename":"w1.raw"}}', "20M")):
        (files / "w1.raw").write_bytes((files / "d.raw").read_bytes())
        q = qemu_img("resize", "json:" + name, size, cwd=files)
        q_size = (files / "w1.raw").stat().st_size
        (files / "w1.raw").write_bytes((files / "d.raw").read_bytes())
        v = vdkit_img("resize", "json:" + name, size, cwd=files)
        assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
        assert (files / "w1.raw").stat().st_size == q_size


def test_windows_in_the_daemon(daemons: Daemons) -> None:  # noqa: F811
    """-drive format=raw,offset=...,size=...: query-block, query-named-block-nodes and info block -v as QEMU's."""
    drives = ["file=d.raw,format=raw,offset=512,if=none,id=a",
              "file=e.raw,format=raw,offset=1M,size=1M,if=none,id=b,readonly=on",
              "driver=raw,file.driver=file,file.filename=c.raw,size=4M,if=none,id=c"]

    def setup(d: Path) -> None:
        for n in "dec":
            check_ok("create", "-q", "-f", "raw", str(d / f"{n}.raw"), "16M")
        assert qemu_io("-f", "raw", "-c", "write -P 0xab 0 1M", str(d / "e.raw")).returncode == 0

    q, v = daemons.pair([a for x in drives for a in ("-drive", x)], setup)
    for cmd in ("query-block", "query-named-block-nodes"):
        assert normalise(v.cmd_line(cmd)) == normalise(q.cmd_line(cmd)), cmd
    for line in ("info block", "info block -v"):
        assert normalise_hmp(v.hmp(line)) == normalise_hmp(q.hmp(line)), line


def test_vpc_force_size_calc(files: Path) -> None:
    """vpc's force_size_calc: a strong option (json: name); the geometry or the footer's current size
    decides the disk size, except for the maximum geometry (always the current size)."""
    check_ok("create", "-q", "-f", "vpc", str(files / "v.vpc"), "4M")
    check_ok("create", "-q", "-f", "vpc", "-o", "force_size=on", str(files / "f.vpc"), "5M")
    check_ok("create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", str(files / "ff.vpc"), "5M")
    check_ok("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(files / "v2.vpc"), "5M")
    for f in ("v.vpc", "f.vpc", "ff.vpc", "v2.vpc"):
        for mode in ("chs", "current_size"):
            _same(["info", f'json:{{"driver":"vpc","force_size_calc":"{mode}","file":{{"driver":"file",'
                           f'"filename":"{f}"}}}}'], files)
            _same(["map", "--output=json", "--image-opts", f"driver=vpc,force_size_calc={mode},file.filename={f}"],
                  files)
    _same(["info", "--output=json", "--image-opts", "driver=vpc,force_size_calc=chs,file.filename=v.vpc"], files)
    for bad in ('{"driver":"vpc","force_size_calc":"x","file":{"driver":"file","filename":"v.vpc"}}',
                '{"driver":"vpc","force_size_calc":1,"file":{"driver":"file","filename":"v.vpc"}}',
                '{"driver":"vpc","force_size_calc":"chs","file":{"driver":"file","filename":"nonex.vpc"}}',
                '{"force_size_calc":"chs","file":{"driver":"file","filename":"d.raw"}}'):
        assert "qemu-img: " in _same(["info", "json:" + bad], files)
    # no driver: the probed format takes the option, and is named
    _same(["info", 'json:{"force_size_calc":"chs","file":{"driver":"file","filename":"v.vpc"}}'], files)
