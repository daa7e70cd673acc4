"""``vdkit-img convert`` against ``qemu-img convert``.

Both tools convert the same source; the outputs must be byte-identical
(``cmp``), stdout/stderr/exit status must match, and for raw outputs the
sparse layout (``qemu-img map`` of the result) must match too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_img, qemu_io, require_tool, vdkit_img
from tests.diff.io_corpus import KINDS, build
from tests.helpers.qemu_io import qio


def _convert_both(cwd: Path, args: list[str], q_out: str = "q.out", v_out: str = "v.out") -> tuple[int, str]:
    q = qemu_img("convert", *args, q_out, cwd=cwd)
    v = vdkit_img("convert", *args, v_out, cwd=cwd)
    assert v.stdout == q.stdout, f"stdout differs for {args}"
    assert v.normalized_stderr() == q.stderr, f"stderr differs for {args}"
    assert v.returncode == q.returncode, f"exit code differs for {args}"
    if q.returncode == 0:
        assert (cwd / q_out).read_bytes() == (cwd / v_out).read_bytes(), f"output differs for {args}"
    return q.returncode, q.stdout


def _same_layout(cwd: Path, fmt: str = "raw") -> None:
    a = check_ok("map", "--output=json", "-f", fmt, "q.out", cwd=cwd).stdout
    b = check_ok("map", "--output=json", "-f", fmt, "v.out", cwd=cwd).stdout
    assert a == b, "sparse layout of the outputs differs"


@pytest.mark.parametrize("kind", KINDS)
def test_convert_to_raw(workdir: Path, kind: str) -> None:
    src = build(kind, workdir)
    _convert_both(workdir, ["-O", "raw", src])
    _same_layout(workdir)
    _convert_both(workdir, ["-S", "0", "-O", "raw", src])
    _convert_both(workdir, ["-S", "64k", src])
    _same_layout(workdir)


def test_convert_sparse_granularity(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "raw", "z.raw", "2M", cwd=workdir)
    # data with zero gaps of 512 B, 3.5 KiB, 4 KiB, 12 KiB, at odd alignments
    qio("z.raw", ["write -P 1 0 1k", "write -P 2 1536 1k", "write -P 3 6144 512", "write -P 4 10240 4k",
                  "write -P 0 14336 12k", "write -P 5 26624 1k", "write -P 6 1M 64k", "write -P 0 1040k 8k"],
        workdir, fmt="raw")
    for s in ("512", "4k", "8k", "1M"):
        _convert_both(workdir, ["-f", "raw", "-S", s, "z.raw"])
        _same_layout(workdir)


def test_convert_snapshots(workdir: Path) -> None:
    src = build("snap", workdir)
    for spec in ("first", "1", "2", "snapshot.id=1", "snapshot.name=1", "snapshot.name=first,snapshot.id=1",
                 "snapshot.name=first,snapshot.id=2", "nope", "snapshot.foo=1", "snapshot.id=1,x=2"):
        _convert_both(workdir, ["-O", "raw", "-l", spec, src])
    # -l on raw, -l with several sources
    check_ok("create", "-q", "-f", "raw", "r.raw", "1M", cwd=workdir)
    _convert_both(workdir, ["-l", "first", "r.raw"])
    _convert_both(workdir, ["-l", "first", src, "r.raw"])


def test_convert_progress_and_quiet(workdir: Path) -> None:
    src = build("v3", workdir)
    _convert_both(workdir, ["-p", "-O", "raw", src])
    _convert_both(workdir, ["-p", "-q", src])
    check_ok("create", "-q", "-f", "qcow2", "big.qcow2", "64M", cwd=workdir)
    qio("big.qcow2", ["write -P 1 0 20M", "write -P 2 30M 7M", "write -P 3 50M 1M"], workdir)
    rc, out = _convert_both(workdir, ["-p", "big.qcow2"])
    assert rc == 0 and out.count("\r") > 10


def test_convert_progress_steps_sparse_zero_and_compressed(workdir: Path) -> None:
    """-p's lines show the copy's pieces: with -S 0 a long unallocated run is written a buffer at
    a time, with -c one target cluster at a time (both used to be one piece: fewer lines)."""
    check_ok("create", "-q", "-f", "qcow2", "h.qcow2", "40M", cwd=workdir)
    qio("h.qcow2", ["write -P 1 0 5M", "write -P 2 5M 5M"], workdir)
    for args, lines in ((["-S", "0", "-O", "raw"], 20), (["-c", "-O", "qcow2"], 40),
                        (["-c", "-S", "0", "-O", "qcow2"], 90)):
        rc, out = _convert_both(workdir, ["-p", *args, "h.qcow2"])
        assert rc == 0 and out.count("\r") > lines, args


def test_convert_concat_and_existing_target(workdir: Path) -> None:
    a = build("raw", workdir)
    b = build("v2", workdir)
    _convert_both(workdir, ["-O", "raw", a, b])
    # -n: write into an existing file (zero areas must be written too)
    (workdir / "q.out").write_bytes(b"\xff" * (8 << 20))
    (workdir / "v.out").write_bytes(b"\xff" * (8 << 20))
    _convert_both(workdir, ["-n", "-O", "raw", b])
    (workdir / "q.out").write_bytes(b"\xff" * 1024)
    (workdir / "v.out").write_bytes(b"\xff" * 1024)
    _convert_both(workdir, ["-n", b])


@pytest.mark.parametrize("args", [
    ["-O", "foo", "x"],
    ["-S", "1000", "x"],
    ["-S", "17M", "x"],
    ["-c", "-O", "raw", "x"],
    ["-B", "x", "-O", "raw", "x"],
    ["-o", "foo=bar", "x"],
    ["missing.qcow2"],
    ["-n", "x"],
    ["--target-is-zero", "x"],
    ["-c", "-O", "qcow2", "-o", "data_file=d.bin", "x"],
    # checks after option parsing, in qemu-img's order, and options validated though without effect
    ["-O", "foo", "missing.qcow2"],  # the sources are opened before the output format is looked up
    ["-T", "bogus", "-O", "qcow2", "x"],
    ["-T", "bogus", "-n", "-o", "cluster_size=4k", "x"],
    ["-n", "-o", "cluster_size=4k", "-O", "qcow2", "x"],
    ["-r", "abc", "-c", "-C", "x"],
    ["-r", "-5", "x"],
    ["-c", "-C", "-O", "qcow2", "x"],
    ["-S", "0", "-C", "x"],
    ["-C", "--salvage", "x"],
    ["-B", "x", "-O", "qcow2", "x", "x"],
    ["-B", "x", "-O", "qed", "x"],  # every format with a backing_file option wants -F
    ["-B", "x", "-O", "vmdk", "x"],
    ["-B", "x", "-O", "vpc", "x"],
    ["-o", "backing_file=x,backing_fmt=qcow2", "-O", "qcow2", "x", "x"],
    ["-B", "x", "-O", "qcow2", "x", "missing.qcow2"],
    ["-l", "s1", "-B", "x", "-O", "qcow2", "x", "x"],
    ["--target-is-zero", "-n", "-B", "x", "-O", "qcow2", "x"],  # an error, yet exit status 0
])
def test_convert_errors(workdir: Path, args: list[str]) -> None:
    check_ok("create", "-q", "-f", "qcow2", "x", "1M", cwd=workdir)
    q = qemu_img("convert", *args, "out.img", cwd=workdir)
    v = vdkit_img("convert", *args, "out.img", cwd=workdir)
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)


@pytest.mark.parametrize("args", [
    # the format's own creation errors carry "<target>: error while converting <fmt>: "
    ["-O", "qcow2", "-o", "compat=0.10,extended_l2=on", "x"],
    ["-O", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "x"],
    ["-O", "qcow2", "-o", "cluster_size=3", "x"],
    ["-O", "qcow2", "-o", "compat=0.9", "x"],
    ["-O", "qcow2", "-o", "refcount_bits=3", "x"],
    ["-O", "qcow2", "-o", "preallocation=bogus", "x"],
    ["-O", "qcow2", "-o", "backing_fmt=raw", "x"],
    ["-O", "qcow2", "-o", "data_file=nosuch/d.raw", "x"],
    ["-O", "raw", "-o", "preallocation=bogus", "x"],
    ["-O", "raw", "-o", "preallocation=metadata", "x"],
    # ... but not convert's own checks
    ["-O", "qcow2", "-o", "backing_file=x", "x"],
    ["-O", "raw", "-o", "backing_file=x", "x"],
])
def test_convert_create_errors(workdir: Path, args: list[str]) -> None:
    check_ok("create", "-q", "-f", "qcow2", "x", "1M", cwd=workdir)
    q = qemu_img("convert", *args, "out.img", cwd=workdir)
    v = vdkit_img("convert", *args, "out.img", cwd=workdir)
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    assert q.returncode == 1


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_target_not_creatable(workdir: Path, fmt: str) -> None:
    """A directory, a missing folder, and (as an unprivileged user) a folder without write permission."""
    import os
    import shutil
    import sys
    import tempfile

    from tests.conftest import _ENV, _run

    check_ok("create", "-q", "-f", "raw", "x", "1M", cwd=workdir)
    (workdir / "adir").mkdir()
    for target in ("adir", "nosuch/out.img"):
        q = qemu_img("convert", "-O", fmt, "x", target, cwd=workdir)
        v = vdkit_img("convert", "-O", fmt, "x", target, cwd=workdir)
        assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
        assert q.stderr.startswith(f"qemu-img: {target}: error while converting {fmt}: Could not create")
    # EACCES: root may write anywhere, so the tools run as nobody in a world-readable folder
    top = Path(tempfile.mkdtemp(prefix="vdperm"))
    try:
        top.chmod(0o755)
        (top / "ro").mkdir(mode=0o755)
        shutil.copy(workdir / "x", top / "x")
        (top / "x").chmod(0o644)
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        if not user:
            (top / "ro").chmod(0o555)
        args = ["convert", "-O", fmt, "x", "ro/out.img"]
        q = _run([*user, require_tool("qemu-img"), *args], cwd=top)
        v = _run([*user, sys.executable, "-m", "vdkit.cli.main", *args], cwd=top, env=_ENV)
        assert q.stderr == f"qemu-img: ro/out.img: error while converting {fmt}: Could not create 'ro/out.img': " \
                           "Permission denied\n"
        assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    finally:
        shutil.rmtree(top)


@pytest.mark.parametrize("args", [
    ["-t", "off", "-T", "off", "-r", "1k", "-W", "-m", "4", "-C"],
    ["-n", "-B", "x"],  # -B without -F is fine when the target exists: it has no effect
])
def test_convert_accepted_options(workdir: Path, args: list[str]) -> None:
    """Options qemu-img accepts that change nothing in the result: same exit, output and bytes."""
    check_ok("create", "-q", "-f", "qcow2", "x", "1M", cwd=workdir)
    assert qemu_io("-c", "write -P 3 64k 64k", str(workdir / "x")).returncode == 0
    for out in ("q.out", "v.out"):
        check_ok("create", "-q", "-f", "qcow2", out, "1M", cwd=workdir)
        assert qemu_io("-c", "write -P 9 0 1M", str(workdir / out)).returncode == 0
    q = qemu_img("convert", *args, "-O", "qcow2", "x", "q.out", cwd=workdir)
    v = vdkit_img("convert", *args, "-O", "qcow2", "x", "v.out", cwd=workdir)
    assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)
    assert qemu_img("compare", "q.out", "v.out", cwd=workdir).returncode == 0


def test_convert_usage(workdir: Path) -> None:
    for args in (["x"], []):
        q = qemu_img("convert", *args, cwd=workdir)
        v = vdkit_img("convert", *args, cwd=workdir)
        assert (v.returncode, v.stdout, v.normalized_stderr()) == (q.returncode, q.stdout, q.stderr)


QCOW2_TARGETS = [
    [],
    ["-c"],
    ["-c", "-o", "compression_type=zstd"],
    ["-o", "cluster_size=4k,compat=0.10"],
    ["-o", "extended_l2=on"],
    ["-S", "0"],
    ["-o", "cluster_size=512,refcount_bits=1"],
]


@pytest.mark.parametrize("kind", KINDS)
def test_convert_to_qcow2(workdir: Path, kind: str) -> None:
    """Same bytes as qemu-img's output (layout included), and qemu-img check is clean."""
    src = build(kind, workdir)
    for extra in QCOW2_TARGETS:
        _convert_both(workdir, ["-O", "qcow2", *extra, src])
        r = qemu_img("check", "v.out", cwd=workdir)
        assert r.returncode == 0, r.stdout + r.stderr
        r = qemu_img("compare", src, "v.out", cwd=workdir)
        assert r.returncode == 0, r.stdout


def test_convert_qcow2_with_backing(workdir: Path) -> None:
    build("chain", workdir)
    _convert_both(workdir, ["-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2"])
    assert qemu_img("compare", "top.qcow2", "v.out", cwd=workdir).returncode == 0
    _convert_both(workdir, ["-O", "qcow2", "-B", "mid.qcow2", "top.qcow2"])
    # into an existing qcow2 (-n): zero areas become zero clusters
    check_ok("create", "-q", "-f", "qcow2", "q.out", "4M", cwd=workdir)
    check_ok("create", "-q", "-f", "qcow2", "v.out", "4M", cwd=workdir)
    qio("q.out", ["write -P 0xff 0 4M"], workdir)
    qio("v.out", ["write -P 0xff 0 4M"], workdir)
    _convert_both(workdir, ["-n", "-O", "qcow2", "top.qcow2"])
    assert qemu_img("compare", "top.qcow2", "v.out", cwd=workdir).returncode == 0
    assert qemu_img("check", "v.out", cwd=workdir).returncode == 0


def test_convert_existing_raw_target_with_backing_option(workdir: Path) -> None:
    """``-n -B`` onto an existing raw target: qemu-img copies (a raw target has no backing file to
    leave ranges to) and succeeds; vdkit once failed asking the raw target for its backing size."""
    check_ok("create", "-q", "-f", "raw", "b.raw", "1M", cwd=workdir)
    check_ok("create", "-q", "-f", "qcow2", "s.qcow2", "1M", cwd=workdir)
    r = qemu_io("-f", "qcow2", "-c", "write -P 0x5a 64k 64k", "s.qcow2", cwd=workdir)
    assert r.returncode == 0, r.stderr
    outs = []
    for tool, name in ((qemu_img, "q.raw"), (vdkit_img, "v.raw")):
        (workdir / name).write_bytes(b"\x11" * (1 << 20))
        res = tool("convert", "-n", "-B", "b.raw", "-O", "raw", "s.qcow2", name, cwd=workdir)
        outs.append((res.returncode, res.stdout, res.normalized_stderr() if tool is vdkit_img else res.stderr))
    assert outs[0] == outs[1] and outs[0][0] == 0
    assert (workdir / "q.raw").read_bytes() == (workdir / "v.raw").read_bytes()
