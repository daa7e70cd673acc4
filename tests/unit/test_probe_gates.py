"""Probing skips a format only when its probe could not have changed the answer (registry.PROBE_GATES).

The gates exist for start-up cost (a format module is imported only when its magic is there), so they
repeat a little of each probe's knowledge; these tests hold the two together: with any head and file
name, a closed gate means a zero score, and probing with the gates answers what asking every format
answers.  Heads come from hypothesis (random bytes around every format's magic) and from images the
real qemu-img created.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import qemu_img_pbkdf
from vdkit.formats import registry

# Every gate's byte strings at their offsets, plus near misses (one byte changed) and real first lines.
_MAGICS: list[tuple[int, bytes]] = [
    (gate[0], prefix + extra)
    for gate in registry.PROBE_GATES.values() if isinstance(gate, tuple)
    for prefix in gate[1]
    for extra in (b"", b"\0\0\0\2", b"\0\0\0\3", b"\x02\x00\x00\x00")
] + [(0, b"version=1\n"), (0, b"# Disk DescriptorFile\nversion=1\n"), (0, b"  \r\nversion=3\r\n"),
     (0, b"Bochs Virtual HD Image\0" + b"\0" * 9 + b"Redolog\0" + b"\0" * 8 + b"Growing\0" + b"\0" * 8 + b"\0\0\1\0"),
     (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")]


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    head = bytearray(draw(st.binary(min_size=0, max_size=registry.PROBE_SIZE)))
    for _ in range(draw(st.integers(0, 2))):
        offset, magic = draw(st.sampled_from(_MAGICS))
        if draw(st.booleans()) and magic:
            i = draw(st.integers(0, len(magic) - 1))
            magic = magic[:i] + bytes([magic[i] ^ draw(st.integers(1, 255))]) + magic[i + 1:]
        head[offset:offset + len(magic)] = magic
    return bytes(head[:registry.PROBE_SIZE])


def _ungated(head: bytes, filename: str, monkeypatch: pytest.MonkeyPatch) -> str:
    with monkeypatch.context() as m:
        m.setattr(registry, "may_probe", lambda name, head, filename: True)
        return registry.probe_format(head, filename)


def _holds(head: bytes, filename: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in registry.FORMATS:
        if name != "raw" and not registry.may_probe(name, head, filename):
            assert registry.format_module(name).probe(head, filename) == 0, (name, head[:80])
    assert registry.probe_format(head, filename) == _ungated(head, filename, monkeypatch)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=heads(), filename=st.sampled_from(["", "x.img", "x.dmg", "x.qcow2"]))
def test_closed_gate_means_zero_score(head: bytes, filename: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _holds(head, filename, monkeypatch)


_CREATE = [("raw", []), ("qcow2", []), ("qcow2", ["-o", "compat=0.10"]), ("qcow", []), ("vmdk", []),
           ("vmdk", ["-o", "subformat=streamOptimized"]), ("vmdk", ["-o", "subformat=monolithicFlat"]),
           ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]), ("vdi", []), ("vhdx", []), ("vpc", []),
           ("vpc", ["-o", "subformat=fixed"]), ("qed", []), ("parallels", []),
           ("luks", ["--object", "secret,id=s,data=pw", "-o", "key-secret=s,iter-time=100"])]


@pytest.mark.parametrize(("fmt", "opts"), _CREATE, ids=[f"{f}{'-' + o[-1] if o else ''}" for f, o in _CREATE])
def test_real_heads(tmp_path: Path, fmt: str, opts: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / f"a.{fmt}"
    r = qemu_img_pbkdf("create", "-q", "-f", fmt, *opts, str(img), "4M")  # (luks: key material)
    assert r.returncode == 0, r.stderr
    head = img.read_bytes()[:registry.PROBE_SIZE]
    _holds(head, str(img), monkeypatch)
    expected = "raw" if fmt == "vpc" and opts else fmt  # a fixed VHD has its footer at the end only
    assert registry.probe_format(head, str(img)) == expected


def test_info_of_qcow2_imports_one_format() -> None:
    """The point of the gates: probing a qcow2 image imports the qcow2 package and no other format's."""
    code = ("import sys; from vdkit.formats import registry;"
            "print(registry.probe_format(b'QFI\\xfb\\0\\0\\0\\3' + bytes(2040), 'a.img'));"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('vdkit.formats.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "qcow2"
    assert out[1].split() == ["vdkit.formats.qcow2", "vdkit.formats.registry"]
