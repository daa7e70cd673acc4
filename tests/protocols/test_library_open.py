"""``vdkit.open`` with ``json:`` names, option sets, secrets and TLS objects, against what qemu-img reads.

Every node the command line can name by options is opened through the library
(local files, NBD exports of qemu-nbd, nginx over http/https, Ceph RBD, LUKS
keys and cephx keys given as secrets, NBD TLS credentials given as objects);
its guest bytes are compared with ``qemu-img convert -O raw`` of the same
``json:`` name (with the same ``--object``s).  Secrets and presets belong to
one open: two opens in one process (and in two threads at once) with the
same secret id and different values both work, and nothing is left in the
process scope.  Bad options raise :class:`vdkit.VdkitError` with qemu-img's
text (``qemu-img map`` of the same name: it opens the chain as the library does).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vdkit
from tests.conftest import check_ok, qemu_img, qemu_img_pbkdf, qemu_io
from tests.helpers import ceph
from tests.helpers.qemu_nbd import QemuNbd
from tests.nbd.conftest import free_port, short_sock
from tests.protocols.test_http import Web, _qemu_convert, web  # noqa: F401  (web: fixture)
from tests.protocols.test_json_backing import chain_files
from tests.protocols.test_nbd_tls import Setup

Options = dict[str, object]


def _json(node: Options) -> str:
    return "json:" + json.dumps(node, separators=(",", ":"))


def _qemu_bytes(spec: str, tmp: Path, *objects: str) -> bytes:
    """What qemu-img reads of ``spec`` (a name or a ``json:`` name), through ``convert -O raw``."""
    out = tmp / "qemu-read.raw"
    args = [a for o in objects for a in ("--object", o)]
    _qemu_convert(*args, "-O", "raw", spec, str(out))  # -m 1, retried: 7.2's curl driver hangs under load
    data = out.read_bytes()
    out.unlink()
    return data


def _lib_bytes(**open_args: object) -> bytes:
    with vdkit.open(**open_args) as node:  # type: ignore[arg-type]
        return node.read(0, node.size)


def _same_read(tmp: Path, node: Options, *objects: str, **open_args: object) -> None:
    """The library reads ``node`` (as options, and as its json: name) as qemu-img does."""
    want = _qemu_bytes(_json(node), tmp, *objects)
    assert _lib_bytes(options=node, **open_args) == want
    assert _lib_bytes(path=_json(node), **open_args) == want


def _qemu_error(spec: str, tmp: Path, *objects: str) -> str:
    """qemu-img's message for a spec it cannot open (``map`` opens the whole chain, as vdkit.open)."""
    args = [a for o in objects for a in ("--object", o)]
    r = qemu_img("map", *args, "--output=json", spec, cwd=tmp)
    assert r.returncode == 1, r.stdout
    text = r.stderr
    # the curl driver's GLib assertion lines (a QEMU cleanup bug) are the command line's alone
    while text.startswith("qemu-img: GLib: "):
        text = text.split("\n", 1)[1]
    assert text.startswith("qemu-img: "), r.stderr
    return text[len("qemu-img: "):].rstrip("\n")


def _text(exc: vdkit.VdkitError) -> str:
    """The message and its hint lines, as the command line prints them after ``qemu-img: ``."""
    hint = (exc.hint or "").replace("\0", "").rstrip("\n")
    return str(exc) + ("\n" + hint if hint else "")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """:func:`chain_files`, base.qcow2's name absolute (test_nbd exports top.qcow2's bytes)."""
    return chain_files(tmp_path, absolute_backing=True)


def _file(path: Path) -> Options:
    return {"driver": "file", "filename": str(path)}


def test_local_option_sets(files: Path) -> None:
    """Nested and dotted options, backing null/replaced/nested, a raw window, an --image-opts string, a path
    with options, and fmt beside a json: name."""
    top = {"driver": "qcow2", "file": _file(files / "top.qcow2")}
    for node in (top, {**top, "backing": None},
                 {**top, "backing": {"driver": "qcow2", "file": _file(files / "base2.qcow2")}},
                 {**top, "backing": {"driver": "raw", "file": _file(files / "r.raw")}},
                 {"driver": "qcow2", "file.driver": "file", "file.filename": str(files / "top.qcow2"),
                  "backing.driver": "raw", "backing.file.filename": str(files / "r.raw")},
                 {"driver": "raw", "offset": 1 << 20, "size": "1M", "file": _file(files / "r.raw")},
                 {"driver": "raw", "file": {"driver": "raw", "offset": 512 << 10, "file": _file(files / "r.raw")}}):
        _same_read(files, node)
    want = _qemu_bytes(_json({**top, "backing": None}), files)
    spec = f"driver=qcow2,file.filename={files / 'top.qcow2'},backing="  # QEMU's deprecated "" for null
    with pytest.warns(UserWarning, match='Use of "backing": "" is deprecated'):
        assert _lib_bytes(options=spec) == want
    assert _lib_bytes(path=str(files / "top.qcow2"), options={"driver": "qcow2", "backing": None}) == want
    assert _lib_bytes(path=_json({"file": _file(files / "top.qcow2"), "backing": None}), fmt="qcow2") == want
    with vdkit.open(options={**top, "backing": {"driver": "raw", "file": _file(files / "r.raw")}}) as node:
        assert [n.format for n in node.chain()] == ["qcow2", "raw"]
        assert vdkit.image_info(node).virtual_size == 4 << 20


def test_policy_still_applies(files: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Options name the top image; the backing files images name still go through the caller's policy."""
    from vdkit.block.chain import OpenPolicy
    from vdkit.errors import PolicyError

    elsewhere = tmp_path_factory.mktemp("elsewhere")
    node = {"driver": "qcow2", "file": _file(files / "top.qcow2"),
            "backing": {"driver": "qcow2", "file": _file(files / "base2.qcow2")}}
    with vdkit.open(options=node, policy=OpenPolicy.restricted_to(elsewhere)) as opened:
        assert opened.backing is not None  # the caller's own choice of backing
    with pytest.raises(PolicyError, match="outside the allowed folders"):
        vdkit.open(options={"driver": "qcow2", "file": _file(files / "top.qcow2")},
                   policy=OpenPolicy.restricted_to(elsewhere))
    check_ok("create", "-q", "-f", "qcow2", "-o", f"data_file={files / 'data.bin'}", str(files / "d.qcow2"), "1M")
    with pytest.raises(PolicyError, match="Data file .* outside the allowed folders"):
        vdkit.open(options={"driver": "qcow2", "file": _file(files / "d.qcow2")},
                   policy=OpenPolicy.restricted_to(elsewhere))
    with pytest.raises(PolicyError, match="following data files is disabled"):
        vdkit.open(options={"driver": "qcow2", "file": _file(files / "d.qcow2")},
                   policy=OpenPolicy(follow_data_file=False))


BAD = [
    lambda d: 'json:{"driver":',
    lambda d: "json:[1]",
    lambda d: _json({"driver": "nosuch", "file": _file(d / "top.qcow2")}),
    lambda d: _json({"driver": "qcow2", "bogus": 1, "file": _file(d / "top.qcow2")}),
    lambda d: _json({"driver": "qcow2", "file": _file(d / "nosuch.qcow2")}),
    lambda d: _json({"driver": "qcow2"}),
    lambda d: _json({"driver": "qcow2", "file": {"driver": "file"}}),
    lambda d: _json({"driver": "qcow2", "file": _file(d / "top.qcow2"), "backing": "node0"}),
    lambda d: _json({"driver": "qcow2", "file": _file(d / "top.qcow2"),
                     "backing": {"driver": "qcow2", "bogus": 1, "file": _file(d / "base2.qcow2")}}),
    lambda d: _json({"driver": "qcow2", "file": _file(d / "base2.qcow2"), "backing": {"driver": "raw"}}),
    lambda d: _json({"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": "70000"},
                     "export": "x"}),
    lambda d: _json({"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": 0}}),
    lambda d: _json({"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": "-2"}}),
    lambda d: _json({"driver": "nbd", "server": {"type": "unix", "path": str(d / "nosuch.sock")}}),
    lambda d: _json({"driver": "http", "url": "ftp://x/y"}),
    lambda d: _json({"driver": "rbd", "pool": "rbd"}),
    lambda d: _json({"driver": "raw", "offset": -1, "file": _file(d / "r.raw")}),
    lambda d: _json({"driver": "luks", "key-secret": "nosuch", "file": _file(d / "r.raw")}),
    lambda d: _json({"driver": "qcow2", "file": "node0", "file.filename": str(d / "top.qcow2")}),
]


def test_bad_options_are_qemu_errors(files: Path) -> None:
    for make in BAD:
        spec = make(files)
        want = _qemu_error(spec, files)
        with pytest.raises(vdkit.VdkitError) as caught:
            vdkit.open(spec)
        assert _text(caught.value) == want, spec
        if spec.startswith("json:{") and spec.endswith("}"):
            with pytest.raises(vdkit.VdkitError) as caught:
                vdkit.open(options=json.loads(spec[len("json:"):]))
            assert _text(caught.value) == want, spec
    twice = 'json:{"driver":"raw","driver":"qcow2","file":%s}' % json.dumps(_file(files / "top.qcow2"))
    with pytest.raises(vdkit.VdkitError) as caught:  # a key given twice (only a JSON text can)
        vdkit.open(twice)
    assert _text(caught.value) == _qemu_error(twice, files)
    with pytest.raises(TypeError):
        vdkit.open()
    with pytest.raises(TypeError):
        vdkit.open(str(files / "top.qcow2"), options={"file": _file(files / "top.qcow2")})


# -- secrets: LUKS keys, two opens in one process --------------------------------------------------

@pytest.fixture(scope="module")
def luks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.luks (passphrase "alpha", 0x5a at 64k) and b.luks (passphrase "beta", 0xa5 at 128k); only read."""
    tmp_path = tmp_path_factory.mktemp("luks")
    for name, word, pattern, at in (("a", "alpha", "0x5a", "64k"), ("b", "beta", "0xa5", "128k")):
        image = tmp_path / f"{name}.luks"
        r = qemu_img_pbkdf("create", "-q", "--object", f"secret,id=k,data={word}", "-f", "luks",
                           "-o", "key-secret=k,iter-time=10", str(image), "1M")
        assert r.returncode == 0, r.stderr
        assert qemu_io("--object", f"secret,id=k,data={word}", "--image-opts", "-c",
                       f"write -P {pattern} {at} 4k",
                       f"driver=luks,key-secret=k,file.filename={image}").returncode == 0
    return tmp_path


def _luks(path: Path) -> Options:
    return {"driver": "luks", "key-secret": "sec0", "file": _file(path)}


def test_two_opens_with_different_secrets(luks: Path) -> None:
    """The same secret id with two values, in one process: each open sees its own; nothing is left over."""
    from vdkit.block import secrets

    a, b = luks / "a.luks", luks / "b.luks"
    want_a = _qemu_bytes(_json(_luks(a)), luks, "secret,id=sec0,data=alpha")
    want_b = _qemu_bytes(_json(_luks(b)), luks, "secret,id=sec0,data=beta")
    with vdkit.open(options=_luks(a), secrets={"sec0": "alpha"}) as na, \
            vdkit.open(str(b), options={"driver": "luks", "key-secret": "sec0"}, secrets={"sec0": b"beta"}) as nb:
        assert na.read(0, na.size) == want_a
        assert nb.read(0, nb.size) == want_b
    word = luks / "a.pw"
    word.write_text("alpha")
    assert _lib_bytes(options=_luks(a), objects=[f"secret,id=sec0,file={word}"]) == want_a  # --object secret
    assert _lib_bytes(options=_luks(a), objects=["secret,id=sec0,data=YWxwaGE=,format=base64"]) == want_a
    assert secrets.PROCESS.secrets == {} and secrets.current() is secrets.PROCESS
    # nothing of these opens in the process scope (an empty table is only another test's lookup there)
    assert not secrets.PROCESS.tables.get("backing") and not secrets.PROCESS.options
    for spec, objects, kw in ((_luks(a), (), {}), (_luks(a), ("secret,id=sec0,data=beta",), {"sec0": "beta"})):
        want = _qemu_error(_json(spec), luks, *objects)  # no secret; the other image's passphrase
        with pytest.raises(vdkit.VdkitError) as caught:
            vdkit.open(options=spec, secrets=kw)
        assert _text(caught.value) == want

    results: dict[str, bytes | BaseException] = {}
    start = threading.Barrier(2)

    def reader(key: str, path: Path, word: str) -> None:
        start.wait()
        try:
            for _ in range(3):
                results[key] = _lib_bytes(options=_luks(path), secrets={"sec0": word})
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread's assertion
            results[key] = exc

    threads = [threading.Thread(target=reader, args=("a", a, "alpha")),
               threading.Thread(target=reader, args=("b", b, "beta"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"a": want_a, "b": want_b}


# -- protocols -----------------------------------------------------------------------------------

@pytest.fixture
def qnbd(tmp_path: Path) -> Iterator[QemuNbd]:
    servers = QemuNbd(tmp_path)
    yield servers
    servers.stop()


def test_nbd(files: Path, qnbd: QemuNbd) -> None:
    """A qcow2 file's bytes exported raw (qcow2 over an nbd file child: its absolute backing name, or a
    backing given as options), a qcow2 exported as its disk (driver=nbd at the top), written through."""
    sock = short_sock("lib.sock")
    qnbd.start(files / "top.qcow2", "-k", sock, "-x", "t", "-f", "raw")
    port = free_port()
    qnbd.start(files / "base2.qcow2", "-p", str(port), "-b", "127.0.0.1", "-x", "b", "-f", "qcow2")
    unix: Options = {"driver": "nbd", "server": {"type": "unix", "path": sock}, "export": "t"}
    inet: Options = {"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": str(port)},
                     "export": "b"}
    for node in ({"driver": "qcow2", "file": unix, "backing": None}, inet, {"driver": "qcow2", "file": unix},
                 {"driver": "qcow2", "file": unix, "backing": {"driver": "raw", "file": _file(files / "r.raw")}}):
        _same_read(files, node)
    with vdkit.open(options=inet, readonly=False) as node:  # writes go to the export
        node.write(0, b"\x77" * 512)
    assert _qemu_bytes(_json(inet), files)[:513] == b"\x77" * 512 + b"\x22"


def test_nbd_tls_objects(tmp_path_factory: pytest.TempPathFactory) -> None:
    """NBD over TLS with the credentials given as ``objects``; they too belong to the one open."""
    setup = Setup(tmp_path_factory.mktemp("libtls"))
    try:
        node: Options = {"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": str(setup.port)},
                         "export": "d", "tls-creds": "tls0"}
        creds = f"tls-creds-x509,id=tls0,dir={setup.cli},endpoint=client"
        want = _qemu_bytes(_json(node), setup.tmp, creds)
        objects = {"tls0": {"qom-type": "tls-creds-x509", "dir": str(setup.cli), "endpoint": "client"}}
        assert _lib_bytes(options=node, objects=objects) == want
        assert _lib_bytes(options=node, objects=[creds]) == want  # --object's own syntax
        for bad in (f"tls-creds-x509,id=tls0,dir={setup.tmp}/nosuch,endpoint=client", "tls-creds-x509,id=tls0",
                    f"{creds},bogus=1", "secret,id=tls0", f"tls-creds-x509,id=0x,dir={setup.cli}"):
            q = qemu_img("info", "--object", bad, "nbd://127.0.0.1:1/x")
            assert q.returncode == 1 and q.stderr.startswith("qemu-img: "), q.stderr
            with pytest.raises(vdkit.VdkitError) as caught:
                vdkit.open(options=node, objects=[bad])
            assert _text(caught.value) == q.stderr[len("qemu-img: "):].rstrip("\n")
        with pytest.raises(vdkit.VdkitError) as caught:
            vdkit.open(options=node)  # the credentials of the open before are gone
        assert _text(caught.value) == _qemu_error(_json(node), setup.tmp)
    finally:
        setup.stop()


def test_http(web: Web, tmp_path: Path) -> None:  # noqa: F811  (web: fixture)
    """http and https (sslverify off: a self-signed certificate) under a format and at the top."""
    for node in ({"driver": "qcow2", "file": {"driver": "https", "url": f"{web.https}/d.qcow2", "sslverify": False}},
                 {"driver": "http", "url": f"{web.http}/r.raw", "readahead": "64k", "timeout": 10},
                 {"driver": "qcow2", "file": {"driver": "http", "url": f"{web.http}/top.qcow2"}},
                 {"driver": "qcow2", "file": {"driver": "http", "url": f"{web.http}/top.qcow2"},
                  "backing": {"driver": "raw", "file": {"driver": "http", "url": f"{web.http}/r.raw"}}}):
        _same_read(tmp_path, node)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ceph.CephCluster:
    return ceph.session_cluster(tmp_path_factory, request)


@pytest.fixture(scope="session")
def cephx(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> ceph.CephCluster:
    return ceph.session_cluster(tmp_path_factory, request, auth="cephx")


def test_rbd(cluster: ceph.CephCluster, files: Path) -> None:
    """driver=rbd at the top and under qcow2 (a qcow2 image converted onto RBD)."""
    raw, q = cluster.unique("libraw"), cluster.unique("libq")
    for image, fmt, src in ((raw, "raw", files / "r.raw"), (q, "qcow2", files / "base2.qcow2")):
        r = qemu_img("convert", "-O", fmt, str(src), cluster.name(image))
        assert r.returncode == 0, r.stderr
    top: Options = {"driver": "rbd", "pool": "rbd", "image": raw, "conf": str(cluster.conf)}
    _same_read(files, top)
    _same_read(files, {"driver": "qcow2", "file": {**top, "image": q}})


def test_rbd_key_secret(cephx: ceph.CephCluster, tmp_path: Path) -> None:
    """A cephx key given as a secret (the key's bytes, as ``--object secret,format=base64`` decodes them)."""
    image = cephx.unique("libx")
    cephx.rbd("create", "--size", "4M", f"rbd/{image}")
    cephx.qemu_io(image, "write -P 0x66 1M 64k")
    key = cephx.key()
    nokey = tmp_path / "nokey.conf"
    nokey.write_text("".join(line for line in cephx.conf.read_text().splitlines(keepends=True)
                             if not line.startswith("keyring")))
    node: Options = {"driver": "rbd", "pool": "rbd", "image": image, "conf": str(nokey), "user": "admin",
                     "key-secret": "sec0"}
    want = _qemu_bytes(_json(node), tmp_path, f"secret,id=sec0,data={key},format=base64")
    assert _lib_bytes(options=node, secrets={"sec0": base64.b64decode(key)}) == want
    wrong = "AQBkaW5nZG9uZ2Rpbmdkb25nZGluZ2RvbmdkaW5nZA=="
    with pytest.raises(vdkit.VdkitError) as caught:
        vdkit.open(options=node, secrets={"sec0": base64.b64decode(wrong)})
    assert _text(caught.value) == _qemu_error(_json(node), tmp_path, f"secret,id=sec0,data={wrong},format=base64")


def test_info_names_options(luks: Path, web: Web, tmp_path: Path) -> None:  # noqa: F811  (web: fixture)
    """A node QEMU names json:{...} by its options (luks's key-secret, curl's sslverify off or cookie) is named
    so by vdkit.image_info, as qemu-img info names it; the rest keep their file names."""
    check_ok("create", "-q", "-f", "vpc", str(tmp_path / "d.vhd"), "10M")
    specs: list[tuple[Options, tuple[str, ...]]] = [
        (_luks(luks / "a.luks"), ("secret,id=sec0,data=alpha",)),
        ({"driver": "vpc", "force_size_calc": "chs", "file": _file(tmp_path / "d.vhd")}, ()),
        ({"driver": "qcow2", "file": {"driver": "https", "url": f"{web.https}/d.qcow2", "sslverify": False}}, ()),
        ({"driver": "raw", "file": {"driver": "http", "url": f"{web.http}/r.raw", "cookie": "a=b"}}, ()),
        ({"driver": "qcow2", "file": {"driver": "http", "url": f"{web.http}/d.qcow2"}}, ()),
        ({"driver": "raw", "offset": 1024, "file": _file(tmp_path / "d.vhd")}, ()),
    ]
    for node, objects in specs:
        args = [a for o in objects for a in ("--object", o)]
        want = qemu_img("info", *args, _json(node))
        assert want.returncode == 0, want.stderr
        with vdkit.open(options=node, secrets={"sec0": "alpha"}) as opened:
            got = vdkit.info.render_human.image_info(vdkit.image_info(opened))
        assert got == want.stdout


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from("ab"), st.sampled_from(["alpha", "beta", None]), st.booleans()),
                min_size=1, max_size=6), st.booleans())
def test_secrets_never_cross_opens(luks: Path, ops: list[tuple[str, str | None, bool]], threaded: bool) -> None:
    """Any sequence of opens (in one thread or spread over two at once), each with its own secret (given as
    secrets= or as an --object, or none): an open unlocks exactly when its own passphrase is its image's;
    otherwise the error is the one an open with that passphrase alone gives."""
    from vdkit.block import secrets

    word_of = {"a": "alpha", "b": "beta"}
    pattern_at, pattern = {"a": 64 << 10, "b": 128 << 10}, {"a": "5a", "b": "a5"}  # the fixture's writes

    def one(image: str, word: str | None, as_object: bool) -> str:
        kw: dict[str, object] = {}
        if word is not None:
            kw = {"objects": [f"secret,id=sec0,data={word}"]} if as_object else {"secrets": {"sec0": word}}
        try:
            with vdkit.open(options=_luks(luks / f"{image}.luks"), **kw) as node:  # type: ignore[arg-type]
                return node.read(pattern_at[image], 1).hex() + ("" if word == word_of[image] else " WRONG KEY")
        except vdkit.VdkitError as exc:
            return str(exc).rsplit(": ", 1)[-1]

    expected = [one(image, word, as_object) if word != word_of[image] else pattern[image]
                for image, word, as_object in ops]
    got: list[str | None] = [None] * len(ops)

    def run(indices: range) -> None:
        for i in indices:
            got[i] = one(*ops[i])

    half = len(ops) // 2
    if threaded:
        threads = [threading.Thread(target=run, args=(r,)) for r in (range(half), range(half, len(ops)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        run(range(len(ops)))
    assert got == expected
    assert all(e in ("5a", "a5") or "key" in e.lower() or "secret" in e.lower() for e in expected), expected
    assert secrets.PROCESS.secrets == {} and not secrets.PROCESS.tables.get("objects")
