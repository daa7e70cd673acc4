"""QEMU's identifier rule, one function (:func:`vdkit.opts.id_wellformed`) for every id and node name.

The rule is checked against its regular-expression reading for any text
(non-ASCII letters and a trailing newline included, which a ``$`` anchor
used to let through), and against qemu-img on an ``--object`` id.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import assert_same, check_ok
from vdkit.opts import id_wellformed

_RULE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from("aZ09._-\n é\u212a\u0660") | st.characters(), max_size=8))
def test_rule(text: str) -> None:
    assert id_wellformed(text) == bool(_RULE.fullmatch(text))


@pytest.mark.parametrize("ident", ["s0", "a.b-c_d", "0a", "a b", "é", "a\u212a", "a\n", "_x"])
def test_object_id_as_qemu_img(ident: str, tmp_path: Path) -> None:
    check_ok("create", "-q", "-f", "raw", str(tmp_path / "d.raw"), "1M")
    assert_same(["info", "--object", f"secret,id={ident},data=x", "d.raw"], tmp_path)
