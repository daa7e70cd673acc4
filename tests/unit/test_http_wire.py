"""The HTTP/1.1 answer reader of the http protocol (vdkit.protocols.http_wire) on byte streams cut at
random places: bodies framed by Content-Length, by chunks (with extensions and trailers) or by the end
of the connection, HEAD/204/304 and 1xx answers without bodies, keep-alive rules; answers that are not
HTTP fail with a WireError.  The protocol tests run it against nginx and test-made servers."""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdkit.protocols.http_wire import Connection, WireError


def _conn_over(stream: bytes, cuts: list[int]) -> Connection:
    """A Connection whose socket receives ``stream`` in pieces cut at ``cuts`` (then the end)."""
    a, b = socket.socketpair()
    conn = Connection("h", 80, 5.0)
    conn.sock = a

    def feed() -> None:
        with b:
            last = 0
            for cut in sorted({c for c in cuts if 0 < c < len(stream)}) + [len(stream)]:
                b.sendall(stream[last:cut])
                last = cut

    threading.Thread(target=feed, daemon=True).start()
    return conn


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for size in sizes:
        piece = body[pos:pos + size]
        if not piece:
            break
        out += b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n"
        pos += len(piece)
    if pos < len(body):
        out += b"%X\r\n" % (len(body) - pos) + body[pos:] + b"\r\n"
    return out + b"0\r\nTrailer: x\r\n\r\n"


def _body(conn: Connection, method: str) -> tuple[int, bytes, bool]:
    conn._method = method
    resp = conn.getresponse()
    return resp.status, resp.read(), resp.will_close


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=500), st.lists(st.integers(1, 40), max_size=6),
       st.lists(st.integers(0, 4000), max_size=8))
def test_answers_in_any_pieces(body: bytes, body2: bytes, sizes: list[int], cuts: list[int]) -> None:
    stream = (b"HTTP/1.1 100 Continue\r\n\r\n"
              b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\nX-A: 1\r\nx-a: 2\r\n\r\n" % len(body) + body
              + b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"  # a HEAD answer: no body
              + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(body, sizes)
              + b"HTTP/1.1 204 No Content\r\n\r\n"
              + b"HTTP/1.0 200 OK\r\n\r\n" + body2)  # no length: the body ends with the connection
    conn = _conn_over(stream, cuts)
    conn._method = "GET"
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("x-a"), resp.read(), resp.will_close) == (206, "1, 2", body, False)
    assert _body(conn, "HEAD") == (200, b"", False)
    assert _body(conn, "GET") == (200, body, False)
    assert _body(conn, "GET") == (204, b"", False)
    assert _body(conn, "GET") == (200, body2, True)
    assert conn.sock is None  # closed with the body


@pytest.mark.parametrize("stream", [b"", b"HTTP/1.1 200 OK\r\nContent-", b"SSH-2.0-OpenSSH\r\n\r\n",
                                    b"HTTP/1.1 2x0 OK\r\n\r\n"])
def test_not_an_answer(stream: bytes) -> None:
    conn = _conn_over(stream, [])
    with pytest.raises(WireError):
        conn.getresponse()


@pytest.mark.parametrize("stream", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
def test_body_cut_short(stream: bytes) -> None:
    conn = _conn_over(stream, [])
    conn._method = "GET"
    resp = conn.getresponse()
    with pytest.raises(WireError):
        resp.read()


def test_connection_close_and_keep_alive() -> None:
    stream = (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive, Close\r\n\r\nx")
    assert _body(_conn_over(stream, []), "GET") == (200, b"x", True)
    stream = b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\nx"
    assert _body(_conn_over(stream, []), "GET") == (200, b"x", False)
