"""TLS credentials (``--object tls-creds-x509``) and the client side of a TLS session, for NBD.

qemu-img creates each ``--object`` as it parses it, and the nbd driver finds
credentials by id (``tls-creds=ID``) when it opens an export.  The facts come
from QEMU 7.2's observed behaviour (``tests/protocols/test_nbd_tls.py`` runs
both tools on the same servers):

* ``tls-creds-x509`` takes a directory: a client needs ``ca-cert.pem``
  (``client-cert.pem``/``client-key.pem`` are sent when present), a server
  ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``; a missing one
  fails the object with ``Unable to access credentials PATH: ...``.
  ``verify-peer`` (default on) checks the server's certificate against the CA
  and the host name: the inet host, or ``tls-hostname``; a unix socket has
  none (``No hostname for certificate validation``).
* ``sanity-check`` (default on) validates the object's own certificate
  against its CA when the object is created.

Built on the standard library's :mod:`ssl` (OpenSSL), which speaks to QEMU's
GnuTLS peers; its verification results are reported with the texts QEMU
prints.  PSK and anonymous credentials need TLS features :mod:`ssl` does not
offer on Python 3.11 (no PSK callbacks): such objects are created and checked
as QEMU does, but an NBD open with them is refused as unsupported.
"""

from __future__ import annotations

import errno as _errno
import os

from vdkit.errors import OpenError, VdkitError
from vdkit.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    import ssl

TLS_TYPES = ("tls-creds-x509", "tls-creds-psk", "tls-creds-anon")


@record
class TlsCreds:
    """One ``tls-creds-*`` object as created: its type, endpoint and the files it loaded."""

    qom_type: str
    id: str
    endpoint: str
    verify_peer: bool
    dir: str | None
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    key_password: bytes | None = None


def _objects() -> dict[str, str]:
    """Every ``--object`` id created in the current open scope (:mod:`vdkit.block.secrets`; a front end's
    process), with its type (QEMU looks credentials up among all)."""
    from vdkit.block.secrets import table

    return table("objects")


def _creds() -> dict[str, TlsCreds]:
    from vdkit.block.secrets import table

    return table("tls-creds")


def _bool(name: str, value: str | None, default: bool) -> bool:
    from vdkit.opts import parse_bool

    return default if value is None else parse_bool(name, value)


def register_object(obj_id: str, qom_type: str, props: dict[str, str], secrets: dict[str, bytes]) -> None:
    """Record an ``--object``; a ``tls-creds-*`` one is loaded and checked as QEMU creates it.

    ``secrets`` maps secret ids to their data (``passwordid`` of an encrypted key).
    Errors are QEMU's texts, without a prefix.
    """
    if qom_type in TLS_TYPES:
        _creds()[obj_id] = _load(obj_id, qom_type, props, secrets)
    _objects()[obj_id] = qom_type


def _load(obj_id: str, qom_type: str, props: dict[str, str], secrets: dict[str, bytes]) -> TlsCreds:
    endpoint = props.get("endpoint", "client")
    if endpoint not in ("client", "server"):
        raise VdkitError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    verify = _bool("verify-peer", props.get("verify-peer"), qom_type == "tls-creds-x509")
    sanity = _bool("sanity-check", props.get("sanity-check"), True)
    creds = TlsCreds(qom_type, obj_id, endpoint, verify, props.get("dir"))
    if qom_type == "tls-creds-psk":
        if endpoint == "server" and "username" in props:
            raise VdkitError("username should not be set when endpoint=server")
        _required(creds, "keys.psk")
        return creds
    if qom_type != "tls-creds-x509":
        return creds
    server = endpoint == "server"
    creds.ca_cert = _required(creds, "ca-cert.pem")
    if server:
        creds.cert, creds.key = _required(creds, "server-cert.pem"), _required(creds, "server-key.pem")
    else:
        cert, key = _optional(creds, "client-cert.pem"), _optional(creds, "client-key.pem")
        creds.cert, creds.key = (cert, key) if cert is not None and key is not None else (None, None)
    password = props.get("passwordid")
    if password is not None:
        if password not in secrets:
            raise VdkitError(f"No secret with id '{password}'")
        creds.key_password = secrets[password]
    import ssl

    try:
        ssl.create_default_context(cafile=creds.ca_cert)
    except (ssl.SSLError, ValueError):
        raise VdkitError(f"Unable to import CA certificate list {creds.ca_cert}") from None
    if creds.cert is not None and sanity:
        _sanity_check(creds)
    return creds


def _path(creds: TlsCreds, name: str) -> str:
    return os.path.join(creds.dir or "", name)


def _required(creds: TlsCreds, name: str) -> str:
    path = _path(creds, name)
    if not os.access(path, os.R_OK):
        err = _errno.ENOENT if not os.path.exists(path) else _errno.EACCES
        raise VdkitError(f"Unable to access credentials {path}: {os.strerror(err)}")
    return path


def _optional(creds: TlsCreds, name: str) -> str | None:
    path = _path(creds, name)
    return path if os.access(path, os.R_OK) else None


def _sanity_check(creds: TlsCreds) -> None:
    """QEMU's check that the object's own certificate is issued by its CA, done as a TLS handshake in memory.

    :mod:`ssl` has no API to verify one certificate, so the certificate is
    presented in the role it will play (a client's to a verifying server, a
    server's to a verifying client) over memory BIOs; the verifier's result
    is QEMU's message.
    """
    import ssl

    assert creds.cert is not None and creds.key is not None and creds.ca_cert is not None
    own_role = ssl.PROTOCOL_TLS_SERVER if creds.endpoint == "server" else ssl.PROTOCOL_TLS_CLIENT
    peer_role = ssl.PROTOCOL_TLS_CLIENT if creds.endpoint == "server" else ssl.PROTOCOL_TLS_SERVER
    own = ssl.SSLContext(own_role)
    own.check_hostname = False
    own.verify_mode = ssl.CERT_NONE
    try:
        own.load_cert_chain(creds.cert, creds.key, password=creds.key_password)
    except (ssl.SSLError, OSError):
        raise VdkitError(f"Unable to import client certificate {creds.cert}") from None
    verifier = ssl.SSLContext(peer_role)
    verifier.check_hostname = False
    verifier.verify_mode = ssl.CERT_REQUIRED
    verifier.load_verify_locations(creds.ca_cert)
    if creds.endpoint == "client":  # the verifying server needs a certificate of its own: the client's
        verifier.load_cert_chain(creds.cert, creds.key, password=creds.key_password)
    try:
        _memory_handshake(own, verifier, creds.endpoint == "server")
    except ssl.SSLCertVerificationError as exc:
        raise VdkitError(f"Our own certificate {creds.cert} failed validation against {creds.ca_cert}: "
                         f"{verify_text(exc)}") from None
    except ssl.SSLError:
        pass  # not a verdict on the certificate (e.g. a key the peer cannot use): the session will tell


def _memory_handshake(own: ssl.SSLContext, verifier: ssl.SSLContext, own_is_server: bool) -> None:
    """Both ends of a handshake over memory BIOs; the verifying end raises its verdict."""
    import ssl

    own_in, own_out, ver_in, ver_out = (ssl.MemoryBIO() for _ in range(4))
    ends = [(own.wrap_bio(own_in, own_out, server_side=own_is_server), own_out, ver_in),
            (verifier.wrap_bio(ver_in, ver_out, server_side=not own_is_server), ver_out, own_in)]
    done = [False, False]
    for _ in range(10):  # a TLS 1.2/1.3 handshake takes at most a few flights
        for i, (end, out, peer_in) in enumerate(ends):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            if data:
                peer_in.write(data)
        if all(done):
            return


def verify_text(exc: ssl.SSLCertVerificationError, hostname: str | None = None) -> str:
    """GnuTLS's words (as QEMU prints them) for an OpenSSL verification result."""
    code = exc.verify_code
    if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return f"Certificate does not match the hostname {hostname}"
    if code in (2, 18, 19, 20, 21):  # issuer unknown, self-signed, chain incomplete
        return "The certificate hasn't got a known issuer"
    if code == 10:
        return "The certificate has expired"
    if code == 9:
        return "The certificate is not yet activated"
    if code == 23:
        return "The certificate has been revoked"
    return "The certificate is not trusted"


def client_creds(creds_id: str) -> TlsCreds:
    """The credentials an NBD client names, checked as QEMU checks them at open."""
    creds = _creds().get(creds_id)
    if creds is None:
        if creds_id in _objects():
            raise OpenError(f"Object with id '{creds_id}' is not TLS credentials")
        raise OpenError(f"No TLS credentials with id '{creds_id}'")
    if creds.endpoint != "client":
        raise OpenError("Expected TLS credentials for a client endpoint")
    return creds


def wrap_client(sock: socket.socket, creds: TlsCreds, hostname: str | None) -> ssl.SSLSocket:
    """Run the client side of the TLS handshake on ``sock`` and check the server's certificate as QEMU.

    ``hostname``: ``tls-hostname`` or the inet host; None for a unix socket
    without ``tls-hostname`` (refused once the handshake is done when the peer
    is verified: QEMU's order).
    """
    import ssl

    if creds.qom_type != "tls-creds-x509":
        from vdkit.errors import UnsupportedError

        kind = creds.qom_type[len("tls-creds-"):].upper()
        raise UnsupportedError(f"TLS with {kind} credentials is not supported by vdkit (x509 only)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = creds.verify_peer and hostname is not None
    ctx.verify_mode = ssl.CERT_REQUIRED if creds.verify_peer else ssl.CERT_NONE
    if creds.verify_peer:
        ctx.load_verify_locations(creds.ca_cert)
    if creds.cert is not None:
        ctx.load_cert_chain(creds.cert, creds.key, password=creds.key_password)
    if hostname == "" and ctx.check_hostname:  # ssl refuses an empty name; no certificate matches one
        ctx.check_hostname = False
    try:
        tls = ctx.wrap_socket(sock, server_hostname=hostname or None, do_handshake_on_connect=False,
                              suppress_ragged_eofs=False)
        tls.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        raise OpenError(verify_text(exc, hostname)) from None
    except TimeoutError:
        raise OpenError("Connection attempt cancelled by timeout") from None
    except ssl.SSLError as exc:
        raise OpenError(f"TLS handshake failed: {exc.reason or exc.strerror}") from None
    except OSError as exc:
        raise OpenError(f"TLS handshake failed: {os.strerror(exc.errno or _errno.EIO)}") from None
    if creds.verify_peer and not hostname:
        tls.close()
        raise OpenError("No hostname for certificate validation" if hostname is None
                        else "Certificate does not match the hostname ")
    return tls
