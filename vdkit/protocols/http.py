"""The ``http``/``https`` protocols: a read-only HTTP(S) client that format drivers read like a file.

What QEMU 7.2's curl driver does, from its observed behaviour
(``shared/reference/protocols.md`` §3):

* the node's name is the URL exactly as typed (query, fragment and
  ``user:pw@`` kept); ``disk size: unavailable``; no block status (the whole
  image is one data extent); read-only (``curl driver does not support writes``);
* opening sends one ``HEAD``: the size from ``Content-Length``, and the server
  must announce ``Accept-Ranges: bytes``;
* every read is a ``GET`` with ``Range: bytes=A-B`` for the requested bytes
  plus ``readahead`` (default 256 KiB) clipped at the end; reads that fall
  inside a window already fetched are served from a small cache;
* errors carry libcurl's texts behind ``CURL: Error opening file: ``.

Built on sockets, :mod:`ssl` and :mod:`vdkit.protocols.http_wire` (the HTTP/1.1
exchange: HEAD and ranged GET over kept-alive connections is all the driver
needs; ``docs/http.md`` says why not :mod:`http.client`); no dependency
(``pip install vdkit`` stays pure Python).  Every wait is bounded
by ``timeout`` (QEMU's default 5 s): where QEMU 7.2 hangs in ``convert`` after
a read timeout, vdkit reports an I/O error.
"""

from __future__ import annotations

import errno as _errno
import os

from vdkit.errors import OpenError, VdkitError
from vdkit.io import DATA, OFFSET_VALID, BlockStatus
from vdkit.protocols import RemoteFile
from vdkit.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.block.secrets import OpenScope
    from vdkit.protocols.http_wire import Connection, Response

PREFIXES = ("http", "https")
DEFAULT_READAHEAD = 256 * 1024
DEFAULT_TIMEOUT = 5
MAX_TIMEOUT = 100000  # QEMU: "timeout parameter is too large or negative" from here on
CACHE_WINDOWS = 4
"""How many fetched windows are kept (QEMU's driver keeps a few per request state)."""
NO_LIMIT_TIMEOUT = 300.0
"""Seconds one socket wait may take with ``timeout=0`` (curl: no limit; vdkit keeps a bound)."""


def _presets() -> dict[str, dict[str, object]]:
    """Options given with ``--image-opts``/``json:`` (readahead, sslverify, timeout, cookie, driver), by URL,
    in the current open scope (:mod:`vdkit.block.secrets`): :class:`HttpFile` opens that URL with them (a
    backing file named by a plain URL gets none, as in QEMU)."""
    from vdkit.block.secrets import table

    return table("http")

_KEYS = ("url", "readahead", "timeout", "sslverify", "cookie", "filename")

AUTO_READ_ONLY: set[str] = set()
"""URLs opened with QEMU's auto-read-only (the daemon's ``-drive``): a writable open is accepted and the
node stays read-only (writes fail), where a plain writable open is refused."""


def _glib_then(message: str) -> OpenError:
    """QEMU 7.2's curl driver prints two GLib assertion lines before its option errors (a cleanup bug):
    the front ends print them too; the library's opens (a scope of their own) do not."""
    from vdkit.block.secrets import PROCESS, current

    if current() is PROCESS:
        _report("GLib: g_hash_table_foreach_remove: assertion 'hash_table != NULL' failed")
        _report("GLib: g_hash_table_destroy: assertion 'hash_table != NULL' failed")
    return OpenError(message)


READ_ONLY = True  # curl nodes never write: -drive driver=http makes the drive read-only
FILENAME_OPTION = "url"  # -drive file=URL: the name is the curl node's url option
# options that only tune a curl node: QEMU leaves them out of a json:{...} description of it
WEAK_OPTIONS = ("readahead", "timeout")


def drive_option(key: str) -> bool:
    """The protocol registry's ``-drive driver=http|https`` slot: every key the drive did not take is the
    curl node's (unknown ones are refused by it)."""
    return not key.startswith("file.")


def name_for_options(opts: dict[str, str], driver: str) -> str:
    """Check the curl driver's options (QEMU's texts and order) and return the node's URL.

    ``cookie-secret``, ``username``, ``password-secret`` and the proxy options are not implemented.
    """
    for key in opts:
        if key not in _KEYS:
            raise OpenError(f"Block protocol '{driver}' doesn't support the option '{key}'")
    readahead = DEFAULT_READAHEAD
    if "readahead" in opts:
        from vdkit.opts import _SIZE_HINT, strtosz

        try:
            readahead = strtosz(opts["readahead"])
        except Exception:
            exc = _glib_then("Parameter 'readahead' expects a non-negative number below 2^64")
            exc.hint = _SIZE_HINT
            raise exc from None
    timeout = DEFAULT_TIMEOUT
    if "timeout" in opts:
        text = opts["timeout"]
        if not text.lstrip("-").isdigit():
            raise _glib_then("Parameter 'timeout' expects a number")
        timeout = int(text)
    sslverify = True
    if "sslverify" in opts:
        from vdkit.opts import parse_bool

        try:
            sslverify = parse_bool("sslverify", opts["sslverify"])
        except VdkitError as exc:
            raise _glib_then(exc.message) from None
    if readahead % 512:
        raise _glib_then(f"HTTP_READAHEAD_SIZE {readahead} is not a multiple of 512")
    if timeout < 0 or timeout >= MAX_TIMEOUT:
        raise _glib_then("timeout parameter is too large or negative")
    url = opts.get("url")
    if url is None:
        raise _glib_then("curl block driver requires an 'url' option")
    if not url.startswith(driver + "://"):
        raise _glib_then(f"{driver} curl driver cannot handle the URL '{url}' (does not start with '{driver}://')")
    _presets()[url] = {"driver": driver, "readahead": readahead, "timeout": timeout, "sslverify": sslverify,
                    "cookie": opts.get("cookie")}
    return url


@record(frozen=True)
class UrlParts:
    scheme: str
    username: str | None
    password: str | None
    hostname: str | None
    port: int | None
    path: str
    query: str


def split_url(url: str) -> UrlParts:
    """The parts of an ``http``/``https`` URL the client uses, as :func:`urllib.parse.urlsplit` gives
    them (host name in lower case without brackets, a port that is not a number below 65536 taken as
    none, the fragment dropped), without importing :mod:`urllib.parse` (start-up: it pulls in
    ``ipaddress`` and ``re``).  Like urlsplit it first drops leading C0 controls and spaces and every
    tab and line break."""
    url = url.lstrip(_C0_OR_SPACE).translate(_UNSAFE)
    scheme, _, rest = url.partition("://")
    netloc_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, rest = rest[:netloc_end], rest[netloc_end:]
    rest = rest.partition("#")[0]
    path, _, query = rest.partition("?")
    username = password = None
    userinfo, at, hostport = netloc.rpartition("@")
    if at:
        username, colon, pw = userinfo.partition(":")
        password = pw if colon else None
    if "[" in hostport:
        host = hostport.partition("[")[2].partition("]")[0]
        port_text = hostport.partition("]")[2].partition(":")[2]
    else:
        host, _, port_text = hostport.partition(":")
    port = int(port_text) if port_text.isdigit() and port_text.isascii() and int(port_text) < 65536 else None
    name, pct, zone = host.partition("%")  # an IPv6 zone keeps its case
    return UrlParts(scheme.lower(), username, password, name.lower() + pct + zone or None, port, path, query)


_C0_OR_SPACE = "".join(map(chr, range(33)))
_UNSAFE = {ord(c): None for c in "\t\r\n"}


def _turned_off(value: object) -> bool:
    """An sslverify value that is QEMU's false (a JSON false or any of its boolean spellings)."""
    if isinstance(value, str):
        from vdkit.opts import parse_bool

        try:
            return not parse_bool("sslverify", value)
        except VdkitError:
            return False
    return value is False


def json_name(opts: dict[str, object], probed: str | None = None) -> dict[str, object] | None:
    """What QEMU's ``json:{...}`` name of a curl node opened with options (flattened keys) holds, or None.

    Only ``cookie`` and ``sslverify`` turned off force one (``username`` too, not implemented);
    once forced, an explicit ``sslverify`` is listed as given (protocols.md §3.3).  A format
    layer above the curl node must be named: a probed one (no ``driver``) comes as ``probed``.
    """
    top = opts.get("driver") in ("http", "https")
    prefix = "" if top else "file."
    if not top and opts.get("file.driver") not in ("http", "https"):
        return None
    ssl = opts.get(prefix + "sslverify")
    cookie = opts.get(prefix + "cookie")
    if cookie is None and not _turned_off(ssl):
        return None
    node: dict[str, object] = {"url": opts.get(prefix + "url"), "driver": opts.get(prefix + "driver")}
    if cookie is not None:
        node["cookie"] = cookie
    if ssl is not None:
        node["sslverify"] = ssl
    if not top:
        fmt = opts.get("driver") or probed
        if fmt is None:
            return None
        node = {"driver": fmt, "file": node}
    return node


def named_by_json(url: str) -> str | None:
    """The driver of a node opened from options that QEMU names ``json:{...}`` (cookie, sslverify off), else None.

    Such a node has no directory to resolve relative backing names against, in QEMU.
    """
    preset = _presets().get(url)
    if preset is None or preset["cookie"] is None and preset["sslverify"]:
        return None
    return str(preset["driver"])


def is_http_name(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def backing_base(url: str, stored: str) -> str:
    """A relative backing name resolved against the URL's directory (QEMU's path combination)."""
    scheme_end = url.find("://") + 3
    slash = url.rfind("/")
    if slash < scheme_end:
        return url + "/" + stored
    return url[: slash + 1] + stored


def resolve_backing(url: str, stored: str) -> str | None:
    """The protocol registry's backing resolution: relative to a plain URL's directory; a node QEMU names
    ``json:{...}`` (or a name that is no URL) has none."""
    if not is_http_name(url) or named_by_json(url):
        return None
    return backing_base(url, stored)


def no_base_directory(url: str) -> str | None:
    """Why a relative backing name below ``url`` cannot be resolved (QEMU's text), None if no URL."""
    return f"Cannot generate a base directory for {named_by_json(url)} nodes" if is_http_name(url) else None


class HttpError(Exception):
    """A transfer failed; ``message`` is libcurl's text for it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HttpFile(RemoteFile):
    """An HTTP(S) resource seen through the interface format drivers use for a file (:class:`ImageFile`)."""

    has_info = False  # no bdrv_get_info: info shows "disk size: unavailable"
    creates_zeroed = False
    json_filename: str | None = None
    """The node's own ``json:{...}`` name when options QEMU names it by were given (set by the daemon)."""

    @property
    def protocol_driver(self) -> str:
        return self.driver

    def __init__(self, url: str, *, readonly: bool = True, force_share: bool = False, driver: str | None = None,
                 readahead: int = DEFAULT_READAHEAD, sslverify: bool = True, timeout: int = DEFAULT_TIMEOUT,
                 cookie: str | None = None) -> None:
        from vdkit.block.secrets import current

        self._scope = current()  # where its read errors are reported (_report)
        preset = _presets().get(url)
        if preset is not None:
            driver = driver or str(preset["driver"])
            readahead, timeout = int(preset["readahead"]), int(preset["timeout"])  # type: ignore[call-overload]
            sslverify, cookie = bool(preset["sslverify"]), preset["cookie"]  # type: ignore[assignment]

        self.filename = url
        self.open_options: str | None = None  # a blockdev-add node's options, as a parent's json: name describes it
        self.readonly = True
        self.sync = True
        scheme = url.split(":", 1)[0]
        driver = driver or scheme
        if not url.startswith(driver + "://"):
            raise OpenError(f"{driver} curl driver cannot handle the URL '{url}' (does not start with "
                            f"'{driver}://')")
        if readahead % 512:
            raise OpenError(f"HTTP_READAHEAD_SIZE {readahead} is not a multiple of 512")
        if timeout < 0 or timeout >= MAX_TIMEOUT:
            raise OpenError("timeout parameter is too large or negative")
        if not readonly and url not in AUTO_READ_ONLY:
            raise OpenError("curl driver does not support writes")
        self.driver = driver
        parts = split_url(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.readahead = readahead
        self.sslverify = sslverify
        self.timeout = float(timeout) if timeout else NO_LIMIT_TIMEOUT
        self.headers: dict[str, str] = {}
        if cookie:
            self.headers["Cookie"] = cookie
        if parts.username is not None:
            import base64

            from vdkit.protocols import unquote

            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        self._conn: Connection | None = None
        self._cache: list[tuple[int, bytearray]] = []
        # A sequential reader's next window, asked for ahead on a second kept-alive connection (the
        # server works on it while the reader uses this one): (offset, length) of the GET sent on
        # ``_spare``; ``_next_read`` is where a sequential reader reads next.
        self._spare: Connection | None = None
        self._ahead: tuple[int, int] | None = None
        self._next_read = -1
        self._free: list[bytearray] = []  # buffers of windows that left the cache, taken again by _get
        try:
            self._size = self._head()
        except HttpError as exc:
            self.close()
            raise OpenError(f"CURL: Error opening file: {exc.message}") from None

    # -- transport ------------------------------------------------------------------------------

    def _connection(self, start: float) -> Connection:
        import _socket
        import time

        from vdkit.protocols.http_wire import Connection

        if self._conn is not None:
            return self._conn
        ctx = None
        if self.https:
            import ssl

            ctx = ssl.create_default_context()
            if not self.sslverify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        conn = Connection(self.host, self.port, self.timeout, ctx)
        try:
            conn.connect()
        except _socket.gaierror:
            raise HttpError(f"Could not resolve host: {self.host}") from None
        except ssl_verify_error() as exc:
            conn.close()
            raise HttpError("server certificate verification failed. CAfile: none CRLfile: none") from exc
        except TimeoutError:
            conn.close()
            raise self._timed_out(start, 0, None) from None
        except OSError as exc:
            conn.close()
            ms = int((time.monotonic() - start) * 1000)
            raise HttpError(f"Failed to connect to {self.host} port {self.port} after {ms} ms: "
                            "Couldn't connect to server") from exc
        self._conn = conn
        return conn

    def _timed_out(self, start: float, got: int, want: int | None) -> HttpError:
        import time

        ms = int((time.monotonic() - start) * 1000)
        of = f" out of {want}" if want is not None else ""
        return HttpError(f"Operation timed out after {ms} milliseconds with {got}{of} bytes received")

    def _request(self, method: str, headers: dict[str, str]) -> tuple[Response, float]:
        """Send one request, reconnecting once when a kept-alive connection was closed by the server."""
        import time

        from vdkit.protocols.http_wire import WireError

        start = time.monotonic()
        for attempt in (0, 1):
            fresh = self._conn is None
            conn = self._connection(start)
            if conn.sock is not None:
                conn.sock.settimeout(self.timeout)
            try:
                conn.request(method, self.path, headers={**self.headers, **headers})
                return conn.getresponse(), start
            except TimeoutError:
                self._drop()
                raise self._timed_out(start, 0, None) from None
            except (WireError, ConnectionResetError, BrokenPipeError) as exc:
                self._drop()
                if fresh or attempt:
                    raise HttpError(f"Recv failure: {exc}") from None
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _swap(self) -> None:
        """Exchange the connection in use with the spare one (the one a GET was sent ahead on)."""
        self._conn, self._spare = self._spare, self._conn

    def _send_ahead(self, offset: int, length: int) -> None:
        """Send the GET of the window after the one just read on the spare connection, not waiting for
        its answer (the next :meth:`_get` of that window reads it): the server's work and the transfer
        into the socket overlap the reader's use of this window.  A failure to send just means no
        window ahead: the read asks for it itself, with its errors."""
        import time

        from vdkit.protocols.http_wire import WireError

        self._swap()
        try:
            conn = self._connection(time.monotonic())
            if conn.sock is not None:
                conn.sock.settimeout(self.timeout)
            conn.request("GET", self.path, headers={**self.headers, "Range": f"bytes={offset}-{offset + length - 1}"})
            self._ahead = (offset, length)
        except (HttpError, OSError, WireError):
            self._drop()
        finally:
            self._swap()

    def _cancel_ahead(self) -> None:
        """A window asked for ahead that the reader did not want: its connection goes (the answer is
        on its way and would have to be read to reuse it)."""
        if self._ahead is not None:
            self._ahead = None
            self._swap()
            self._drop()
            self._swap()

    def _head(self) -> int:
        resp, _ = self._request("HEAD", {})
        resp.read()
        if resp.status >= 400:
            self._drop()
            raise HttpError(f"The requested URL returned error: {resp.status}")
        length = resp.getheader("Content-Length")
        if length is None or not length.strip().isdigit():
            raise HttpError("Server does not support 'range' (byte ranges).")
        ranges = (resp.getheader("Accept-Ranges") or "").lower()
        if "bytes" not in ranges:
            raise HttpError("Server does not support 'range' (byte ranges).")
        return int(length)

    def _get(self, offset: int, length: int, *, sent: bool = False) -> bytearray:
        """``GET`` bytes [offset, offset+length) with a Range header; the answer must be a 206 of that range.

        ``sent``: the request went ahead on the current connection (:meth:`_send_ahead`); only its
        answer is read (the timeout runs from now: the reader may have been busy since).  The body is
        received chunk by chunk straight into one buffer (a free one of that size when there is one).
        """
        import time

        from vdkit.protocols.http_wire import WireError

        resp: Response | None = None
        if sent:
            start = time.monotonic()
            try:
                assert self._conn is not None
                resp = self._conn.getresponse()
            except TimeoutError:
                self._drop()
                raise self._timed_out(start, 0, None) from None
            except (WireError, OSError):
                self._drop()  # closed while it waited (keep-alive timeout): ask again, as a new request
        if resp is None:
            resp, start = self._request("GET", {"Range": f"bytes={offset}-{offset + length - 1}"})
        data = next((b for b in self._free if len(b) == length), None)
        if data is None:
            data = bytearray(length)
        else:
            self._free.remove(data)
        got = 0
        try:
            whole = resp.status == 200
            if resp.status != 206 and not whole:
                resp.read()
                self._drop()
                if resp.status >= 400:
                    raise HttpError(f"The requested URL returned error: {resp.status}")
                raise HttpError("Server does not support 'range' (byte ranges).")
            # curl's timeout bounds the whole transfer, not one wait: a server trickling bytes ends too
            deadline = start + self.timeout
            sock = self._conn.sock if self._conn is not None else None
            # A server that announced byte ranges but ignores them sends the whole resource (200):
            # QEMU then returns its first bytes for any offset (wrong data); vdkit skips to the offset.
            skip = offset if whole else 0
            while skip:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                if sock is not None:
                    sock.settimeout(left)
                chunk = resp.read1(min(skip, 1 << 20))
                if not chunk:
                    break
                skip -= len(chunk)
            view = memoryview(data)
            # the body is received straight into the buffer, one receive at a time (a trickling server
            # must not hold a read past the deadline)
            while got < length:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                if sock is not None:
                    sock.settimeout(left)
                n = resp.readinto1(view[got:got + min(length - got, 1 << 20)])
                if not n:
                    break
                got += n
            if whole:
                self._drop()  # the rest of the resource is not wanted
            elif got == length:
                resp.read()  # the body is complete: marks the response done so the connection can be reused
        except TimeoutError:
            self._drop()
            raise self._timed_out(start, got, length) from None
        except (WireError, OSError) as exc:
            self._drop()
            raise HttpError(f"Recv failure: {exc}") from None
        if got != length:
            self._drop()
            raise HttpError(f"transfer closed with {length - got} bytes remaining to read")
        if self._conn is not None and resp.will_close:
            self._drop()
        return data

    # -- the file interface ---------------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def allocated_size(self) -> int:
        raise OSError(_errno.ENOTSUP, "disk size unavailable over HTTP")

    def readinto(self, offset: int, view: memoryview) -> None:
        """The resource's bytes at ``offset`` copied once into ``view`` from a fetched window (zeros past
        the end)."""
        if offset < 0:
            raise OSError(_errno.EIO, os.strerror(_errno.EIO))
        inside = max(0, min(len(view), self._size - offset))
        sequential = self._next_read == offset
        self._next_read = offset + len(view)
        if sequential and inside == len(view) and inside >= self.readahead:
            self._sequential(offset, view)
            return
        if inside:
            self._cancel_ahead()
        if inside:
            start, buf = self._window(offset, inside)
            view[:inside] = memoryview(buf)[offset - start:offset - start + inside]
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)

    def _window(self, offset: int, length: int) -> tuple[int, bytearray]:
        """A fetched window holding [offset, offset+length): a cached one, or a new GET with read-ahead."""
        end = offset + length
        for i, (start, buf) in enumerate(self._cache):
            if start <= offset and end <= start + len(buf):
                if i:
                    self._cache.insert(0, self._cache.pop(i))
                return start, buf
        want = min(length + self.readahead, self._size - offset)
        try:
            buf = self._get(offset, want)
        except HttpError as exc:
            _report(f"curl: {exc.message}", self._scope)
            raise OSError(_errno.EIO, exc.message) from None
        self._keep(offset, buf)
        return offset, buf

    def _keep(self, offset: int, buf: bytearray) -> None:
        self._cache.insert(0, (offset, buf))
        for _, old in self._cache[CACHE_WINDOWS:]:
            self._free[:] = [old, *self._free[:1]]
        del self._cache[CACHE_WINDOWS:]

    def _sequential(self, offset: int, view: memoryview) -> None:
        """Serve a read that starts where the last one ended (and ends inside the resource) from the
        windows of a sequential reader: the part already fetched, then the window asked for ahead (or a
        new GET of the read's length plus read-ahead, as QEMU sizes its requests), and ask for the next
        window ahead."""
        pos, end = offset, offset + len(view)
        while pos < end:
            hit = next(((s, b) for s, b in self._cache if s <= pos < s + len(b)), None)
            if hit is None:
                ahead, self._ahead = self._ahead, None
                want = min(len(view) + self.readahead, self._size - pos)
                try:
                    if ahead is not None and ahead[0] == pos:
                        self._swap()  # the spare connection carries the answer
                        want = ahead[1]
                        buf = self._get(pos, want, sent=True)
                    else:
                        if ahead is not None:
                            self._ahead = ahead
                            self._cancel_ahead()
                        buf = self._get(pos, want)
                except HttpError as exc:
                    _report(f"curl: {exc.message}", self._scope)
                    raise OSError(_errno.EIO, exc.message) from None
                self._keep(pos, buf)
                hit = (pos, buf)
                nxt = pos + want
                if nxt < self._size and self._ahead is None:
                    self._send_ahead(nxt, min(len(view) + self.readahead, self._size - nxt))
            start, buf = hit
            n = min(end, start + len(buf)) - pos
            view[pos - offset:pos - offset + n] = memoryview(buf)[pos - start:pos - start + n]
            pos += n

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise OSError(_errno.EACCES, "curl driver does not support writes")

    def pwritev(self, offset: int, buffers: list[bytes | bytearray | memoryview]) -> None:
        raise OSError(_errno.EACCES, "curl driver does not support writes")

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """No block status in the curl driver: everything up to the end is data at its own offset."""
        return BlockStatus(DATA | OFFSET_VALID, max(0, self._size - offset), offset, self.filename)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._drop()
        self._swap()
        self._drop()
        self._ahead = None
        self._cache = []
        self._free = []

    def __enter__(self) -> HttpFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<HttpFile {self.filename!r}>"


REPORT_SINK: list[str] | None = None
"""Where :func:`_report` puts its lines instead of stderr (the daemon prefixes them with the -drive)."""


def _report(message: str, scope: OpenScope | None = None) -> None:
    """A line on stderr as QEMU's error_report prints it while a read fails (``qemu-img: curl: ...``); a
    file the library opened (``scope``: the open's, not a front end's) gives it to its scope's warnings."""
    import sys

    if scope is not None:
        from vdkit.block.secrets import PROCESS

        if scope is not PROCESS:
            scope.warning(message)
            return
    if REPORT_SINK is not None:
        REPORT_SINK.append(message)
        return

    prog = "vdkit-daemon" if "vdkit.daemon.runtime" in sys.modules else "vdkit-img"
    sys.stdout.flush()
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.flush()


def open_file(name: str, *, readonly: bool, force_share: bool, fmt: str | None) -> tuple[HttpFile, str]:
    """The protocol registry's open: the resource, named as given (``fmt`` http/https: the curl node is
    the top node and its driver the one named)."""
    file = HttpFile(name, readonly=readonly, force_share=force_share, driver=fmt if fmt in PREFIXES else None)
    return file, name


def open_blockdev(opts: dict[str, object], *, readonly: bool, auto_read_only: bool) -> tuple[HttpFile, str, bool]:
    """The protocol registry's ``blockdev-add`` open (QAPI-checked options): the resource, the node's name
    (its URL, or ``json:{...}`` with a cookie or ``sslverify`` off, values with their QMP types) and its
    read-only flag (always: ``auto-read-only`` makes a writable request read-only)."""
    from vdkit.info.render_json import dumps_compact

    driver = str(opts["driver"])
    if not readonly and not auto_read_only:
        raise OpenError("curl driver does not support writes")
    for key in ("username", "password-secret", "proxy-username", "proxy-password-secret", "cookie-secret"):
        if key in opts:
            raise VdkitError(f"The '{driver}' option '{key}' is not supported by vdkit")
    given: dict[str, object] = {k: opts[k] for k in ("url", "readahead", "timeout", "sslverify", "cookie")
                                if k in opts}
    text = {k: ("on" if v else "off") if isinstance(v, bool) else str(v) for k, v in given.items()}
    url = name_for_options(text, driver)
    file = HttpFile(url, readonly=True, driver=driver)
    # a parent's json: name describes the node by its options, the tuning ones left out
    file.open_options = dumps_compact({"driver": driver, **{k: v for k, v in given.items() if k not in WEAK_OPTIONS}})
    desc = json_name({"driver": driver, **given})
    return file, "json:" + dumps_compact(desc) if desc is not None else url, True


def ssl_verify_error() -> type[Exception]:
    """The certificate verification error class (``ssl`` imported only for https names)."""
    import ssl

    return ssl.SSLCertVerificationError
