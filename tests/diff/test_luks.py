"""LUKS-encrypted qcow2: `info` agrees with qemu-img across cipher choices; broken headers fail cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok, qemu_img_pbkdf, vdkit_img

CIPHERS = [
    "",
    "encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
    "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512",
    "encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha1",
    "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
]


def _make(workdir: Path, name: str, extra: str) -> Path:
    opts = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=200"
    if extra:
        opts += "," + extra
    r = qemu_img_pbkdf("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o", opts, name, "16M",
                       cwd=workdir)
    assert r.returncode == 0, r.stderr
    return workdir / name


@pytest.mark.parametrize("extra", CIPHERS)
def test_luks_info_matches(workdir: Path, extra: str) -> None:
    _make(workdir, "enc.qcow2", extra)
    for args in (["info", "enc.qcow2"], ["info", "--output=json", "enc.qcow2"]):
        q = assert_same(args, workdir)
        assert q.returncode == 0
        assert "encrypt" in q.stdout


def test_legacy_aes(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
             "encrypt.format=aes,encrypt.key-secret=s0,compat=0.10", "aes.qcow2", "16M", cwd=workdir)
    assert_same(["info", "aes.qcow2"], workdir)
    assert_same(["info", "--output=json", "aes.qcow2"], workdir)


@pytest.mark.parametrize("patch", ["magic", "version", "cipher", "truncate"])
def test_broken_luks_header_is_a_clean_error(workdir: Path, patch: str) -> None:
    img = _make(workdir, "enc.qcow2", "")
    data = bytearray(img.read_bytes())
    luks_off = data.find(b"LUKS\xba\xbe")
    assert luks_off > 0
    if patch == "magic":
        data[luks_off] = ord("X")
    elif patch == "version":
        data[luks_off + 6 : luks_off + 8] = b"\x00\x07"
    elif patch == "cipher":
        data[luks_off + 8 : luks_off + 40] = b"rot13".ljust(32, b"\0")
    else:
        data = data[: luks_off + 100]
    img.write_bytes(bytes(data))
    r = vdkit_img("info", "enc.qcow2", cwd=workdir)
    assert r.returncode == 1
    assert r.stderr.startswith("vdkit-img: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr


@pytest.mark.parametrize(
    ("pos", "value"),
    [
        (0, b"XUKS"),
        (6, b"\x00\x02"),
        (8, b"ae".ljust(32, b"\0")),
        (40, b"xtsplain64".ljust(32, b"\0")),
        (40, b"xts-plain6".ljust(32, b"\0")),
        (40, b"foo-plain64".ljust(32, b"\0")),
        (40, b"cbc-essiv:sha7".ljust(32, b"\0")),
        (72, b"sha257".ljust(32, b"\0")),
    ],
    ids=["magic", "version", "cipher", "mode-format", "ivgen", "mode", "ivgen-hash", "hash"],
)
def test_damaged_luks_fields_match_qemu(workdir: Path, pos: int, value: bytes) -> None:
    """Each damaged LUKS field is reported with qemu-img's words, in qemu-img's order of checks."""
    img = _make(workdir, "enc.qcow2", "")
    data = bytearray(img.read_bytes())
    luks_off = data.find(b"LUKS\xba\xbe")
    data[luks_off + pos : luks_off + pos + len(value)] = value
    img.write_bytes(bytes(data))
    q = assert_same(["info", "enc.qcow2"], workdir)
    assert q.returncode == 1
