"""The ``nbd`` protocol: an NBD client that a format driver reads and writes like a file.

What QEMU 7.2's client does, from the NBD specification and its observed
behaviour (``shared/reference/protocols.md`` §1):

* names: ``nbd://HOST[:PORT][/EXPORT]``, ``nbd+tcp://...``,
  ``nbd+unix:///EXPORT?socket=PATH`` and the legacy ``nbd:unix:PATH[:exportname=E]``
  / ``nbd:HOST:PORT[:exportname=E]``; the node's name is regenerated from the
  parsed address (:func:`canonical_name`), never the string typed;
* the handshake: fixed newstyle without zeroes, structured replies, one meta
  context (``base:allocation``), ``NBD_OPT_GO`` asking for block sizes;
  an oldstyle server works for the empty export name;
* TLS (``tls-creds``): ``NBD_OPT_STARTTLS`` first, then the handshake over
  the TLS session (:mod:`vdkit.protocols.tls`);
* requests honour the server's block size constraints (reads widened to the
  minimum, split at the maximum payload).

The socket exchange is a plain blocking one (qemu-img's commands are
sequential); byte layouts come from :mod:`vdkit.nbd.wire`, shared with the
server side.  Every wait has a bound (:data:`DEFAULT_TIMEOUT`): a server that
accepts and never speaks ends the open with QEMU's timeout text instead of
hanging as QEMU 7.2 does.
"""

from __future__ import annotations

# _socket: the C module the socket module wraps: same socket type, functions and constants, but
# importing ``socket`` first turns every AF_/SOCK_/MSG_/AI_ constant into enum members (~33M
# instructions, as much as the bare interpreter's start, for an ``info`` that sends a few packets).
import _socket as socket
import errno as _errno
import os

import vdkit.nbd.wire as w
from vdkit.errors import OpenError, VdkitError
from vdkit.io import DATA, OFFSET_VALID, ZERO, BlockStatus
from vdkit.protocols import RemoteFile
from vdkit.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from vdkit.opts import CreateOpts

    T = TypeVar("T")

PREFIXES = ("nbd", "nbd+tcp", "nbd+unix")
DEFAULT_PORT = 10809
DEFAULT_TIMEOUT = 30.0
"""Seconds any one connect or handshake read may take (QEMU 7.2 waits forever without open-timeout)."""
IO_TIMEOUT = 300.0
"""Seconds one request may wait for its reply once connected: a server that stops answering fails the
request with EIO (QEMU 7.2 waits forever); long enough for any honest server's 32 MiB request."""


@record(frozen=True)
class NbdAddress:
    """Where an export is: a unix socket ``path`` or ``host``/``port``, and the export name."""

    export: str
    path: str | None = None
    host: str | None = None
    port: int | str = DEFAULT_PORT  # the text of an options' port that is not a plain port number
    tls_creds: str | None = None
    """``tls-creds``: the id of ``--object tls-creds-x509`` credentials (never part of the name)."""
    tls_hostname: str | None = None
    x_dirty_bitmap: str | None = None
    """``x-dirty-bitmap``: the meta context block status asks for instead of ``base:allocation``, its
    flags read as that one's (a ``qemu:dirty-bitmap:NAME``: dirty ranges map as unallocated); not part
    of the name."""

    def canonical_name(self) -> str:
        """The filename QEMU regenerates for the node (no escaping, IPv6 without brackets)."""
        if self.path is not None:
            return f"nbd+unix:///{self.export}?socket={self.path}" if self.export else \
                f"nbd+unix://?socket={self.path}"
        base = f"nbd://{self.host}:{self.port}"
        return f"{base}/{self.export}" if self.export else base

    def describe(self) -> str:
        """How connection errors name the server (``PATH`` or ``HOST:PORT``)."""
        return self.path if self.path is not None else f"{self.host}:{self.port}"


def is_nbd_name(name: str) -> bool:
    colon = name.find(":")
    return colon > 0 and name[:colon] in PREFIXES


# -- names ------------------------------------------------------------------------------------

def parse_name(name: str) -> NbdAddress:
    """Parse a command-line NBD filename with QEMU's rules and error texts."""
    from vdkit.protocols import unquote

    if name.startswith("nbd:") and not name.startswith("nbd://"):
        return _parse_legacy(name[len("nbd:"):])
    scheme, sep, rest = name.partition("://")
    if not sep or scheme not in PREFIXES:
        raise OpenError("No valid URL specified")
    q = rest.find("?")
    rest, query = (rest[:q], rest[q + 1:]) if q >= 0 else (rest, "")
    authority, slash, path_part = rest.partition("/")
    export = unquote(path_part)
    if scheme == "nbd+unix":
        if authority or not query:
            raise OpenError("No valid URL specified")
        items = query.split("&")
        if len(items) != 1 or not items[0].startswith("socket="):
            raise OpenError("No valid URL specified")
        return NbdAddress(export, path=unquote(items[0][len("socket="):]))
    if query or not authority:
        raise OpenError("No valid URL specified")
    host, port = _split_host_port(unquote(authority))
    if host is None:
        raise OpenError("No valid URL specified")
    return NbdAddress(export, host=host, port=port)


def _split_host_port(authority: str) -> tuple[str | None, int]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return None, 0
        host, rest = authority[1:end], authority[end + 1:]
    else:
        host, _, rest = authority.partition(":")
        rest = ":" + rest if _ else ""
    if not host:
        return None, 0
    if not rest:
        return host, DEFAULT_PORT
    if not rest.startswith(":") or not rest[1:].isdigit() or not 0 < int(rest[1:]) < 65536:
        return None, 0
    return host, int(rest[1:])


def _parse_legacy(spec: str) -> NbdAddress:
    if not spec:
        raise OpenError("NBD server address missing")
    export = ""
    if spec.startswith("unix:"):
        path = spec[len("unix:"):]
        path, sep, name = path.partition(":exportname=")
        export = name if sep else ""
        return NbdAddress(export, path=path)
    head, sep, name = spec.partition(":exportname=")
    if sep:
        export = name
    if head.startswith("["):
        end = head.find("]")
        host, rest = head[1:end], head[end + 1:]
        if not rest.startswith(":"):
            raise OpenError(f"error parsing address '{head}'")
        port_text = rest[1:]
    else:
        host, colon, port_text = head.partition(":")
        if not colon:
            raise OpenError(f"error parsing address '{head}'")
        if ":" in port_text:  # more colons: the resolver sees a port it cannot use
            raise OpenError(f"address resolution failed for {head}: Servname not supported for ai_socktype")
    if not port_text.isdigit():
        raise OpenError(f"address resolution failed for {head}: Servname not supported for ai_socktype")
    return NbdAddress(export, host=host, port=int(port_text))


# -- options (--image-opts, json:) -------------------------------------------------------------

AUTO_READ_ONLY: set[str] = set()
"""Names opened with QEMU's auto-read-only (the daemon's ``-drive``): a read-only export is then opened
read-only instead of refused."""

def _presets() -> dict[str, tuple[NbdAddress, float | None]]:
    """Addresses given as options, by the node name they get, in the current open scope
    (:mod:`vdkit.block.secrets`): :class:`NbdFile` uses them as they are (a regenerated URI is not always
    parseable back: nothing in it is escaped)."""
    from vdkit.block.secrets import table

    return table("nbd")

_UNIX_KEYS = ("path", "abstract", "tight")
_INET_KEYS = ("host", "port", "numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp")
_RUNTIME_KEYS = ("export", "open-timeout", "reconnect-delay", "tls-creds", "tls-hostname", "x-dirty-bitmap",
                 "filename")


def address_from_options(opts: dict[str, str]) -> tuple[NbdAddress, float | None]:
    """The nbd driver's options (``server.*`` or the legacy ``path``/``host``/``port``, ``export``,
    ``open-timeout``, ``tls-creds``...) -> (address, open timeout), with QEMU's texts and order of checks.

    Every key of ``opts`` must be the driver's: an unknown one is refused after the address
    is complete, as QEMU does.  ``filename`` is accepted and ignored (inside options it is not
    parsed as a URI).  ``tls-creds`` must name client credentials (checked here, before the
    unknown keys, as QEMU); ``tls-hostname`` only matters with them.
    """
    server = {k[len("server."):]: v for k, v in opts.items() if k.startswith("server.")}
    legacy = {k: opts[k] for k in ("path", "host", "port") if k in opts}
    if server and legacy:
        raise OpenError("Cannot use 'server' and path/host/port at the same time")
    export = opts.get("export", "")
    if legacy:
        if "path" in legacy and "host" in legacy:
            raise OpenError("path and host may not be used at the same time")
        if "path" in legacy:
            if "port" in legacy:
                raise OpenError("port may not be used without host")
            addr = NbdAddress(export, path=legacy["path"])
        elif "host" in legacy:
            addr = _inet(legacy["host"], legacy.get("port", str(DEFAULT_PORT)), export)
        else:
            raise OpenError("NBD server address missing")
    elif server:
        kind = server.get("type")
        if kind is None:
            raise OpenError("Parameter 'type' is missing")
        allowed = {"unix": _UNIX_KEYS, "inet": _INET_KEYS, "vsock": ("cid", "port"), "fd": ("str",)}.get(kind)
        if allowed is None:
            raise OpenError(f"Parameter 'type' does not accept value '{kind}'")
        required = {"unix": ("path",), "inet": ("host", "port"), "vsock": ("cid", "port"), "fd": ("str",)}[kind]
        for key in required:
            if key not in server:
                raise OpenError(f"Parameter '{key}' is missing")
        for key in server:
            if key != "type" and key not in allowed:
                raise OpenError(f"Parameter '{key}' is unexpected")
        if kind == "unix":
            addr = NbdAddress(export, path=server["path"])
        elif kind == "inet":
            addr = _inet(server["host"], server["port"], export)
        else:
            from vdkit.errors import UnsupportedError

            raise UnsupportedError(f"NBD servers of type '{kind}' are not supported by vdkit")
    else:
        raise OpenError("NBD server address missing")
    timeout: float | None = None
    for key in ("open-timeout", "reconnect-delay"):
        value = opts.get(key)
        if value is not None:
            if not value.isdigit():
                raise OpenError(f"Parameter '{key}' expects a number")
            if key == "open-timeout" and int(value):
                timeout = float(int(value))
    if "tls-creds" in opts:
        from vdkit.protocols.tls import client_creds

        client_creds(opts["tls-creds"])
        addr = NbdAddress(addr.export, addr.path, addr.host, addr.port, opts["tls-creds"], opts.get("tls-hostname"))
    if "x-dirty-bitmap" in opts:
        addr = NbdAddress(addr.export, addr.path, addr.host, addr.port, addr.tls_creds, addr.tls_hostname,
                          opts["x-dirty-bitmap"])
    for key in opts:
        if not key.startswith("server.") and key not in legacy and key not in _RUNTIME_KEYS:
            raise OpenError(f"Block protocol 'nbd' doesn't support the option '{key}'")
    return addr, timeout


def _inet(host: str, port: str, export: str) -> NbdAddress:
    """An inet address given as options: the port text goes to getaddrinfo as QEMU passes it (glibc takes
    ``+80``, `` 80``, ``70000`` (mod 2^16) and ``""``, and refuses ``-1`` or a name it does not know,
    which the connect reports), and names the server as given."""
    return NbdAddress(export, host=host, port=int(port) if port.isdigit() and 0 < int(port) < 65536 else port)


KEEPS_FILE_TUNING = True  # -drive file.driver=nbd: file.locking, file.aio... are the nbd node's (refused)
# options that only tune an nbd node: QEMU leaves them out of a json:{...} description of it (observed for
# reconnect-delay; the address, export and TLS options stay, flattened as given)
WEAK_OPTIONS = ("reconnect-delay", "open-timeout", "x-dirty-bitmap")
_DRIVE_KEYS = ("path", "host", "port", "export", "open-timeout", "reconnect-delay", "tls-creds", "tls-hostname",
               "x-dirty-bitmap")


def drive_option(key: str) -> bool:
    """The protocol registry's ``-drive driver=nbd`` slot: ``key`` is the nbd node's option."""
    return key.startswith("server.") or key in _DRIVE_KEYS


def clashes_with_filename(key: str) -> bool:
    """The protocol registry's slot for a file name given beside options (a backing name QEMU fills in):
    ``key`` is part of an address, which a file name excludes (QEMU's 'Option ... cannot be used with a
    file name')."""
    return key in ("host", "port", "path", "export") or key.startswith("server.")


def top_options(opts: dict[str, str], filename: str | None, file_driver: str | None) -> dict[str, str]:
    """The protocol registry's options of ``driver=nbd`` at the top: a ``file.filename`` or ``file.driver``
    given stays an option of the nbd node (which has no file child: :func:`name_for_options` refuses it)."""
    out = dict(opts)
    for key, value in (("file.filename", filename), ("file.driver", file_driver)):
        if value is not None:
            out[key] = value
    return out


def name_for_options(opts: dict[str, str], driver: str = "nbd") -> str:
    """Check the options and return the node's (regenerated) name; opening that name uses them
    (``driver``: the protocol registry's uniform signature; always nbd here)."""
    addr, timeout = address_from_options(opts)
    name = addr.canonical_name()
    _presets()[name] = (addr, timeout)
    return name


# -- the client -------------------------------------------------------------------------------

class NbdError(VdkitError):
    """The server or the connection failed a request (``errno`` is the host errno to report)."""


class _Eof(Exception):
    pass


class NbdClient:
    """One connection to one export, after a completed handshake."""

    def __init__(self, addr: NbdAddress, *, readonly: bool, timeout: float = DEFAULT_TIMEOUT,
                 auto_readonly: bool = False, io_timeout: float = IO_TIMEOUT) -> None:
        self.addr = addr
        self.size = 0
        self.flags = 0
        self.min_block = 1
        self.max_payload = w.MAX_PAYLOAD
        self.structured = False
        self.meta_id: int | None = None
        self._handle = 0
        self.sock = self._connect(timeout)
        try:
            self._handshake()
        except BaseException:
            self.sock.close()
            raise
        if not readonly and not auto_readonly and self.flags & w.TFLAG_READ_ONLY:
            self.close()
            raise OpenError("Could not open image: Permission denied", errno=_errno.EACCES)
        self.sock.settimeout(io_timeout)

    # -- connection ---------------------------------------------------------------------------
    def _connect(self, timeout: float) -> socket.socket:
        a = self.addr
        what = a.describe()
        if a.path is not None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = a.path
        else:
            try:
                infos = socket.getaddrinfo(a.host, a.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise OpenError(f"address resolution failed for {a.host}:{a.port}: {exc.strerror}") from None
            family, kind, proto, _, target = infos[0]
            s = socket.socket(family, kind, proto)
        s.settimeout(timeout)
        try:
            if target == "":  # QEMU's connect() to an empty unix path is refused, Python's is EINVAL
                raise ConnectionRefusedError(_errno.ECONNREFUSED, os.strerror(_errno.ECONNREFUSED))
            s.connect(target)  # type: ignore[arg-type]
        except TimeoutError:
            s.close()
            raise OpenError("Connection attempt cancelled by timeout") from None
        except OSError as exc:
            s.close()
            raise OpenError(f"Failed to connect to '{what}': {os.strerror(exc.errno or _errno.EIO)}",
                            errno=exc.errno) from None
        return s

    def _recv(self, n: int, what: str) -> bytes:
        buf = bytearray()
        try:
            while len(buf) < n:
                chunk = self.sock.recv(n - len(buf))
                if not chunk:
                    raise _Eof()
                buf += chunk
        except TimeoutError:
            raise OpenError("Connection attempt cancelled by timeout") from None
        except _Eof:
            raise OpenError(f"{what}: Unexpected end-of-file before all data were read",
                            errno=_errno.EIO) from None
        except OSError as exc:
            if self.tls:  # the peer ended the session (e.g. it refused our certificate): QEMU's words
                # (GnuTLS: an alert read is EIO, a session cut without one ECONNABORTED; which one a
                # refused client sees depends on timing, for QEMU as for vdkit)
                alert = "ALERT" in str(getattr(exc, "reason", "") or "").upper()
                err = _errno.EIO if alert else _errno.ECONNABORTED
                raise OpenError(f"{what}: Cannot read from TLS channel: {os.strerror(err)}", errno=err) from None
            raise OpenError(f"{what}: {os.strerror(exc.errno or _errno.EIO)}", errno=exc.errno) from None
        return bytes(buf)

    def _send(self, data: bytes) -> None:
        """A handshake message.  A failed send is not reported by itself: the reply read that follows
        fails and says why, as in QEMU (whose writes are buffered; a server that refused our TLS
        certificate is only noticed when its reply cannot be read)."""
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    # -- handshake ------------------------------------------------------------------------------
    def _handshake(self) -> None:
        magic = int.from_bytes(self._recv(8, "Failed to read initial magic"), "big")
        if magic != w.NBDMAGIC:
            raise OpenError(f"Bad initial magic received: {magic:#x}")
        second = int.from_bytes(self._recv(8, "Failed to read server magic"), "big")
        if second == 0x00420281861253:  # oldstyle: size, flags, 124 zero bytes
            if self.addr.export:
                raise OpenError("Server does not support non-empty export names")
            rest = self._recv(8 + 4 + 124, "Failed to read export length")
            self.size = int.from_bytes(rest[:8], "big")
            self.flags = int.from_bytes(rest[8:12], "big") & 0xFFFF
            return
        if second != w.IHAVEOPT:
            raise OpenError(f"Bad server magic received: {second:#x}")
        gflags = w.U16.unpack(self._recv(2, "Failed to read server flags"))[0]
        client = gflags & (w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES)
        self._send(w.CLIENT_FLAGS.pack(client))
        if self.addr.tls_creds is not None:
            if not gflags & w.FLAG_FIXED_NEWSTYLE:
                raise OpenError("Server does not support STARTTLS")
            self._starttls()
        if not gflags & w.FLAG_FIXED_NEWSTYLE:
            self._export_name_option(gflags)
            return
        self.structured = self._simple_option(w.OPT_STRUCTURED_REPLY, b"")
        if self.structured:
            self._set_meta_context()
        self._go()
        if self.addr.x_dirty_bitmap is not None and self.meta_id is None:
            # the server has no such context: QEMU's open fails with EINVAL (its own text is lost)
            raise OpenError("Could not open image: Invalid argument", errno=_errno.EINVAL)

    def _starttls(self) -> None:
        """``NBD_OPT_STARTTLS``, then the TLS handshake; the rest of the negotiation runs over TLS."""
        from vdkit.protocols.tls import client_creds, wrap_client

        creds = client_creds(self.addr.tls_creds or "")
        self._option(w.OPT_STARTTLS, b"")
        rtype, payload = self._reply(w.OPT_STARTTLS)
        if rtype != w.REP_ACK:
            if rtype & w.REP_FLAG_ERROR:
                raise _option_error(rtype, payload, w.OPT_STARTTLS)
            raise OpenError("Unexpected option reply")
        hostname = self.addr.tls_hostname if self.addr.tls_hostname is not None else self.addr.host
        import socket as full_socket  # ssl wraps the socket module's type (and imports it anyway)

        timeout = self.sock.gettimeout()
        plain = full_socket.socket(fileno=self.sock.detach())
        plain.settimeout(timeout)
        self.sock = wrap_client(plain, creds, hostname)
        self.tls = True

    tls = False

    def _option(self, opt: int, data: bytes) -> None:
        self._send(w.OPTION_HEADER.pack(w.IHAVEOPT, opt, len(data)) + data)

    def _reply(self, opt: int) -> tuple[int, bytes]:
        head = self._recv(w.OPTION_REPLY.size, "Failed to read option reply")
        magic, ropt, rtype, length = w.OPTION_REPLY.unpack(head)
        if magic != w.REPLY_MAGIC_OPT or ropt != opt:
            raise OpenError("Unexpected option reply")
        if length > w.MAX_OPTION_LENGTH:
            raise OpenError(f"server's reply to option {opt} is too long")
        return rtype, self._recv(length, "Failed to read option reply") if length else b""

    def _simple_option(self, opt: int, data: bytes) -> bool:
        """An option whose reply is a plain ACK or an error (False for "not supported")."""
        self._option(opt, data)
        rtype, _ = self._reply(opt)
        return rtype == w.REP_ACK

    def _set_meta_context(self) -> None:
        name = self.addr.export.encode()
        wanted = self.addr.x_dirty_bitmap or w.BASE_ALLOCATION
        ctx = wanted.encode()
        data = w.U32.pack(len(name)) + name + w.U32.pack(1) + w.U32.pack(len(ctx)) + ctx
        self._option(w.OPT_SET_META_CONTEXT, data)
        while True:
            rtype, payload = self._reply(w.OPT_SET_META_CONTEXT)
            if rtype == w.REP_META_CONTEXT and len(payload) >= 4:
                if payload[4:].decode(errors="replace") == wanted:
                    self.meta_id = w.U32.unpack(payload[:4])[0]
                continue
            break  # ACK ends the list; an error means no contexts

    def _go(self) -> None:
        name = self.addr.export.encode()
        self._option(w.OPT_GO, w.U32.pack(len(name)) + name + w.U16.pack(1) + w.U16.pack(w.INFO_BLOCK_SIZE))
        have_export = False
        while True:
            rtype, payload = self._reply(w.OPT_GO)
            if rtype == w.REP_INFO and len(payload) >= 2:
                kind = w.U16.unpack(payload[:2])[0]
                if kind == w.INFO_EXPORT and len(payload) == w.INFO_EXPORT_DATA.size:
                    _, self.size, self.flags = w.INFO_EXPORT_DATA.unpack(payload)
                    have_export = True
                elif kind == w.INFO_BLOCK_SIZE and len(payload) == w.INFO_BLOCK_SIZE_DATA.size:
                    _, minimum, _preferred, maximum = w.INFO_BLOCK_SIZE_DATA.unpack(payload)
                    if minimum and minimum & (minimum - 1) == 0 and minimum <= 65536:
                        self.min_block = minimum
                    if maximum >= self.min_block:
                        self.max_payload = min(maximum, w.MAX_PAYLOAD)
                continue
            if rtype == w.REP_ACK:
                if not have_export:
                    raise OpenError("server sent no export information")
                return
            if rtype & w.REP_FLAG_ERROR:
                raise _option_error(rtype, payload, w.OPT_GO)
            raise OpenError("Unexpected option reply")

    def _export_name_option(self, gflags: int) -> None:
        self._option(w.OPT_EXPORT_NAME, self.addr.export.encode())
        data = self._recv(10, "Failed to read export length")
        self.size, self.flags = w.EXPORT_NAME_REPLY.unpack(data)
        if not gflags & w.FLAG_NO_ZEROES:
            self._recv(124, "Failed to read export flags")

    # -- transmission --------------------------------------------------------------------------
    def _request(self, cmd: int, offset: int, length: int, *, flags: int = 0, data: bytes = b"") -> int:
        self._handle += 1
        try:
            self._send(w.REQUEST.pack(w.REQUEST_MAGIC, flags, cmd, self._handle, offset, length) + data)
        except OSError as exc:
            raise NbdError(os.strerror(exc.errno or _errno.EIO), errno=exc.errno or _errno.EIO) from None
        return self._handle

    def _io_recv(self, n: int) -> bytes:
        try:
            return self._recv(n, "Failed to read reply")
        except OpenError as exc:
            raise NbdError("Input/output error", errno=_errno.EIO) from exc

    def _simple_reply(self, handle: int) -> None:
        """The rest of a simple reply's header (its magic already read): a reply to another request is
        EIO, an error reply raises it as the host's errno."""
        err, h = w.SIMPLE_REPLY.unpack(w.U32.pack(w.SIMPLE_REPLY_MAGIC) + self._io_recv(w.SIMPLE_REPLY.size - 4))[1:]
        if h != handle:
            raise NbdError("Input/output error", errno=_errno.EIO)
        if err:
            raise NbdError(os.strerror(_host_errno(err)), errno=_host_errno(err))

    def _replies(self, handle: int) -> list[tuple[int, bytes]]:
        """All chunks of one reply, as (type, payload); raises NbdError for an error reply."""
        chunks: list[tuple[int, bytes]] = []
        while True:
            magic = w.U32.unpack(self._io_recv(4))[0]
            if magic == w.SIMPLE_REPLY_MAGIC:
                self._simple_reply(handle)
                chunks.append((-1, b""))
                return chunks
            if magic != w.STRUCTURED_REPLY_MAGIC:
                raise NbdError("Input/output error", errno=_errno.EIO)
            _, flags, rtype, h, length = w.STRUCTURED_HEADER.unpack(
                w.U32.pack(magic) + self._io_recv(w.STRUCTURED_HEADER.size - 4))
            if h != handle or length > w.MAX_PAYLOAD + 64:
                raise NbdError("Input/output error", errno=_errno.EIO)
            payload = self._io_recv(length) if length else b""
            if rtype in (w.REPLY_TYPE_ERROR, w.REPLY_TYPE_ERROR_OFFSET):
                err = w.U32.unpack(payload[:4])[0] if len(payload) >= 4 else w.EIO
                raise NbdError(os.strerror(_host_errno(err)), errno=_host_errno(err))
            chunks.append((rtype, payload))
            if flags & w.REPLY_FLAG_DONE:
                return chunks

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of the export (inside it), split at the maximum payload."""
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the export's bytes at ``offset`` (inside it), split at the maximum payload.

        Aligned pieces are received straight into ``view`` (no copy of the data in this process:
        reading through intermediate bytes objects made a 2 MiB read cost several copies); a piece
        widened to the server's minimum block size goes through a small buffer.
        """
        mb = self.min_block
        step = self.max_payload - self.max_payload % mb if self.max_payload >= mb else mb
        pos, end = offset, offset + len(view)
        while pos < end:
            a = pos - pos % mb
            b = min(self.size, -(-min(end, a + step) // mb) * mb)
            take = min(end, b) - pos
            if a == pos and b - a == take:
                self._read_piece(a, view[pos - offset:pos - offset + take])
            else:
                tmp = memoryview(bytearray(b - a))
                self._read_piece(a, tmp)
                view[pos - offset:pos - offset + take] = tmp[pos - a:pos - a + take]
            pos += take

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        try:
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise NbdError("Input/output error", errno=_errno.EIO)
                got += n
        except OSError:  # timeouts (IO_TIMEOUT) included
            raise NbdError("Input/output error", errno=_errno.EIO) from None

    def _read_piece(self, offset: int, target: memoryview) -> None:
        """One NBD_CMD_READ of ``len(target)`` bytes at ``offset``, its data received into ``target``."""
        handle = self._request(w.CMD_READ, offset, len(target))
        while True:
            magic = w.U32.unpack(self._io_recv(4))[0]
            if magic == w.SIMPLE_REPLY_MAGIC:
                self._simple_reply(handle)
                self._recv_into(target)
                return
            if magic != w.STRUCTURED_REPLY_MAGIC:
                raise NbdError("Input/output error", errno=_errno.EIO)
            _, flags, rtype, h, length = w.STRUCTURED_HEADER.unpack(
                w.U32.pack(magic) + self._io_recv(w.STRUCTURED_HEADER.size - 4))
            if h != handle or length > w.MAX_PAYLOAD + 64:
                raise NbdError("Input/output error", errno=_errno.EIO)
            if rtype == w.REPLY_TYPE_OFFSET_DATA and length >= 8:
                at = w.U64.unpack(self._io_recv(8))[0] - offset
                if at < 0 or at + length - 8 > len(target):
                    raise NbdError("Input/output error", errno=_errno.EIO)
                self._recv_into(target[at:at + length - 8])
            else:
                payload = self._io_recv(length) if length else b""
                if rtype in (w.REPLY_TYPE_ERROR, w.REPLY_TYPE_ERROR_OFFSET):
                    err = w.U32.unpack(payload[:4])[0] if len(payload) >= 4 else w.EIO
                    raise NbdError(os.strerror(_host_errno(err)), errno=_host_errno(err))
                if rtype == w.REPLY_TYPE_OFFSET_HOLE and len(payload) == 12:
                    hole_at, hole_len = w.U64.unpack(payload[:8])[0] - offset, w.U32.unpack(payload[8:])[0]
                    if hole_at < 0 or hole_at + hole_len > len(target):
                        raise NbdError("Input/output error", errno=_errno.EIO)
                    target[hole_at:hole_at + hole_len] = bytes(hole_len)  # the caller's buffer is reused
            if flags & w.REPLY_FLAG_DONE:
                return

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``, split at the maximum payload.

        A request not aligned to the server's minimum block size becomes a
        read-modify-write of the whole blocks it touches, as QEMU does (a
        512-byte write to a 4 KiB-block export reads and writes 4 KiB).
        """
        mb = self.min_block
        if mb > 1 and (offset % mb or len(data) % mb):
            a = offset - offset % mb
            b = min(self.size, -(-(offset + len(data)) // mb) * mb)
            buf = bytearray(self.read(a, b - a))
            buf[offset - a:offset - a + len(data)] = data
            offset, data = a, bytes(buf)
        view = memoryview(data)
        step = max(mb, self.max_payload - self.max_payload % mb)
        pos = 0
        while pos < len(view):
            n = min(step, len(view) - pos)
            handle = self._request(w.CMD_WRITE, offset + pos, n, flags=w.CMDFLAG_FUA if fua else 0,
                                   data=bytes(view[pos:pos + n]))
            self._replies(handle)
            pos += n

    def write_zeroes(self, offset: int, length: int, *, trim: bool = True) -> None:
        """Zero ``[offset, offset+length)``: NBD_CMD_WRITE_ZEROES (may trim unless ``trim`` is off).

        A server without the command gets zeros written; block-unaligned edges are written
        (read-modify-write) so that only whole blocks are zeroed by the command.
        """
        mb = self.min_block
        if mb > 1 and (offset % mb or length % mb):
            # QEMU's order: read both edge blocks, write the head, zero the middle, write the tail
            end = offset + length
            a, b = offset - offset % mb, min(self.size, -(-end // mb) * mb)
            first_end = min(a + mb, b)
            last = max(first_end, b - mb if b % mb == 0 else b - b % mb)
            head = bytearray(self.read(a, first_end - a)) if offset % mb or end < first_end else None
            tail = bytearray(self.read(last, b - last)) if last < b and end % mb else None
            if head is not None:
                head[offset - a:min(end, first_end) - a] = bytes(min(end, first_end) - offset)
                self.write(a, bytes(head), fua=False)
                offset = first_end
            if tail is not None:
                tail[:end - last] = bytes(end - last)
            length = (last if tail is not None else end) - offset
            if length > 0:
                self.write_zeroes(offset, length, trim=trim)
            if tail is not None:
                self.write(last, bytes(tail))
            return
        if length <= 0:
            return
        if not self.flags & w.TFLAG_SEND_WRITE_ZEROES:
            chunk = bytes(min(length, 1 << 20))
            for pos in range(0, length, len(chunk)):
                self.write(offset + pos, chunk[:min(len(chunk), length - pos)])
            return
        pos = 0
        limit = (1 << 31) - (1 << 31) % mb
        while pos < length:
            n = min(limit, length - pos)
            self._replies(self._request(w.CMD_WRITE_ZEROES, offset + pos, n,
                                        flags=0 if trim else w.CMDFLAG_NO_HOLE))
            pos += n

    def flush(self) -> None:
        if self.flags & w.TFLAG_SEND_FLUSH:
            self._replies(self._request(w.CMD_FLUSH, 0, 0))

    def block_status(self, offset: int, length: int) -> tuple[int, bool, bool]:
        """(length, hole, zero) of the run at ``offset`` (one extent, REQ_ONE, as QEMU asks)."""
        if self.meta_id is None:
            return length, False, False
        handle = self._request(w.CMD_BLOCK_STATUS, offset, min(length, 0xFFFFFFFF), flags=w.CMDFLAG_REQ_ONE)
        for rtype, payload in self._replies(handle):
            if rtype == w.REPLY_TYPE_BLOCK_STATUS and len(payload) >= 12:
                n, state = w.EXTENT.unpack(payload[4:12])
                if n == 0:
                    break
                return min(n, length), bool(state & w.STATE_HOLE), bool(state & w.STATE_ZERO)
        return length, False, False

    def close(self) -> None:
        try:
            self._request(w.CMD_DISC, 0, 0)
        except (NbdError, OSError):
            pass
        self.sock.close()


def _host_errno(nbd_err: int) -> int:
    return {w.EPERM: _errno.EPERM, w.EIO: _errno.EIO, w.ENOMEM: _errno.ENOMEM, w.EINVAL: _errno.EINVAL,
            w.ENOSPC: _errno.ENOSPC, w.EOVERFLOW: _errno.EOVERFLOW, w.ENOTSUP: _errno.ENOTSUP,
            w.ESHUTDOWN: _errno.ESHUTDOWN}.get(nbd_err, _errno.EINVAL)


def _option_error(rtype: int, payload: bytes, opt: int) -> OpenError:
    text = payload.decode("utf-8", "replace")
    name = {w.OPT_STARTTLS: "starttls", w.OPT_GO: "go"}.get(opt, "unknown")
    reported = f"server reported: {text}" if text else None
    if rtype == w.REP_ERR_UNKNOWN:
        msg = "Requested export not available"
    elif rtype == w.REP_ERR_TLS_REQD:
        msg = f"TLS negotiation required before option {opt} ({name})"
        return OpenError(msg, hint="Did you forget a valid tls-creds?" + (f"\n{reported}" if reported else ""))
    elif rtype == w.REP_ERR_POLICY:
        msg = f"Denied by server for option {opt} ({name})"
    else:
        msg = f"Server error for option {opt} ({name})"
    return OpenError(msg, hint=reported)


# -- the protocol node -----------------------------------------------------------------------

class NbdFile(RemoteFile):
    """An NBD export seen through the interface format drivers use for a file (:class:`ImageFile`)."""

    has_info = False  # no bdrv_get_info: info shows no dirty flag and "disk size: unavailable"
    protocol_driver = "nbd"
    creates_zeroed = False  # an export keeps its old bytes when "created": convert writes every zero range

    def __init__(self, name: str, *, readonly: bool = True, force_share: bool = False,
                 addr: NbdAddress | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        open_timeout: float | None = None
        preset = _presets().get(name) if addr is None else None
        if preset is not None:
            addr, open_timeout = preset
        self._name = name
        self.open_options: str | None = None  # a blockdev-add node's options, as the graph describes it
        self.addr = addr if addr is not None else parse_name(name)
        self.filename = self.addr.canonical_name()
        self.readonly = readonly
        self.sync = True
        self.client = self._connect(timeout) if open_timeout is None else self._retry(open_timeout)

    def _connect(self, timeout: float) -> NbdClient:
        auto = not self.readonly and (self._name in AUTO_READ_ONLY or self.filename in AUTO_READ_ONLY)
        client = NbdClient(self.addr, readonly=self.readonly, timeout=timeout, auto_readonly=auto)
        if client.flags & w.TFLAG_READ_ONLY:
            self.readonly = True
        return client

    def _retry(self, seconds: float) -> NbdClient:
        """``open-timeout``: QEMU retries the connection and handshake that long, then reports the last error."""
        import time

        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            try:
                return self._connect(max(left, 0.05))
            except OpenError as exc:
                if exc.errno == _errno.EACCES or time.monotonic() + 0.1 >= deadline:
                    raise
            time.sleep(0.1)

    def size(self) -> int:
        return self.client.size

    def allocated_size(self) -> int:
        raise OSError(_errno.ENOTSUP, "disk size unavailable over NBD")

    def readinto(self, offset: int, view: memoryview) -> None:
        """The export's bytes at ``offset`` received straight into ``view`` (zeros past its end)."""
        if offset < 0:
            raise OSError(_errno.EIO, os.strerror(_errno.EIO))
        inside = max(0, min(len(view), self.client.size - offset))
        if inside:
            self._io(lambda: self.client.readinto(offset, view[:inside]))
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset + len(data) > self.client.size:
            raise OSError(_errno.EIO, "Cannot grow NBD nodes")
        self._io(lambda: self.client.write(offset, bytes(data)), writes=True)

    def pwritev(self, offset: int, buffers: list[bytes | bytearray | memoryview]) -> None:
        self.pwrite(offset, b"".join(bytes(b) for b in buffers))

    def truncate_exact(self, size: int) -> None:
        """``resize`` (an exact size): an export keeps its size, so only its own size is accepted (QEMU's text)."""
        if size != self.client.size:
            raise VdkitError("Cannot resize NBD nodes", errno=_errno.ENOTSUP)

    def truncate(self, size: int) -> None:
        if size > self.client.size:
            raise VdkitError("Cannot grow NBD nodes", errno=_errno.EINVAL)

    def block_status(self, offset: int, length: int) -> BlockStatus:
        n, hole, zero = self._io(lambda: self.client.block_status(offset, length))
        flags = (ZERO if zero else 0) | (0 if hole else DATA) | OFFSET_VALID
        return BlockStatus(flags, n, offset, self.filename)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero a range inside the export; ``unmap`` lets the server trim (QEMU's BDRV_REQ_MAY_UNMAP)."""
        end = min(offset + length, self.client.size)
        if end > offset:
            self._io(lambda: self.client.write_zeroes(offset, end - offset, trim=unmap), writes=True)

    def punch_hole(self, offset: int, length: int, *, extend: bool = True) -> None:
        end = min(offset + length, self.client.size)
        if end > offset:
            self._io(lambda: self.client.write_zeroes(offset, end - offset, trim=True), writes=True)

    def flush(self) -> None:
        """NBD_CMD_FLUSH; also under ``cache=unsafe`` (qemu-img's convert still ends with one flush)."""
        if not self.readonly:
            self._io(self.client.flush)
            self._written = False

    def close(self) -> None:
        """Disconnect; writes not flushed yet are flushed first, as QEMU's node close does."""
        if self._written:
            try:
                self.flush()
            except OSError:
                pass
        self.client.close()

    _written = False  # data written since the last flush

    def _io(self, fn: Callable[[], T], *, writes: bool = False) -> T:
        self._written = self._written or writes
        try:
            return fn()
        except NbdError as exc:
            raise OSError(exc.errno or _errno.EIO, exc.message) from None

    def __enter__(self) -> NbdFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<NbdFile {self.filename!r}>"


def no_base_directory(name: str) -> str | None:
    """Why a relative backing name below an export cannot be resolved (QEMU's text)."""
    return "Cannot generate a base directory for NBD nodes"


def open_file(name: str, *, readonly: bool, force_share: bool, fmt: str | None) -> tuple[NbdFile, str]:
    """The protocol registry's open: the export, named by its canonical name."""
    file = NbdFile(name, readonly=readonly, force_share=force_share)
    return file, file.filename


_BLOCKDEV_KEYS = ("server", "export", "tls-creds", "tls-hostname", "x-dirty-bitmap", "reconnect-delay", "open-timeout")


def open_blockdev(opts: dict[str, object], *, readonly: bool, auto_read_only: bool) -> tuple[NbdFile, str, bool]:
    """The protocol registry's ``blockdev-add`` open (QAPI-checked options; ``server`` flattened to the
    dotted keys :func:`name_for_options` checks, values as their option strings): the export, named by its
    canonical name, and its read-only flag (``auto-read-only`` over a read-only export makes it read-only)."""
    from vdkit.info.render_json import dumps_compact

    flat: dict[str, str] = {}
    desc: dict[str, object] = {"driver": "nbd"}  # as QEMU describes the node in a parent's json: name
    for key, value in opts.items():
        if key not in _BLOCKDEV_KEYS:  # the node's common options (node-name, cache, read-only...)
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, item in items:
            dotted = key if sub is None else f"{key}.{sub}"
            flat[dotted] = ("on" if item else "off") if isinstance(item, bool) else str(item)
            if key not in WEAK_OPTIONS:
                desc[dotted] = item
    try:
        name = name_for_options(flat)
    except OpenError as exc:  # the QAPI visitor names a SocketAddress member by its path in the node
        import re

        found = re.fullmatch(r"Parameter '([^']+)' is (missing|unexpected)", exc.message)
        if found is None or not any(k.startswith("server.") for k in flat):
            raise
        raise OpenError(f"Parameter 'server.{found[1]}' is {found[2]}") from None
    if auto_read_only and not readonly:
        AUTO_READ_ONLY.add(name)
    file = NbdFile(name, readonly=readonly)
    file.open_options = dumps_compact(desc)
    return file, file.filename, bool(file.readonly)


def create_fallback(name: str, size: int) -> None:
    """What ``qemu-img create`` does on an NBD name, the driver having no image creation.

    QEMU's generic fallback: open the existing export for writing, check that
    it holds ``size`` bytes, zero (may trim) its first sector, flush and
    disconnect; the format driver then reconnects to write its metadata.
    """
    try:
        f = NbdFile(name, readonly=False)
    except VdkitError as exc:
        raise VdkitError("Protocol driver 'nbd' does not support image creation, and opening the image failed: "
                         + exc.message, hint=exc.hint, errno=exc.errno) from exc
    with f:
        try:
            f.truncate(size)  # "Cannot grow NBD nodes"
            n = min(512, f.size())
            if n:
                f._io(lambda: f.client.write_zeroes(0, n, trim=True))
        finally:
            f.flush()  # closing flushes, also after a refusal (as QEMU's node close)


# -- qemu-img create on an NBD name (vdkit.protocols.registry's creation entry points) -------------

CREATE_PLACE = "NBD exports"


def create_raw(filename: str, opts: CreateOpts) -> None:
    """A raw image on an export: the export itself, which must be as large as the image."""
    prealloc = str(opts.get("preallocation", "off"))
    if prealloc != "off":  # QEMU's fallback takes none
        raise VdkitError(f"Unsupported preallocation mode '{prealloc}'")
    create_fallback(filename, -(-int(opts.get("size") or 0) // 512) * 512)


def create_for_format(filename: str, opts: CreateOpts) -> None:
    """The export prepared for a format that writes through it (qcow2): any export size will do."""
    from vdkit.errors import UnsupportedError

    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in ("off", "metadata"):
        raise UnsupportedError(f"Preallocation mode '{prealloc}' on NBD exports is not supported by vdkit")
    if opts.get("data_file") is not None:
        raise UnsupportedError("A qcow2 data file next to an NBD export is not supported by vdkit")
    create_fallback(filename, 0)
