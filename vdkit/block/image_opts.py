"""QEMU's ``--image-opts`` and ``json:{...}`` options, interpreted for every front end and the library.

One interpreter turns a node's options (the flattened dotted keys of an
``--image-opts`` string, a ``json:`` name or a ``vdkit.open(options=...)``
mapping) into the file name and format :func:`vdkit.block.node.open_image`
opens, and attaches what the name cannot carry to that name in the current
open scope (:mod:`vdkit.block.secrets`): ``backing: null``, a ``backing``
object (opened when the backing is, as QEMU does), the strong format options
(luks's ``key-secret``), and the protocols' presets (an NBD address, curl's
options, an RBD spec).  Errors are QEMU's texts with the ``Could not open
'<spec>': `` prefix qemu-img gives them.
"""

from __future__ import annotations

from vdkit.opts import split_items

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from vdkit.block.chain import OpenPolicy
    from vdkit.block.node import Node


def image_opts(spec: str, parsed: dict[str, object] | None = None) -> tuple[str, str | None]:
    """:func:`_image_opts`, and the ``backing`` child the options give, remembered for the open."""
    backing: list[object] = []
    filename, driver = _image_opts(spec, parsed, backing)
    if backing:
        _remember_backing(filename, backing[0])
    return filename, driver


def _image_opts(spec: str, parsed: dict[str, object] | None, backing: list[object]) -> tuple[str, str | None]:
    """``--image-opts`` string (or a ``json:`` name's flattened options) -> (file name, format or None).

    Understood: ``driver`` (any format vdkit has, or ``nbd`` for an export
    without format layer), the ``file`` child as ``file.driver=file`` with
    ``file.filename`` or ``file.driver=nbd`` with the nbd driver's options
    (:func:`vdkit.protocols.nbd.address_from_options`; the file name is then
    the export's regenerated URI), ``backing: null`` (the chain ends here), the
    options that only tune I/O (caches, locking, aio, read-only...), luks's
    ``key-secret`` (kept for the driver, see :mod:`vdkit.block.secrets`) and
    qcow2's ``encrypt.key-secret``, which scripts pass with ``--object
    secret``: vdkit reads no encrypted qcow2 data, and opening for metadata
    (info) does not use the key in qemu-img either.  Anything else is refused
    with qemu-img's words.  Errors carry the ``Could not open '<spec>': ``
    prefix qemu-img gives them.
    """
    from vdkit.errors import OpenError

    try:
        raw: dict[str, object] = {}
        if parsed is None:
            for item in split_items(spec, empty=False):
                key, eq, value = item.partition("=")
                if not eq:
                    raise OpenError(f"Cannot find device='{item}' nor node-name='{item}'")
                raw[key] = value
        else:
            raw = dict(parsed)
        backing.extend(_take_backing(raw))
        ref = raw.get("file")
        if isinstance(ref, str):  # a node reference, which qemu-img never has (once the driver is known)
            named = raw.get("driver")
            if isinstance(named, str):
                from vdkit.formats.registry import is_known

                if not is_known(named):
                    raise OpenError(f"Unknown driver '{named}'")
            if any(k.startswith("file.") for k in raw):  # options for the child, or its file, beside it
                raise OpenError("Cannot reference an existing block device with additional options or a new "
                                "filename")
            raise OpenError(f"Cannot find device='{ref}' nor node-name='{ref}'")
        window = _window(raw)  # a format's options making its node a window (raw's offset/size)
        if window is not None:
            return window
        given = {k: raw.pop(k, None) for k in ("driver", "file.filename", "file.driver")}
        driver, filename, file_driver = (v if isinstance(v, str) else None for v in given.values())
        opts = {k: _opt_text(v) for k, v in raw.items()}
        if driver is not None:
            from vdkit.formats.registry import is_known

            if not is_known(driver):
                raise OpenError(f"Unknown driver '{driver}'")
        from vdkit.protocols.registry import is_protocol

        if file_driver is not None and file_driver != "file" and not is_protocol(file_driver):
            raise OpenError(f"Unknown driver '{file_driver}'")
        if is_protocol(driver):  # the protocol is the top node: every option but the tuning ones is its
            from vdkit.protocols.registry import top_name

            top_opts = {k: v for k, v in opts.items() if k not in _TUNING}
            return top_name(str(driver), top_opts, filename, file_driver), driver
        if is_protocol(file_driver):  # a format over a protocol node: the file.* options are the protocol's
            from vdkit.protocols.registry import name_for_options

            proto_opts = {k[len("file."):]: v for k, v in opts.items() if k.startswith("file.")}
            proto_opts = {k: v for k, v in proto_opts.items() if k not in _TUNING}
            if filename is not None:
                proto_opts["filename"] = filename
            opts = {k: v for k, v in opts.items() if not k.startswith("file.")}
            filename = name_for_options(str(file_driver), proto_opts)
        else:
            if filename is None and file_driver is not None:
                raise OpenError("The 'file' block driver requires a file name")
            for key in [k for k in opts if k.startswith("file.")]:
                if key[len("file."):] not in _TUNING:
                    raise OpenError(f"Block protocol 'file' doesn't support the option '{key[len('file.'):]}'")
                del opts[key]
        from vdkit.formats.registry import runtime_options

        own = frozenset() if driver is None else runtime_options(driver)  # the format's, without effect
        for key in [k for k in opts if k in _TUNING or k in own]:
            del opts[key]
        strong: dict[str, str] = {}  # the format's strong options (registry.STRONG_OPTIONS)
        owner = strong_owner()
        for key in [k for k in opts if k in owner]:
            if driver is None and filename is not None:
                driver = _probe_for_option(filename, key, owner[key])
                if driver is None:  # unreadable: the open reports why
                    opts.pop(key)
                    continue
            if driver is not None and owner[key] == driver:
                strong[key] = opts.pop(key)
        if opts and driver is None and filename is not None and not is_protocol(file_driver):
            probed = _probed_format(filename)  # QEMU probes first; the probed format takes its own options
            if probed is not None:
                for key in [k for k in opts if k in runtime_options(probed)]:
                    del opts[key]
                if opts:
                    raise OpenError(f"Block format '{probed}' does not support the option '{next(iter(opts))}'")
        if opts:
            key = next(iter(opts))
            if driver is None:
                raise OpenError("Must specify either driver or file")
            raise OpenError(f"Block format '{driver}' does not support the option '{key}'")
        if filename is None:
            if driver is None:
                raise OpenError("Must specify either driver or file")
            raise OpenError('A block device must be specified for "file"')
    except OpenError as exc:
        raise exc.prefixed(f"Could not open '{spec}': ") from None
    if strong:  # the driver takes them by file name when it opens (luks's key, vpc's size rule)
        from vdkit.block.secrets import set_open_option

        for key, value in strong.items():
            set_open_option(filename, key, value)
    if not is_protocol(file_driver) and ":" in filename:
        from vdkit.block.chain import protocol_of
        from vdkit.block.secrets import set_open_option

        if protocol_of(filename) is not None:
            set_open_option(filename, "protocol", "file")  # an option's filename is never a URI
    return filename, driver


# Options every node takes that change no data and no name (QEMU drops them from json: names).
_TUNING = frozenset(("read-only", "auto-read-only", "force-share", "cache.direct", "cache.no-flush", "discard",
                     "detect-zeroes", "node-name", "locking", "aio", "aio-max-batch", "drop-cache",
                     "x-check-cache-dropped"))


def _window(raw: dict[str, object]) -> tuple[str, str] | None:
    """Nodes whose format makes them a window into the file below (``registry.window_name``: raw's
    ``offset``/``size``): the node is named ``json:{...}``, as in QEMU; the options left must only
    tune I/O (or be the top format's)."""
    from vdkit.errors import OpenError
    from vdkit.formats.registry import runtime_options, window_name

    top = raw.get("driver")
    window = window_name(raw)
    if window is None:
        return None
    name, fmt, file_prefix, layer = window
    own = runtime_options(fmt) if isinstance(top, str) and top != layer else frozenset()
    for key in raw:  # the file node's options are checked first: it opens first
        tail = key[len(file_prefix):]
        if key.startswith(file_prefix) and tail not in _TUNING:
            raise OpenError(f"Block protocol 'file' doesn't support the option '{tail}'")
    for key in raw:
        tail = key
        while tail.startswith("file."):
            tail = tail[len("file."):]
        if tail in _TUNING or key in own:
            continue
        if "." not in key:
            raise OpenError(f"Block format '{fmt}' does not support the option '{key}'")
        raise OpenError(f"Block format '{layer}' does not support the option '{tail}'")
    return name, fmt


_NULL = "null"  # _take_backing's answer for "backing": null (and QEMU's deprecated "")


def _take_backing(raw: dict[str, object]) -> list[object]:
    """Take the ``backing`` member and the ``backing.*`` keys out of ``raw``: [] when there are none,
    else [what :func:`_remember_backing` records] (a :class:`vdkit.block.secrets.BackingOverride`, or
    ``_NULL``).

    A nested object is interpreted when the backing opens (:func:`_backing_node`): QEMU reports its
    errors, prefixed 'Could not open backing file: ', only after the image above opened, and fills
    in the image's own backing name where the object names no file.
    """
    keys = [k for k in raw if k == "backing" or k.startswith("backing.")]
    if not keys:
        return []
    from vdkit.block.secrets import BackingOverride
    from vdkit.info.render_json import qdict_order

    top = raw.pop("backing", {})
    # QEMU extracts the child's options in its QDict order: colliding keys then come in the other order
    sub = {k[len("backing."):]: raw.pop(k) for k in qdict_order(keys) if k != "backing"}
    if top is None or top == "":
        if top == "":
            from vdkit.block.secrets import current

            current().warning('Use of "backing": "" is deprecated; use "backing": null instead')
        if not sub:
            return [_NULL]
        # the null took the member: the dotted keys are left over wherever the image opens
        return [BackingOverride("unused", qdict_order([k for k in keys if k != "backing"])[0])]
    unused = qdict_order(keys)[0]
    if isinstance(top, str):
        return [BackingOverride("ref", unused, ref=top)]
    if not sub:  # a number, a boolean, an empty object
        return [BackingOverride("default", unused)]
    explicit = "file.filename" in sub

    def node(name: str | None, image_fmt: str | None) -> tuple[str, str | None]:
        return _backing_node(dict(sub), None if explicit else name, image_fmt)

    return [BackingOverride("node", unused, open=node, explicit=explicit)]


def _backing_node(sub: dict[str, object], name: str | None, image_fmt: str | None) -> tuple[str, str | None]:
    """(file name, format) of the backing node the options ``sub`` describe, as QEMU opens it.

    ``name`` is the image's backing name (resolved) or None; QEMU gives it to the backing node as its
    ``filename``: a node without ``file`` options opens that name (as ``driver``, else as the format
    the image names), a ``file`` child of the local driver opens it, the curl driver takes it as its
    URL and the nbd driver refuses it next to an address.  Errors are QEMU's texts, unprefixed.
    """
    from vdkit.errors import OpenError

    driver = sub.get("driver")
    top_protocol = is_protocol_driver(driver)
    if not top_protocol and not any(k == "file" or k.startswith("file.") for k in sub):
        fmt = _backing_format_only(sub)
        bad = next((k for k in sub if k != "driver" and k not in _TUNING), None)
        if bad is not None:
            raise OpenError(f"Block format '{fmt or image_fmt or 'raw'}' does not support the option '{bad}'")
        if name is None:
            raise OpenError('A block device must be specified for "file"')
        return name, fmt if fmt is not None else image_fmt
    if name is not None:
        prefix = "" if top_protocol else "file."
        protocol = driver if top_protocol else sub.get(prefix + "driver")
        if is_protocol_driver(protocol):  # the protocol module says what a file name beside options is
            from vdkit.protocols.registry import protocol_module

            mod = protocol_module(str(protocol))
            clashes = getattr(mod, "clashes_with_filename", None)
            if clashes is not None:  # nbd: an address and a file name exclude each other
                from vdkit.info.render_json import qdict_order

                own = list(sub)
                if prefix:  # the file child's options are extracted and copied once more (observed order)
                    own = qdict_order([k[len(prefix):] for k in qdict_order(own) if k.startswith(prefix)])
                clash = [k for k in own if clashes(k)]
                if clash:
                    raise OpenError(f"Option '{qdict_order(clash)[0]}' cannot be used with a file name")
            elif hasattr(mod, "FILENAME_OPTION"):
                sub[prefix + mod.FILENAME_OPTION] = name  # the curl driver's file name is its URL
        elif protocol in (None, "file"):
            sub[prefix + "filename"] = name
    nested: list[object] = []
    try:
        filename, fmt = _image_opts("", sub, nested)
    except OpenError as exc:
        err = exc.prefixed("")
        err.message = exc.message.removeprefix("Could not open '': ")
        err.args = (err.message,)
        raise err from None
    if nested:
        _remember_backing(filename, nested[0])
    return filename, fmt


def is_protocol_driver(driver: object) -> bool:
    from vdkit.protocols.registry import is_protocol

    return isinstance(driver, str) and is_protocol(driver)


def _backing_format_only(sub: dict[str, object]) -> str | None:
    """A backing object without ``file``: the image's backing name opens with these options (a
    ``driver``, options that only tune I/O or the format's own run-time options, which are taken out
    of ``sub``); the caller refuses what is left by the backing's format."""
    from vdkit.errors import OpenError, UnsupportedError
    from vdkit.formats.registry import is_known, runtime_options

    driver = sub.get("driver")
    if driver is not None and (not isinstance(driver, str) or not is_known(driver)):
        raise OpenError(f"Unknown driver '{driver}'")
    if any(k == "backing" or k.startswith("backing.") for k in sub):
        raise UnsupportedError("A 'backing' option inside a backing object without 'file' is not supported by vdkit")
    own = frozenset() if driver is None else runtime_options(driver)
    for key in [k for k in sub if k in own]:
        del sub[key]
    return driver


def _remember_backing(filename: str, backing: object) -> None:
    """Record what the options said about ``filename``'s backing child for :mod:`vdkit.block.node`."""
    from vdkit.block.secrets import BackingOverride, set_open_option, table

    if backing == _NULL:
        set_open_option(filename, "backing", "null")
    elif isinstance(backing, BackingOverride):
        table("backing")[filename] = backing  # read by vdkit.block.chain.backing_override


def _opt_text(value: object) -> str:
    """A JSON scalar as the option string QEMU's visitors accept (``"port": 10809`` = ``port=10809``)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "" if value is None else str(value)


def strong_owner() -> dict[str, str]:
    """Each strong option's format (registry.STRONG_OPTIONS turned around)."""
    from vdkit.formats.registry import STRONG_OPTIONS

    return {key: fmt for fmt, keys in STRONG_OPTIONS.items() for key in keys}


def _probed_format(filename: str) -> str | None:
    """The format QEMU probes for a local file given by options without ``driver`` (None: unreadable)."""
    from vdkit.formats.registry import PROBE_SIZE, probe_format

    try:
        with open(filename, "rb") as f:
            head = f.read(PROBE_SIZE)
    except OSError:
        return None  # the open reports it
    return probe_format(head, filename)


def _probe_for_option(filename: str, key: str, wanted: str) -> str | None:
    """Probe the format when a format option comes without ``driver``: only ``wanted`` takes ``key``."""
    from vdkit.errors import OpenError
    from vdkit.formats.registry import PROBE_SIZE, probe_format

    try:
        with open(filename, "rb") as f:
            head = f.read(PROBE_SIZE)
    except OSError:
        return None  # the open reports it
    fmt = probe_format(head, filename)
    if fmt != wanted:
        raise OpenError(f"Block format '{fmt}' does not support the option '{key}'")
    return fmt


def image_opts_name(spec: str) -> str | None:
    """The ``json:`` name qemu-img gives an image opened with options its file name cannot express.

    Of the options :func:`image_opts` accepts only ``encrypt.key-secret`` is one
    (QEMU keeps it in the node's options); None when the plain file name stands.
    """
    if spec.startswith("json:"):
        from vdkit.block import json_name

        given = json_name.parse(spec)
        opts = {k: v for k, v in given.items() if isinstance(v, str)}
    else:
        opts = dict(item.partition("=")[::2] for item in split_items(spec, empty=False))
        given = dict(opts)
    json_proto = _json_named_protocol(given)
    if json_proto is not None:  # a protocol that names its nodes by some options (curl: a cookie, sslverify off)
        from vdkit.protocols.registry import protocol_module

        mod = protocol_module(json_proto)
        desc = mod.json_name(given)
        name_key = f"file.{getattr(mod, 'FILENAME_OPTION', 'filename')}"
        if desc is None and given.get("driver") is None and given.get(name_key):
            desc = mod.json_name(given, _probe_name(json_proto, str(given[name_key])))
        if desc is None:
            return None
        from vdkit.info.render_json import dumps_compact

        return "json:" + dumps_compact(desc)
    # strong options (registry.STRONG_OPTIONS) name the node json:{...} with them; without ``driver``
    # the format is the one owning the first (image_opts probed it and refused any other)
    owner = strong_owner()
    first = next((k for k in given if k in owner), None)
    if first is None:
        return None
    fmt = str(opts.get("driver") or owner[first])
    named: dict[str, object] = {k: given[k] for k in given if owner.get(k) == fmt}
    if not named:
        return None
    from vdkit.info.render_json import dumps_compact

    named.update({"driver": fmt, "file": {"driver": "file", "filename": given.get("file.filename", "")}})
    return "json:" + dumps_compact(named)


def _json_named_protocol(given: dict[str, object]) -> str | None:
    """The protocol driver (top, else the file child's) whose module names nodes ``json:{...}`` by options."""
    from vdkit.protocols.registry import protocol_module

    for driver in (given.get("driver"), given.get("file.driver")):
        if is_protocol_driver(driver) and hasattr(protocol_module(str(driver)), "json_name"):
            return str(driver)
    return None


def _probe_name(driver: str, name: str) -> str | None:
    """The format QEMU probes for a protocol's name given as options without ``driver`` (it names it in
    ``json:``)."""
    from vdkit.errors import VdkitError
    from vdkit.formats.registry import PROBE_SIZE, probe_format
    from vdkit.protocols.registry import open_name

    try:
        f, _ = open_name(driver, name, readonly=True, force_share=False)
    except (VdkitError, OSError):
        return None  # the open reports it
    try:
        return probe_format(f.pread(0, PROBE_SIZE), name)  # type: ignore[attr-defined]
    except (VdkitError, OSError):
        return None
    finally:
        f.close()  # type: ignore[attr-defined]


def file_description(flat: Mapping[str, object]) -> dict[str, object] | None:
    """The protocol ``file`` child of flattened options as QEMU's ``json:`` names describe it: its options as
    given, flattened (``server.path``), without those that only tune I/O (``_TUNING``, the protocol's
    ``WEAK_OPTIONS``: curl's readahead, nbd's reconnect-delay); None when the child is not a protocol's."""
    driver = flat.get("file.driver")
    if not is_protocol_driver(driver):
        return None
    from vdkit.protocols.registry import protocol_module

    weak = frozenset(getattr(protocol_module(str(driver)), "WEAK_OPTIONS", ()))
    given = {k[len("file."):]: v for k, v in flat.items() if k.startswith("file.")}
    return {k: v for k, v in given.items() if k not in _TUNING and k not in weak}


def node_description(node: Node, file: dict[str, object] | None = None) -> dict[str, object] | None:
    """``node`` as QEMU's ``json:`` names describe it, or None where vdkit does not.

    The node's own ``json:`` name's options where it has one (a raw window, strong options), else its
    driver over a local file, or over the protocol child ``file`` describes (:func:`file_description`,
    from the options the node was opened with; a protocol child without it is not described); with a
    ``backing`` member where its backing child is not the one its header names
    (:func:`backing_replaced`): null, or the child's own description, which names its own backing only
    where that was replaced too.
    """
    import json

    from vdkit.block.chain import has_protocol
    from vdkit.io.file import ImageFile

    name = node.display_name or node.filename
    desc: dict[str, object]
    if name.startswith("json:"):
        desc = json.loads(name[len("json:"):])
    elif isinstance(node.driver.file, ImageFile) and not has_protocol(node.filename):
        desc = {"driver": node.format, "file": {"driver": "file", "filename": node.filename}}
    elif file is not None:
        desc = {"driver": node.format, "file": file}
    else:
        return None
    if backing_replaced(node):
        below = None if node.backing is None else node_description(node.backing)
        if node.backing is not None and below is None:
            return None  # a backing vdkit does not describe: keep the plain name
        desc["backing"] = below
    return desc


def backing_replaced(node: Node) -> bool:
    """Whether ``node`` (opened with its backing) has another backing child than its header names, as
    QEMU decides it: ``"backing": null`` over a backing name; a ``backing`` object in the options (of the
    current open scope) whose node's file name is not the header's name *as stored* (so a backing
    object over ``sub/t.qcow2`` naming ``sub/b.qcow2``, the very file its header's ``b.qcow2`` names,
    still counts: observed in qemu-system-x86_64 7.2); without options, a backing other than the
    header's resolved name.  A header's ``json:`` backing name is never "replaced"."""
    from vdkit.block.chain import backing_override

    stored = node.driver.backing_file
    if node.backing is None:
        return stored is not None
    if stored is not None and stored.startswith("json:"):
        return False
    override = backing_override(node.filename)
    if override is not None and override.kind == "node":
        return node.backing.filename != stored
    return node.backing.filename != node.backing_filename_resolved


def name_replaced_backings(node: Node, flat: Mapping[str, object] | None = None) -> list[Node]:
    """Set ``display_name`` of each layer of ``node``'s chain (opened with its backing) whose backing was
    replaced by options to QEMU's ``json:{"backing": ..., ...}`` name; the layers renamed, top first.
    ``flat``: the options ``node`` was opened with (flattened), which describe a protocol child.

    Names are worked out before any is set (a layer's description holds its replaced backing's)."""
    from vdkit.info.render_json import dumps_compact

    names: list[tuple[Node, str]] = []
    for layer in node.chain():
        if backing_replaced(layer):
            desc = node_description(layer, file_description(flat) if layer is node and flat else None)
            if desc is not None:
                names.append((layer, "json:" + dumps_compact(desc)))
    for layer, name in names:
        layer.display_name = name
    return [layer for layer, _ in names]


def open_with_options(path: str | None, fmt: str | None, options: Mapping[str, object] | str | None, *,
                      secrets: Mapping[str, bytes | str] | None = None,
                      objects: Sequence[str] | Mapping[str, Mapping[str, str]] | None = None,
                      readonly: bool, force_share: bool, backing: bool, policy: OpenPolicy | None) -> Node:
    """``vdkit.open``: a name or options opened in a scope of their own (:class:`~vdkit.block.secrets.OpenScope`).

    ``path`` may be a ``json:{...}`` name; ``options`` is a node's options as ``json:`` has them (nested
    objects or dotted keys) or an ``--image-opts`` string; with both, ``path`` is the ``file`` child's
    file name.  The options go through the interpreter the command line uses, then
    :func:`vdkit.block.node.open_image`; errors name the spec as qemu-img's do.  ``secrets`` and the
    TLS credential ``objects`` exist only for this open: the scope is dropped when it returns, and an
    open node never looks them up again.
    """
    from vdkit.block.secrets import OpenScope
    from vdkit.errors import OpenError, SpecNames

    if isinstance(options, str) and path is not None:
        raise TypeError("vdkit.open() takes an --image-opts string without a path")
    scope = OpenScope({k: v.encode("utf-8") if isinstance(v, str) else bytes(v) for k, v in (secrets or {}).items()})
    with scope:
        if objects:
            _add_objects(objects, scope.secrets)
        spec: str | None = None
        given_flat: dict[str, object] | None = None  # the options, flattened (they describe a protocol child)
        if options is not None:
            from vdkit.block import json_name

            if isinstance(options, str):
                spec, parsed = options, None
            else:
                parsed = json_name.flatten(dict(options))
                if path is not None:
                    if any(k == "file" or k.startswith("file.") for k in parsed) or is_protocol_driver(
                            parsed.get("driver")):
                        raise TypeError("vdkit.open() takes a path or options naming the file, not both")
                    parsed["file.filename"] = path
                import json

                spec = "json:" + json.dumps(dict(options) if path is None else
                                            {**options, "file": {"filename": path}}, separators=(",", ":"))
            filename, driver = image_opts(spec, parsed)
            given_flat = dict(parsed) if parsed is not None else \
                dict(item.partition("=")[::2] for item in split_items(spec, empty=False))
        elif path is not None and path.startswith("json:"):
            from vdkit.block import json_name

            spec = path
            try:
                flat = json_name.parse(path)
            except OpenError as exc:
                raise exc.prefixed(f"Could not open '{path}': ") from None
            filename, driver = image_opts(path, flat)
            given_flat = flat
        elif path is not None:
            filename, driver = path, None
        else:
            raise TypeError("vdkit.open() needs a path or options")
        from vdkit.block.node import open_image

        with SpecNames((filename, spec)):
            node = open_image(filename, driver or fmt, readonly=readonly, force_share=force_share,
                              backing=backing, policy=policy)
        if spec is not None:
            try:
                node.display_name = image_opts_name(spec)
                if backing:  # QEMU names a layer whose backing the options replaced by them
                    name_replaced_backings(node, given_flat)
            except BaseException:
                node.close()
                raise
        return node


def _add_objects(objects: Sequence[str] | Mapping[str, Mapping[str, str]], secrets: dict[str, bytes]) -> None:
    """Create ``objects`` as ``--object`` creates them (:func:`vdkit.block.objects.add_object`, qemu-img's
    checks and texts) in the current scope: ``--object`` strings, or ``{id: {"qom-type": T, key: value}}``.
    The ``secrets`` given beside them are secret objects already (a TLS key's ``passwordid`` may name one)."""
    from collections.abc import Mapping

    from vdkit.block.objects import ObjectHelp, QomObject, add_object
    from vdkit.errors import VdkitError

    created = {k: QomObject("secret", k, {}, v) for k, v in secrets.items()}
    if isinstance(objects, str):
        specs: list[str] = [objects]
    elif isinstance(objects, Mapping):
        specs = []
        for obj_id, given in objects.items():
            props = {k: str(v) for k, v in given.items() if k != "qom-type"}
            items = [str(given.get("qom-type", "")), f"id={obj_id}", *(f"{k}={v}" for k, v in props.items())]
            specs.append(",".join(item.replace(",", ",,") for item in items))
    else:
        specs = list(objects)
    for spec in specs:
        try:
            add_object(spec, created)
        except ObjectHelp:
            raise VdkitError(f"Object '{spec}': 'help' lists objects on the command line only") from None
