"""One algorithm, two table backends: the same writes and snapshot operations give byte-identical images.

vdkit.io.tables' list backend (small images) and numpy's must not only both be correct (the model and
fault-injection suites run on each) but make the same choices: the same clusters allocated, the same
free-cluster hint after a transaction, the same refusals.  A random sequence of guest writes and
snapshot create/delete/revert through the library runs once per backend from the same image; every
step's outcome and the final files must be equal, and ``qemu-img check`` clean.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import check_ok, qemu_io
from tests.diff.test_snapshot_write import check_counts
from vdkit.block.node import open_image
from vdkit.errors import VdkitError
from vdkit.formats.qcow2.snapshot_ops import find_id_then_name
from vdkit.io import tables

SIZE = 256 * 1024

steps_st = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE // 512 - 1), st.integers(1, 200), st.integers(1, 255)),
    st.tuples(st.just("create"), st.booleans()),
    st.tuples(st.just("delete"), st.integers(0, 7)),
    st.tuples(st.just("revert"), st.integers(0, 7)),
), min_size=3, max_size=10)


def _play(img: Path, steps: list[tuple], backend: str, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Run ``steps`` on ``img`` with the table backend forced; each step's outcome."""
    monkeypatch.setattr(tables, "FORCE", backend)
    outcomes: list[object] = []
    names: list[str] = []
    for n, step in enumerate(steps):
        with open_image(str(img), "qcow2", readonly=False) as node:
            try:
                if step[0] == "write":
                    _, sector, nsect, pattern = step
                    off = sector * 512
                    node.write(off, bytes([pattern]) * min(nsect * 512, SIZE - off))
                elif step[0] == "create":
                    name = f"s{n}"
                    node.snapshot_create(name, date_sec=n, date_nsec=0, icount=0,
                                         vm_state=bytes(range(256)) * 3 if step[1] else None)
                    names.append(name)
                elif not names:
                    outcomes.append("skip")
                    continue
                elif step[0] == "delete":
                    node.snapshot_delete(name=names.pop(step[1] % len(names)))
                else:
                    entry = find_id_then_name(node.driver.snapshots(), names[step[1] % len(names)])
                    assert entry is not None
                    node.snapshot_revert(entry)
                outcomes.append("ok")
            except VdkitError as exc:
                outcomes.append(exc.errno)
    return outcomes


@settings(max_examples=int(os.environ.get("VDKIT_PROPERTY_EXAMPLES", "10")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(opts=st.sampled_from(["cluster_size=512,refcount_bits=1", "cluster_size=4k,refcount_bits=2",
                             "cluster_size=4k", "cluster_size=64k,refcount_bits=64",
                             "cluster_size=16k,extended_l2=on", "cluster_size=1k,compat=0.10"]),
       steps=steps_st)
def test_backends_write_the_same_bytes(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                                       opts: str, steps: list[tuple]) -> None:
    d = tmp_path_factory.mktemp("backends")
    base = d / "base.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", opts, str(base), str(SIZE))
    writes = ["-c", "write -P 9 0 40k"]
    if "refcount_bits=1," not in opts + "," and "refcount_bits=2," not in opts + ",":
        writes += ["-c", "write -c -P 8 192k 64k"]  # (compressed clusters share hosts: counts above 3)
    assert qemu_io(*writes, str(base)).returncode == 0
    results = {}
    for backend in ("small", "numpy"):
        img = d / f"{backend}.qcow2"
        shutil.copy(base, img)
        with monkeypatch.context() as m:
            results[backend] = _play(img, steps, backend, m)
        assert check_counts(img) == (0, {"corruptions": 0, "leaks": 0, "check-errors": 0})
    assert results["small"] == results["numpy"]
    assert (d / "small.qcow2").read_bytes() == (d / "numpy.qcow2").read_bytes()
