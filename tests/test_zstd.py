"""zstd-compressed clusters read through the library, as qemu-img 7.2 always reads them.

``zstandard`` is a required dependency; where it is missing vdkit uses the standard library's
``compression.zstd`` (Python 3.14+).  The second path is exercised here through ``backports.zstd``, the
same API on older interpreters, by hiding ``zstandard``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from tests.conftest import check_ok, qemu_io
from vdkit.errors import VdkitError
from vdkit.formats.qcow2 import layout as L
from vdkit.formats.qcow2 import zstd_codec
from vdkit.formats.qcow2.io import compress_cluster, decompress_cluster

if sys.version_info >= (3, 14):
    from compression import zstd as stdlib_zstd  # type: ignore[import-not-found, unused-ignore]
else:
    from backports import zstd as stdlib_zstd


def _text(n: int, seed: int) -> bytes:
    """Compressible but not trivial data (words from a small vocabulary)."""
    rng = random.Random(seed)
    words = [b"qcow2", b"cluster", b"zstd", b"refcount", b"snapshot", b"L2", b"\x00" * 7, b"\xff\x01"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + bytes([rng.randrange(256)])
    return bytes(out[:n])


@pytest.fixture(params=["zstandard", "stdlib"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the ``zstandard`` package, or with it hidden and ``compression.zstd``'s API."""
    if request.param == "stdlib":
        monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError
        monkeypatch.setattr(zstd_codec, "_stdlib", lambda: stdlib_zstd)
    return str(request.param)


@pytest.mark.parametrize("cluster_size", [4096, 65536, 2 * 1024 * 1024])
def test_library_reads_zstd_image(tmp_path: Path, codec: str, cluster_size: int) -> None:
    """Images qemu-img and qemu-io compressed with zstd read back as the data that went in."""
    import vdkit

    size = 4 * cluster_size + 3 * 65536
    raw = bytearray(_text(size, cluster_size))
    raw[cluster_size:2 * cluster_size] = bytes(cluster_size)  # left unallocated by convert
    src = tmp_path / "src.raw"
    src.write_bytes(raw)
    img = tmp_path / "z.qcow2"
    check_ok("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type=zstd,cluster_size={cluster_size}",
             str(src), str(img))
    info = check_ok("info", str(img)).stdout
    assert "compression type: zstd" in info
    # qemu-io compresses one more cluster (pattern 0x5a) into that hole
    r = qemu_io("-c", f"write -c -P 0x5a {cluster_size} {cluster_size}", str(img))
    assert r.returncode == 0, r.stdout + r.stderr
    raw[cluster_size:2 * cluster_size] = b"\x5a" * cluster_size
    with vdkit.open(img) as node:
        assert node.read(0, size) == bytes(raw)
        assert node.read(2 * cluster_size - 100, 200) == bytes(raw[2 * cluster_size - 100:2 * cluster_size + 100])


def test_library_writes_zstd_clusters(tmp_path: Path, codec: str) -> None:
    """vdkit's compressed writes on a zstd image are read back by qemu-io (and the check is clean)."""
    import vdkit

    img = tmp_path / "w.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", str(img), "1M")
    data = _text(65536, 7)
    with vdkit.open(img, readonly=False) as node:
        node.driver.io.write_compressed(65536, data)  # type: ignore[attr-defined]
    r = qemu_io("-c", "read -P 0x00 0 64k", str(img))
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out.raw"
    check_ok("convert", "-O", "raw", str(img), str(out))
    assert out.read_bytes()[65536:131072] == data
    assert check_ok("check", str(img)).stdout.startswith("No errors were found on the image.\n")


def test_cluster_across_frames_and_trailing_bytes(codec: str) -> None:
    """A cluster may be stored as several frames; bytes after the cluster's end (the rest of the last
    sector) are never decoded; a cut-off frame is a short cluster, refused with EIO."""
    data = _text(65536, 3)
    frames = stdlib_zstd.compress(data[:20000]) + stdlib_zstd.compress(data[20000:])
    assert decompress_cluster(frames + b"\xde\xad" * 300, 65536, L.CompressionType.ZSTD) == data
    one = compress_cluster(data, L.CompressionType.ZSTD)
    assert decompress_cluster(one + b"garbage", 65536, L.CompressionType.ZSTD) == data
    with pytest.raises(VdkitError) as e:
        decompress_cluster(one[: len(one) // 2], 65536, L.CompressionType.ZSTD)
    assert e.value.errno == 5
    with pytest.raises(VdkitError) as e:
        decompress_cluster(b"\x00" * 512, 65536, L.CompressionType.ZSTD)
    assert str(e.value).startswith("Could not decompress cluster") and e.value.errno == 5


def test_both_codecs_write_the_same_frame() -> None:
    """zstandard and compression.zstd both wrap libzstd: the frame vdkit writes does not depend on which."""
    data = _text(65536, 11)
    assert zstd_codec.compress(data) == stdlib_zstd.compress(data, level=3)


def test_no_codec_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)
    monkeypatch.setattr(zstd_codec, "_stdlib", lambda: None)
    with pytest.raises(VdkitError, match="zstandard"):
        decompress_cluster(b"", 512, L.CompressionType.ZSTD)


def test_zstandard_is_a_required_dependency() -> None:
    """``pip install vdkit`` (no extra) installs what reading zstd clusters needs."""
    import importlib.metadata
    import tomllib

    from tests.conftest import ROOT

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("zstandard") for d in deps)
    assert "zstandard>=0.21" in (importlib.metadata.requires("vdkit") or [])
