"""luks (raw LUKS1 container): vdkit-img against qemu-img 7.2 on images qemu-img creates.

Without a key only the header is read: ``info`` (human and JSON, with the
luks ``Format specific information``) must match byte for byte, and every
command that reads data must be refused with qemu-img's text.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import assert_same, qemu_img, qemu_img_pbkdf, require_tool
from tests.helpers.limited import run_limited

SECRET = ["--object", "secret,id=sec0,data=abc"]

VARIANTS = {
    "default": "",
    "cbc-essiv": "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
    "twofish": "cipher-alg=twofish-256,hash-alg=sha512",
    "plain": "cipher-alg=aes-192,ivgen-alg=plain,hash-alg=sha384",
}


def make(d: Path, name: str, opts: str, size: str = "1M") -> None:
    """qemu-img create -f luks (through qemu_img_pbkdf: its PBKDF calibration)."""
    extra = f",{opts}" if opts else ""
    r = qemu_img_pbkdf("create", "-q", "-f", "luks", *SECRET, "-o", f"key-secret=sec0,iter-time=300{extra}", name,
                       size, cwd=d)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("luks")
    for name, opts in VARIANTS.items():
        make(d, f"{name}.luks", opts)
    (d / "src.raw").write_bytes(b"\x55" * 65536)
    return d


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_info(images: Path, variant: str) -> None:
    name = f"{variant}.luks"
    for args in (["info"], ["info", "--output=json"], ["info", "-f", "luks"], ["info", "--backing-chain"],
                 ["info", "-U", "--output=json", "-f", "luks"]):
        assert_same([*args, name], images)


def test_data_needs_key(images: Path) -> None:
    """Without a key: qemu-img's 'Parameter 'key-secret' is required for cipher' for every data access."""
    n = "default.luks"
    for args in (["map", n], ["map", "--output=json", n], ["check", n], ["compare", n, "src.raw"],
                 ["convert", "-O", "raw", n, "out.raw"], ["snapshot", "-l", n], ["check", "-f", "luks", n]):
        assert_same(args, images)


def test_not_luks(images: Path) -> None:
    """-f luks on other files; a LUKS2-looking header is not luks to QEMU 7.2."""
    data = bytearray((images / "default.luks").read_bytes()[:1 << 20])
    data[7] = 2
    (images / "v2.luks").write_bytes(bytes(data))
    for args in (["info", "-f", "luks", "src.raw"], ["info", "v2.luks"], ["info", "-f", "luks", "v2.luks"]):
        assert_same(args, images)


# header fields: (offset, bytes)
BAD = {
    "cipher-name": (8, b"blowfish\0"),
    "cipher-mode-no-iv": (40, b"xts\0"),
    "cipher-mode-bad": (40, b"ofb-plain64\0"),
    "ivgen-bad": (40, b"xts-random\0"),
    "ivgen-hash-bad": (40, b"cbc-essiv:whirl\0"),
    "hash-bad": (72, b"sha3\0"),
    "key-bytes-odd": (108, b"\0\0\0\x21"),
    "payload-past-eof": (104, b"\0\x10\0\0"),
    "payload-zero": (104, b"\0\0\0\0"),
    "uuid-garbage": (168, b"not-a-uuid\xff\xfe"),
    "slot-state-junk": (208, b"\x12\x34\x56\x78"),
    "slot-offset-zero": (208 + 40, b"\0\0\0\0"),
    "slot-stripes-zero": (208 + 44, b"\0\0\0\0"),
    "slot-iters-zero": (208 + 4, b"\0\0\0\0"),
    "mk-iters-zero": (164, b"\0\0\0\0"),
    "slots-overlap": (208 + 48 * 3 + 40, b"\0\0\0\x08"),
    "slot-past-payload": (208 + 48 * 7 + 40, b"\0\0\x07\xd0"),
    "slot-inactive-state": (208 + 48 * 5, b"\0\0\0\5"),
    "key-bytes-huge": (108, b"\x80\0\0\0"),
    "payload-huge": (104, b"\xff\xff\xff\xff"),
    "payload-and-mk-iters": (104, b"\0\0\0\x07\0\0\0\x20" + bytes(52) + b"\0\0\0\0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_header(images: Path, case: str) -> None:
    off, val = BAD[case]
    data = bytearray((images / "default.luks").read_bytes())
    data[off:off + len(val)] = val
    name = f"bad-{case}.luks"
    (images / name).write_bytes(bytes(data))
    for args in (["info"], ["info", "--output=json", "-f", "luks"]):
        assert_same([*args, name], images)


def test_damage_sweep(images: Path) -> None:
    """Random damage to the 592-byte header: info alike (exit status and texts), never a traceback."""
    import sys

    base = (images / "default.luks").read_bytes()
    diffs = []
    for seed in range(15):
        rng = random.Random(seed)
        d = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            off = rng.randrange(592)
            if rng.random() < 0.5:
                d[off] = rng.randrange(256)
            else:
                off -= off % 4
                d[off:off + 4] = rng.choice((0, 1, 0xFFFFFFFF, 4096, rng.randrange(1 << 32))).to_bytes(4, "big")
        name = f"sw{seed}.luks"
        (images / name).write_bytes(bytes(d))
        q = run_limited([require_tool("qemu-img"), "info", "--output=json", name], images)
        v = run_limited([sys.executable, "-m", "vdkit.cli.main", "info", "--output=json", name], images, limit=True)
        assert "Traceback" not in v[2] and "internal error" not in v[2], v[2]
        v = (v[0], v[1], v[2].replace("vdkit-img:", "qemu-img:"))
        if q != v:
            diffs.append(f"seed {seed}:\n  qemu:  {q}\n  vdkit: {v}")
    assert not diffs, "\n".join(diffs)


# -- data with a key (--object secret + --image-opts driver=luks,key-secret=...) ---------------------


def _spec(name: str, secret: str = "sec0") -> str:
    return f"driver=luks,key-secret={secret},file.filename={name}"


@pytest.fixture(scope="module")
def written(images: Path) -> Path:
    """The AES variants with the reference's pattern written through qemu-io (with the key)."""
    from tests.conftest import qemu_io

    for variant in ("default", "cbc-essiv"):
        r = qemu_io(*SECRET, "--image-opts", _spec(f"{variant}.luks"), "-c", "write -P 0xaa 0 64k",
                    "-c", "write -z 300k 64k", "-c", "write -P 0x55 513k 5k", "-c", "write -P 0x11 1020k 4k",
                    cwd=images)
        assert r.returncode == 0, r.stderr
    return images


@pytest.mark.parametrize("variant", ["default", "cbc-essiv"])
def test_data_with_key(written: Path, variant: str) -> None:
    """map, check, info (json: name), compare and convert with the key, decrypted as qemu-img does."""
    d, spec = written, _spec(f"{variant}.luks")
    for args in (["map", "--output=json"], ["map"], ["check"], ["info", "--output=json"], ["info"],
                 ["snapshot", "-l"]):
        assert_same([args[0], *SECRET, *args[1:], "--image-opts", spec], d)
    q = qemu_img("convert", *SECRET, "--image-opts", spec, "-O", "raw", f"q-{variant}.raw", cwd=d)
    assert q.returncode == 0, q.stderr
    from tests.conftest import vdkit_img

    v = vdkit_img("convert", *SECRET, "--image-opts", spec, "-O", "raw", f"v-{variant}.raw", cwd=d)
    assert (v.returncode, v.stderr) == (0, "")
    assert (d / f"q-{variant}.raw").read_bytes() == (d / f"v-{variant}.raw").read_bytes()
    assert (d / f"v-{variant}.raw").read_bytes()[:65536] == b"\xaa" * 65536
    assert_same(["compare", *SECRET, "--image-opts", spec, f"driver=raw,file.filename=q-{variant}.raw"], d)
    assert_same(["compare", *SECRET, "--image-opts", spec, "driver=raw,file.filename=src.raw"], d)


def test_key_errors(written: Path) -> None:
    """Wrong passphrase, unknown secret, no key-secret, a key for a file that is not LUKS."""
    d = written
    for args in (["map", "--object", "secret,id=sec0,data=wrong", "--image-opts", _spec("default.luks")],
                 ["map", *SECRET, "--image-opts", _spec("default.luks", "nope")],
                 ["map", *SECRET, "--image-opts", "driver=luks,file.filename=default.luks"],
                 ["map", *SECRET, "--image-opts", _spec("src.raw")],
                 # no driver: the key option makes the format be probed (luks: taken; raw: refused)
                 ["info", *SECRET, "--image-opts", "key-secret=sec0,file.filename=default.luks"],
                 ["map", *SECRET, "--image-opts", "file.filename=src.raw,key-secret=sec0"],
                 ["info", "--object", "secret,id=sec0,data=wrong", "--image-opts", _spec("default.luks", "nope")]):
        assert_same(args, d)


def test_cipher_vdkit_lacks(images: Path) -> None:
    """twofish: qemu-img decrypts, vdkit (AES only, through 'cryptography') says it cannot."""
    from tests.conftest import vdkit_img

    r = vdkit_img("map", *SECRET, "--image-opts", _spec("twofish.luks"), cwd=images)
    assert r.returncode == 1
    assert r.stderr.startswith("vdkit-img: Could not open 'driver=luks,key-secret=sec0,file.filename=twofish.luks': "
                               "vdkit cannot decrypt twofish-256-xts"), r.stderr


# -- create -f luks / convert -O luks ------------------------------------------------------------------

_RANDOM_LINES = ("uuid", "iters", "master key iters", '"uuid"', '"iters"', '"master-key-iters"')


def _masked(text: str, name: str) -> str:
    """info without what is random (UUID) or timed (iteration counts), the file name made common."""
    return "".join(line for line in text.replace(name, "IMG").splitlines(keepends=True)
                   if not line.strip().startswith(_RANDOM_LINES))


CREATE = {
    "default": "",
    "cbc-essiv": ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
    "odd-size": "",
}


@pytest.mark.parametrize("variant", list(CREATE))
def test_create(tmp_path: Path, variant: str) -> None:
    """vdkit's image: the Formatting line, size, layout and info of qemu-img's (random fields aside), and
    qemu-io reads back with the key what it writes."""
    from tests.conftest import qemu_io, vdkit_img

    size = "1000" if variant == "odd-size" else "1M"
    opts = f"key-secret=sec0,iter-time=300{CREATE[variant]}"
    v = vdkit_img("create", "-f", "luks", *SECRET, "-o", opts, "v.luks", size, cwd=tmp_path)
    assert v.returncode == 0, v.stderr
    make(tmp_path, "q.luks", CREATE[variant].lstrip(","), size)
    q = qemu_img_pbkdf("create", "-f", "luks", *SECRET, "-o", opts, "q2.luks", size, cwd=tmp_path)
    assert q.returncode == 0, q.stderr
    assert v.stdout == q.stdout.replace("q2.luks", "v.luks")
    assert (tmp_path / "v.luks").stat().st_size == (tmp_path / "q.luks").stat().st_size
    for args in (["info"], ["info", "--output=json"]):
        qi = qemu_img(*args, "q.luks", cwd=tmp_path)
        vi = qemu_img(*args, "v.luks", cwd=tmp_path)
        assert _masked(vi.stdout, "v.luks") == _masked(qi.stdout, "q.luks")
    r = qemu_io(*SECRET, "--image-opts", _spec("v.luks"), "-c", "write -P 0x77 0 512", "-c", "read -P 0x77 0 512",
                cwd=tmp_path)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr


def test_create_errors(tmp_path: Path) -> None:
    for args in (["create", "-f", "luks", "x.luks", "1M"],
                 ["create", "-f", "luks", *SECRET, "-o", "key-secret=nope", "x.luks", "1M"],
                 ["create", "-f", "luks", "-o", "help"], ["convert", "-O", "luks", "x.raw", "x.luks"]):
        (tmp_path / "x.raw").write_bytes(bytes(4096))
        assert_same(args, tmp_path)
        assert not (tmp_path / "x.luks").exists()


def test_convert_to_luks(images: Path) -> None:
    """convert -O luks: qemu-img reads the data back with the key; zeros are written (encrypted) as qemu-img
    writes them, so the file is allocated alike."""
    from tests.conftest import vdkit_img

    src = images / "pat.raw"
    data = bytearray(1 << 20)
    data[:65536] = b"\xaa" * 65536
    data[700000:705000] = b"\x55" * 5000
    src.write_bytes(bytes(data))
    v = vdkit_img("convert", *SECRET, "-O", "luks", "-o", "key-secret=sec0,iter-time=300", "pat.raw", "cv.luks",
                  cwd=images)
    assert v.returncode == 0, v.stderr
    r = qemu_img("compare", *SECRET, "--image-opts", _spec("cv.luks"), "driver=raw,file.filename=pat.raw", cwd=images)
    assert (r.returncode, r.stdout) == (0, "Images are identical.\n"), r.stdout + r.stderr
    q = qemu_img_pbkdf("convert", *SECRET, "-O", "luks", "-o", "key-secret=sec0,iter-time=300", "pat.raw", "cq.luks",
                       cwd=images)
    assert q.returncode == 0, q.stderr
    assert (images / "cv.luks").stat().st_blocks == (images / "cq.luks").stat().st_blocks


def test_luks_image_as_backing_file(images: Path, tmp_path: Path) -> None:
    """create -b X.luks -F luks: the backing file is opened for its size only (no I/O, no key)."""
    import shutil

    shutil.copy(images / "default.luks", tmp_path / "b.luks")
    assert_same(["create", "-f", "qcow2", "-b", "b.luks", "-F", "luks", "top.qcow2"], tmp_path)
    assert_same(["info", "top.qcow2"], tmp_path)
