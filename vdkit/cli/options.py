"""qemu-img's argument syntax: GNU getopt_long with its quirks.

qemu-img parses each subcommand with ``getopt_long`` and an option string
starting with ``:``: options may follow file names (arguments are permuted),
long options may be abbreviated to any unique prefix, ``--opt=value`` and
``--opt value`` are equivalent, short options may be bundled (``-qf qcow2``,
``-fqcow2``), and ``--`` ends option parsing.  Errors use qemu-img's words.
"""

from __future__ import annotations

import errno
import os

from vdkit.errors import UsageError, VdkitError
from vdkit.opts import CACHE_MODES as _CACHE_TABLE
from vdkit.opts import SizeRangeError as SizeRangeError  # re-exported
from vdkit.opts import id_wellformed, split_items
from vdkit.opts import strtosz as strtosz
from vdkit.record import field, record


class ObjectError(VdkitError):
    """A bad ``--object``: compare exits with 2 for it, the other commands with 1."""


@record(frozen=True)
class LongOpt:
    name: str
    has_arg: bool
    key: str  # the short letter it maps to, or a long-only key such as "output"


@record
class Parsed:
    opts: list[tuple[str, str | None]] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    # ``--object`` definitions, created (checked) as the option is met, like qemu-img does
    objects: dict[str, QomObject] = field(default_factory=dict)

    def last(self, key: str) -> str | None:
        value = None
        for k, v in self.opts:
            if k == key:
                value = v
        return value

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.opts)


def getopt_long(argv: list[str], shortopts: str, longopts: list[LongOpt], argv0: str | None = None) -> Parsed:
    """Parse ``argv`` (the arguments after the subcommand name ``argv0``).

    qemu-img names the offending argument as ``argv[optind - 1]``; glibc has
    not yet moved past a bundle (``-qx``) when it meets an unknown letter in
    its middle, so the message then names the *previous* argument (the
    subcommand itself for the first one).  Pass ``argv0`` to get that quirk.
    """
    short_arg: dict[str, bool] = {}
    i = 0
    while i < len(shortopts):
        ch = shortopts[i]
        if ch == ":":
            i += 1
            continue
        takes = i + 1 < len(shortopts) and shortopts[i + 1] == ":"
        short_arg[ch] = takes
        i += 2 if takes else 1
    out = Parsed()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            out.args.extend(argv[i:])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            exact = [lo for lo in longopts if lo.name == name]
            matches = exact or [lo for lo in longopts if lo.name.startswith(name)]
            # glibc calls a prefix ambiguous only when the candidates differ in
            # what they do; qemu-img's leading ':' turns that into "unrecognized".
            if len({(m.has_arg, m.key) for m in matches}) != 1:
                raise UsageError(f"unrecognized option '{arg}'")
            lo = matches[0]
            if lo.has_arg:
                if not eq:
                    if i >= len(argv):
                        raise UsageError(f"missing argument for option '{arg}'")
                    value = argv[i]
                    i += 1
                out.opts.append((lo.key, value))
                if lo.key == "object":
                    # qemu-img creates each object when getopt returns it: a bad one ends the
                    # command before later options are even looked at.
                    try:
                        add_object(value, out.objects)
                    except VdkitError as exc:
                        raise ObjectError(exc.message, hint=exc.hint) from None
            else:
                if eq:
                    raise UsageError(f"unrecognized option '{arg}'")
                out.opts.append((lo.key, None))
            continue
        if arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                ch = arg[j]
                j += 1
                if ch not in short_arg:
                    shown = arg
                    if argv0 is not None and j < len(arg):
                        shown = argv[i - 2] if i >= 2 else argv0
                    raise UsageError(f"unrecognized option '{shown}'")
                if short_arg[ch]:
                    if j < len(arg):
                        value = arg[j:]
                    elif i < len(argv):
                        value = argv[i]
                        i += 1
                    else:
                        raise UsageError(f"missing argument for option '{arg}'")
                    out.opts.append((ch, value))
                    break
                out.opts.append((ch, None))
            continue
        out.args.append(arg)
    return out


def output_format(value: str | None) -> str:
    """Validate ``--output``; qemu-img reports this one without the Try line."""
    from vdkit.errors import VdkitError

    if value is None:
        return "human"
    if value not in ("human", "json"):
        raise VdkitError("--output must be used with human or json as argument.")
    return value


def cvtnum(name: str, value: str, min_value: int = 0, max_value: int = 2**63 - 1) -> int:
    """qemu-img's size argument check, with its two-line error for bad syntax."""
    from vdkit.cli.main import PROG
    from vdkit.errors import VdkitError

    warnings: list[str] = []
    try:
        result = strtosz(value, warn=warnings)
    except SizeRangeError:
        result = None
    except ValueError:
        raise VdkitError(
            f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for",
            hint=f"\0{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n",
        ) from None
    finally:
        if warnings:
            from vdkit.cli.main import write_err

            for w in warnings:
                write_err(f"{PROG}: warning: {w}\n")
    if result is None or not min_value <= result <= max_value:
        raise VdkitError(f"Invalid {name} specified. Must be between {min_value} and {max_value}.")
    return result



def image_opts(spec: str, parsed: dict[str, object] | None = None) -> tuple[str, str | None]:
    """The one option interpreter (:func:`vdkit.block.image_opts.image_opts`), whose warnings qemu-img prints
    as ``vdkit-img: warning: ...`` (also those given later, when a ``backing`` object opens)."""
    from vdkit.block import image_opts as interpreter
    from vdkit.block.secrets import PROCESS
    from vdkit.cli.main import warn

    PROCESS.warn = warn
    return interpreter.image_opts(spec, parsed)


CACHE_MODES = tuple(_CACHE_TABLE)  # qemu-img checks the name only


def check_cache_modes(p: Parsed, *, cache: str | None = "t", src_cache: str | None = "T") -> None:
    """qemu-img's cache-mode checks (``-t``, then ``-T``), which come before the images are opened.

    vdkit's I/O does not depend on them (convert's target aside), but a bad
    value is an error in qemu-img, so it is one here too.
    """
    from vdkit.errors import VdkitError

    for key, what in ((cache, "cache"), (src_cache, "source cache")):
        value = p.last(key) if key is not None else None
        if value is not None and value not in CACHE_MODES:
            raise VdkitError(f"Invalid {what} option: {value}")


def mutually_exclusive_image_opts(p: Parsed, *fmt_keys: str) -> None:
    """qemu-img refuses a format option next to ``--image-opts`` (the spec names its driver)."""
    from vdkit.errors import VdkitError

    if p.has("image-opts") and any(p.last(k) is not None for k in fmt_keys):
        raise VdkitError("--image-opts and --format are mutually exclusive")


def open_args(name: str, fmt: str | None, use_opts: bool) -> tuple[str, str | None, str | None]:
    """(file name, format, spec) for one image argument: the spec is the argument under ``--image-opts``."""
    if not use_opts:
        if name.startswith("json:"):  # QEMU's json: pseudo-filename: the same options, as JSON
            from vdkit.block import json_name
            from vdkit.errors import OpenError

            try:
                parsed = json_name.parse(name)
            except OpenError as exc:
                raise exc.prefixed(f"Could not open '{name}': ") from None
            filename, driver = image_opts(name, parsed)
            return filename, driver or fmt, name
        # Only a spec parsed earlier (which imported the option store to write it) can have set one: a plain
        # command such as ``info x.qcow2`` does not pay for importing the store to learn that it is empty.
        import sys

        store = sys.modules.get("vdkit.block.secrets")
        if store is not None:
            store.forget_backing(name)
        return name, fmt, None
    filename, driver = image_opts(name)
    return filename, driver, name


class SpecNames:
    """Context manager: errors naming a file opened from a spec name the spec, as qemu-img's do.

    The block layer only sees file names; qemu-img opens the spec itself, so
    its top-level "Could not open" names the spec.  ``pairs`` are the
    (file name, spec) of the images opened inside the block (spec None: a
    plain name, nothing to rewrite).
    """

    def __init__(self, *pairs: tuple[str, str | None]) -> None:
        self.pairs = [(f, s) for f, s in pairs if s is not None]

    def rewrite(self, exc: Exception) -> Exception:
        from vdkit.block.image_opts import reprefix_open_error
        from vdkit.errors import UnsupportedError, VdkitError

        for filename, spec in self.pairs:
            new = reprefix_open_error(exc, filename, spec)
            if new is not exc:
                if (isinstance(new, VdkitError) and "encrypt.key-secret=" in spec
                        and new.message.endswith("Parameter 'encrypt.key-secret' is required for cipher")):
                    # the key was given: qemu-img would decrypt, vdkit cannot; say that, not a false reason
                    return UnsupportedError(f"Could not open '{spec}': vdkit-img cannot read encrypted data")
                return new
        return exc

    def __enter__(self) -> SpecNames:
        return self

    def __exit__(self, tp: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, Exception) and self.pairs:
            new = self.rewrite(exc)
            if new is not exc:
                raise new from exc


# -- --object (QOM user-creatable objects) ------------------------------------------------------
#
# vdkit does no encrypted I/O, so objects change nothing; but qemu-img creates
# each ``--object`` as soon as getopt returns it and scripts rely on its
# refusals.  The definition is checked in qemu-img's order: keyval syntax,
# qom-type, id, the type's parameters, whether qemu-img can create that type
# at all, a duplicate id, then what creating it does (a secret loads and
# decodes its data).  The tables below are what qemu-img 7.2 answers.

# QOM types qemu-img can create, with the properties ``--object TYPE,help`` lists.
_CREATABLE: dict[str, str] = {
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
# parameter qemu-img finds missing when only an id is given.  Types not in _CREATABLE are
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


def _print_object_help(qom_type: str | None) -> None:
    import sys

    from vdkit.cli.main import write_out

    if qom_type in _CREATABLE:
        lines = [f"{qom_type} options:"] + [f"  {p}" for p in _CREATABLE[qom_type].split()]
    else:
        lines = ["List of user creatable objects:"] + [f"  {t}" for t in sorted(_CREATABLE)]
    write_out("\n".join(lines) + "\n")
    # qemu-img exits here; SystemExit rather than main's Exit, which is a different class when
    # vdkit.cli.main runs as __main__ (python -m)
    sys.stdout.flush()
    raise SystemExit(0)


def add_object(spec: str, objects: dict[str, QomObject]) -> None:
    """Create ``--object spec`` into ``objects`` (keyed by id) or fail with qemu-img's error.

    ``help`` (alone or after a type) prints what qemu-img prints and ends the
    command with status 0.  Objects have no effect on vdkit's I/O.
    """

    from vdkit.errors import VdkitError

    params, want_help = _keyval(spec)
    qom_type = params.get("qom-type")
    if want_help:
        _print_object_help(qom_type)
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
    if qom_type not in _CREATABLE:
        missing = _SCHEMA_TYPES[qom_type]
        if missing is not None and missing not in props:
            raise VdkitError(f"Parameter '{missing}' is missing")
        raise VdkitError(f"invalid object type: {qom_type}")
    known = {p.partition("=")[0] for p in _CREATABLE[qom_type].split()} | set(_READ_ONLY.get(qom_type, ()))
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
