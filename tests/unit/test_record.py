"""vdkit.record behaves like the dataclasses it replaces on the start-up path (stdlib as the oracle)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit import record as rec

NAMES = ["a", "b", "c", "d", "e", "f"]


def _declare(decorate, field_fn, specs: list[tuple[str, str]], frozen: bool):  # type: ignore[no-untyped-def]
    """A class with fields ``specs``: (name, kind) with kind in required/default/factory/hidden."""
    ns: dict[str, object] = {"__annotations__": {}}
    for name, kind in specs:
        ns["__annotations__"][name] = "int"  # type: ignore[index]
        if kind == "default":
            ns[name] = len(name)
        elif kind == "factory":
            ns[name] = field_fn(default_factory=list)
        elif kind == "hidden":
            ns[name] = field_fn(default=None, repr=False)
    return decorate(frozen=frozen)(type("Shape", (), ns))


specs_strategy = st.lists(
    st.sampled_from(["required", "default", "factory", "hidden"]), min_size=0, max_size=len(NAMES)
).map(lambda kinds: list(zip(NAMES, sorted(kinds, key=lambda k: k != "required"), strict=False)))


@settings(max_examples=150, deadline=None)
@given(specs=specs_strategy, frozen=st.booleans(), values=st.lists(st.integers(-5, 5), min_size=6, max_size=6))
def test_record_matches_dataclass(specs: list[tuple[str, str]], frozen: bool, values: list[int]) -> None:
    dc = _declare(dataclasses.dataclass, dataclasses.field, specs, frozen)
    rc = _declare(rec.record, rec.field, specs, frozen)
    required = [n for n, k in specs if k == "required"]
    args = dict(zip(required, values, strict=False))
    d1, r1 = dc(**args), rc(**args)
    assert repr(r1) == repr(d1)
    assert rec.fields(rc) == tuple(f.name for f in dataclasses.fields(dc))
    assert {n: getattr(r1, n) for n in rec.fields(r1)} == dataclasses.asdict(d1)
    # positional construction and value semantics
    d2, r2 = dc(*values[: len(required)]), rc(*values[: len(required)])
    assert (r1 == r2) == (d1 == d2)
    assert r1 != d1  # different classes never compare equal
    if frozen:
        if all(k != "factory" for _, k in specs):  # lists are unhashable, as with dataclasses
            assert hash(r1) == hash(rc(**args)) == hash(d1)
        with pytest.raises(AttributeError):
            r1.a = 1  # type: ignore[attr-defined]
    else:
        assert rc.__hash__ is None
    changed = {n: 99 for n, _ in specs[:1]}
    assert repr(rec.replace(r1, **changed)) == repr(dataclasses.replace(d1, **changed))
    # factories give each instance its own object
    for name, kind in specs:
        if kind == "factory":
            assert getattr(r1, name) is not getattr(r2, name)
    # classes built often switch to a compiled __init__: same results either way
    for i in range(rec._COMPILE_AFTER + 3):
        kw = {n: i for n in required} | {n: -i for n, k in specs if k == "default" and i % 2}
        assert repr(rc(**kw)) == repr(dc(**kw))
        positional = [i] * len(required)
        assert repr(rc(*positional)) == repr(dc(*positional))
    with pytest.raises(TypeError):
        rc(*values, 1, 2, 3, 4, 5, 6, 7)
    with pytest.raises(TypeError):
        rc(**args, zz=1)


def test_record_errors_match_dataclass() -> None:
    with pytest.raises(TypeError):
        _declare(rec.record, rec.field, [("a", "default"), ("b", "required")], False)

    @rec.record
    class P:
        x: int
        y: int = 2

    for _ in range(rec._COMPILE_AFTER + 2):  # generic, then compiled __init__
        with pytest.raises(TypeError):
            P()  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            P(1, z=3)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            P(1, x=3)  # type: ignore[misc]
        assert P(1) == P(1, 2) and P(1) != P(1, 3) and P(y=5, x=1) == P(1, 5)


def test_slots_record_has_no_dict() -> None:
    @rec.record(frozen=True, slots=True)
    class S:
        x: int
        y: str = "y"

    s = S(1)
    assert S.__slots__ == ("x", "y") and not hasattr(s, "__dict__")
    assert (s.x, s.y, repr(s)) == (1, "y", "S(x=1, y='y')")


def test_info_path_imports_neither_dataclasses_nor_typing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The whole point: ``vdkit-img info`` must not pay for these imports (issue 2's start-up target)."""
    img = tmp_path / "a.qcow2"
    subprocess.run([sys.executable, "-m", "vdkit.cli.main", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    code = (
        "import sys; from vdkit.cli.main import main; main(['info', '--output=json', sys.argv[1]]);"
        "main(['info', sys.argv[1]]); main(['snapshot', '-l', sys.argv[1]]);"
        "print(' '.join(m for m in ('dataclasses', 'typing', 'inspect', 'numpy') if m in sys.modules), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(img)], capture_output=True, text=True, check=True)
    loaded = out.stderr.strip().split()
    assert [m for m in loaded if m != "typing"] == []
    # typing may come from site (an editable install's finder); never from vdkit
    if "typing" in loaded:
        bare = subprocess.run([sys.executable, "-c", "import sys; print('typing' in sys.modules)"],
                              capture_output=True, text=True, check=True)
        assert bare.stdout.strip() == "True"
