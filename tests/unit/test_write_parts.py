"""``ImageFile.write_parts``: buffers and :class:`FileBytes` (bytes also found in another open file,
which the kernel copies with ``copy_file_range`` on a file system that shares extents) written back to
back, against the plain definition: the file then holds the parts' bytes one after another; elsewhere,
or where the kernel refuses the copy (another file system, an old kernel), the part's own bytes are
written, and after a refusal later parts no longer try it."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.io.file import FileBytes, ImageFile

_SOURCE = bytes(range(256)) * 64  # 16 KiB: every offset's byte differs from its neighbours'


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.tuples(st.booleans(), st.integers(0, len(_SOURCE)), st.integers(0, 5000)), max_size=8),
       start=st.integers(0, 9000), refuse=st.sampled_from([None, errno.EXDEV, errno.ENOSYS, errno.EINVAL]),
       sharing=st.booleans())
def test_write_parts_writes_the_parts_back_to_back(parts: list[tuple[bool, int, int]], start: int,
                                                   refuse: int | None, sharing: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "src"
        src.write_bytes(_SOURCE)
        before = bytes([0xEE]) * 20000
        (Path(d) / "dst").write_bytes(before)
        fd = os.open(src, os.O_RDONLY)
        f = ImageFile(Path(d) / "dst", readonly=False)
        f.shares_extents = lambda: sharing  # type: ignore[method-assign]  # (as XFS or btrfs would say)
        real, calls = os.copy_file_range, []

        def copy_file_range(*args: int) -> int:
            calls.append(args)
            if refuse is not None:
                raise OSError(refuse, os.strerror(refuse))
            return real(*args)

        try:
            os.copy_file_range = copy_file_range  # type: ignore[assignment]  # (restored below)
            want = bytearray(before)
            pos = start
            written: list[bytes | bytearray | memoryview | FileBytes] = []
            for in_file, offset, length in parts:
                data = _SOURCE[offset : offset + length]
                view = memoryview(bytearray(data))
                written.append(FileBytes(view, fd, offset) if in_file else view)
                want[pos : pos + len(data)] = data
                pos += len(data)
            f.write_parts(start, written)
        finally:
            os.copy_file_range = real
            f.close()
            os.close(fd)
        assert (Path(d) / "dst").read_bytes() == bytes(want)
        copies = [p for p in written if type(p) is FileBytes and len(p)]
        # every file part went through the kernel while it could, then none tried it again
        assert len(calls) == (0 if not sharing else min(1, len(copies)) if refuse else len(copies))


def test_shares_extents_by_file_system(tmp_path: Path) -> None:
    """Only file systems whose copy_file_range can share extents (or copy server-side) take it: the
    answer follows the folder's file system type as coreutils' ``stat -f`` reports it."""
    import subprocess

    (tmp_path / "f").touch()
    fs_type = int(subprocess.run(["stat", "-f", "-c", "%t", str(tmp_path)], capture_output=True, text=True,
                                 check=True).stdout, 16)
    sharing = {0x58465342, 0x9123683E, 0xCA451A4E, 0x2FC12FC1, 0x7461636F, 0x6969, 0xFE534D42, 0xFF534D42}
    with ImageFile(tmp_path / "f") as f:
        assert f.shares_extents() == (fs_type in sharing)


def test_write_parts_reports_other_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure of the copy itself (EIO, ENOSPC) is the write's failure, not a reason to write otherwise."""
    (tmp_path / "src").write_bytes(_SOURCE)
    (tmp_path / "dst").touch()
    f = ImageFile(tmp_path / "dst", readonly=False)
    f.shares_extents = lambda: True  # type: ignore[method-assign]
    fd = os.open(tmp_path / "src", os.O_RDONLY)

    def fail(*args: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", fail)
    try:
        with pytest.raises(OSError) as e:
            f.write_parts(0, [FileBytes(memoryview(_SOURCE), fd, 0)])
        assert e.value.errno == errno.EIO
    finally:
        f.close()
        os.close(fd)
