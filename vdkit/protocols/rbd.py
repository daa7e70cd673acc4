"""The ``rbd`` protocol: Ceph RBD images through librbd, read and written like a file.

What QEMU 7.2's rbd driver does, from its observed behaviour (``shared/reference/ceph-rbd.md`` §2):

* names: ``rbd:pool[/namespace]/image[@snap][:key=value...]`` (a backslash
  escapes the next character; ``conf=`` and ``id=`` are the driver's, every
  other key is a librados option), or the ``driver=rbd`` options ``pool``,
  ``namespace``, ``image``, ``snapshot``, ``conf``, ``user``, ``key-secret``,
  ``auth-client-required`` and ``server``; the node is always reported under a
  ``json:{...}`` name built from them;
* ``disk size: unavailable``, ``cluster_size`` is the RBD object size, block
  status per RBD object from the object map (fast-diff), everything data
  without it;
* RBD snapshots are the internal snapshots: ID and name are both the
  snapshot's name, VM SIZE the image size when it was taken, date and clock 0;
  an image opened at a snapshot is read-only;
* no image locking (QEMU takes none on rbd; RBD's exclusive-lock feature is
  librbd's own business);
* an unreachable monitor blocks in ``rados_connect`` for
  ``client_mount_timeout`` (librados' default: 300 s).  vdkit keeps a name's
  or conf file's value and otherwise sets :data:`DEFAULT_MOUNT_TIMEOUT`.

librbd and librados are loaded with :mod:`ctypes` (``librbd.so.1`` and
``librados.so.2`` from Debian's ``librbd1``/``librados2``), not through the
``rbd``/``rados`` Cython modules: those are built for one CPython minor
version, come only from the distribution (nothing on PyPI) and do not load in
a virtualenv of another interpreter, while the C API vdkit needs is small and
stable.  The libraries are optional: without them an ``rbd:`` name fails to
open with a clear error and nothing else changes (``docs/rbd.md``).
"""

from __future__ import annotations

import errno as _errno
import os

from vdkit.errors import OpenError, VdkitError
from vdkit.io import DATA, OFFSET_VALID, ZERO, BlockStatus
from vdkit.protocols import RemoteFile

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.opts import CreateOpts, OptDesc

PREFIX = "rbd:"
DEFAULT_MOUNT_TIMEOUT = 30
"""Seconds an open waits for an unreachable cluster when neither the name nor the conf file says
(librados' own default, which QEMU keeps, is 300)."""
LIBRADOS_DEFAULT_MOUNT_TIMEOUT = "300"
RBD_FEATURE_FAST_DIFF = 1 << 4
RBD_FLAG_FAST_DIFF_INVALID = 1 << 1
_STOP = -1000  # what the block-status callback returns to end rbd_diff_iterate2 early
_MAX_IO = 1 << 30  # bytes per librbd read/write call (its length is a size_t, its result an ssize_t)
WRITE_DEPTH = 4
"""Writes in flight (rbd_aio_write) before a write waits for the oldest; every other operation waits
for all of them first, and a write overlapping one in flight too."""

OPTION_KEYS = ("pool", "namespace", "image", "snapshot", "conf", "user", "key-secret", "encrypt",
               "auth-client-required", "server", "filename")


class RbdSpec:
    """Where an rbd node is and how to reach it: the parsed name or options."""

    def __init__(self, pool: str, image: str, *, namespace: str | None = None, snapshot: str | None = None,
                 conf: str | None = None, user: str | None = None, key_secret: str | None = None,
                 conf_options: list[tuple[str, str]] | None = None, servers: list[tuple[str, str]] | None = None,
                 auth_client_required: list[str] | None = None, from_options: bool = False) -> None:
        self.pool = pool
        self.image = image
        self.namespace = namespace
        self.snapshot = snapshot
        self.conf = conf
        self.user = user
        self.key_secret = key_secret
        self.conf_options = conf_options or []
        self.servers = servers or []
        self.auth_client_required = auth_client_required
        self.from_options = from_options

    def json_dict(self) -> dict[str, object]:
        """The node's ``json:`` name as QEMU builds it: the options given (an ``rbd:`` name always sets
        ``namespace``), never ``key-secret``, ``auth-client-required`` or librados options."""
        d: dict[str, object] = {"pool": self.pool, "image": self.image}
        if self.conf is not None:
            d["conf"] = self.conf
        if self.snapshot is not None:
            d["snapshot"] = self.snapshot
        for i, (host, port) in enumerate(self.servers):
            d[f"server.{i}.host"] = host
            d[f"server.{i}.port"] = port
        d["driver"] = "rbd"
        if self.namespace is not None:
            d["namespace"] = self.namespace
        if self.user is not None:
            d["user"] = self.user
        return d

    def json_name(self) -> str:
        from vdkit.info.render_json import dumps_compact

        return "json:" + dumps_compact(self.json_dict())


# -- names -------------------------------------------------------------------------------------

def is_rbd_name(name: str) -> bool:
    return name.startswith(PREFIX)


def _token(text: str, delim: str) -> tuple[str, str | None]:
    """``text`` up to the first ``delim`` not escaped by a backslash, and what follows it (None: no delim).

    The token keeps its backslashes (:func:`_unescape` removes them), as QEMU splits first and unescapes after.
    """
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            i += 2
            continue
        if c == delim:
            return text[:i], text[i + 1:]
        i += 1
    return text, None


def _unescape(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def parse_name(name: str) -> RbdSpec:
    """``rbd:pool[/namespace]/image[@snap][:key=value...]`` -> :class:`RbdSpec` (QEMU's errors).

    ``@`` anywhere after the pool starts the snapshot name (QEMU looks for it before splitting off the
    options); ``conf`` and ``id`` are the driver's keys, every other key goes to librados.
    """
    rest = name[len(PREFIX):] if name.startswith(PREFIX) else name
    pool, after = _token(rest, "/")
    if after is None:
        raise OpenError("Pool name is required")
    snapshot: str | None = None
    if "@" in after:
        image, after2 = _token(after, "@")
        snap, opts = (_token(after2, ":") if after2 is not None else ("", None))
        snapshot = _unescape(snap)
    else:
        image, opts = _token(after, ":")
    namespace = ""
    if "/" in image:
        ns, img = _token(image, "/")
        namespace = _unescape(ns)
        image = img if img is not None else ""
    spec = RbdSpec(_unescape(pool), _unescape(image), namespace=namespace, snapshot=snapshot)
    while opts is not None and opts != "":
        key, value_rest = _token(opts, "=")
        if value_rest is None:
            raise OpenError(f"conf option {_unescape(key)} has no value")
        value, opts = _token(value_rest, ":")
        key, value = _unescape(key), _unescape(value)
        if key == "conf":
            spec.conf = value
        elif key == "id":
            spec.user = value
        else:
            spec.conf_options.append((key, value))
    return spec


def _presets() -> dict[str, RbdSpec]:
    """Nodes named by options (``--image-opts``, ``json:``, ``-blockdev``), by the name they are opened under,
    in the current open scope (:mod:`vdkit.block.secrets`)."""
    from vdkit.block.secrets import table

    return table("rbd")


def drive_option(key: str) -> bool:
    """The protocol registry's ``-drive driver=rbd`` slot: ``key`` (or the object it is a member of) is
    one of the rbd node's options."""
    return key.split(".", 1)[0] in OPTION_KEYS


def name_for_options(opts: dict[str, str], driver: str = "rbd") -> str:
    """Check ``driver=rbd``'s options (QEMU's texts) and return the name the node opens under.

    The name is an ``rbd:`` name of the same image; the options that name cannot carry (servers,
    key secret, the json: naming without ``namespace``) stay attached to it for the open.
    ``driver``: the protocol registry's uniform signature (always rbd here).
    """
    for key in opts:
        base = key.split(".", 1)[0]
        if base not in OPTION_KEYS or base in ("pool", "namespace", "image", "snapshot", "conf", "user",
                                               "key-secret", "filename") and "." in key:
            raise OpenError(f"Parameter '{key}' is unexpected")
    if "filename" in opts:
        spec = parse_name(opts["filename"])
    else:
        if "pool" not in opts:
            raise OpenError("Parameter 'pool' is missing")
        if "image" not in opts:
            raise OpenError("Parameter 'image' is missing")
        servers: list[tuple[str, str]] = []
        i = 0
        while f"server.{i}.host" in opts or f"server.{i}.port" in opts:
            if f"server.{i}.host" not in opts:
                raise OpenError(f"Parameter 'server[{i}].host' is missing")
            if f"server.{i}.port" not in opts:
                raise OpenError(f"Parameter 'server[{i}].port' is missing")
            servers.append((opts[f"server.{i}.host"], opts[f"server.{i}.port"]))
            i += 1
        auth: list[str] | None = None
        if any(k.startswith("auth-client-required.") for k in opts):
            auth = []
            i = 0
            while f"auth-client-required.{i}" in opts:
                mode = opts[f"auth-client-required.{i}"]
                if mode not in ("cephx", "none"):
                    raise OpenError(f"Parameter 'auth-client-required[{i}]' does not accept value '{mode}'")
                auth.append(mode)
                i += 1
        if "encrypt" in opts or any(k.startswith("encrypt.") for k in opts):
            from vdkit.errors import UnsupportedError

            raise UnsupportedError("RBD encryption (encrypt.*) is not supported by vdkit")
        spec = RbdSpec(opts["pool"], opts["image"], namespace=opts.get("namespace"), snapshot=opts.get("snapshot"),
                       conf=opts.get("conf"), user=opts.get("user"), key_secret=opts.get("key-secret"),
                       servers=servers, auth_client_required=auth, from_options=True)
    name = canonical_name(spec)
    _presets()[name] = spec
    return name


def canonical_name(spec: RbdSpec) -> str:
    """An ``rbd:`` name that parses back to ``spec``'s image (every separator escaped)."""

    def esc(text: str) -> str:
        return "".join("\\" + c if c in "\\/@:=" else c for c in text)

    name = PREFIX + esc(spec.pool) + "/"
    if spec.namespace:
        name += esc(spec.namespace) + "/"
    name += esc(spec.image)
    if spec.snapshot is not None:
        name += "@" + esc(spec.snapshot)
    if spec.conf is not None:
        name += ":conf=" + esc(spec.conf)
    if spec.user is not None:
        name += ":id=" + esc(spec.user)
    for key, value in spec.conf_options:
        name += f":{esc(key)}={esc(value)}"
    return name


def spec_for(name: str) -> RbdSpec:
    """The spec a name opens: options attached by :func:`name_for_options`, else the parsed name."""
    return _presets().get(name) or parse_name(name)


# -- the libraries -------------------------------------------------------------------------------

class _Libs:
    """librados and librbd through ctypes, with the signatures vdkit calls."""

    def __init__(self) -> None:
        import ctypes

        c = ctypes
        self.c = c
        names = {"rados": "librados.so.2", "rbd": "librbd.so.1"}
        libs = {}
        for short, soname in names.items():
            try:
                libs[short] = c.CDLL(soname, use_errno=True)
            except OSError:
                import ctypes.util  # only when the soname is not found (it costs a subprocess import)

                found = ctypes.util.find_library(short)
                if found is None:
                    raise
                libs[short] = c.CDLL(found, use_errno=True)
        self.rados, self.rbd = libs["rados"], libs["rbd"]
        vp, cp, u64, sz, i = c.c_void_p, c.c_char_p, c.c_uint64, c.c_size_t, c.c_int
        self.diff_cb = c.CFUNCTYPE(i, u64, sz, i, vp)
        for lib, fname, args, res in (
            (self.rados, "rados_create", [c.POINTER(vp), cp], i),
            (self.rados, "rados_conf_read_file", [vp, cp], i),
            (self.rados, "rados_conf_set", [vp, cp, cp], i),
            (self.rados, "rados_conf_get", [vp, cp, cp, sz], i),
            (self.rados, "rados_connect", [vp], i),
            (self.rados, "rados_shutdown", [vp], None),
            (self.rados, "rados_ioctx_create", [vp, cp, c.POINTER(vp)], i),
            (self.rados, "rados_ioctx_destroy", [vp], None),
            (self.rados, "rados_ioctx_set_namespace", [vp, cp], None),
            (self.rbd, "rbd_create", [vp, cp, u64, c.POINTER(i)], i),
            (self.rbd, "rbd_open", [vp, cp, c.POINTER(vp), cp], i),
            (self.rbd, "rbd_open_read_only", [vp, cp, c.POINTER(vp), cp], i),
            (self.rbd, "rbd_close", [vp], i),
            (self.rbd, "rbd_get_size", [vp, c.POINTER(u64)], i),
            (self.rbd, "rbd_stat", [vp, vp, sz], i),
            (self.rbd, "rbd_get_features", [vp, c.POINTER(u64)], i),
            (self.rbd, "rbd_get_flags", [vp, c.POINTER(u64)], i),
            (self.rbd, "rbd_read", [vp, u64, sz, vp], c.c_ssize_t),
            (self.rbd, "rbd_write", [vp, u64, sz, vp], c.c_ssize_t),
            (self.rbd, "rbd_discard", [vp, u64, u64], i),
            (self.rbd, "rbd_write_zeroes", [vp, u64, sz, i, i], c.c_ssize_t),
            (self.rbd, "rbd_flush", [vp], i),
            (self.rbd, "rbd_resize", [vp, u64], i),
            (self.rbd, "rbd_snap_list", [vp, vp, c.POINTER(i)], i),
            (self.rbd, "rbd_snap_list_end", [vp], None),
            (self.rbd, "rbd_snap_create", [vp, cp], i),
            (self.rbd, "rbd_snap_remove", [vp, cp], i),
            (self.rbd, "rbd_snap_rollback", [vp, cp], i),
            (self.rbd, "rbd_diff_iterate2", [vp, cp, u64, u64, c.c_uint8, c.c_uint8, self.diff_cb, vp], i),
            (self.rbd, "rbd_namespace_exists", [vp, cp, c.POINTER(c.c_bool)], i),
            (self.rbd, "rbd_aio_create_completion", [vp, vp, c.POINTER(vp)], i),
            (self.rbd, "rbd_aio_write", [vp, u64, sz, vp, vp], i),
            (self.rbd, "rbd_aio_read", [vp, u64, sz, vp, vp], i),
            (self.rbd, "rbd_aio_wait_for_complete", [vp], i),
            (self.rbd, "rbd_aio_get_return_value", [vp], c.c_ssize_t),
            (self.rbd, "rbd_aio_release", [vp], None),
        ):
            fn = getattr(lib, fname)
            fn.argtypes = args
            fn.restype = res

        class ImageInfo(c.Structure):
            _fields_ = [("size", u64), ("obj_size", u64), ("num_objs", u64), ("order", i),
                        ("block_name_prefix", c.c_char * 24), ("parent_pool", c.c_int64),
                        ("parent_name", c.c_char * 96)]

        class SnapInfo(c.Structure):
            _fields_ = [("id", u64), ("size", u64), ("name", cp)]

        self.ImageInfo = ImageInfo
        self.SnapInfo = SnapInfo


_libs: _Libs | None = None


def libs() -> _Libs:
    """The loaded libraries, or a clear error naming the packages when they are missing."""
    global _libs
    if _libs is None:
        try:
            _libs = _Libs()
        except (OSError, AttributeError) as exc:
            raise OpenError("rbd: librbd/librados could not be loaded (install Debian's librbd1 and librados2, "
                            f"or your distribution's Ceph client libraries): {exc}") from None
    return _libs


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _fail(message: str, ret: int) -> OpenError:
    """``message: strerror`` as QEMU's error_setg_errno words it (librados/librbd return -errno)."""
    return OpenError(f"{message}: {os.strerror(-ret)}", errno=-ret)


class Cluster:
    """A connected librados client and an I/O context on one pool (and namespace)."""

    def __init__(self, spec: RbdSpec) -> None:
        self.lib = lib = libs()
        c = lib.c
        self.cluster = c.c_void_p()
        self.ioctx = c.c_void_p()
        r = lib.rados.rados_create(c.byref(self.cluster), _b(spec.user) if spec.user is not None else None)
        if r < 0:
            raise _fail("error initializing", r)
        try:
            self._configure(spec)
            r = lib.rados.rados_connect(self.cluster)
            if r < 0:
                raise _fail("error connecting", r)
            r = lib.rados.rados_ioctx_create(self.cluster, _b(spec.pool), c.byref(self.ioctx))
            if r < 0:
                raise _fail(f"error opening pool {spec.pool}", r)
            lib.rados.rados_ioctx_set_namespace(self.ioctx, _b(spec.namespace or ""))
            if spec.namespace:
                exists = c.c_bool(False)
                r = lib.rbd.rbd_namespace_exists(self.ioctx, _b(spec.namespace), c.byref(exists))
                if r < 0:
                    raise _fail(f"error checking namespace {spec.namespace}", r)
                if not exists.value:
                    raise OpenError(f"namespace '{spec.namespace}' does not exist", errno=_errno.ENOENT)
        except BaseException:
            self.close()
            raise

    def _configure(self, spec: RbdSpec) -> None:
        """The conf file, then the name's librados options, the key and the monitors (QEMU's order)."""
        lib, cl = self.lib, self.cluster
        if spec.conf is not None:
            r = lib.rados.rados_conf_read_file(cl, _b(spec.conf))
            if r < 0:
                raise _fail(f"error reading conf file {spec.conf}", r)
        else:
            lib.rados.rados_conf_read_file(cl, None)  # $CEPH_CONF or the default places; none is fine
        for key, value in spec.conf_options:
            r = lib.rados.rados_conf_set(cl, _b(key), _b(value))
            if r < 0:
                raise _fail(f"invalid conf option {key}", r)
        if spec.key_secret is not None:
            import base64

            from vdkit.block.secrets import lookup_secret

            key = base64.b64encode(lookup_secret(spec.key_secret)).decode("ascii")
            r = lib.rados.rados_conf_set(cl, b"key", _b(key))
            if r < 0:
                raise _fail("Could not set 'key'", r)
        if spec.auth_client_required:
            r = lib.rados.rados_conf_set(cl, b"auth_client_required", _b(";".join(spec.auth_client_required)))
            if r < 0:
                raise _fail("Could not set 'auth_client_required'", r)
        if spec.servers:
            hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in spec.servers)
            r = lib.rados.rados_conf_set(cl, b"mon_host", _b(hosts))
            if r < 0:
                raise _fail("Could not set 'mon_host'", r)
        buf = lib.c.create_string_buffer(64)
        r = lib.rados.rados_conf_get(cl, b"client_mount_timeout", buf, len(buf))
        if r == 0 and buf.value.decode() == LIBRADOS_DEFAULT_MOUNT_TIMEOUT:
            lib.rados.rados_conf_set(cl, b"client_mount_timeout", str(DEFAULT_MOUNT_TIMEOUT).encode())

    def close(self) -> None:
        if self.ioctx:
            self.lib.rados.rados_ioctx_destroy(self.ioctx)
            self.ioctx = self.lib.c.c_void_p()
        if self.cluster:
            self.lib.rados.rados_shutdown(self.cluster)
            self.cluster = self.lib.c.c_void_p()


def create_image(name: str, size: int, cluster_size: int | None = None) -> None:
    """``qemu-img create`` on an rbd name: a new RBD image of ``size`` bytes (rounded up to 512),
    objects of ``cluster_size`` bytes (a power of two) or librbd's default."""
    spec = spec_for(name)
    order = 0
    if cluster_size is not None:
        if cluster_size & (cluster_size - 1) or cluster_size < 4096:
            raise VdkitError("obj size needs to be power of 2" if cluster_size & (cluster_size - 1)
                             else "obj size too small")
        order = cluster_size.bit_length() - 1
    cluster = Cluster(spec)
    try:
        c = cluster.lib.c
        r = cluster.lib.rbd.rbd_create(cluster.ioctx, _b(spec.image), -(-size // 512) * 512, c.byref(c.c_int(order)))
        if r < 0:
            raise _fail("error rbd create", r)
    finally:
        cluster.close()


NODE_FORMAT = "rbd"  # a bare rbd node answers like a format node (vdkit.formats.rbd.RbdDriver)
CREATE_PLACE = "RBD"  # vdkit.protocols.registry's creation entry points


def create_raw(filename: str, opts: CreateOpts) -> None:
    """A raw image on an rbd name: a new RBD image holding the disk."""
    from vdkit.errors import UnsupportedError

    if opts.get("encrypt.format") is not None:
        raise UnsupportedError("RBD encryption (encrypt.format) is not supported by vdkit")
    cluster = opts.get("cluster_size")
    create_image(filename, int(opts.get("size") or 0),
                 int(cluster) if cluster is not None else None)


def create_for_format(filename: str, opts: CreateOpts) -> None:
    """An empty RBD image that grows as the format (qcow2) writes its clusters, as in QEMU."""
    from vdkit.errors import UnsupportedError

    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in ("off", "metadata"):
        raise UnsupportedError(f"Preallocation mode '{prealloc}' on RBD is not supported by vdkit")
    if opts.get("data_file") is not None:
        raise UnsupportedError("A qcow2 data file next to an RBD image is not supported by vdkit")
    create_image(filename, 0)


def create_options() -> list[OptDesc]:
    """The rbd protocol's creation options (``create -o help`` on an rbd name, besides the format's)."""
    from vdkit.opts import OptDesc

    return [OptDesc("size", "size", None, "Virtual disk size"),
            OptDesc("cluster_size", "size", None, "RBD object size"),
            OptDesc("password-secret", "string", None, "ID of secret providing the password"),
            OptDesc("encrypt.format", "string", None, "Encrypt the image, format choices: 'luks', 'luks2'"),
            OptDesc("encrypt.cipher-alg", "string", None,
                    "Name of encryption cipher algorithm (allowed values: aes-128, aes-256)"),
            OptDesc("encrypt.key-secret", "string", None, "ID of secret providing LUKS passphrase")]


class RbdSnapshot:
    """One RBD snapshot as QEMU's generic snapshot record shows it (ID and name both the RBD name)."""

    date_sec = 0
    date_nsec = 0
    vm_clock_nsec = 0
    icount = 0

    def __init__(self, name: str, size: int) -> None:
        self.id_str = name
        self.name = name
        self.vm_state_size = size

    def __repr__(self) -> str:
        return f"<RbdSnapshot {self.name!r} size={self.vm_state_size}>"


class RbdRead:
    """A read in flight (:meth:`RbdFile.start_readinto`): its completion (None once waited for or
    when it was done at once), the ctypes array over the caller's buffer, and the view it fills."""

    __slots__ = ("comp", "target", "view")

    def __init__(self, comp: object, target: object, view: memoryview) -> None:
        self.comp = comp
        self.target = target
        self.view = view


class RbdFile(RemoteFile):
    """An RBD image seen through the interface format drivers use for a file (:class:`ImageFile`)."""

    has_info = True  # bdrv_get_info answers (cluster size, no dirty flag); the allocated size does not
    creates_zeroed = True  # a new RBD image reads as zeros (QEMU's rbd has zero init)
    protocol = "rbd"
    protocol_driver = "rbd"  # the daemon's name for the protocol node (query-named-block-nodes: "drv": "rbd")

    def __init__(self, name: str, *, readonly: bool = True, force_share: bool = False) -> None:
        self.spec = spec = spec_for(name)
        self.name = name
        self.json = spec.json_dict()
        self.filename = spec.json_name()
        self.readonly = readonly
        self.sync = True
        self._written = False
        self._writes: list[tuple[int, int, object, object]] = []  # aio writes in flight: offset, length, buf, comp
        self._write_bufs: list[object] = []
        self.cluster = Cluster(spec)
        lib = self.lib = self.cluster.lib
        c = lib.c
        self.image = c.c_void_p()
        try:
            snap = _b(spec.snapshot) if spec.snapshot is not None else None
            # Opened as QEMU opens it, read-only nodes too: only such a handle watches the image header,
            # so snapshots made elsewhere show up (a read-only handle keeps its first list).  A read-only
            # RbdFile refuses every write itself (_check_writable).
            r = lib.rbd.rbd_open(self.cluster.ioctx, _b(spec.image), c.byref(self.image), snap)
            if r < 0:
                raise _fail(f"error reading header from {spec.image}", r)
            if spec.snapshot is not None and not readonly:
                raise OpenError("rbd snapshots are read-only", errno=_errno.EROFS)
            info = lib.ImageInfo()
            r = lib.rbd.rbd_stat(self.image, c.byref(info), c.sizeof(info))
            if r < 0:
                raise _fail("error getting image info", r)
            self.cluster_size = int(info.obj_size)
            self._size = self._get_size()
        except BaseException:
            self.close()
            raise

    def node_name(self, fmt: str) -> str:
        """The name of a node of format ``fmt`` on this image: ``json:{"driver": FMT, "file": {...}}``, or
        the rbd dict alone for ``driver=rbd`` (QEMU never reports an ``rbd:`` name back)."""
        if fmt == "rbd":
            return self.filename
        from vdkit.info.render_json import dumps_compact

        return "json:" + dumps_compact({"driver": fmt, "file": self.json})

    # -- geometry --------------------------------------------------------------------------------

    def _get_size(self) -> int:
        c = self.lib.c
        size = c.c_uint64()
        r = self.lib.rbd.rbd_get_size(self.image, c.byref(size))
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        return int(size.value)

    def size(self) -> int:
        return self._size

    def allocated_size(self) -> int:
        raise OSError(_errno.ENOTSUP, "disk size unavailable over RBD")

    # -- data ------------------------------------------------------------------------------------

    def readinto(self, offset: int, view: memoryview) -> None:
        length = len(view)
        if offset < 0:
            raise OSError(_errno.EIO, os.strerror(_errno.EIO))
        inside = max(0, min(length, self._size - offset))
        self._drain_writes()
        c = self.lib.c
        pos = 0
        while pos < inside:
            n = min(inside - pos, _MAX_IO)
            if not view.readonly and view.c_contiguous:
                r = self.lib.rbd.rbd_read(self.image, offset + pos, n, (c.c_char * n).from_buffer(view[pos:pos + n]))
            else:
                tmp = c.create_string_buffer(n)
                r = self.lib.rbd.rbd_read(self.image, offset + pos, n, tmp)
                if r > 0:
                    view[pos:pos + r] = tmp.raw[:r]
            if r < 0:
                raise OSError(-r, os.strerror(-r))
            if r == 0:
                break
            pos += r
        if pos < length:
            view[pos:] = bytes(length - pos)

    def start_readinto(self, offset: int, view: memoryview) -> RbdRead:
        """Start reading the image at ``offset`` into ``view`` (``rbd_aio_read``) and return at once.

        The copy engine keeps several of these in flight, each into its own buffer, so the cluster
        works on the next pieces while this process writes the last one (one synchronous
        ``rbd_read`` at a time left the OSDs idle between requests, and qemu-img keeps 8).  librbd
        writes into ``view`` until :meth:`finish_read` has returned: the caller must not touch,
        resize or free the buffer before that, and must call it for every read started, even when
        giving up.  A view librbd cannot write into is read synchronously here.
        """
        length = len(view)
        if offset < 0:
            raise OSError(_errno.EIO, os.strerror(_errno.EIO))
        inside = max(0, min(length, self._size - offset))
        if not inside or inside > _MAX_IO or view.readonly or not view.c_contiguous:
            self.readinto(offset, view)
            return RbdRead(None, None, view)
        self._drain_writes()
        c = self.lib.c
        comp = c.c_void_p()
        r = self.lib.rbd.rbd_aio_create_completion(None, None, c.byref(comp))
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        target = (c.c_char * inside).from_buffer(view[:inside])  # holds the buffer export until done
        r = self.lib.rbd.rbd_aio_read(self.image, offset, inside, target, comp)
        if r < 0:
            self.lib.rbd.rbd_aio_release(comp)
            raise OSError(-r, os.strerror(-r))
        return RbdRead(comp, target, view)

    def finish_read(self, read: RbdRead) -> None:
        """Wait for a read of :meth:`start_readinto`; the bytes past the image's end (or a short read's)
        read as zeros.  A failure raises ``OSError`` once librbd is done with the buffer."""
        if read.comp is None:
            return
        comp, read.comp = read.comp, None
        r = self._complete(comp)
        read.target = None  # librbd is done with the buffer: release its export
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        if r < len(read.view):
            read.view[r:] = bytes(len(read.view) - r)

    def _complete(self, comp: object) -> int:
        """Wait for an issued request and release its completion: its result (bytes or -errno)."""
        self.lib.rbd.rbd_aio_wait_for_complete(comp)
        r = int(self.lib.rbd.rbd_aio_get_return_value(comp))
        self.lib.rbd.rbd_aio_release(comp)
        return r

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into a buffer of the file's and start writing it (rbd_aio_write), up to
        :data:`WRITE_DEPTH` writes in flight as qemu-img keeps several: a write's failure is reported
        by a later write, the flush, or any other operation (which all wait for the writes first)."""
        self._check_writable()
        mv = memoryview(data).cast("B")
        if offset + len(mv) > self._size:  # QEMU's rbd grows the image (a format on rbd appending)
            self._drain_writes()
            r = self.lib.rbd.rbd_resize(self.image, offset + len(mv))
            if r < 0:
                raise OSError(-r, os.strerror(-r))
            self._size = self._get_size()
        if any(o < offset + len(mv) and offset < o + n for o, n, _, _ in self._writes):
            self._drain_writes()  # librbd need not keep the order of overlapping writes in flight
        c = self.lib.c
        pos = 0
        self._written = True
        while pos < len(mv):
            n = min(len(mv) - pos, _MAX_IO)
            buf = next((b for b in self._write_bufs if c.sizeof(b) == n), None)
            if buf is None:
                buf = c.create_string_buffer(n)
            else:
                self._write_bufs.remove(buf)
            memoryview(buf).cast("B")[:n] = mv[pos:pos + n]  # type: ignore[arg-type]  # a ctypes char array
            comp = c.c_void_p()
            r = self.lib.rbd.rbd_aio_create_completion(None, None, c.byref(comp))
            if r >= 0:
                r = self.lib.rbd.rbd_aio_write(self.image, offset + pos, n, buf, comp)
                if r < 0:
                    self.lib.rbd.rbd_aio_release(comp)
            if r < 0:
                raise OSError(-r, os.strerror(-r))
            self._writes.append((offset + pos, n, buf, comp))
            pos += n
            while len(self._writes) > WRITE_DEPTH:
                self._finish_write()

    def _finish_write(self) -> None:
        _, _, buf, comp = self._writes.pop(0)
        r = self._complete(comp)
        self._write_bufs[:] = [buf, *self._write_bufs[:WRITE_DEPTH]]
        if r < 0:
            raise OSError(-r, os.strerror(-r))

    def _drain_writes(self) -> None:
        """Wait for every write in flight; the first failure is raised once all are done."""
        failure: OSError | None = None
        while self._writes:
            try:
                self._finish_write()
            except OSError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def pwritev(self, offset: int, buffers: list[bytes | bytearray | memoryview]) -> None:
        self.pwrite(offset, b"".join(bytes(b) for b in buffers))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Zero a range; ``unmap`` lets librbd drop whole objects (QEMU: thick-provision unless may-unmap)."""
        self._check_writable()
        self._drain_writes()
        end = min(offset + length, self._size)
        self._written = True
        flags = 0 if unmap else 1  # RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        pos = offset
        while pos < end:
            n = min(end - pos, _MAX_IO)
            r = self.lib.rbd.rbd_write_zeroes(self.image, pos, n, flags, 0)
            if r < 0:
                raise OSError(-r, os.strerror(-r))
            pos += n

    def punch_hole(self, offset: int, length: int, *, extend: bool = True) -> None:
        """Discard: librbd frees whole objects and zeroes partial ones."""
        self._check_writable()
        self._drain_writes()
        end = min(offset + length, self._size)
        if end > offset:
            self._written = True
            r = self.lib.rbd.rbd_discard(self.image, offset, end - offset)
            if r < 0:
                raise OSError(-r, os.strerror(-r))

    def flush(self) -> None:
        if not self.readonly and self.image:
            self._drain_writes()
            r = self.lib.rbd.rbd_flush(self.image)
            self._written = False
            if r < 0:
                raise OSError(-r, os.strerror(-r))

    def truncate(self, size: int) -> None:
        """``resize``: librbd's resize (shrinking drops the objects past the end)."""
        self._check_writable()
        self._drain_writes()
        r = self.lib.rbd.rbd_resize(self.image, size)
        if r < 0:
            raise VdkitError(f"failed to resize rbd image: {os.strerror(-r)}", errno=-r)
        self._size = self._get_size()

    def _check_writable(self) -> None:
        if self.readonly:
            raise OSError(_errno.EACCES, os.strerror(_errno.EACCES))

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """Data or zeros at ``offset`` per RBD object, from the object map (QEMU's rbd block status).

        Without the fast-diff feature, or with an invalid object map, the whole range is data.  An
        object counts as written in full; the run ends where the kind changes or the range ends.
        """
        self._drain_writes()
        length = max(0, min(length, self._size - offset))
        data = BlockStatus(DATA | OFFSET_VALID, length, offset, self.filename)
        if length == 0:
            return data
        lib, c = self.lib, self.lib.c
        features, flags = c.c_uint64(), c.c_uint64()
        if lib.rbd.rbd_get_features(self.image, c.byref(features)) < 0 or not features.value & RBD_FEATURE_FAST_DIFF:
            return data
        if lib.rbd.rbd_get_flags(self.image, c.byref(flags)) < 0 or flags.value & RBD_FLAG_FAST_DIFF_INVALID:
            return data
        end = offset + length
        state: dict[str, int] = {"start": -1, "end": -1}

        def extent(offs: int, n: int, exists: int, _arg: object) -> int:
            e_start, e_end = max(offs, offset), min(offs + n, end)
            if not exists or e_end <= e_start:
                return 0
            if state["start"] < 0:
                state["start"], state["end"] = e_start, e_end
                return _STOP if e_start > offset else 0
            if e_start > state["end"]:
                return _STOP  # a gap after the data run
            state["end"] = max(state["end"], e_end)
            return 0

        cb = lib.diff_cb(extent)
        r = lib.rbd.rbd_diff_iterate2(self.image, None, offset, length, 1, 1, cb, None)
        if r < 0 and r != _STOP:
            return data
        first = state["start"]
        if first < 0:
            return BlockStatus(ZERO | OFFSET_VALID, length, offset, self.filename)
        if first > offset:
            return BlockStatus(ZERO | OFFSET_VALID, first - offset, offset, self.filename)
        return BlockStatus(DATA | OFFSET_VALID, state["end"] - offset, offset, self.filename)

    # -- snapshots -------------------------------------------------------------------------------

    def snapshots(self) -> list[RbdSnapshot]:
        self._drain_writes()
        lib, c = self.lib, self.lib.c
        count = 16
        while True:
            arr = (lib.SnapInfo * count)()
            n = c.c_int(count)
            r = lib.rbd.rbd_snap_list(self.image, arr, c.byref(n))
            if r == -_errno.ERANGE:
                count = max(n.value, count * 2)
                continue
            if r < 0:
                return []
            try:
                return [RbdSnapshot(arr[k].name.decode("utf-8", "surrogateescape"), int(arr[k].size))
                        for k in range(r)]
            finally:
                lib.rbd.rbd_snap_list_end(arr)

    def snap_call(self, fn: str, name: str) -> int:
        """``rbd_snap_create``/``remove``/``rollback`` on this image: 0 or -errno."""
        self._drain_writes()
        return int(getattr(self.lib.rbd, fn)(self.image, _b(name)))

    def refresh_size(self) -> None:
        self._drain_writes()
        self._size = self._get_size()

    # -- life ------------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "image", None):
            try:
                self._drain_writes()  # a failure was the writer's to see (flush): the data is what it is
            except OSError:
                pass
            if self._written and not self.readonly:
                try:
                    self.flush()
                except OSError:
                    pass
            self.lib.rbd.rbd_close(self.image)
            self.image = self.lib.c.c_void_p()
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            cluster.close()

    def __enter__(self) -> RbdFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RbdFile {self.filename!r}>"


def open_blockdev(opts: dict[str, object], *, readonly: bool, auto_read_only: bool) -> tuple[RbdFile, str, bool]:
    """The protocol registry's ``blockdev-add`` open (QAPI-checked options, nested objects flattened to
    the dotted keys :func:`name_for_options` checks): the image, named by QEMU's ``json:{...}``."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = str(value)

    for key in ("pool", "namespace", "image", "conf", "snapshot", "user", "key-secret", "server",
                "auth-client-required"):
        if key in opts:
            walk(key, opts[key])
    file = RbdFile(name_for_options(flat), readonly=readonly)
    return file, file.filename, readonly


def open_file(name: str, *, readonly: bool, force_share: bool, fmt: str | None) -> tuple[RbdFile, str]:
    """The protocol registry's open: the image, named by its json: name (the node's name comes from
    :meth:`RbdFile.node_name` once the format is known)."""
    file = RbdFile(name, readonly=readonly, force_share=force_share)
    return file, file.filename
