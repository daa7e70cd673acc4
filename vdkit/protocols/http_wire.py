"""The HTTP/1.1 exchange the curl driver needs: a request on a kept-alive connection and its answer.

:mod:`vdkit.protocols.http` sends ``HEAD`` and ranged ``GET`` requests and reads
their answers' status, a few headers and the body, with a bound on every wait.
This module is that and nothing more: no redirects, no proxies, no
authentication schemes beyond the headers the caller sends, no request bodies.
It replaces :mod:`http.client`, whose import (the ``email`` package for header
parsing, ``ssl`` and ``urllib.parse`` even for plain http) was three times the
bare interpreter's start-up, for an ``info`` that sends two requests.  Plain
connections use ``_socket`` (the C module the socket module wraps: ``socket``
builds enums of every constant at import); ``https`` wraps a ``socket.socket``
with :mod:`ssl`, which imports both anyway.

Answers are parsed as RFC 9112 says: a status line, header fields up to an
empty line, then a body framed by ``Transfer-Encoding: chunked``, by
``Content-Length``, or by the end of the connection; ``HEAD`` answers and 1xx,
204 and 304 have none.  A connection is kept for the next request unless the
server said ``Connection: close``, spoke HTTP/1.0 without ``keep-alive``, or
ended the body by closing.
"""

from __future__ import annotations

import _socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl

MAX_HEADER_BYTES = 64 * 1024  # a status line and header fields longer than this are not an answer


class WireError(Exception):
    """The server's answer is not HTTP or the connection ended in the middle of one (the message is
    the reason, reported after libcurl's ``Recv failure: ``)."""


class Connection:
    """One TCP (or TLS) connection to ``host:port``; :meth:`request` then :meth:`getresponse`, again and
    again while the answers allow it."""

    def __init__(self, host: str, port: int, timeout: float, context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.context = context
        self.sock: _socket.socket | None = None
        self._buf = bytearray()  # received bytes not yet consumed
        self._method = ""

    def connect(self) -> None:
        """Connect (and run the TLS handshake); errors are the socket's (``gaierror`` for the name,
        ``TimeoutError``, ``OSError``) and ssl's."""
        if self.context is not None:
            import socket

            plain = socket.create_connection((self.host, self.port), self.timeout)
            plain.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            try:
                self.sock = self.context.wrap_socket(plain, server_hostname=self.host)
            except BaseException:
                plain.close()
                raise
            return
        last: OSError | None = None
        for family, kind, proto, _, addr in _socket.getaddrinfo(self.host, self.port, 0, _socket.SOCK_STREAM):
            sock = _socket.socket(family, kind, proto)
            try:
                sock.settimeout(self.timeout)
                sock.connect(addr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            self.sock = sock
            return
        raise last if last is not None else OSError("getaddrinfo returned no address")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._buf.clear()

    def request(self, method: str, path: str, headers: dict[str, str]) -> None:
        """Send a request without a body (connecting first if needed)."""
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        host = self.host if ":" not in self.host else f"[{self.host}]"
        default_port = 443 if self.context is not None else 80
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}" + ("" if self.port == default_port else f":{self.port}"),
                 "Accept-Encoding: identity"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self._method = method

    def getresponse(self) -> Response:
        """Read the status line and header fields of the next answer (1xx answers skipped)."""
        while True:
            head = self._read_head()
            resp = Response(self, self._method, head)
            if not 100 <= resp.status < 200:
                return resp

    def _read_head(self) -> bytes:
        end = self._buf.find(b"\r\n\r\n")
        while end < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise WireError("got more than 65536 bytes when reading the header lines")
            seen = max(0, len(self._buf) - 3)
            if not self._fill():
                if self._buf:
                    raise WireError("Connection closed in the middle of the header lines")
                raise WireError("Remote end closed connection without response")
            end = self._buf.find(b"\r\n\r\n", seen)
        head = bytes(self._buf[:end])
        del self._buf[:end + 4]
        return head

    def _fill(self) -> int:
        """Receive what one ``recv`` brings into the buffer; 0 at the end of the connection."""
        assert self.sock is not None
        data = self.sock.recv(256 * 1024)
        self._buf += data
        return len(data)

    def _readinto1(self, view: memoryview) -> int:
        """At most ``len(view)`` body bytes with at most one receive: buffered ones first."""
        if self._buf:
            n = min(len(view), len(self._buf))
            view[:n] = self._buf[:n]
            del self._buf[:n]
            return n
        assert self.sock is not None
        return self.sock.recv_into(view)

    def _line(self) -> bytes:
        end = self._buf.find(b"\r\n")
        while end < 0:
            if len(self._buf) > MAX_HEADER_BYTES or not self._fill():
                raise WireError("Connection closed in the middle of a chunked body")
            end = self._buf.find(b"\r\n")
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line


class Response:
    """An answer's status and header fields, and its body read in pieces (:meth:`readinto1`)."""

    def __init__(self, conn: Connection, method: str, head: bytes) -> None:
        self._conn = conn
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise WireError(f"Bad status line: {lines[0]!r}")
        self.status = int(code)
        self._headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                continue
            key = name.strip().lower()
            value = value.strip()
            self._headers[key] = f"{self._headers[key]}, {value}" if key in self._headers else value
        tokens = {t.strip().lower() for t in self._headers.get("connection", "").split(",")}
        self.will_close = "close" in tokens or (version == "HTTP/1.0" and "keep-alive" not in tokens)
        self.chunked = "chunked" in self._headers.get("transfer-encoding", "").lower()
        self._chunk_left = 0
        self._done = False
        self.length: int | None = None
        if method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            self.length = 0
            self.chunked = False
        elif not self.chunked:
            text = self._headers.get("content-length", "").split(",")[0].strip()
            if text.isdigit():
                self.length = int(text)
            else:
                self.will_close = True  # the body ends with the connection
        if self.length == 0:
            self._finish()

    def getheader(self, name: str) -> str | None:
        return self._headers.get(name.lower())

    def readinto1(self, view: memoryview) -> int:
        """Body bytes into ``view`` with at most one receive: 0 at the end of the body."""
        if self._done or not len(view):
            return 0
        conn = self._conn
        if self.chunked:
            if not self._chunk_left:
                size = conn._line().split(b";")[0].strip()
                try:
                    self._chunk_left = int(size, 16)
                except ValueError:
                    raise WireError(f"Bad chunk size: {size!r}") from None
                if not self._chunk_left:
                    while conn._line():  # the trailer fields, up to an empty line
                        pass
                    self._finish()
                    return 0
            n = conn._readinto1(view[:self._chunk_left])
            if not n:
                raise WireError("Connection closed in the middle of a chunked body")
            self._chunk_left -= n
            if not self._chunk_left:
                conn._line()  # the CRLF after the chunk
            return n
        if self.length is not None:
            n = conn._readinto1(view[:self.length])
            if not n:
                raise WireError(f"Connection closed with {self.length} bytes of the body left")
            self.length -= n
            if not self.length:
                self._finish()
            return n
        n = conn._readinto1(view)
        if not n:
            self._finish()
        return n

    def read1(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto1(memoryview(buf))
        return bytes(buf[:got])

    def read(self) -> bytes:
        """The rest of the body (the connection is then ready for the next request, or closed)."""
        out = bytearray()
        while not self._done:
            piece = self.read1(256 * 1024)
            if not piece and not self._done:
                break
            out += piece
        return bytes(out)

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            if self.will_close:
                self._conn.close()
