"""QOM user-creatable objects as ``--object`` defines them (``secret``, ``tls-creds-*``...), for every front end
and the library.

vdkit does no encrypted I/O, so objects change nothing; but qemu-img creates
each ``--object`` as soon as getopt returns it and scripts rely on its
refusals.  The definition is checked in qemu-img's order: keyval syntax,
qom-type, id, the type's parameters, whether qemu-img can create that type
at all, a duplicate id, then what creating it does (a secret loads and
decodes its data).  The tables below are what qemu-img 7.2 answers.

Secrets and TLS credentials go to the current open scope (:mod:`vdkit.block.secrets`): the process's for
the command line, the call's own for ``vdkit.open(objects=...)``.
"""

from __future__ import annotations

import errno
import os

from vdkit.opts import id_wellformed, split_items
from vdkit.record import record


class ObjectHelp(Exception):  # noqa: N818 - a request, not an error
    """``help`` was given: the front end prints the list (``qom_type``: that type's properties)."""

    def __init__(self, qom_type: str | None) -> None:
        super().__init__(qom_type)
        self.qom_type = qom_type


# QOM types qemu-img can create, with the properties ``--object TYPE,help`` lists.
CREATABLE: dict[str, str] = {
    "authz-list": "policy=<QAuthZListPolicy> rules=<QAuthZListRule>",
    "authz-list-file": "filename=<string> refresh=<bool>",
    "authz-simple": "identity=<string>",
    "main-loop": "aio-max-batch=<int> thread-pool-max=<int> thread-pool-min=<int>",
    "pr-manager-helper": "path=<string>",
    "secret": "data=<string> file=<string> format=<QCryptoSecretFormat> iv=<string> keyid=<string>",
    "secret_keyring": "format=<QCryptoSecretFormat> iv=<string> keyid=<string> serial=<int32_t>",
    "thread-context": "cpu-affinity=<int> node-affinity=<int>",
    "throttle-group": "limits=<ThrottleLimits> x-bps-read-max-length=<int> x-bps-read-max=<int> x-bps-read=<int> "
                      "x-bps-total-max-length=<int> x-bps-total-max=<int> x-bps-total=<int> "
                      "x-bps-write-max-length=<int> x-bps-write-max=<int> x-bps-write=<int> "
                      "x-iops-read-max-length=<int> x-iops-read-max=<int> x-iops-read=<int> x-iops-size=<int> "
                      "x-iops-total-max-length=<int> x-iops-total-max=<int> x-iops-total=<int> "
                      "x-iops-write-max-length=<int> x-iops-write-max=<int> x-iops-write=<int>",
    "tls-cipher-suites": "dir=<string> endpoint=<QCryptoTLSCredsEndpoint> priority=<string> verify-peer=<bool>",
    "tls-creds-anon": "dir=<string> endpoint=<QCryptoTLSCredsEndpoint> priority=<string> verify-peer=<bool>",
    "tls-creds-psk": "dir=<string> endpoint=<QCryptoTLSCredsEndpoint> priority=<string> username=<string> "
                     "verify-peer=<bool>",
    "tls-creds-x509": "dir=<string> endpoint=<QCryptoTLSCredsEndpoint> passwordid=<string> priority=<string> "
                      "sanity-check=<bool> verify-peer=<bool>",
}

# Every qom-type QEMU's schema knows (others: "does not accept value"), with the first
# parameter qemu-img finds missing when only an id is given.  Types not in CREATABLE are
# refused after that ("invalid object type").  The schema's name for authz-list-file is
# authz-listfile, which is why qemu-img cannot create that one from the command line.
_SCHEMA_TYPES: dict[str, str | None] = {
    "authz-list": None, "authz-listfile": "filename", "authz-pam": "service", "authz-simple": "identity",
    "can-bus": None, "can-host-socketcan": "if", "colo-compare": "primary_in", "cryptodev-backend": None,
    "cryptodev-backend-builtin": None, "cryptodev-vhost-user": "chardev", "dbus-vmstate": "addr",
    "filter-buffer": "netdev", "filter-dump": "netdev", "filter-mirror": "netdev",
    "filter-redirector": "netdev", "filter-replay": "netdev", "filter-rewriter": "netdev",
    "input-barrier": "name", "input-linux": "evdev", "iothread": None, "main-loop": None,
    "memory-backend-epc": "size", "memory-backend-file": "size", "memory-backend-memfd": "size",
    "memory-backend-ram": "size", "pef-guest": None, "pr-manager-helper": "path", "qtest": "chardev",
    "rng-builtin": None, "rng-egd": "chardev", "rng-random": None, "secret": None, "secret_keyring": "serial",
    "sev-guest": "reduced-phys-bits", "s390-pv-guest": None, "thread-context": None, "throttle-group": None,
    "tls-creds-anon": None, "tls-creds-psk": None, "tls-creds-x509": None, "tls-cipher-suites": None,
    "x-remote-object": "fd", "x-vfio-user-server": "socket",
}

# Schema members that are not writable properties (deprecated read-only "loaded").
_READ_ONLY = {"secret": ("loaded",), "secret_keyring": ("loaded",)}

_SECRET_FORMATS = ("raw", "base64")
_BASE64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")


@record
class QomObject:
    """One ``--object``: its type, id and parameters; ``data`` is a secret's decoded value."""

    qom_type: str
    id: str
    props: dict[str, str]
    data: bytes | None = None


def _keyval(spec: str) -> tuple[dict[str, str], bool]:
    """QEMU's keyval syntax with the implied key ``qom-type``: (parameters, whether help was asked).

    Dotted keys are kept flat (``data.a``); the caller decides what nesting means.
    """
    import re

    from vdkit.errors import VdkitError

    params: dict[str, str] = {}
    want_help = False
    first = True
    for item in _split_opts_keep_empty(spec):
        if item == "" and not first:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            if item in ("help", "?"):
                want_help = True
                first = False
                continue
            if first and item:
                params["qom-type"] = item
                first = False
                continue
            if not item or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)*", item):
                raise VdkitError(f"Invalid parameter '{item}'")
            raise VdkitError(f"Expected '=' after parameter '{item}'")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)*", key):
            raise VdkitError(f"Invalid parameter '{key}'")
        params[key] = value  # a repeated key: the last one wins
        first = False
    return params, want_help


def _split_opts_keep_empty(spec: str) -> list[str]:
    """Comma-separated items (``,,`` a literal comma), keeping empty ones so a leading ``,`` is seen."""
    if not spec:
        return []
    items = split_items(spec)
    if items and items[-1] == "" and len(items) > 1:
        items.pop()  # a trailing comma ends the list
    return items


def add_object(spec: str, objects: dict[str, QomObject]) -> None:
    """Create ``--object spec`` into ``objects`` (keyed by id) or fail with qemu-img's error.

    ``help`` (alone or after a type) prints what qemu-img prints and ends the
    command with status 0.  Objects have no effect on vdkit's I/O.
    """

    from vdkit.errors import VdkitError

    params, want_help = _keyval(spec)
    qom_type = params.get("qom-type")
    if want_help:
        raise ObjectHelp(qom_type)
    if qom_type is None:
        raise VdkitError("Parameter 'qom-type' is missing")
    if qom_type not in _SCHEMA_TYPES:
        raise VdkitError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    obj_id = params.get("id")
    if obj_id is None:
        raise VdkitError("Parameter 'id' is missing")
    if not id_wellformed(obj_id):
        raise VdkitError("Parameter 'id' expects an identifier",
                         hint="Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
    props = {k: v for k, v in params.items() if k not in ("qom-type", "id")}
    if qom_type not in CREATABLE:
        missing = _SCHEMA_TYPES[qom_type]
        if missing is not None and missing not in props:
            raise VdkitError(f"Parameter '{missing}' is missing")
        raise VdkitError(f"invalid object type: {qom_type}")
    known = {p.partition("=")[0] for p in CREATABLE[qom_type].split()} | set(_READ_ONLY.get(qom_type, ()))
    required = {"authz-simple": "identity", "pr-manager-helper": "path", "secret_keyring": "serial"}.get(qom_type)
    if "format" in known and props.get("format", "raw") not in _SECRET_FORMATS:
        raise VdkitError(f"Parameter 'format' does not accept value '{props['format']}'")
    if required is not None and required not in props:
        raise VdkitError(f"Parameter '{required}' is missing")
    for key in props:
        top = key.partition(".")[0]
        if top not in known:
            raise VdkitError(f"Parameter '{top}' is unexpected")
        if "." in key and qom_type != "throttle-group":  # only throttle-group's 'limits' is a struct
            raise VdkitError(f"Parameters '{top}.*' are unexpected")
    for key in _READ_ONLY.get(qom_type, ()):
        if key in props:
            raise VdkitError(f"Property '{qom_type}.{key}' is not writable")
    if obj_id in objects:
        raise VdkitError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
    obj = QomObject(qom_type, obj_id, props)
    if qom_type == "secret":
        obj.data = _load_secret(props, objects)
        if "keyid" not in props:  # (an encrypted secret is not decrypted by vdkit: not usable as a key)
            from vdkit.block.secrets import register_secret

            register_secret(obj_id, obj.data)
    elif qom_type == "tls-cipher-suites" and "priority" not in props:
        raise VdkitError("'priority' property is not set")
    elif qom_type in ("tls-creds-psk", "tls-creds-x509") and "dir" not in props:
        raise VdkitError("Missing 'dir' property value")
    from vdkit.protocols.tls import register_object

    register_object(obj_id, qom_type, props, {k: o.data for k, o in objects.items() if o.data is not None})
    objects[obj_id] = obj


def _qbase64_decode(text: bytes) -> bytes:
    """QEMU's strict character check, then glib's lenient decoding (whole 4-character groups only)."""
    import binascii

    from vdkit.errors import VdkitError

    if b"\0" in text:
        raise VdkitError("Base64 data contains embedded NUL characters")
    if not set(text.decode("latin-1")) <= _BASE64_CHARS:
        raise VdkitError("Base64 data contains invalid characters")
    chars = text.replace(b"\n", b"")
    whole = chars[: len(chars) // 4 * 4]
    pad = len(whole) - len(whole.rstrip(b"="))
    body = whole.replace(b"=", b"A")
    try:
        out = binascii.a2b_base64(body)
    except binascii.Error:
        return b""
    return out[: len(out) - min(pad, 2)] if pad else out


def _load_secret(props: dict[str, str], objects: dict[str, QomObject]) -> bytes:
    """What completing a ``secret`` object checks: one source, readable, decodable, decryptable shape."""
    from vdkit.errors import VdkitError

    data, file = props.get("data"), props.get("file")
    if data is not None and file is not None:
        raise VdkitError("'file' and 'data' are mutually exclusive")
    if file is not None:
        try:
            fd = open(file, "rb")  # noqa: SIM115 - two different glib messages for open and read
        except IsADirectoryError:  # glib opens a directory and fails to read it
            raise VdkitError(f"Unable to read {file}: Error reading file \u201c{file}\u201d: "
                             f"{os.strerror(errno.EISDIR)}") from None
        except OSError as exc:
            raise VdkitError(f"Unable to read {file}: Failed to open file \u201c{file}\u201d: "
                             f"{os.strerror(exc.errno or 0)}") from None
        try:
            with fd:
                raw = fd.read()
        except OSError as exc:
            raise VdkitError(f"Unable to read {file}: Error reading file \u201c{file}\u201d: "
                             f"{os.strerror(exc.errno or 0)}") from None
    elif data is not None:
        raw = data.encode("utf-8", "surrogateescape")
    else:
        raise VdkitError("Either 'file' or 'data' must be provided")
    keyid = props.get("keyid")
    if keyid is not None:
        key = objects.get(keyid)
        if key is None:
            raise VdkitError(f"No secret with id '{keyid}'")
        if key.qom_type != "secret":
            raise VdkitError(f"Object with id '{keyid}' is not a secret")
        if len(key.data or b"") != 32:
            raise VdkitError("Key should be 32 bytes in length")
        iv_text = props.get("iv")
        if iv_text is None:
            raise VdkitError("IV is required to decrypt secret")
        iv = _qbase64_decode(iv_text.encode("utf-8", "surrogateescape"))
        if len(iv) != 16:
            raise VdkitError(f"IV should be 16 bytes in length not {len(iv)}")
        cipher = _qbase64_decode(raw) if props.get("format") == "base64" else raw
        if len(cipher) % 16:
            raise VdkitError(f"Length {len(cipher)} must be a multiple of block size 16")
        # vdkit never uses secret values: the AES-256-CBC decryption (and qemu-img's check of
        # its padding) is not done
        return cipher
    if props.get("format") == "base64":
        return _qbase64_decode(raw)
    return raw
