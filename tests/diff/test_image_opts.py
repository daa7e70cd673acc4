"""``--image-opts``, ``--target-image-opts`` and ``--object`` on every command, against qemu-img 7.2.

Scripts written for qemu-img name images by QemuOpts specs and pass secrets
as objects.  vdkit does no encrypted I/O, so objects change nothing, but a
malformed one must fail exactly as qemu-img fails (it creates each object
while parsing the options).  Read-only commands run on one shared set of
images; writing commands run in two identical folders (one per program) and
the resulting files must be byte-identical as well.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img, qemu_img_pbkdf, vdkit_img
from tests.helpers.qemu_io import qio

Q = "driver=qcow2,file.filename=q.qcow2"
Q_FILE = "driver=qcow2,file.driver=file,file.filename=q.qcow2"
O_SPEC = "driver=qcow2,file.filename=o.qcow2"
R_SPEC = "driver=raw,file.filename=r.raw"
MISSING = "driver=qcow2,file.filename=nonexist"


def _images(d: Path) -> None:
    """q.qcow2 (data), o.qcow2 (overlay of q), r.raw (data), empty targets t.raw and t.qcow2."""
    d.mkdir(parents=True, exist_ok=True)
    check_ok("create", "-q", "-f", "qcow2", "q.qcow2", "1M", cwd=d)
    qio("q.qcow2", ["write -P 1 0 64k", "write -P 2 512k 64k"], d)
    check_ok("create", "-q", "-f", "qcow2", "-b", "q.qcow2", "-F", "qcow2", "o.qcow2", cwd=d)
    qio("o.qcow2", ["write -P 3 64k 64k", "write -z 512k 4k"], d)
    (d / "r.raw").write_bytes(b"\x05" * 4096 + bytes(1024 * 1024 - 4096))
    check_ok("create", "-q", "-f", "raw", "t.raw", "1M", cwd=d)
    check_ok("create", "-q", "-f", "qcow2", "t.qcow2", "1M", cwd=d)
    (d / "key.txt").write_text("hunter2")
    (d / "key.b64").write_text("aHVudGVyMg==")


@pytest.fixture(scope="module")
def ro_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("image_opts_ro")
    _images(d)
    return d


# -- read-only commands: valid specs, invalid specs, mutual exclusions --------------------------------

READ_CASES: list[list[str]] = [
    # check
    ["check", "--image-opts", Q],
    ["check", "--image-opts", "--output=json", Q_FILE],
    ["check", "--image-opts", "file.filename=q.qcow2"],
    ["check", "--image-opts", R_SPEC],
    ["check", "--image-opts", MISSING],
    ["check", "--image-opts", "q.qcow2"],
    ["check", "--image-opts", Q + ",bogus=1"],
    ["check", "--image-opts", "driver=qcow2,file.filename=r.raw"],
    ["check", "--image-opts", "-f", "qcow2", Q],
    ["check", "--image-opts", "-f", "qcow2"],
    ["check", "--image-opts", "-r", "all", "-U", Q],
    # map
    ["map", "--image-opts", O_SPEC],
    ["map", "--image-opts", "--output=json", O_SPEC],
    ["map", "--image-opts", "--output=json", "file.filename=o.qcow2"],
    ["map", "--image-opts", R_SPEC],
    ["map", "--image-opts", MISSING],
    ["map", "--image-opts", "o.qcow2"],
    ["map", "--image-opts", "driver=qcow2"],
    ["map", "--image-opts", "-f", "qcow2", O_SPEC],
    ["map", "--image-opts", "--output=foo", "-f", "qcow2", O_SPEC],
    # compare
    ["compare", "--image-opts", Q, Q_FILE],
    ["compare", "--image-opts", Q, O_SPEC],
    ["compare", "--image-opts", "-s", Q, O_SPEC],
    ["compare", "--image-opts", R_SPEC, "driver=raw,file.filename=r.raw"],
    ["compare", "--image-opts", Q, MISSING],
    ["compare", "--image-opts", "bogus", Q],
    ["compare", "--image-opts", Q, Q + ",x=1"],
    ["compare", "--image-opts", "-f", "qcow2", Q, Q],
    ["compare", "--image-opts", "-F", "qcow2", Q, Q],
    ["compare", "--image-opts", "-f", "qcow2", Q],
    # info and snapshot (the existing support, now with the shared helpers)
    ["info", "--image-opts", "--backing-chain", O_SPEC],
    ["info", "--image-opts", "-f", "raw", Q],
    # a format's own runtime options (registry RUNTIME_OPTIONS): qcow2 takes them, raw refuses them
    ["info", "--image-opts", Q + ",l2-cache-size=1M,lazy-refcounts=on,overlap-check=all"],
    ["info", "--image-opts", R_SPEC + ",l2-cache-size=1M"],
    # without a driver: the probed format takes its own options and refuses others by its name
    ["info", "--image-opts", "file.filename=q.qcow2,l2-cache-size=1M"],
    ["info", "--image-opts", "file.filename=q.qcow2,bogus=1"],
    ["info", "--image-opts", "file.filename=r.raw,l2-cache-size=1M"],
    ["snapshot", "-l", "--image-opts", Q],
    ["snapshot", "-l", "--image-opts", MISSING],
    ["snapshot", "-l", "--image-opts", "-f", "qcow2", Q],
    # the file child by reference beside options for it (either order), and the json: equivalents
    ["info", "--image-opts", "driver=qcow2,file=q.qcow2,file.filename=o.qcow2"],
    ["info", "--image-opts", "driver=qcow2,file.filename=o.qcow2,file=q.qcow2"],
    ["info", "--image-opts", "file=q.qcow2,file.aio=threads"],
    ["info", "--image-opts", "driver=qcow2,file=,file.driver=file"],
    ["info", "--image-opts", "driver=nosuch,file=q.qcow2,file.filename=o.qcow2"],
    ["info", "--image-opts", "driver=nosuch,file=q.qcow2"],
    ["info", "--image-opts", "driver=qcow2,file=q.qcow2,bogus=1"],
    ["info", 'json:{"driver":"qcow2","file":"q.qcow2","file.filename":"o.qcow2"}'],
    ["map", 'json:{"file.driver":"file","driver":"qcow2","file":"q.qcow2"}'],
    # a key twice: refused (Python's json would keep the last, and open another file)
    ["info", 'json:{"driver":"qcow2","file":"q.qcow2","file":{"driver":"file","filename":"o.qcow2"}}'],
    ["info", 'json:{"driver":"qcow2","file":{"driver":"file","filename":"o.qcow2","filename":"q.qcow2"}}'],
    ["check", 'json:{"driver":"raw","driver":"qcow2","file":{"filename":"q.qcow2"}}'],
]


@pytest.mark.parametrize("args", READ_CASES, ids=[" ".join(a) for a in READ_CASES])
def test_image_opts_read(args: list[str], ro_dir: Path) -> None:
    assert_same(args, ro_dir)


# -- --object: accepted on every command, refused as qemu-img refuses -----------------------------------

OBJECTS: list[list[str]] = [
    ["secret,id=s0,data=x"],
    ["secret,id=s0,file=key.txt"],
    ["secret,id=s0,file=key.b64,format=base64"],
    ["secret,id=s0,data=aHVudGVyMg==,format=base64", "secret,id=s1,data=y"],
    ["throttle-group,id=t0", "main-loop,id=m", "authz-list,id=a", "tls-creds-anon,id=tls0"],
    ["secret,id=s0,data=y,", "secret,id=s1,data=x,iv=AAAA"],
    [""],
    ["secret"],
    ["id=s0"],
    ["secret,id=s0"],
    ["foo,id=s0"],
    ["iothread,id=io"],
    ["memory-backend-ram,id=m"],
    ["memory-backend-ram,id=m,size=1M"],
    ["authz-list-file,id=a"],
    ["authz-listfile,id=a"],
    ["authz-simple,id=a"],
    ["tls-creds-x509,id=x"],
    ["tls-cipher-suites,id=x"],
    ["secret,id=s0,data=x", "secret,id=s0,data=y"],
    ["secret,id=s0,data=x", "throttle-group,id=s0"],
    ["secret,id=s0,file=nonexist"],
    ["secret,id=s0,file=."],
    ["secret,id=s0,data=x,file=key.txt"],
    ["secret,id=s0,data=x,format=foo"],
    ["secret,id=s0,data=x!,format=base64"],
    ["secret,id=s0,data=x,bogus=1"],
    ["secret,id=s0,data.a=x"],
    ["secret,id=s0,data=x,loaded=on"],
    ["secret,id=0bad,data=x"],
    ["secret,id=,data=x"],
    ["secret,id=s0,,data=x"],
    ["secret,secret,id=s0,data=x"],
    [",id=s0"],
    ["secret,id=s0,data=x,=y"],
    ["secret,id=s0,data=x,Bad!=1"],
    ["qom-type=help"],
    ["secret,id=s0,data=x,keyid=nokey"],
    ["throttle-group,id=t0", "secret,id=s0,data=x,keyid=t0"],
    ["secret,id=k,data=x", "secret,id=s0,data=x,keyid=k"],
    ["secret,id=k,data=MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=,format=base64", "secret,id=s0,data=x,keyid=k"],
    ["secret,id=k,data=MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=,format=base64",
     "secret,id=s0,data=x,keyid=k,iv=AAAA"],
    ["secret,id=k,data=MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=,format=base64",
     "secret,id=s0,data=x,keyid=k,iv=MDEyMzQ1Njc4OTAxMjM0NQ=="],
    ["help"],
    ["foo,help"],
    ["secret,help"],
    ["throttle-group,id=t,help"],
    ["throttle-group,id=t,bogus=1"],
]


def _object_args(specs: list[str]) -> list[str]:
    out: list[str] = []
    for s in specs:
        out += ["--object", s]
    return out


@pytest.mark.parametrize("specs", OBJECTS, ids=[" ".join(s) or "empty" for s in OBJECTS])
def test_object(specs: list[str], ro_dir: Path) -> None:
    assert_same(["info", *_object_args(specs), "q.qcow2"], ro_dir)


OBJECT_COMMANDS: list[list[str]] = [
    ["info", "--image-opts", Q],
    ["check", "--image-opts", Q],
    ["map", "--image-opts", O_SPEC],
    ["compare", "--image-opts", Q, O_SPEC],
    ["snapshot", "-l", "--image-opts", Q],
    ["convert", "--image-opts", "-n", Q, "nonexist.raw"],
    ["rebase", "--image-opts", "-u", "-b", "x", "nonexist.qcow2"],
    ["resize", "--image-opts", MISSING, "2M"],
    ["commit", "--image-opts", MISSING],
    ["create", "-f", "qcow2", "nonexist/x.qcow2", "1M"],
]


@pytest.mark.parametrize("cmd", OBJECT_COMMANDS, ids=[c[0] for c in OBJECT_COMMANDS])
@pytest.mark.parametrize("specs", [["secret,id=s0,data=x", "throttle-group,id=t"], ["secret,id=s0"], ["help"]],
                         ids=["valid", "invalid", "help"])
def test_object_every_command(cmd: list[str], specs: list[str], ro_dir: Path) -> None:
    """Each command creates the objects while parsing: before its own argument errors, after earlier options."""
    assert_same([cmd[0], *_object_args(specs), *cmd[1:]], ro_dir)


def test_object_order(ro_dir: Path) -> None:
    """Objects are created as getopt meets them: an unknown option before a bad object wins, after it loses."""
    assert_same(["info", "-x", "--object", "secret,id=s0", "q.qcow2"], ro_dir)
    assert_same(["info", "--object", "secret,id=s0", "-x", "q.qcow2"], ro_dir)
    assert_same(["info", "q.qcow2", "r.raw", "--object", "bad,id=s"], ro_dir)
    assert_same(["map", "--object", "secret,id=s0,data=x", "--image-opts"], ro_dir)


# -- writing commands: same messages, same resulting bytes -----------------------------------------------

def _both(tmp: Path, args: list[str]) -> tuple[Path, Path]:
    """Run ``args`` with qemu-img in tmp/q and vdkit-img in tmp/v (identical images); compare everything.

    Files must end up byte-identical, except after ``snapshot -c``: a snapshot
    records the time it was taken (and vdkit places its table differently,
    see docs/snapshot-writes.md), so there the snapshot lists and the guest
    content are compared instead.
    """
    q, v = tmp / "q", tmp / "v"
    _images(q)
    shutil.copytree(q, v)
    assert_same(args, q, vdkit_cwd=v)
    names = sorted(p.name for p in q.iterdir())
    assert sorted(p.name for p in v.iterdir()) == names, args
    for name in names:
        if args[0] == "snapshot" and name.endswith(".qcow2"):
            assert qemu_img("compare", "-q", str(q / name), str(v / name)).returncode == 0, name
            tags = [check_ok("snapshot", "-l", name, cwd=d).stdout.split("\n")[2:] for d in (q, v)]
            assert [t.split()[:2] for t in tags[0] if t] == [t.split()[:2] for t in tags[1] if t], name
        else:
            assert (q / name).read_bytes() == (v / name).read_bytes(), f"{name} differs after {args}"
    return q, v


WRITE_CASES: list[list[str]] = [
    # convert: --image-opts for the sources, --target-image-opts (with -n) for the target
    ["convert", "--image-opts", Q, "out.raw"],
    ["convert", "--image-opts", "-O", "qcow2", O_SPEC, "out.qcow2"],
    ["convert", "--image-opts", "-O", "qcow2", "-c", "file.filename=o.qcow2", "out.qcow2"],
    ["convert", "--image-opts", Q, R_SPEC, "out.raw"],
    ["convert", "-n", "--target-image-opts", "o.qcow2", "driver=raw,file.filename=t.raw"],
    ["convert", "-n", "--target-image-opts", "o.qcow2", "driver=qcow2,file.filename=t.qcow2"],
    ["convert", "-n", "--target-image-opts", "o.qcow2", "file.filename=t.qcow2"],
    ["convert", "-n", "--image-opts", "--target-image-opts", O_SPEC, "driver=qcow2,file.filename=t.qcow2"],
    ["convert", "-n", "--image-opts", "--target-image-opts", "-c", O_SPEC, "driver=qcow2,file.filename=t.qcow2"],
    ["convert", "-n", "--image-opts", "--target-image-opts", "-c", O_SPEC, "driver=raw,file.filename=t.raw"],
    ["convert", "-n", "--target-image-opts", "--target-is-zero", "r.raw", "driver=qcow2,file.filename=t.qcow2"],
    ["convert", "-n", "--target-image-opts", "-O", "raw", "q.qcow2", "driver=raw,file.filename=t.raw"],
    ["convert", "-n", "--target-image-opts", "-O", "nosuch", "q.qcow2", "driver=raw,file.filename=t.raw"],
    ["convert", "-n", "--target-image-opts", "-O", "raw", "nonexist", "driver=raw,file.filename=t.raw"],
    ["convert", "-n", "--target-image-opts", "q.qcow2", "driver=qcow2,file.filename=t.raw"],
    ["convert", "-n", "--target-image-opts", "q.qcow2", MISSING],
    ["convert", "-n", "--target-image-opts", "q.qcow2", "t.raw"],
    ["convert", "-n", "--target-image-opts", "q.qcow2", "driver=qcow2,file.filename=t.qcow2,foo=bar"],
    ["convert", "--target-image-opts", "q.qcow2", "driver=raw,file.filename=t.raw"],
    ["convert", "--target-image-opts", "q.qcow2"],
    ["convert", "--target-image-opts", "--target-is-zero", "q.qcow2", "t.raw"],
    ["convert", "--image-opts", "-f", "qcow2", Q, "out.raw"],
    ["convert", "--image-opts", "-f", "qcow2", Q],
    ["convert", "--image-opts", Q, MISSING, "out.raw"],
    ["convert", "--image-opts", "q.qcow2", "out.raw"],
    ["convert", "--image-opts", "-O", "nosuch", Q, "out.raw"],
    # resize
    ["resize", "--image-opts", Q, "2M"],
    ["resize", "--image-opts", "file.filename=q.qcow2", "+64k"],
    ["resize", "--image-opts", R_SPEC, "2M"],
    ["resize", "--image-opts", "file.filename=r.raw", "2M"],
    ["resize", "--image-opts", "--shrink", Q, "512k"],
    ["resize", "--image-opts", Q, "512k"],
    ["resize", "--image-opts", MISSING, "2M"],
    ["resize", "--image-opts", "q.qcow2", "2M"],
    ["resize", "--image-opts", "-f", "qcow2", Q, "2M"],
    ["resize", "--image-opts", "-f", "qcow2", Q],
    # rebase
    ["rebase", "--image-opts", "-u", "-b", "", O_SPEC],
    ["rebase", "--image-opts", "-b", "", O_SPEC],
    ["rebase", "--image-opts", "-b", "r.raw", "-F", "raw", O_SPEC],
    ["rebase", "--image-opts", "-u", "-b", "r.raw", "-F", "raw", "file.filename=o.qcow2"],
    ["rebase", "--image-opts", "-b", "nonexist", "-F", "raw", O_SPEC],
    ["rebase", "--image-opts", "-u", "-b", "", MISSING],
    ["rebase", "--image-opts", "-u", "-b", "", "o.qcow2"],
    ["rebase", "--image-opts", "-f", "qcow2", "-u", "-b", "", O_SPEC],
    ["rebase", "--image-opts", "-f", "qcow2", O_SPEC],
    # commit
    ["commit", "--image-opts", O_SPEC],
    ["commit", "--image-opts", "-d", "file.filename=o.qcow2"],
    ["commit", "--image-opts", "-b", "q.qcow2", O_SPEC],
    ["commit", "--image-opts", "-b", "nope", O_SPEC],
    ["commit", "--image-opts", Q],
    ["commit", "--image-opts", MISSING],
    ["commit", "--image-opts", "o.qcow2"],
    ["commit", "--image-opts", "-f", "qcow2", O_SPEC],
    # snapshot's writing side
    ["snapshot", "--image-opts", "-c", "s1", Q],
    ["snapshot", "--image-opts", "-c", "s1", R_SPEC],
    ["snapshot", "--image-opts", "-d", "nosuch", Q],
    ["snapshot", "--image-opts", "-c", "s1", "file.filename=r.raw"],
    # check's repairing mode opens the image writable
    ["check", "--image-opts", "-r", "all", Q],
]


@pytest.mark.parametrize("args", WRITE_CASES, ids=[" ".join(a) for a in WRITE_CASES])
def test_image_opts_write(args: list[str], tmp_path: Path) -> None:
    q, v = _both(tmp_path, args)
    if args[0] in ("commit", "rebase", "resize", "convert", "snapshot"):
        for name in ("q.qcow2", "o.qcow2", "t.qcow2"):
            assert qemu_img("check", "-q", name, cwd=v).returncode == 0, name


def test_encrypted_key_secret(tmp_path: Path) -> None:
    """The usual reason for --object: a key for an encrypted qcow2.  info needs no key (qemu-img opens it
    for metadata only), so any key-secret is accepted; I/O commands without one fail as qemu-img does."""
    _images(tmp_path)
    r = qemu_img_pbkdf("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
                       "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "enc.qcow2", "1M",
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    enc = "driver=qcow2,file.filename=enc.qcow2"
    for args in (["info", "--object", "secret,id=s0,data=pw", "--image-opts", enc + ",encrypt.key-secret=s0"],
                 ["info", "--image-opts", enc + ",encrypt.key-secret=nosuch"],
                 ["info", "--image-opts", "--output=json", enc],
                 ["info", "--image-opts", "file.filename=enc.qcow2,encrypt.key-secret=s0"],
                 ["info", "--image-opts", "file.filename=r.raw,encrypt.key-secret=s0"],
                 ["info", "--image-opts", "file.filename=nonexist,encrypt.key-secret=s0"],
                 ["info", "--image-opts", "driver=raw,file.filename=enc.qcow2,encrypt.key-secret=s0"],
                 ["map", "--image-opts", enc],
                 ["check", "--image-opts", enc],
                 # an unencrypted image: the key is not used
                 ["map", "--image-opts", "driver=qcow2,file.filename=q.qcow2,encrypt.key-secret=s0"],
                 ["check", "--image-opts", "driver=qcow2,file.filename=q.qcow2,encrypt.key-secret=s0"],
                 ["compare", "--image-opts", "driver=qcow2,file.filename=q.qcow2,encrypt.key-secret=s0", Q]):
        assert_same(args, tmp_path)
    # qemu-img decrypts with the key; vdkit cannot, and says so instead of asking for a key
    r = vdkit_img("map", "--object", "secret,id=s0,data=pw", "--image-opts", enc + ",encrypt.key-secret=s0",
                  cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, f"vdkit-img: Could not open '{enc},encrypt.key-secret=s0': "
                                           "vdkit-img cannot read encrypted data\n")
