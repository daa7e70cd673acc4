"""vdkit's URL pieces against the standard library's: the protocols split URLs and decode ``%XX``
escapes themselves (importing :mod:`urllib.parse` costs an ``info`` over NBD about as much as the
rest of its start-up), so both must answer exactly as ``urllib.parse`` does."""

from __future__ import annotations

from urllib.parse import unquote as std_unquote
from urllib.parse import urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.protocols import unquote
from vdkit.protocols.http import split_url

PIECES = list("%%/?#@:[]aZ09.-_ \t\n\x00\x1f\x7f\x80é") + [
    "%e9", "%C3%A9", "%ff", "%2", "%%41", "%c3", "%A9", "\ud800", "::1", "65535", "65536", "+8", "80", "٣",
    "http://", "user", "HTTP://"]


@settings(max_examples=400)
@given(st.lists(st.sampled_from(PIECES)).map("".join))
def test_unquote_as_urllib(text: str) -> None:
    assert unquote(text) == std_unquote(text)


@settings(max_examples=200)
@given(st.text())
def test_unquote_any_text(text: str) -> None:
    assert unquote(text) == std_unquote(text)


@settings(max_examples=600)
@given(st.sampled_from(["http://", "https://", " http://", "\thttps://", "HTTP://"]),
       st.lists(st.sampled_from(PIECES)).map("".join))
def test_split_url_as_urlsplit(prefix: str, rest: str) -> None:
    url = prefix + rest
    try:
        ref = urlsplit(url)
        try:
            port = ref.port
        except ValueError:
            port = None  # the client falls back to the scheme's port
    except ValueError:
        return  # urlsplit refuses unbalanced brackets; the connection then fails in both
    got = split_url(url)
    assert (got.scheme, got.username, got.password, got.hostname, got.port, got.path, got.query) == (
        ref.scheme, ref.username, ref.password, ref.hostname, port, ref.path, ref.query)
