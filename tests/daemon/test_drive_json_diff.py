"""``-drive file=json:{...}`` against qemu-system-x86_64 7.2 (issue 13: json: names wherever a file name is).

QEMU parses the name's options (``shared/reference/protocols.md`` §2), lays
the -drive's own options over them (``format=`` is the driver, ``file.filename=``
or ``offset=`` beside the name win, a ``node-name`` inside it names the node)
and opens the result as a node given by options.  The node's name is plain
unless the options say what a file name cannot: a raw window, or a backing
child other than the header's (``"backing": null``, another file, even the
header's own file reached by another spelling), named
``json:{"backing": ..., "driver": ..., "file": ...}``.  ``query-block``,
``query-named-block-nodes`` and ``info block -v`` are compared, and the start-up
errors (bad JSON, the interpreter's refusals, a failed open).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import check_ok, require_tool
from tests.daemon.conftest import _ENV, QEMU_BASE, Daemons, Monitor, normalise, normalise_hmp
from tests.helpers import ceph
from tests.nbd.conftest import short_sock
from tests.protocols.test_http import Web, web  # noqa: F401  (fixture)
from tests.protocols.test_nbd_client import QemuNbd, qnbd  # noqa: F401  (fixture)


def _setup(d: Path) -> None:
    def create(*args: str) -> None:
        check_ok("create", "-q", *args, cwd=d)

    (d / "sub").mkdir()
    for name in ("base.qcow2", "base2.qcow2", "sub/b.qcow2"):
        create("-f", "qcow2", name, "4M")
    create("-f", "qcow2", "-b", "base2.qcow2", "-F", "qcow2", "mid2.qcow2")
    create("-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "sub/t.qcow2")
    for i in range(12):  # one top per writable drive: a writer's lock keeps others off its file
        create("-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f"t{i}.qcow2")
    create("-f", "raw", "r.raw", "1M")


def _file(name: str) -> str:
    return '{"driver":"file","filename":"%s"}' % name


def _qcow2(top: str, extra: str = "") -> str:
    return 'json:{"driver":"qcow2","file":%s%s}' % (_file(top), extra)


# each a -drive's value (id and if=none added); commas doubled when put on the command line
DRIVES = [
    _qcow2("t0.qcow2"),  # the plain name stands
    _qcow2("t1.qcow2", ',"backing":null'),
    _qcow2("t2.qcow2", ',"backing":{"driver":"qcow2","file":%s,"backing":null}' % _file("mid2.qcow2")),
    _qcow2("t3.qcow2", ',"backing":{"driver":"raw","offset":512,"file":%s}' % _file("r.raw")),
    _qcow2("t4.qcow2") + "\0backing.file.filename=base2.qcow2",  # a backing given beside the name
    _qcow2("t5.qcow2", ',"backing":{"driver":"qcow2","file":%s}' % _file("base.qcow2")),  # the header's: plain
    _qcow2("t6.qcow2", ',"backing":{"driver":"qcow2"}'),
    _qcow2("sub/t.qcow2", ',"backing":{"driver":"qcow2"}'),  # the header's file by another spelling
    _qcow2("t7.qcow2", ',"backing":{"driver":"qcow2","file":%s}' % _file("mid2.qcow2")),  # mid2's own backing kept
    'json:{"driver":"raw","offset":4096,"file":%s}\0offset=512\0read-only=on' % _file("r.raw"),
    'json:{"file":%s}\0read-only=on' % _file("r.raw"),  # probed
    'json:{"file":%s}\0format=qcow2' % _file("t8.qcow2"),
    _qcow2("t9.qcow2") + "\0format=raw",  # the -drive's format wins over the name's driver
    'json:{"driver":"qcow2","node-name":"jn","file":%s}' % _file("t10.qcow2"),
    _qcow2("t0.qcow2") + "\0file.filename=t11.qcow2\0read-only=on",  # file.filename beside the name wins
    "json: {'driver': 'qcow2', 'file': {'filename': 'sub/b.qcow2'}}\0read-only=on",  # single quotes, space
]


def _args(drives: list[str]) -> list[str]:
    out = []
    for i, drive in enumerate(drives):
        name, *beside = drive.split("\0")
        out += ["-drive", ",".join([f"if=none,id=j{i}", "file=" + name.replace(",", ",,"), *beside])]
    return out


def _same_queries(q: Monitor, v: Monitor) -> None:
    """query-block, query-named-block-nodes, info block (and -v) alike on both daemons."""
    for cmd in ("query-block", "query-named-block-nodes"):
        assert normalise(v.cmd_line(cmd)) == normalise(q.cmd_line(cmd)), cmd
    for line in ("info block", "info block -v"):
        assert normalise_hmp(v.hmp(line)) == normalise_hmp(q.hmp(line)), line


def _library_names_as_query_block(q: Monitor, option_sets: list[dict[str, object]]) -> None:
    """vdkit.open of each drive's options (drive ``j<i>``) names the layers as QEMU's query-block does."""
    import json

    import vdkit
    from vdkit.info.render_json import render_pretty

    shown = {b["device"]: b["inserted"]["image"] for b in q.cmd("query-block")["return"]}
    for i, options in enumerate(option_sets):
        with vdkit.open(options=options) as node:
            assert json.loads(render_pretty(vdkit.image_info(node, nested=True))) == shown[f"j{i}"], options


def test_json_drives_in_queries(daemons: Daemons) -> None:
    q, v = daemons.pair(_args(DRIVES), _setup)
    _same_queries(q, v)


OPTION_DRIVES = [  # a local image given by options, or its backing replaced beside a plain file name
    "driver=qcow2,file.filename=t0.qcow2", "file.driver=file,file.filename=t1.qcow2",
    "file=t2.qcow2,backing.file.filename=base2.qcow2", "file=t3.qcow2,backing=",
    "file=t4.qcow2,backing.driver=raw,backing.file.filename=r.raw,read-only=on",
    "file=t5.qcow2,format=qcow2,backing.driver=qcow2,backing.file.filename=mid2.qcow2,backing.backing=",
    "file=sub/t.qcow2,backing.driver=qcow2", "file=t6.qcow2,l2-cache-size=1M,backing.file.filename=base.qcow2",
    "file=r.raw,format=raw,backing=,read-only=on",  # raw takes a deprecated empty backing without a word
]


def test_option_drives_in_queries(daemons: Daemons) -> None:
    args = [a for i, d in enumerate(OPTION_DRIVES) for a in ("-drive", f"if=none,id=o{i},{d}")]
    q, v = daemons.pair(args, _setup)
    for cmd in ("query-block", "query-named-block-nodes"):
        assert normalise(v.cmd_line(cmd)) == normalise(q.cmd_line(cmd)), cmd
    assert normalise_hmp(v.hmp("info block -v")) == normalise_hmp(q.hmp("info block -v"))


def test_json_drive_with_snapshot_on(daemons: Daemons) -> None:
    """snapshot=on over json: drives: the temporary overlay is named by the json: description of its base (a
    backing null or a raw window inside it)."""
    q, v = daemons.pair(_args([_qcow2("t0.qcow2") + "\0snapshot=on", _qcow2("t1.qcow2", ',"backing":null')
                               + "\0snapshot=on", 'json:{"driver":"raw","offset":512,"file":%s}\0snapshot=on'
                               % _file("r.raw")]), _setup)

    def tmp(text: str) -> str:
        return re.sub(r"vl\.[A-Za-z0-9]{6}", "vl.XXXXXX", text)

    for cmd in ("query-block", "query-named-block-nodes"):
        assert tmp(normalise(v.cmd_line(cmd))) == tmp(normalise(q.cmd_line(cmd))), cmd


REFUSED = [  # (the interpreter's other texts are compared with qemu-img's in tests/diff/test_image_opts.py)
    'json:{"driver":"qcow2",}', "json:[1]", "json:{}",
    'json:{"driver":"nosuch","file":%s}' % _file("r.raw"),
    'json:{"driver":"raw","file":%s}' % _file("nosuch.raw"),
    _qcow2("t0.qcow2") + "\0bogus=1",
    _qcow2("t0.qcow2", ',"backing":{"driver":"qcow2","file":%s}' % _file("nosuch.qcow2")),
    'json:{"driver":"raw","offset":"abc","file":%s}' % _file("r.raw"),
    'json:{"driver":"qcow2","file":"t0.qcow2","file.filename":"t0.qcow2"}',  # a reference with options
    'json:{"driver":"qcow2","driver":"raw","file":%s}' % _file("t0.qcow2"),  # a key twice
]
# the same start-up errors for drives given by options (no json: name); file= beside file.filename=
REFUSED_OPTIONS = ["driver=nosuch,file.filename=t0.qcow2", "file=t0.qcow2,backing.bogus=1",
                   "driver=qcow2,file.filename=t0.qcow2,file.bogus=1", "file=t0.qcow2,file.filename=t0.qcow2",
                   "file.filename=r.raw,format=raw,file=r.raw", "format=raw,offset=0,file=r.raw,file.filename=r.raw",
                   "file=t0.qcow2,file.driver=file,file.filename=t1.qcow2,backing=null"]


def _refusal(prog: str, p: subprocess.Popen[bytes]) -> tuple[int | str, str]:
    """Exit status and stderr (program name masked) of a daemon expected to refuse its command line; one
    still running after 30 s was not refused (killed)."""
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return "still running", ""
    return p.returncode, err.decode().replace(f"{prog}:", "PROG:")


def test_json_drive_errors_like_qemu(tmp_path: Path) -> None:
    _setup(tmp_path)
    cases = [_args([drive]) for drive in REFUSED]
    cases += [["-drive", f"if=none,id=o0,{drive}"] for drive in REFUSED_OPTIONS]
    for drive in cases:
        procs = [(prog, subprocess.Popen([*cmd, *drive], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV, cwd=tmp_path))
                 for prog, cmd in (("qemu-system-x86_64", [require_tool("qemu-system-x86_64"), *QEMU_BASE]),
                                   ("vdkit-daemon", [sys.executable, "-m", "vdkit.daemon.main", "-S"]))]
        out = [_refusal(prog, p) for prog, p in procs]  # both at once: each is refused at start-up
        assert out[1] == out[0], drive
        assert out[0][0] == 1, drive


def test_library_names_replaced_backings(daemons: Daemons, tmp_path: Path) -> None:
    """vdkit.open + vdkit.image_info(nested=True) of option sets replacing a backing, against the image that
    qemu-system-x86_64's query-block shows for the same options as a read-only -drive (qemu-img info opens
    no backing and refuses a backing object); ``"backing": null`` without the backing opened keeps the
    plain name, as qemu-img info shows it."""
    import json

    import vdkit
    from vdkit.info.render_human import image_info as human
    from vdkit.info.render_json import render_pretty

    d = tmp_path / "lib"
    d.mkdir()
    _setup(d)

    def f(name: str) -> dict[str, str]:
        return {"driver": "file", "filename": str(d / name)}

    sets: list[dict[str, object]] = [
        {"driver": "qcow2", "file": f("t0.qcow2"), "backing": None},
        {"driver": "qcow2", "file": f("t1.qcow2"), "backing": {"driver": "qcow2", "file": f("mid2.qcow2"),
                                                                "backing": None}},
        {"driver": "qcow2", "file": f("t2.qcow2"), "backing": {"driver": "raw", "offset": 512, "file": f("r.raw")}},
        {"driver": "qcow2", "file": f("t3.qcow2"), "backing": {"driver": "qcow2", "file": f("mid2.qcow2")}},
        {"driver": "qcow2", "file": f("t4.qcow2"), "backing": {"driver": "qcow2"}},  # the header's: plain
        {"driver": "qcow2", "file": f("sub/t.qcow2"), "backing": {"driver": "qcow2"}},
    ]
    args = [a for i, o in enumerate(sets) for a in (
        "-drive", f"if=none,id=l{i},read-only=on,file=json:" + json.dumps(o).replace(",", ",,"))]
    _, path, _ = daemons.qemu(args, d)
    q = daemons.monitor(path).negotiate()
    shown = {b["device"]: b["inserted"]["image"] for b in q.cmd("query-block")["return"]}
    for i, options in enumerate(sets):
        for how in ({"options": options}, {"path": "json:" + json.dumps(options)}):
            with vdkit.open(**how) as node:
                got = json.loads(render_pretty(vdkit.image_info(node, nested=True)))
            assert got == shown[f"l{i}"], how
    want = subprocess.run([require_tool("qemu-img"), "info", "json:" + json.dumps(sets[0])], capture_output=True,
                          text=True, env=_ENV)
    assert want.returncode == 0, want.stderr
    with vdkit.open(options=sets[0], backing=False) as node:
        assert human(vdkit.image_info(node)) == want.stdout


def _nbd_exports(server: QemuNbd, d: Path, prefix: str) -> tuple[str, str, str, str]:
    """qemu-nbd exports in ``d`` and their sockets (named with ``prefix``): ``w`` a writable 64 MiB raw, ``r``
    a 16 MiB qcow2 file's bytes, ``ro`` a read-only raw, ``t`` the bytes of a qcow2 over base.qcow2 named
    absolute (an export has no folder to resolve a relative name in)."""
    raw, q2, ro = d / "w.raw", d / "e.qcow2", d / "ro.raw"
    check_ok("create", "-q", "-f", "raw", str(raw), "64M")
    check_ok("create", "-q", "-f", "qcow2", str(q2), "16M")
    check_ok("create", "-q", "-f", "raw", str(ro), "16M")
    base, top = d / "base.qcow2", d / "top.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(base), "16M")
    check_ok("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    w, e, r, t = (short_sock(f"{prefix}{n}.sock") for n in ("w", "e", "ro", "t"))
    server.start(raw, "-k", w, "-x", "w", "-f", "raw", "-e", "8")
    server.start(q2, "-k", e, "-x", "r", "-f", "raw", "-e", "8")
    server.start(ro, "-k", r, "-x", "ro", "-f", "raw", "-r", "-e", "8")
    server.start(top, "-k", t, "-x", "t", "-f", "raw", "-r", "-e", "8")
    return w, e, r, t


def _nbd(sock: str, export: str) -> dict[str, object]:
    return {"driver": "nbd", "server": {"type": "unix", "path": sock}, "export": export}


def test_json_drives_over_nbd(daemons: Daemons, qnbd: QemuNbd, tmp_path: Path) -> None:  # noqa: F811
    """json: names whose file (or top) node is nbd, on qemu-nbd exports: a raw and a qcow2 layer over an
    export, the nbd node itself, a probed read-only export (-drive's auto-read-only), nbd's flat spellings,
    a backing null over an export (the nbd node described by its options as given, flattened, without
    reconnect-delay)."""
    import json

    w, e, r, t = _nbd_exports(qnbd, tmp_path, "")
    names: list[dict[str, object]] = [
        {"driver": "raw", "file": _nbd(w, "w")},
        {"driver": "qcow2", "file": _nbd(e, "r")},
        _nbd(w, "w"),
        {"file": _nbd(r, "ro")},
        {"driver": "raw", "file.driver": "nbd", "file.path": w, "file.export": "w"},
        {"driver": "qcow2", "file": _nbd(e, "r"), "backing": None},  # no backing file: plain
        {"driver": "qcow2", "file": _nbd(t, "t")},  # an absolute backing name from an export
        {"driver": "qcow2", "file": {**_nbd(t, "t"), "reconnect-delay": 0}, "backing": None},
        {"driver": "qcow2", "file.driver": "nbd", "file.path": t, "file.export": "t", "backing": None},
    ]
    drives = ["json:" + json.dumps(n) + ("\0read-only=on" if i >= 4 else "") for i, n in enumerate(names)]
    q, v = daemons.pair(_args(drives), lambda d: None)
    _same_queries(q, v)
    _library_names_as_query_block(q, names)

def test_json_drives_over_http(daemons: Daemons, web: Web) -> None:  # noqa: F811
    """json: names whose file (or top) node is curl's, on nginx: a writable raw drive over the read-only
    curl node (-drive's auto-read-only), qcow2 over http(s), the curl node itself, options naming the node
    (sslverify off, a cookie), a backing resolved against the URL, and a backing null over http."""
    import json

    h, s = web.http, web.https
    names: list[tuple[dict[str, object], str]] = [
        ({"driver": "raw", "file": {"driver": "http", "url": f"{h}/r.raw"}}, ""),
        ({"driver": "qcow2", "file": {"driver": "http", "url": f"{h}/d.qcow2"}}, "read-only=on"),
        ({"driver": "http", "url": f"{h}/r.raw"}, ""),
        ({"driver": "qcow2", "file": {"driver": "https", "url": f"{s}/d.qcow2", "sslverify": False}}, "read-only=on"),
        ({"driver": "raw", "file": {"driver": "http", "url": f"{h}/r.raw", "cookie": "a=b"}}, "read-only=on"),
        ({"driver": "qcow2", "file": {"driver": "http", "url": f"{h}/top.qcow2"}}, "read-only=on"),
        ({"driver": "qcow2", "file": {"driver": "http", "url": f"{h}/top.qcow2"}, "backing": None}, "read-only=on"),
        ({"file": {"driver": "http", "url": f"{h}/sub/top.qcow2"}}, "read-only=on"),
    ]
    drives = ["json:" + json.dumps(n) + (f"\0{extra}" if extra else "") for n, extra in names]
    q, v = daemons.pair(_args(drives), lambda d: None)
    _same_queries(q, v)
    _library_names_as_query_block(q, [n for n, _ in names])


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ceph.CephCluster:
    return ceph.session_cluster(tmp_path_factory, request)


def test_json_drives_over_rbd(daemons: Daemons, cluster: ceph.CephCluster) -> None:
    """json: names whose file (or top) node is rbd, on the test cluster: raw over rbd, the rbd node itself,
    a probed snapshot (read-only), as qemu-system-x86_64 names and lists them."""
    import json

    vm, other = cluster.unique("jvm"), cluster.unique("jother")
    for name, size in ((vm, "32M"), (other, "8M")):
        cluster.rbd("create", "--size", size, f"rbd/{name}")
        cluster.qemu_io(name, "write -P 0x11 0 1M")
    cluster.rbd("snap", "create", f"rbd/{vm}@s1")

    def rbd(image: str, **more: str) -> dict[str, object]:
        return {"driver": "rbd", "pool": "rbd", "image": image, "conf": str(cluster.conf), **more}

    names: list[tuple[dict[str, object], str]] = [
        ({"driver": "raw", "file": rbd(vm)}, ""),
        (rbd(other), ""),
        ({"file": rbd(vm, snapshot="s1")}, "read-only=on"),
    ]
    drives = ["json:" + json.dumps(n) + (f"\0{extra}" if extra else "") for n, extra in names]
    q, v = daemons.pair(_args(drives), lambda d: None)
    _same_queries(q, v)


def test_blockdev_nbd_nodes(daemons: Daemons, qnbd: QemuNbd, tmp_path: Path) -> None:  # noqa: F811
    """-blockdev driver=nbd (dotted keys and JSON, unix and a read-only export), format nodes over it by
    reference and inline, a backing null over an export whose header names an absolute backing file."""
    import json

    w, e, r, t = _nbd_exports(qnbd, tmp_path, "b")
    blockdevs = [
        f"driver=nbd,server.type=unix,server.path={w},export=w,node-name=n0",
        "driver=raw,file=n0,node-name=r0",
        json.dumps({**_nbd(e, "r"), "node-name": "n1"}),
        "driver=qcow2,file=n1,node-name=q1",
        json.dumps({"driver": "raw", "node-name": "r2", "read-only": True, "file": _nbd(r, "ro")}),
        json.dumps({"driver": "qcow2", "node-name": "q3", "read-only": True, "file": _nbd(t, "t"), "backing": None}),
        json.dumps({"driver": "qcow2", "node-name": "q4", "read-only": True, "file": _nbd(t, "t")}),
    ]
    args = [a for b in blockdevs for a in ("-blockdev", b)]
    q, v = daemons.pair(args, lambda d: None)
    for flat in (False, True):
        want, got = (json.loads(normalise(m.cmd_line("query-named-block-nodes", {"flat": flat})))["return"]
                     for m in (q, v))
        assert [n["file"] for n in got] == [n["file"] for n in want]
        assert got == want
        assert normalise(v.cmd_line("query-named-block-nodes", {"flat": flat})) == \
            normalise(q.cmd_line("query-named-block-nodes", {"flat": flat}))


def test_blockdev_nbd_errors_like_qemu(qnbd: QemuNbd, tmp_path: Path) -> None:  # noqa: F811
    ro = tmp_path / "ro.raw"
    check_ok("create", "-q", "-f", "raw", str(ro), "16M")
    r = short_sock("bero.sock")
    qnbd.start(ro, "-k", r, "-x", "ro", "-f", "raw", "-r", "-e", "8")
    gone = short_sock("gone.sock")
    cases = [
        "driver=nbd,export=x,node-name=n",
        f"driver=nbd,server.type=unix,server.path={gone},node-name=n",
        f"driver=nbd,server.type=unix,server.path={r},export=nope,node-name=n",
        f"driver=nbd,server.type=unix,server.path={r},export=ro,node-name=n,read-only=off,auto-read-only=off",
        "driver=nbd,server.type=inet,server.host=127.0.0.1,node-name=n",
        "driver=nbd,server.path=x,node-name=n",
        f"driver=nbd,server.type=unix,server.path={r},server.bogus=1,node-name=n",
    ]
    for case in cases:
        procs = [(prog, subprocess.Popen([*cmd, "-blockdev", case], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV, cwd=tmp_path))
                 for prog, cmd in (("qemu-system-x86_64", [require_tool("qemu-system-x86_64"), *QEMU_BASE]),
                                   ("vdkit-daemon", [sys.executable, "-m", "vdkit.daemon.main", "-S"]))]
        out = [_refusal(prog, p) for prog, p in procs]
        assert out[1] == out[0], case
        assert out[0][0] == 1, case


def test_change_medium_to_json_names(daemons: Daemons) -> None:
    """blockdev-change-medium (and HMP change) with json: names: opened and named as -drive's, format= over
    the name's driver, errors as QEMU's; the drive keeps its medium after a refusal."""
    q, v = daemons.pair(["-drive", "if=ide,id=cd0,media=cdrom"], _setup)
    names = [_qcow2("t0.qcow2", ',"backing":null'), 'json:{"driver":"raw","offset":512,"file":{"filename":"r.raw"}}',
             'json:{"driver":"nosuch"}', "json:{", _qcow2("t1.qcow2", ',"backing":{"driver":"qcow2","file":%s}'
                                                           % _file("mid2.qcow2")),
             'json:{"file":{"filename":"t2.qcow2"}}']
    for i, name in enumerate(names):
        args: dict[str, object] = {"device": "cd0", "filename": name}
        if i == len(names) - 1:
            args["format"] = "raw"
        assert normalise(v.cmd_line("blockdev-change-medium", args)) == \
            normalise(q.cmd_line("blockdev-change-medium", args)), name
        for cmd in ("query-block", "query-named-block-nodes"):
            assert normalise(v.cmd_line(cmd)) == normalise(q.cmd_line(cmd)), (name, cmd)
    line = "change cd0 " + _qcow2("t3.qcow2", ',"backing":null')
    assert normalise_hmp(v.hmp(line)) == normalise_hmp(q.hmp(line))
    assert normalise_hmp(v.hmp("info block -v")) == normalise_hmp(q.hmp("info block -v"))


def test_job_targets_named_by_json(daemons: Daemons) -> None:
    """drive-mirror and drive-backup into an existing target named json:{...}, and blockdev-snapshot-sync with
    an existing overlay named so: the jobs run, the nodes are listed and the targets written as QEMU's;
    a new target named json: is refused (it cannot be created), bad JSON with QEMU's text."""
    from tests.helpers.qmp_script import wait_event

    def setup(d: Path) -> None:
        _setup(d)
        check_ok("create", "-q", "-f", "raw", "tm.raw", "1M", cwd=d)
        check_ok("create", "-q", "-f", "qcow2", "tb.qcow2", "4M", cwd=d)
        check_ok("create", "-q", "-f", "qcow2", "-b", "t2.qcow2", "-F", "qcow2", "ov.qcow2", cwd=d)
        assert subprocess.run([require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 4k 64k", "r.raw"],
                              cwd=d, capture_output=True).returncode == 0

    drives = ["if=none,id=d0,file=r.raw,format=raw,read-only=on", "if=none,id=d1,file=t1.qcow2",
              "if=none,id=d2,file=t2.qcow2"]
    q, v = daemons.pair([a for d in drives for a in ("-drive", d)], setup)
    commands: list[tuple[str, dict[str, object]]] = [
        ("drive-mirror", {"device": "d0", "job-id": "m", "sync": "full", "mode": "existing", "format": "raw",
                          "target": 'json:{"driver":"raw","file":{"filename":"tm.raw"}}'}),
        ("drive-backup", {"device": "d1", "job-id": "b", "sync": "full", "mode": "existing",
                          "target": _qcow2("tb.qcow2")}),
        ("blockdev-snapshot-sync", {"device": "d2", "mode": "existing", "format": "qcow2",
                                    "snapshot-file": 'json:{"file":{"filename":"ov.qcow2"}}'}),
        ("drive-backup", {"device": "d2", "job-id": "x", "sync": "full", "target": 'json:{"driver":"raw"'}),
        ("drive-backup", {"device": "d2", "job-id": "y", "sync": "full", "format": "raw",
                          "target": 'json:{"driver":"raw","file":{"filename":"new.raw"}}'}),
        ("blockdev-snapshot-sync", {"device": "d1", "format": "qcow2",
                                    "snapshot-file": 'json:{"driver":"qcow2","file":{"filename":"new.qcow2"}}'}),
    ]
    for cmd, args in commands:
        assert normalise(v.cmd_line(cmd, args)) == normalise(q.cmd_line(cmd, args)), cmd
    for m in (q, v):  # (events stay in m.events: each wait looks from the first)
        wait_event(m, [0], lambda e: e["event"] == "BLOCK_JOB_READY")
        wait_event(m, [0], lambda e: e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == "b")
    # (the mirror's existing raw target holds only the source's data in both: its zero granules are holes,
    # so its actual-size is compared as it is)
    for cmd in ("query-block", "query-named-block-nodes", "query-block-jobs"):
        assert normalise(v.cmd_line(cmd)) == normalise(q.cmd_line(cmd)), cmd
    for m in (q, v):
        assert m.cmd("block-job-complete", {"device": "m"}) == {"return": {}}
        wait_event(m, [0], lambda e: e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == "m")
    assert sorted(p.name for p in (daemons.tmp / "v").iterdir()) == \
        sorted(p.name for p in (daemons.tmp / "q").iterdir())  # nothing made for a json: target
    for name in ("tm.raw", "tb.qcow2"):
        cmp = subprocess.run([require_tool("qemu-img"), "compare", str(daemons.tmp / "q" / name),
                              str(daemons.tmp / "v" / name)], capture_output=True, text=True)
        assert cmp.returncode == 0, (name, cmp.stdout, cmp.stderr)


def test_json_names_after_stream_and_commit(daemons: Daemons) -> None:
    """A json:-named drive whose chain a job changes is named again as QEMU names it: a commit of the replaced
    backing rewrites the header's name to the base's (plain again), a stream drops the backing (plain)."""
    import json

    from tests.helpers.qmp_script import wait_event

    drives = ["if=none,id=d0,file=" + _qcow2("t0.qcow2", ',"backing":{"driver":"qcow2","file":%s}'
                                               % _file("mid2.qcow2")).replace(",", ",,"),
              "if=none,id=d1,file=" + _qcow2("sub/t.qcow2", ',"backing":{"driver":"qcow2"}').replace(",", ",,")]
    q, v = daemons.pair([a for d in drives for a in ("-drive", d)], _setup)
    for cmd, args in (("block-commit", {"device": "d0", "job-id": "c", "top": "mid2.qcow2"}),
                      ("block-stream", {"device": "d1", "job-id": "s"})):
        assert normalise(v.cmd_line(cmd, args)) == normalise(q.cmd_line(cmd, args)), cmd
        for m in (q, v):
            wait_event(m, [0], lambda e, job=args["job-id"]: e["event"] == "BLOCK_JOB_COMPLETED"
                       and e["data"]["device"] == job)
    for cmd in ("query-block", "query-named-block-nodes"):
        want, got = (json.loads(normalise(m.cmd_line(cmd)))["return"] for m in (q, v))
        assert [n.get("inserted", n).get("file") for n in got] == [n.get("inserted", n).get("file") for n in want]
        for a, b in zip(got, want, strict=True):
            assert a == b
        assert normalise(v.cmd_line(cmd)) == normalise(q.cmd_line(cmd)), cmd


def test_blockdev_backing_null_over_http(daemons: Daemons, web: Web) -> None:  # noqa: F811
    """-blockdev qcow2 nodes over curl children with backing null (inline and by reference): the format node's
    json: name describes the curl node by its options (url, driver), as QEMU does."""
    import json

    h = web.http
    blockdevs = [json.dumps({"driver": "qcow2", "node-name": "a", "read-only": True, "backing": None,
                             "file": {"driver": "http", "url": f"{h}/top.qcow2", "readahead": 65536}}),
                 f"driver=http,url={h}/sub/top.qcow2,node-name=c0,read-only=on",
                 "driver=qcow2,file=c0,backing=,node-name=b,read-only=on"]
    q, v = daemons.pair([a for b in blockdevs for a in ("-blockdev", b)], lambda d: None)
    for flat in (False, True):
        want, got = (json.loads(normalise(m.cmd_line("query-named-block-nodes", {"flat": flat})))["return"]
                     for m in (q, v))
        assert [n["file"] for n in got] == [n["file"] for n in want]
        assert normalise(v.cmd_line("query-named-block-nodes", {"flat": flat})) == \
            normalise(q.cmd_line("query-named-block-nodes", {"flat": flat}))


def test_backing_null_over_rbd(daemons: Daemons, cluster: ceph.CephCluster, tmp_path: Path) -> None:
    """A qcow2 image in rbd whose header names a local backing file, opened with backing null as a json:
    drive and as a -blockdev node: named with the rbd node's options, as QEMU names it."""
    import json

    base = tmp_path / "base.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(base), "8M")
    image = cluster.unique("jq")
    check_ok("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", cluster.name(image), "8M")
    rbd = {"driver": "rbd", "pool": "rbd", "image": image, "conf": str(cluster.conf)}
    drive = "json:" + json.dumps({"driver": "qcow2", "file": rbd, "backing": None})
    args = [*_args([drive + "\0read-only=on"]),
            "-blockdev", json.dumps({"driver": "qcow2", "node-name": "b", "read-only": True, "backing": None,
                                     "file": rbd})]
    q, v = daemons.pair(args, lambda d: None)

    def mask(text: str) -> str:
        # the rbd node of a qcow2 image that grew to an unaligned size (196616 bytes): QEMU lists the node's
        # length in whole sectors (197120), vdkit's bare rbd node its exact size (noted; not the names')
        return re.sub(r'"virtual-size": \d+(, "filename": "json:\{\\"pool)', r'"virtual-size": N\1', text)

    for cmd in ("query-block", "query-named-block-nodes"):
        assert mask(normalise(v.cmd_line(cmd))) == mask(normalise(q.cmd_line(cmd))), cmd
