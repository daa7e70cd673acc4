"""``vdkit-img compare`` against ``qemu-img compare``: messages, offsets and exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import assert_same, check_ok
from tests.diff.io_corpus import KINDS, build
from tests.helpers.qemu_io import qio


@pytest.mark.parametrize("kind", KINDS)
def test_compare_with_its_conversion(workdir: Path, kind: str) -> None:
    src = build(kind, workdir)
    check_ok("convert", "-O", "raw", src, "flat.raw", cwd=workdir)
    assert_same(["compare", src, "flat.raw"], workdir)
    assert_same(["compare", "-s", src, "flat.raw"], workdir)
    assert_same(["compare", "-p", "flat.raw", src], workdir)
    # one changed sector in the middle, then a change in the first sector
    qio("flat.raw", ["write -P 0xee 1050k 512"], workdir, fmt="raw")
    assert_same(["compare", src, "flat.raw"], workdir)
    assert_same(["compare", "-q", src, "flat.raw"], workdir)
    qio("flat.raw", ["write -P 0xee 0 1"], workdir, fmt="raw")
    assert_same(["compare", "-F", "raw", src, "flat.raw"], workdir)


def test_compare_sizes(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "a.qcow2", "1M", cwd=workdir)
    qio("a.qcow2", ["write -P 1 0 64k"], workdir)
    check_ok("create", "-q", "-f", "qcow2", "b.qcow2", "3M", cwd=workdir)
    qio("b.qcow2", ["write -P 1 0 64k", "write -z 1M 1M"], workdir)
    assert_same(["compare", "a.qcow2", "b.qcow2"], workdir)  # larger tail is zero: identical + warning
    assert_same(["compare", "-s", "a.qcow2", "b.qcow2"], workdir)
    assert_same(["compare", "-p", "b.qcow2", "a.qcow2"], workdir)
    qio("b.qcow2", ["write -P 2 2M 4k"], workdir)
    assert_same(["compare", "a.qcow2", "b.qcow2"], workdir)
    assert_same(["compare", "b.qcow2", "a.qcow2"], workdir)


def test_compare_unallocated_vs_allocated_zero(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "u.qcow2", "2M", cwd=workdir)
    check_ok("create", "-q", "-f", "qcow2", "d.qcow2", "2M", cwd=workdir)
    qio("d.qcow2", ["write -P 0 0 1M", "write -P 3 1536k 1"], workdir)
    assert_same(["compare", "u.qcow2", "d.qcow2"], workdir)
    assert_same(["compare", "d.qcow2", "u.qcow2"], workdir)
    assert_same(["compare", "-s", "d.qcow2", "u.qcow2"], workdir)


def test_compare_errors(workdir: Path) -> None:
    check_ok("create", "-q", "-f", "qcow2", "a.qcow2", "1M", cwd=workdir)
    assert_same(["compare", "a.qcow2"], workdir)
    assert_same(["compare", "a.qcow2", "missing.qcow2"], workdir)
    assert_same(["compare", "missing.qcow2", "a.qcow2"], workdir)
    assert_same(["compare", "-f", "raw", "a.qcow2", "a.qcow2"], workdir)
    assert_same(["compare", "-f", "foo", "a.qcow2", "a.qcow2"], workdir)
