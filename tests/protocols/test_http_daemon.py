"""vdkit-daemon drives on HTTP(S) URLs, against qemu-system-x86_64 on the same nginx.

Every ``-drive`` spelling of a curl node: ``file=URL`` (format given or
probed, ``file.*`` curl options), ``file.driver=http|https,file.url=...`` and
``driver=http|https,url=...`` (no format layer); ``-drive``'s auto-read-only
(a raw drive opens writable over the read-only curl node, a top-level curl
node is read-only, formats that write at open are refused), the ``json:{...}``
names QEMU gives nodes with a cookie or ``sslverify=off`` (format node and
curl node), relative backing files resolved against the URL, and the option
and open errors (``shared/reference/protocols.md`` §4).  ``query-block``,
``query-named-block-nodes`` and ``info block -v`` are compared.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tool
from tests.daemon.conftest import _ENV, QEMU_BASE, Daemons, daemons, normalise, normalise_hmp  # noqa: F401
from tests.protocols.test_http import Web, web  # noqa: F401  (fixture)


def test_http_drives_in_query_block_and_info_block(daemons: Daemons, web: Web) -> None:  # noqa: F811
    h, s = web.http, web.https
    drives = [
        f"file={h}/d.qcow2,if=none,id=d0,readonly=on",
        f"file={s}/r.raw,file.sslverify=off,if=none,id=d1,readonly=on,format=raw",
        f"file={h}/top.qcow2,if=none,id=d2,readonly=on",
        f"driver=http,url={h}/r.raw,if=none,id=a",
        f"driver=https,url={s}/r.raw,sslverify=off,if=none,id=b,readonly=on",
        f"file.driver=http,file.url={h}/r.raw,format=raw,if=none,id=c",
        f"file={h}/sub/top.qcow2,readonly=on,if=none,id=e",
        f"file={h}/r.raw,file.cookie=a=b,format=raw,readonly=on,if=none,id=f",
        f"file.driver=http,file.url={h}/d.qcow2,file.readahead=64k,format=qcow2,readonly=on,if=none,id=g",
        f"driver=http,url={h}/r.raw,timeout=0,if=none,id=j,readonly=on",
        f"file.driver=https,file.url={s}/d.qcow2,file.sslverify=off,readonly=on,if=none,id=k",
        f"file.driver=https,file.url={s}/r.raw,file.sslverify=off,if=none,id=l",
    ]
    args = [a for d in drives for a in ("-drive", d)]
    q, v = daemons.pair(args, lambda d: None)
    for cmd in ("query-block", "query-named-block-nodes"):
        assert normalise(v.cmd_line(cmd)) == normalise(q.cmd_line(cmd)), cmd
    for line in ("info block", "info block -v"):
        assert normalise_hmp(v.hmp(line)) == normalise_hmp(q.hmp(line)), line


def test_http_drive_errors_like_qemu(web: Web, tmp_path: Path) -> None:  # noqa: F811
    h, s = web.http, web.https
    drives = [
        f"file={h}/d.qcow2,if=none,id=d",  # qcow2 writes at open; the curl node is read-only
        f"file={h}/d.qcow2,format=qcow2,if=none,id=d",
        f"file={s}/top.qcow2,file.sslverify=off,readonly=on,if=none,id=h",  # json: name: no base directory
        f"file={h}/nope.qcow2,if=none,id=d",
        f"file={s}/d.qcow2,format=qcow2,if=none,id=d,readonly=on",  # self-signed certificate
        f"driver=http,url={s}/d.qcow2,if=none,id=d,readonly=on",  # the GLib lines carry the -drive too
        f"driver=http,url={h}/d.qcow2,readahead=1000,if=none,id=d,readonly=on",
        "driver=http,if=none,id=d,readonly=on",
        f"file.driver=http,file.url={h}/d.qcow2,file.bogus=1,if=none,id=d,readonly=on",
        f"file={h}/d.qcow2,file.bogus=1,if=none,id=d,readonly=on",
        f"driver=http,url={h}/d.qcow2,bogus=1,if=none,id=d,readonly=on",
    ]
    for drive in drives:
        out = []
        for cmd in ([require_tool("qemu-system-x86_64"), *QEMU_BASE],
                    [sys.executable, "-m", "vdkit.daemon.main", "-S"]):
            p = subprocess.run([*cmd, "-drive", drive], capture_output=True, timeout=60, env=_ENV,
                               stdin=subprocess.DEVNULL, cwd=tmp_path)
            prog = Path(cmd[0]).name if cmd[0] != sys.executable else "vdkit-daemon"
            out.append((p.returncode, p.stderr.decode().replace(f"{prog}:", "PROG:")))
        assert out[0] == out[1], drive
        assert out[0][0] == 1, drive


def test_http_blockdev_nodes(daemons: Daemons, web: Web) -> None:  # noqa: F811
    """-blockdev driver=http|https (by reference and inline, header backing over http, json: names)."""
    h, s = web.http, web.https
    args = ["-blockdev", f"driver=http,url={h}/d.qcow2,node-name=h0,read-only=on",
            "-blockdev", "driver=qcow2,file=h0,node-name=q0,read-only=on",
            "-blockdev", f"driver=http,url={h}/r.raw,node-name=h1,auto-read-only=on",
            "-blockdev", f'{{"driver":"https","url":"{s}/r.raw","sslverify":false,"node-name":"h2","read-only":true}}',
            "-blockdev", f'{{"driver":"raw","node-name":"r0","read-only":true,"file":{{"driver":"https",'
                         f'"url":"{s}/r.raw","sslverify":false,"cookie":"a=b"}}}}',
            "-blockdev", f"driver=qcow2,node-name=q1,read-only=on,file.driver=http,file.url={h}/top.qcow2",
            "-blockdev", f"driver=raw,node-name=r1,file.driver=http,file.url={h}/r.raw,file.auto-read-only=on"]
    q, v = daemons.pair(args, lambda d: None)
    assert normalise(v.cmd_line("query-named-block-nodes")) == normalise(q.cmd_line("query-named-block-nodes"))
    assert normalise_hmp(v.hmp("info block -n")) == normalise_hmp(q.hmp("info block -n"))
    for cmd in ({"execute": "blockdev-add", "arguments": {"driver": "http", "url": f"{h}/r.raw", "node-name": "x0"}},
                {"execute": "blockdev-add", "arguments": {"driver": "https", "url": f"{h}/r.raw", "node-name": "x1",
                                                          "read-only": True}},
                {"execute": "blockdev-add", "arguments": {"driver": "http", "url": f"{h}/nope.raw", "node-name": "x2",
                                                          "read-only": True}},
                {"execute": "blockdev-add", "arguments": {"driver": "http", "url": f"{h}/r.raw", "node-name": "x3",
                                                          "read-only": True, "timeout": "x"}},
                {"execute": "blockdev-add", "arguments": {"driver": "http", "node-name": "x4", "read-only": True}},
                {"execute": "blockdev-add", "arguments": {"driver": "https", "url": f"{s}/r.raw", "node-name": "x5",
                                                          "auto-read-only": True}},
                {"execute": "blockdev-add", "arguments": {"driver": "http", "url": f"{h}/r.raw", "node-name": "x6",
                                                          "read-only": True}},
                {"execute": "blockdev-del", "arguments": {"node-name": "x6"}}):
        name, arguments = str(cmd["execute"]), cmd["arguments"]
        assert v.cmd(name, arguments) == q.cmd(name, arguments), cmd  # type: ignore[arg-type]


def test_http_blockdev_errors_like_qemu(web: Web, tmp_path: Path) -> None:  # noqa: F811
    h = web.http
    for blockdev in (f"driver=http,url={h}/r.raw,node-name=h0",
                     "driver=http,node-name=h0,read-only=on",
                     f"driver=http,url={h}/r.raw,node-name=h0,read-only=on,timeout=x",
                     f"driver=http,url={h}/nope.raw,node-name=h0,read-only=on",
                     f"driver=qcow2,node-name=q0,file.driver=http,file.url={h}/d.qcow2,file.auto-read-only=on"):
        out = []
        for cmd in ([require_tool("qemu-system-x86_64"), *QEMU_BASE],
                    [sys.executable, "-m", "vdkit.daemon.main", "-S"]):
            p = subprocess.run([*cmd, "-blockdev", blockdev], capture_output=True, timeout=60, env=_ENV,
                               stdin=subprocess.DEVNULL, cwd=tmp_path)
            prog = Path(cmd[0]).name if cmd[0] != sys.executable else "vdkit-daemon"
            out.append((p.returncode, p.stderr.decode().replace(f"{prog}:", "PROG:")))
        assert out[0] == out[1], blockdev
