"""Sockets for the tests' own servers and the servers they start (nginx, qemu-nbd, vdkit-daemon -nbd).

No pytest here: ``bench/`` imports it too (through :mod:`tests.helpers.nginx`).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_threads(handler: Callable[[socket.socket], object]) -> tuple[int, socket.socket]:
    """A listener on a free port of 127.0.0.1 passing each connection to ``handler(conn)`` in its own
    daemon thread (a misbehaving server written by a test); (port, listener: close it to stop)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return int(srv.getsockname()[1]), srv


def serve_http(answer: Callable[[bytes, list[bytes]], bytes], *,
               one_per_connection: bool = False) -> tuple[int, socket.socket]:
    """:func:`serve_threads` for an HTTP server written by a test: each request's line and header lines
    go to ``answer(request_line, header_lines)``, whose bytes are sent back; the connection stays open for
    the next request unless ``one_per_connection`` (closed after one answer without saying so).  A client
    that goes away ends its connection quietly."""

    def handler(conn: socket.socket) -> None:
        with conn:
            f = conn.makefile("rb")
            try:
                while True:
                    line = f.readline()
                    if not line:
                        return
                    headers = []
                    while (h := f.readline()) not in (b"\r\n", b""):
                        headers.append(h)
                    conn.sendall(answer(line, headers))
                    if one_per_connection:
                        return
            except OSError:
                return

    return serve_threads(handler)
