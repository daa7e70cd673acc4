"""Dirty bitmaps exported over NBD (``qemu:dirty-bitmap:NAME``) and the ``qemu:allocation-depth``
context, compared with qemu-system-x86_64.

The same images (persistent bitmaps of several granularities, a disabled one, one in the backing
file, one on a read-only drive) exported by both daemons: the QMP answers and refusals, the meta
context negotiation and block status replies byte for byte (context ids included), what
``nbdinfo --map`` and ``qemu-img map`` with ``x-dirty-bitmap`` read (and ``vdkit-img map`` with it,
the same), and the bitmap following a write made through a writable export while it is exported.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import qemu_img, qemu_io, require_tool, vdkit_img
from tests.daemon.conftest import Daemons, Monitor
from tests.nbd.client import NbdClient, _recv_exact
from tests.nbd.conftest import short_sock
from tests.nbd.test_qmp import run, unix
from vdkit.nbd import wire as w

DRIVES = ["-drive", "file=top.qcow2,if=none,id=drv,node-name=disk",
          "-drive", "file=r.qcow2,if=none,id=ro,node-name=rnode,readonly=on"]
MiB = 1 << 20


def setup(d: Path) -> None:
    def img(*args: str) -> None:
        r = qemu_img(*args, cwd=d)
        assert r.returncode == 0, r.stderr

    def io(name: str, *cmds: str) -> None:
        r = qemu_io(*[a for c in cmds for a in ("-c", c)], name, cwd=d)
        assert r.returncode == 0, r.stderr

    img("create", "-f", "qcow2", "base.qcow2", "4M")
    img("bitmap", "--add", "base.qcow2", "bb")
    io("base.qcow2", "write 2M 64k")
    img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "4M")
    img("bitmap", "--add", "top.qcow2", "b0")
    img("bitmap", "--add", "-g", "512K", "top.qcow2", "b1")
    img("bitmap", "--add", "-g", "4K", "--disable", "top.qcow2", "dis")
    io("top.qcow2", "write -P 1 0 100k", "write 1M 64k", "write 3M 4k")
    img("bitmap", "--add", "-g", "4K", "--disable", "top.qcow2", "late")
    io("top.qcow2", "write 5k 1k")
    img("bitmap", "--enable", "top.qcow2", "dis")
    io("top.qcow2", "write 200k 12k")
    img("bitmap", "--disable", "top.qcow2", "dis")
    img("create", "-f", "qcow2", "r.qcow2", "1M")
    img("bitmap", "--add", "r.qcow2", "rb")
    io("r.qcow2", "write 512k 4k")


def script(node_ro: str) -> list[tuple[str, dict[str, Any] | None]]:
    def add(id: str, node: str, bitmaps: list[str], **kw: Any) -> tuple[str, dict[str, Any]]:
        return ("block-export-add", {"type": "nbd", "id": id, "node-name": node, "bitmaps": bitmaps, **kw})

    return [
        add("e0", "disk", ["b0"]),  # no server yet
        ("nbd-server-start", unix("@SOCK@")),
        add("e1", "disk", ["b0"]),  # recording bitmap of a writable node, read-only export
        add("e1", "disk", ["nope"]),
        add("e1", "disk", ["dis", "nope"]),
        add("e1", "disk", ["dis", "dis", "bb"], name="ro"),  # a bitmap of the backing file: read-only node
        add("e2", "disk", ["b0", "b1", "late"], name="w", writable=True),
        add("e3", "disk", ["b0"], name="w2", writable=True),  # busy now
        add("e3", "disk", ["nope"], name="w"),  # the name is checked first
        add("e3", node_ro, ["rb"], name="r"),  # recording, but the node is read-only
        add("e4", "disk", [], name="ad", **{"allocation-depth": True}),
        ("nbd-server-add", {"device": "drv", "name": "n1", "bitmap": "b1"}),
        ("nbd-server-add", {"device": "drv", "name": "w", "bitmap": "nope"}),
        ("nbd-server-add", {"device": "drv", "name": "e2", "bitmap": "nope"}),
        ("block-dirty-bitmap-remove", {"node": "disk", "name": "b0"}),
        ("block-dirty-bitmap-clear", {"node": "disk", "name": "late"}),
        ("block-dirty-bitmap-disable", {"node": "disk", "name": "b1"}),
        ("block-dirty-bitmap-enable", {"node": "disk", "name": "dis"}),
        ("query-block-exports", None),
    ]


def bitmaps(m: Monitor) -> list[Any]:
    nodes = m.cmd("query-named-block-nodes", {"flat": True})["return"]
    return [(n["node-name"] if not n["node-name"].startswith("#") else n["file"], n.get("dirty-bitmaps"))
            for n in nodes if n["drv"] == "qcow2"]


def meta(name: str, *queries: str) -> bytes:
    b = name.encode()
    return (w.U32.pack(len(b)) + b + w.U32.pack(len(queries))
            + b"".join(w.U32.pack(len(q)) + q.encode() for q in queries))


def conversation(sock: str, export: str, lists: list[list[str]], sets: list[str],
                 requests: list[tuple[int, int, int]]) -> list[Any]:
    """Meta context options, then block status requests: every reply chunk as (flags, context id, extents)."""
    out: list[Any] = []
    c = NbdClient.__new__(NbdClient)  # handshake by hand: options before GO
    c.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.sock.settimeout(30)
    c.sock.connect(sock)
    c.sock.recv(18)
    c.sock.sendall(w.CLIENT_FLAGS.pack(3))
    c.option(w.OPT_STRUCTURED_REPLY)
    for q in lists:
        out.append(("list", q, c.option(w.OPT_LIST_META_CONTEXT, meta(export, *q))))
    out.append(("set", sets, c.option(w.OPT_SET_META_CONTEXT, meta(export, *sets))))
    name = export.encode()
    assert c.option(w.OPT_GO, w.U32.pack(len(name)) + name + w.U16.pack(0))[-1][0] == w.REP_ACK
    c._handle, c._reads = 0, {}
    for offset, length, flags in requests:
        c.send(w.CMD_BLOCK_STATUS, offset, length, b"", flags)
        chunks: list[Any] = []
        done = False
        while not done:
            assert w.U32.unpack(_recv_exact(c.sock, 4))[0] == w.STRUCTURED_REPLY_MAGIC
            cflags, rtype, _, n = struct.unpack(">HHQI", _recv_exact(c.sock, 16))
            payload = _recv_exact(c.sock, n)
            if rtype == w.REPLY_TYPE_BLOCK_STATUS:
                extents = [w.EXTENT.unpack_from(payload, 4 + 8 * i) for i in range((n - 4) // 8)]
                chunks.append((cflags, w.U32.unpack_from(payload)[0], extents))
            else:
                chunks.append((cflags, rtype, payload[6:].decode(errors="replace")))
            done = bool(cflags & w.REPLY_FLAG_DONE)
        out.append((offset, length, flags, chunks))
    c.close()
    return out


def reads(sock: str) -> list[Any]:
    """What clients read: raw conversations, nbdinfo --map and qemu-img map through each context."""
    bm = "qemu:dirty-bitmap:"
    all_lists = [[], ["qemu:"], [bm], [bm + "b1"], [bm + "b"], ["base:"], ["qemu:allocation-depth"], ["qemu"]]
    reqs = [(0, 4 * MiB, 0), (0, 4 * MiB, w.CMDFLAG_REQ_ONE), (131000, 100000, w.CMDFLAG_REQ_ONE),
            (1000, 70000, 0), (100000, 2 * MiB, 0), (3 * MiB, MiB, 0), (4 * MiB - 194, 194, 0)]
    out = [conversation(sock, "w", all_lists, [bm + "late", w.BASE_ALLOCATION, bm + "b0", bm + "nope"], reqs),
           conversation(sock, "w", [], [bm + "b1"], reqs[:3]),
           conversation(sock, "ro", [[], [bm + "dis", "qemu:"]], [bm + "dis", bm + "bb"], reqs[:2]),
           conversation(sock, "ro", [], ["qemu:", "base:"], [(0, 4096, 0)])]
    nbdinfo = require_tool("nbdinfo")
    out.append(conversation(sock, "ad", [[], ["qemu:"], [w.ALLOCATION_DEPTH], ["qemu:allocation"]],
                            [w.ALLOCATION_DEPTH, w.BASE_ALLOCATION], reqs))
    out.append(conversation(sock, "w", [[w.ALLOCATION_DEPTH]], [w.ALLOCATION_DEPTH], []))  # not served there
    for export, ctx in [("w", bm + "b0"), ("w", bm + "b1"), ("w", bm + "late"), ("ro", bm + "dis"),
                        ("ro", bm + "bb"), ("r", bm + "rb"), ("ad", w.ALLOCATION_DEPTH)]:
        r = subprocess.run([nbdinfo, f"--map={ctx}", f"nbd+unix:///{export}?socket={sock}"],
                           capture_output=True, text=True, timeout=60)
        out.append((export, ctx, r.returncode, r.stdout, r.stderr))
    for export, ctx in [("w", "b0"), ("ro", "dis"), ("w", "nope")]:
        opts = f"driver=nbd,server.type=unix,server.path={sock},export={export},x-dirty-bitmap={bm}{ctx}"
        r = qemu_img("map", "--output=json", "--image-opts", opts)
        out.append((export, ctx, r.returncode, r.stdout, r.stderr.replace(sock, "SOCK")))
        # vdkit's own client reads the context as qemu-img does (dirty ranges map as unallocated)
        mine = vdkit_img("map", "--output=json", "--image-opts", opts)
        assert (mine.returncode, mine.stdout, mine.stderr.replace("vdkit-img:", "qemu-img:")) == \
            (r.returncode, r.stdout, r.stderr)
    return out


def test_dirty_bitmap_exports_match_qemu(daemons: Daemons) -> None:
    q, v = daemons.pair(DRIVES, setup)
    results = []
    for m in (q, v):
        sock = short_sock("n.sock")
        out: list[Any] = run(m, sock, script("rnode"))
        out.append(bitmaps(m))
        out += reads(sock)
        # a write through the writable export marks its recording bitmaps, which the export serves live
        r = qemu_io("-f", "raw", "-c", "write 2M 4k", "-c", "write 3584k 64k", f"nbd+unix:///w?socket={sock}")
        assert r.returncode == 0, r.stderr
        out += reads(sock)[-12:]
        out += run(m, sock, [("block-export-del", {"id": "e2"}), ("block-dirty-bitmap-remove",
                                                                   {"node": "disk", "name": "b0"})])
        out.append(bitmaps(m))
        out += run(m, sock, [("nbd-server-stop", None)])
        out.append(bitmaps(m))
        results.append("\n".join(x if isinstance(x, str) else json.dumps(x, default=repr) for x in out))
    assert results[1] == results[0]
