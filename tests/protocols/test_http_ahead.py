"""The http protocol's sequential reads: the next window is asked for on a second connection ahead.

A test-made HTTP/1.1 server with byte ranges records every GET, so the request
sizes (QEMU's: the read plus read-ahead) and the absence of refetched bytes
are checked, with the bytes of a convert; also from a server that closes
each connection after one answer without saying so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import vdkit_img
from tests.helpers.net import serve_http


@pytest.mark.parametrize("one_per_connection", [False, True])
def test_sequential_reads_ask_ahead(tmp_path: Path, one_per_connection: bool) -> None:
    """A sequential reader (convert) has the next window asked for on a second connection while it uses
    this one: every GET is QEMU's size (the read plus read-ahead, clipped at the end), no byte is fetched
    twice, the bytes are right, also from a server that closes each connection after one answer without
    saying so (the request sent ahead then meets a closed connection and is asked again)."""
    body = os.urandom(13 << 20) + bytes(3 << 20)
    gets: list[tuple[int, int]] = []

    def answer(line: bytes, headers: list[bytes]) -> bytes:
        if line.startswith(b"HEAD"):
            return f"HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        rng = None
        for h in headers:
            if h.lower().startswith(b"range: bytes="):
                a, b = h.split(b"=", 1)[1].strip().split(b"-")
                rng = (int(a), int(b) + 1)
        assert rng is not None
        gets.append(rng)
        part = body[rng[0]:rng[1]]
        return (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(part)}\r\n"
                f"Content-Range: bytes {rng[0]}-{rng[1] - 1}/{len(body)}\r\n\r\n".encode() + part)

    port, srv = serve_http(answer, one_per_connection=one_per_connection)
    try:
        r = vdkit_img("convert", "-f", "raw", "-O", "raw", f"http://127.0.0.1:{port}/r.raw", str(tmp_path / "o.raw"))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "o.raw").read_bytes() == body
    finally:
        srv.close()
    window = (2 << 20) + (256 << 10)
    for a, b in gets:
        assert b - a == min(window, len(body) - a), (a, b)
    fetched = sorted(set(gets))
    assert fetched[0][0] == 0 and fetched[-1][1] == len(body)
    assert all(x[1] == y[0] for x, y in zip(fetched, fetched[1:], strict=False)), fetched  # contiguous, no overlap
