"""Renderers: human sizes, QDict key order and JSON escaping, each checked against qemu-img's output."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import require_tool
from tests.data import generate as g
from tests.data.compare import run_qemu, run_vdkit
from vdkit.info import model
from vdkit.info.render_human import size_to_str, snapshot_row
from vdkit.info.render_json import dumps_compact, dumps_pretty, qdict_bucket, qdict_order, quote
from vdkit.record import fields

# cli-output.md §0.1, verified renderings
SIZE_TABLE = [
    (0, "0 B"), (512, "512 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (999424, "976 KiB"),
    (1022976, "999 KiB"), (1023488, "1e+03 KiB"), (1024000, "0.977 MiB"), (1047552, "0.999 MiB"),
    (1048576, "1 MiB"), (1234568192, "1.15 GiB"), (1073741824, "1 GiB"), (1099511627776, "1 TiB"),
    (479577, "468 KiB"),
]


@pytest.mark.parametrize(("value", "text"), SIZE_TABLE)
def test_size_to_str_table(value: int, text: str) -> None:
    assert size_to_str(value) == text


def test_size_to_str_against_qemu_img(tmp_path: Path) -> None:
    """Virtual sizes of qcow2 images as qemu-img renders them, including the %g edge cases."""
    require_tool("qemu-img")
    sizes = [512, 1000 * 512, 1023 * 1024, 1023 * 1024 + 512, 1048064, 1536 * 1024 * 1024, 10**12 // 512 * 512,
             (1 << 40) - 512, 999 * (1 << 30), 1000 * (1 << 30), 1023 * (1 << 40), (1 << 50), 3 * (1 << 50),
             (1 << 60) // 4096 * 4096, 2047 * (1 << 40) + 5 * (1 << 30)]
    for i, size in enumerate(sizes):
        name = f"s{i}.qcow2"
        g.create(tmp_path, name, size, options=["cluster_size=2M"] if size > (1 << 50) else [])
        out = run_qemu(["info", name], tmp_path).stdout
        m = re.search(r"^virtual size: (.*) \((\d+) bytes\)$", out, re.M)
        assert m is not None, out
        assert size_to_str(int(m.group(2))) == m.group(1)


@given(st.integers(min_value=0, max_value=2**63 - 1))
@settings(max_examples=300, deadline=None)
def test_size_to_str_shape(value: int) -> None:
    """Always "<number> <prefix>B" with at most 3 significant digits."""
    m = re.fullmatch(r"(\d+(\.\d+)?|\de\+03) (|Ki|Mi|Gi|Ti|Pi|Ei)B", size_to_str(value))
    assert m is not None, size_to_str(value)


def test_snapshot_row_pads_bytes_not_characters() -> None:
    sn = model.SnapshotInfo(id="1", name="ü", vm_state_size=0, date_sec=0, date_nsec=0, vm_clock_sec=0,
                            vm_clock_nsec=0, icount=None)
    row = snapshot_row(sn)
    assert row.startswith("1         ü" + " " * 14 + " ")
    assert row.endswith(" " * 11)


# -- QDict order -----------------------------------------------------------------------------

def _schema_order(cls: type) -> list[str]:
    names = getattr(cls, "__qapi_order__", None) or list(fields(cls))
    return [n.rstrip("_").replace("_", "-") for n in names]


def _printed_orders(value: Any, cls: type, out: list[tuple[list[str], list[str]]]) -> None:
    """(printed key order, schema order of those keys) for every object in a qemu-img JSON document."""
    schema = _schema_order(cls)
    keys = list(value)
    out.append((keys, [k for k in schema if k in value]))
    children = {"snapshots": model.SnapshotInfo, "format-specific": model.ImageInfoSpecific}
    for key, sub_cls in children.items():
        if key in value:
            items = value[key] if isinstance(value[key], list) else [value[key]]
            for item in items:
                _printed_orders(item, sub_cls, out)
    if cls is model.ImageInfoSpecific:
        _printed_orders(value["data"], model.ImageInfoSpecificQcow2, out)
    if cls is model.ImageInfoSpecificQcow2 and "bitmaps" in value:
        for b in value["bitmaps"]:
            _printed_orders(b, model.Qcow2BitmapInfo, out)


def test_qdict_order_matches_qemu_img(tmp_path: Path) -> None:
    require_tool("qemu-img")
    g.create(tmp_path, "base.raw", "1M", fmt="raw")
    img = g.create(tmp_path, "t.qcow2", "1M", backing="base.raw", backing_fmt="raw",
                   options=["lazy_refcounts=on", "extended_l2=on"])
    g.snapshot(img, "-c", "s")
    g.bitmap_add(img, "b", granularity="128k")
    g.create(tmp_path, "d.qcow2", "1M", options=["data_file=d.raw", "data_file_raw=on", "compat=1.1"])
    pairs: list[tuple[list[str], list[str]]] = []
    for name in ("t.qcow2", "d.qcow2", "base.raw"):
        q = run_qemu(["info", "--output=json", name], tmp_path)
        assert q.returncode == 0, q.stderr
        _printed_orders(json.loads(q.stdout), model.ImageInfo, pairs)
    assert len(pairs) >= 8
    for printed, schema in pairs:
        assert sorted(printed) == sorted(schema), (printed, schema)
        assert qdict_order(schema) == printed


def test_qdict_same_bucket_latest_first() -> None:
    """Keys sharing a bucket come out most recently inserted first."""
    by_bucket: dict[int, list[str]] = {}
    for i in range(5000):
        key = f"k{i}"
        by_bucket.setdefault(qdict_bucket(key), []).append(key)
    a, b = next(v for v in by_bucket.values() if len(v) >= 2)[:2]
    assert qdict_order([a, b]) == [b, a]
    assert qdict_order([b, a]) == [a, b]


def test_empty_containers_pretty() -> None:
    assert dumps_pretty({"a": [], "b": {}}).count("[\n    ]") == 1
    assert dumps_pretty([]) == "[\n]"
    assert dumps_compact({"x": [1, {"y": True}]}) == '{"x": [1, {"y": true}]}'


# -- JSON string escaping ----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "escaped"), [
    ("plain", '"plain"'),
    ('q"b\\', '"q\\"b\\\\"'),
    ("\b\f\n\r\t", '"\\b\\f\\n\\r\\t"'),
    ("\x01\x1f", '"\\u0001\\u001F"'),
    ("\x7f", '"\\u007F"'),
    ("é", '"\\u00E9"'),
    ("€", '"\\u20AC"'),
    ("𝄞", '"\\uD834\\uDD1E"'),
    ("\U0010ffff", '"\\uDBFF\\uDFFF"'),
    ("a\udcffb", '"a\\uFFFDb"'),
    ("/", '"/"'),
])
def test_quote(text: str, escaped: str) -> None:
    assert quote(text) == escaped


def test_escaping_matches_qemu_img(tmp_path: Path) -> None:
    """Snapshot names with every kind of character, printed by both tools in JSON."""
    require_tool("qemu-img")
    img = g.create(tmp_path, "esc.qcow2", "1M")
    names = ["\x01\x02\x1b[31m", "\x7f\u0080\u00ff", "tab\tnl\ncr\r", 'q"\\/', "€𝄞\U0010fffd", "\b\f"]
    for n in names:
        g.snapshot(img, "-c", n)
    g.snapshot(img, "-c", "bad-\udcfe")
    q = run_qemu(["info", "--output=json", "esc.qcow2"], tmp_path)
    v = run_vdkit(["info", "--output=json", "esc.qcow2"], tmp_path)
    assert q.returncode == 0, q.stderr
    assert v.stdout == q.stdout
    got = [s["name"] for s in json.loads(q.stdout)["snapshots"]]
    assert got[:-1] == names and got[-1] == "bad-\ufffd"
