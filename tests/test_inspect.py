"""``vdkit-img inspect`` / ``vdkit.block.inspect``: the safety verdict for untrusted images.

Images are made by the real qemu-img (and damaged by hand); every verdict is
cross-checked against what the real tools do with the same file where that
is the point: an image called unsafe for its metadata is one ``qemu-img check``
finds corrupt or ``qemu-img info`` refuses, and a valid modern image (extended
L2, zstd, compressed clusters, snapshots, bitmaps) that qemu-img handles is safe.
Attack files are built so that no real system file is ever named in a write:
a name of the same length is written by qemu-img and patched in afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_img, qemu_img_pbkdf, qemu_io, vdkit_img
from tests.data.generate import set_u64
from vdkit.block.inspect import inspect_image


def _verdict(path: Path, *args: str) -> tuple[int, dict]:
    r = vdkit_img("inspect", "--output=json", *args, str(path))
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    return r.returncode, (json.loads(r.stdout) if r.stdout else {})


def _kinds(doc: dict) -> set[str]:
    return {r["kind"] for r in doc["reasons"]}


@pytest.mark.parametrize("opts", [
    "", "compat=0.10", "extended_l2=on", "compression_type=zstd", "cluster_size=4096,refcount_bits=2",
    "lazy_refcounts=on", "preallocation=metadata",
])
def test_valid_images_are_safe(tmp_path: Path, opts: str) -> None:
    img = tmp_path / "ok.qcow2"
    check_ok("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), str(img), "4M")
    assert qemu_io("-c", "write -P 0x5a 0 256k", "-c", "write -z 1M 64k", str(img)).returncode == 0
    check_ok("snapshot", "-c", "s1", str(img))
    assert qemu_io("-c", "write -P 0x33 64k 64k", str(img)).returncode == 0
    assert qemu_img("check", str(img)).returncode == 0
    rc, doc = _verdict(img)
    assert (rc, doc["verdict"], doc["reasons"], doc["format"]) == (0, "safe", [], "qcow2")
    assert doc["virtual-size"] == 4 << 20


def test_compressed_image_and_raw_are_safe(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x11" * 65536 + bytes(65536) + b"abc" * 30000)
    check_ok("convert", "-c", "-O", "qcow2", str(src), str(tmp_path / "c.qcow2"))
    for name, fmt in (("c.qcow2", "qcow2"), ("src.raw", "raw")):
        rc, doc = _verdict(tmp_path / name, "-f", fmt)
        assert (rc, doc["verdict"], doc["format"]) == (0, "safe", fmt)


def test_backing_file_is_unsafe_and_not_opened(tmp_path: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M")
    check_ok("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(tmp_path / "top.qcow2"))
    (tmp_path / "base.qcow2").unlink()  # never opened: a missing backing file changes nothing
    rc, doc = _verdict(tmp_path / "top.qcow2")
    assert rc == 2 and doc["verdict"] == "unsafe" and _kinds(doc) == {"backing-file"}
    assert "'base.qcow2'" in doc["reasons"][0]["detail"]


def test_json_backing_file_is_unsafe(tmp_path: Path) -> None:
    spec = 'json:{"driver":"raw","file":{"driver":"file","filename":"/dev/sda"}}'
    check_ok("create", "-q", "-f", "qcow2", "-u", "-b", spec, "-F", "raw", str(tmp_path / "j.qcow2"), "1M")
    rc, doc = _verdict(tmp_path / "j.qcow2")
    assert rc == 2 and _kinds(doc) == {"backing-file"} and "/dev/sda" in doc["reasons"][0]["detail"]


def test_data_file_naming_a_system_file_is_unsafe(tmp_path: Path) -> None:
    """qcow2 with ``data_file=/etc/passwd``: qemu-img writes ``xxxx/passwd`` (same length) in a
    scratch folder, the name is patched afterwards, so /etc/passwd itself is never written."""
    (tmp_path / "xxxx").mkdir()
    check_ok("create", "-q", "-f", "qcow2", "-o", "data_file=xxxx/passwd,data_file_raw=on", "evil.qcow2", "1M",
             cwd=tmp_path)
    img = tmp_path / "evil.qcow2"
    raw = img.read_bytes()
    assert raw.count(b"xxxx/passwd") == 1
    img.write_bytes(raw.replace(b"xxxx/passwd", b"/etc/passwd"))
    info = qemu_img("info", "--output=json", "-U", str(img))
    assert json.loads(info.stdout)["format-specific"]["data"]["data-file"] == "/etc/passwd"
    rc, doc = _verdict(img)
    assert rc == 2 and _kinds(doc) == {"data-file"} and "'/etc/passwd'" in doc["reasons"][0]["detail"]


def test_declared_raw_that_is_a_qcow2_is_unsafe(tmp_path: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", str(tmp_path / "up.img"), "1M")
    rc, doc = _verdict(tmp_path / "up.img", "-f", "raw")
    assert rc == 2 and "format-mismatch" in _kinds(doc)
    assert "declared format 'raw', but the content is 'qcow2'" in {r["detail"] for r in doc["reasons"]}


def test_unknown_incompatible_feature_is_unsafe_as_qemu_refuses_it(tmp_path: Path) -> None:
    img = tmp_path / "f.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "1M")
    set_u64(img, 72, 1 << 40)  # incompatible_features: an unknown bit
    q = qemu_img("info", str(img))
    assert q.returncode == 1
    rc, doc = _verdict(img)
    assert rc == 2 and _kinds(doc) == {"invalid-metadata"}
    assert doc["reasons"][0]["detail"] in q.stderr


def test_l1_entry_past_the_end_of_file_is_unsafe_as_check_finds(tmp_path: Path) -> None:
    img = tmp_path / "l1.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "1M")
    assert qemu_io("-c", "write -P 1 0 64k", str(img)).returncode == 0
    l1 = int.from_bytes(img.read_bytes()[40:48], "big")
    set_u64(img, l1, (1 << 63) | (1 << 40))  # an L2 table far past the end of the file
    assert qemu_img("check", str(img)).returncode != 0
    rc, doc = _verdict(img)
    assert rc == 2 and "corrupt-metadata" in _kinds(doc)


def test_corrupt_bit_and_encryption_and_size_limit(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(img), "1M")
    set_u64(img, 72, 2)  # the corrupt bit
    rc, doc = _verdict(img)
    assert rc == 2 and "corrupt-flag" in _kinds(doc)
    enc = tmp_path / "e.qcow2"
    r = qemu_img_pbkdf("create", "-q", "--object", "secret,id=s,data=pw", "-f", "qcow2", "-o",
                       "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=200", str(enc), "1M")
    assert r.returncode == 0, r.stderr
    rc, doc = _verdict(enc)
    assert rc == 2 and _kinds(doc) == {"encrypted"}
    big = tmp_path / "big.qcow2"
    check_ok("create", "-q", "-f", "qcow2", str(big), "2T")
    rc, doc = _verdict(big, "--max-size", "1T")
    assert rc == 2 and _kinds(doc) == {"size-limit"}
    assert _verdict(big, "--max-size", "2T")[0] == 0


def test_human_output_and_unreadable_file(tmp_path: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", str(tmp_path / "t.qcow2"), "1M")
    r = vdkit_img("inspect", str(tmp_path / "t.qcow2"))
    assert r.returncode == 2
    assert r.stdout.splitlines()[-2:] == ["verdict: unsafe", "  backing-file: backing file 'b.qcow2'"]
    r = vdkit_img("inspect", str(tmp_path / "missing.qcow2"))
    assert r.returncode == 1 and "No such file or directory" in r.stderr and r.stdout == ""


def test_library_api(tmp_path: Path) -> None:
    import vdkit

    check_ok("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "1M")
    v = inspect_image(tmp_path / "a.qcow2")
    assert v.safe and v.verdict == "safe" and v.format == "qcow2" and v.virtual_size == 1 << 20
    v = vdkit.inspect(tmp_path / "a.qcow2", "raw", max_virtual_size=1024)
    assert not v.safe and {r.kind for r in v.reasons} == {"format-mismatch", "size-limit"}


def test_declared_format_without_a_probe_signature(tmp_path: Path) -> None:
    """A fixed VHD probes as raw (its footer is at the end): declared vpc, it is parsed as vpc and safe;
    a raw file declared vpc is not a VHD at all, which is a reason."""
    check_ok("create", "-q", "-f", "vpc", "-o", "subformat=fixed", str(tmp_path / "f.vhd"), "4M")
    assert qemu_img("info", "-f", "vpc", str(tmp_path / "f.vhd")).returncode == 0
    rc, doc = _verdict(tmp_path / "f.vhd", "-f", "vpc")
    assert (rc, doc["format"], doc["reasons"]) == (0, "vpc", [])
    (tmp_path / "plain.raw").write_bytes(bytes(1 << 20))
    rc, doc = _verdict(tmp_path / "plain.raw", "-f", "vpc")
    assert rc == 2 and _kinds(doc) == {"invalid-metadata"}


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "monolithicFlat", "twoGbMaxExtentFlat"])
def test_vmdk_extents_of_their_own_kind_are_safe(tmp_path: Path, subformat: str) -> None:
    """Sparse extents probe as vmdk, flat ones as nothing (raw): neither is a reason."""
    img = tmp_path / "d.vmdk"
    check_ok("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(img), "4M")
    assert qemu_io("-c", "write -P 0x5a 0 64k", str(img)).returncode == 0
    rc, doc = _verdict(img)
    assert (rc, doc["verdict"], doc["reasons"], doc["format"]) == (0, "safe", [], "vmdk")


def test_vmdk_extent_of_another_format_is_unsafe(tmp_path: Path) -> None:
    """A flat extent that is a qcow2 image, and a sparse extent that is one: each named by its format."""
    for subformat, name in (("monolithicFlat", "d-flat.vmdk"), ("twoGbMaxExtentSparse", "d-s001.vmdk")):
        img = tmp_path / "d.vmdk"
        check_ok("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", str(img), "4M")
        (tmp_path / name).unlink()
        check_ok("create", "-q", "-f", "qcow2", str(tmp_path / name), "4M")
        rc, doc = _verdict(img)
        reasons = [r for r in doc["reasons"] if r["kind"] == "extent-format"]
        assert doc["verdict"] == "unsafe" and rc != 0, doc
        assert [r["detail"] for r in reasons] == [f"extent '{name}' is itself a qcow2 image"], doc
