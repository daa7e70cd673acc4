"""Property tests for qcow2 check/repair: random damage, then repair must restore a clean image.

Hypothesis picks an image geometry (cluster size, refcount width), some
guest writes and a handful of refcount/flag damages; ``check(driver, "all")``
must then leave an image that ``qemu-img check`` finds clean and whose guest
data is unchanged.  A second property checks the counting itself: a
read-only check of an intact image finds nothing and agrees with qemu-img's
allocation statistics.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import check_ok, qemu_img, qemu_io
from tests.diff.test_check import Img, raw_data
from vdkit.block.node import open_image
from vdkit.formats.qcow2.check import check

GEOMETRY = st.tuples(st.sampled_from([512, 4096, 65536]), st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
WRITES = st.lists(st.tuples(st.integers(0, 63), st.booleans()), min_size=1, max_size=6, unique_by=lambda w: w[0])
DAMAGE = st.lists(st.tuples(st.sampled_from(["leak", "high", "low", "copied"]), st.integers(0, 10**6)),
                  min_size=1, max_size=3)


def build(tmp: Path, cluster_size: int, bits: int, writes: list[tuple[int, bool]]) -> Path:
    path = tmp / "p.qcow2"
    check_ok("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size},refcount_bits={bits}",
             str(path), "4M")
    cmds: list[str] = []
    for slot, compressed in writes:
        off = slot * 65536
        if compressed and cluster_size == 65536:
            cmds += ["-c", f"write -c -P {slot + 1} {off} 64k"]
        else:
            cmds += ["-c", f"write -P {slot + 1} {off} 4k"]
    r = qemu_io("-f", "qcow2", *cmds, str(path))
    assert r.returncode == 0, r.stderr
    return path


def data_clusters(img: Img) -> list[int]:
    out = []
    for i in range(img.l1_size):
        l2 = img.l2_offset(i)
        if not l2:
            continue
        for j in range(img.cs // 8):
            e = img.u64(l2 + 8 * j)
            if e and not e & (1 << 62):
                out.append((e & 0x00FFFFFFFFFFFE00) // img.cs)
    return out


def damage(img: Img, kind: str, pick: int) -> None:
    clusters = data_clusters(img)
    if kind == "leak" or not clusters:
        img.set_refcount(img.append_cluster(), 1)
        return
    c = clusters[pick % len(clusters)]
    if kind == "high" and img.rbits > 1:
        img.set_refcount(c, 2)
    elif kind == "low":
        img.set_refcount(c, 0)
    else:  # flip the COPIED flag of the first L2 entry pointing at c
        l2 = img.l2_offset(0)
        for j in range(img.cs // 8):
            e = img.u64(l2 + 8 * j)
            if (e & 0x00FFFFFFFFFFFE00) // img.cs == c and e:
                img.put64(l2 + 8 * j, e ^ (1 << 63))
                break


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry=GEOMETRY, writes=WRITES, damages=DAMAGE)
def test_repair_all_restores_clean_image(geometry: tuple[int, int], writes: list[tuple[int, bool]],
                                         damages: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = build(tmp, *geometry, writes)
        before = raw_data(path)
        img = Img(path)
        for kind, pick in damages:
            damage(img, kind, pick)
        lines: list[str] = []
        with open_image(str(path), readonly=False, check_mode=True) as node:
            result = check(node.driver, "all", lines.append)  # type: ignore[arg-type]
        assert result.error == 0 and result.check_errors == 0, lines
        after = qemu_img("check", str(path))
        assert after.returncode == 0, after.stdout + after.stderr + "\n".join(lines)
        assert raw_data(path) == before


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry=GEOMETRY, writes=WRITES)
def test_clean_image_counts_match_qemu(geometry: tuple[int, int], writes: list[tuple[int, bool]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = build(Path(d), *geometry, writes)
        q = json.loads(check_ok("check", "--output=json", str(path)).stdout)
        lines: list[str] = []
        with open_image(str(path), check_mode=True) as node:
            r = check(node.driver, None, lines.append)  # type: ignore[arg-type]
        assert not lines and r.corruptions == r.leaks == r.check_errors == 0
        assert r.image_end_offset == q.get("image-end-offset", 0)
        assert r.allocated_clusters == q.get("allocated-clusters", 0)
        assert r.fragmented_clusters == q.get("fragmented-clusters", 0)
        assert r.compressed_clusters == q.get("compressed-clusters", 0)
        assert r.total_clusters == q["total-clusters"]
