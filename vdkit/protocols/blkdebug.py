"""The ``blkdebug`` driver: QEMU's rule-based I/O error injection, a node between a format and its file.

Why vdkit has it: it is how QEMU's own tests (and anyone checking a management stack's error
handling) make a block job meet a real I/O error: ``BLOCK_JOB_ERROR`` and the ``on-source-error`` /
``on-target-error`` / ``on-error`` policies can only be compared with QEMU's through the same rules.

Facts it follows (QEMU's ``docs/devel/blkdebug.txt``, the 7.2 QAPI schema ``BlockdevOptionsBlkdebug``
as ``query-qmp-schema`` lists it, and observed ``qemu-system-x86_64`` 7.2 behaviour):

* **Rules.**  ``inject-error`` rules (``event``, ``state``, ``iotype``, ``errno`` (default EIO),
  ``sector``, ``once``, ``immediately``) and ``set-state`` rules (``event``, ``state``,
  ``new_state``) come from the ``inject-error``/``set-state`` lists, from a ``config`` file in
  ``-readconfig``'s ini form (``[inject-error]`` sections of ``key = "value"`` lines), or both.
* **Events arm, requests fail.**  A rule does nothing until its *event* happens in its *state*
  (0: any; the engine starts in state 1).  When an event with inject-error rules happens, those
  rules become the active ones (replacing whatever was active); from then on every request to the
  node whose type (``iotype``, default all) and range (``sector``) match fails with ``errno``, until
  another such event replaces them.  A ``once`` rule is dropped after its first failure, for good.
  ``set-state`` rules of the event move the state once all the event's rules were looked at.
* **Which events vdkit makes.**  QEMU's formats announce what they are about to do (``l2_load``,
  ``cluster_alloc``, ...); vdkit's formats do not, so only the events below happen here, all on the
  blkdebug node itself: ``read_aio`` before a read of guest data (vdkit's formats read guest data
  with ``readinto``, metadata with ``pread``), ``write_aio`` before a vectored write (how qcow2
  writes guest data; its metadata goes out with ``pwrite``), ``pwritev``/``pwritev_zero`` before and
  ``pwritev_done`` after every write or zero write (QEMU's block layer fires these on every write to a
  node), ``flush_to_os`` and ``flush_to_disk`` before a flush.  Every other event of the schema is
  accepted in a rule and never happens.  Under a raw node every read and write is guest data
  (``read_aio``/``write_aio`` before each, as QEMU's raw driver announces them).
* **Names.**  ``blkdebug:CONFIG:FILE`` opens FILE under the rules of CONFIG (an empty CONFIG: no
  rules), named as given (also in block status: map's File column); a relative backing name below it
  is FILE's directory's.  A node given only a config file and its image (``blockdev-add``,
  ``-drive file.driver=blkdebug,...``, ``--image-opts``) is named so too; with rules among its
  options (``blockdev-add`` only) it is ``json:{...}`` of them (``image`` nested, the rules
  flattened), as QEMU names it.  A ``blockdev-add`` node lists its image as a file node of its own.
* **At the top** (``-f blkdebug``, ``driver=blkdebug``): :mod:`vdkit.formats.blkdebug`, the image's
  bytes as the disk.

The node is the image's local file with the rules in front of each request (:class:`BlkdebugFile`,
an :class:`~vdkit.io.file.ImageFile` whose descriptor fast paths the copy engine does not take:
they test for the exact class), so locks and every format work unchanged.  ``image`` must be a local
file given inline (QEMU also takes any node, by reference); ``immediately`` has no visible effect in
vdkit (QEMU: the failure completes before the request yields).  The alignment and limit options
are checked as QEMU checks ``align`` and otherwise not applied.
"""

from __future__ import annotations

import errno as _errno
import os
import threading

from vdkit.errors import OpenError, VdkitError
from vdkit.io.file import ImageFile

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from vdkit.io import BlockStatus

PREFIXES = ("blkdebug",)

# QAPI BlkdebugEvent (7.2), in schema order
EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table", "l2_load", "l2_update",
    "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write", "read_aio", "read_backing_aio",
    "read_compressed", "write_aio", "write_compressed", "vmstate_load", "vmstate_save", "cow_read", "cow_write",
    "reftable_load", "reftable_grow", "reftable_update", "refblock_load", "refblock_update",
    "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
    "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev",
    "pwritev_zero", "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
)
# QAPI BlkdebugIOType (7.2): a rule without one matches them all
IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
_ALL_IOTYPES = (1 << len(IOTYPES)) - 1
_READ, _WRITE, _ZEROES, _DISCARD, _FLUSH, _STATUS = (1 << i for i in range(len(IOTYPES)))

# the members of each rule kind (the config file's keys; QAPI's for the option lists)
_RULE_KEYS = {
    "inject-error": ("event", "state", "iotype", "errno", "sector", "once", "immediately"),
    "set-state": ("event", "state", "new_state"),
}


class Rule:
    """One rule: an ``inject-error`` (``new_state`` None) or a ``set-state`` rule."""

    __slots__ = ("event", "state", "iotypes", "errno", "offset", "once", "new_state")

    def __init__(self, event: str, *, state: int = 0, iotypes: int = _ALL_IOTYPES, errno: int = _errno.EIO,
                 offset: int = -1, once: bool = False, new_state: int | None = None) -> None:
        self.event = event
        self.state = state
        self.iotypes = iotypes
        self.errno = errno
        self.offset = offset
        self.once = once
        self.new_state = new_state


class Rules:
    """The injection engine of one node: its rules by event, the armed ones, the state.

    Requests come from the job's thread and from the daemon's NBD and monitor threads, so the
    engine's own lock guards every change (QEMU's has one too).
    """

    def __init__(self, rules: list[Rule]) -> None:
        self.state = 1
        self._lock = threading.Lock()
        self._by_event: dict[str, list[Rule]] = {}
        for rule in rules:  # the newest rule of an event is looked at first (QEMU keeps them so)
            self._by_event.setdefault(rule.event, []).insert(0, rule)
        self._armed: list[Rule] = []

    def event(self, name: str) -> None:
        """``name`` happened: arm its inject-error rules of this state, then take its state changes."""
        rules = self._by_event.get(name)
        if not rules:
            return
        with self._lock:
            new_state, armed = self.state, False
            for rule in rules:
                if rule.state and rule.state != self.state:
                    continue
                if rule.new_state is not None:
                    new_state = rule.new_state
                    continue
                if not armed:
                    self._armed, armed = [], True
                self._armed.insert(0, rule)
            self.state = new_state

    def check(self, iotype: int, offset: int, length: int) -> None:
        """Fail the request (raise its rule's errno) if an armed rule matches it."""
        if not self._armed:
            return
        with self._lock:
            for rule in self._armed:
                if rule.iotypes & iotype and (rule.offset < 0 or length and offset <= rule.offset < offset + length):
                    break
            else:
                return
            if not rule.errno:
                return
            if rule.once:
                self._armed.remove(rule)
                self._by_event[rule.event].remove(rule)
        code = abs(rule.errno)
        raise OSError(code, os.strerror(code))


class BlkdebugFile(ImageFile):
    """The image's local file with the rules in front of every request (see the module doc)."""

    protocol_driver = "blkdebug"  # the node's ``drv`` (vdkit.block.protocol_node)
    has_image_child = True  # a blockdev-add node lists its image as a node of its own (QEMU's ``image`` child)

    def __init__(self, image: str, rules: Rules, *, readonly: bool, force_share: bool = False,
                 lock: bool = False) -> None:
        super().__init__(image, readonly=readonly, force_share=force_share, lock=lock)
        self.image = self.filename  # (``filename`` becomes the node's name when it has one)
        self.rules = rules
        self._all_data = False  # every request is guest data (a raw node above: guest_data_only)
        self.open_options: str | None = None  # a blockdev-add node's options, as the graph describes it

    def guest_data_only(self) -> None:
        """A raw node above: every read and write is guest data (QEMU's raw fires read_aio/write_aio for
        each), not only the vectored ones a format with metadata uses for it."""
        self._all_data = True

    def pread(self, offset: int, length: int) -> bytes:
        if self._all_data:
            self.rules.event("read_aio")
        self.rules.check(_READ, offset, length)
        return super().pread(offset, length)

    def readinto(self, offset: int, view: memoryview) -> None:
        self.rules.event("read_aio")
        self.rules.check(_READ, offset, view.nbytes)
        super().readinto(offset, view)

    def _write(self, iotype: int, offset: int, length: int) -> None:
        self.rules.event("pwritev_zero" if iotype == _ZEROES else "pwritev")
        self.rules.check(iotype, offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._all_data:
            self.rules.event("write_aio")
        self._write(_WRITE, offset, len(data))
        super().pwrite(offset, data)
        self.rules.event("pwritev_done")

    def pwritev(self, offset: int, buffers: list[bytes | bytearray | memoryview]) -> None:
        self.rules.event("write_aio")
        self._write(_WRITE, offset, sum(len(b) for b in buffers))
        super().pwritev(offset, buffers)
        self.rules.event("pwritev_done")

    def punch_hole(self, offset: int, length: int, *, extend: bool = True) -> None:
        # a discard inside an image never grows it; a zero write may
        if extend:
            self._write(_ZEROES, offset, length)
        else:
            self.rules.check(_DISCARD, offset, length)
        super().punch_hole(offset, length, extend=extend)
        if extend:
            self.rules.event("pwritev_done")

    def block_status(self, offset: int, length: int) -> BlockStatus:
        """The image file's status, naming the image (QEMU passes block status down to it)."""
        from vdkit.io import BlockStatus

        self.rules.check(_STATUS, offset, length)
        st = super().block_status(offset, length)
        return BlockStatus(st.flags, st.length, st.offset, self.image)

    def allocated_size(self) -> int:
        """QEMU's blkdebug does not pass the question on to its image: no ``actual-size``."""
        raise OSError(_errno.ENOTSUP, os.strerror(_errno.ENOTSUP))

    def flush(self) -> None:
        if not self.sync:  # cache=unsafe (convert's output): no flush reaches the node, no event either
            return
        self.rules.event("flush_to_os")
        self.rules.event("flush_to_disk")
        self.rules.check(_FLUSH, 0, 0)
        super().flush()


# -- rules from options and config files ---------------------------------------------------------------


def _rule(kind: str, opts: dict[str, Any]) -> Rule:
    """A rule from its (checked) members."""
    if kind == "set-state":
        return Rule(opts["event"], state=opts.get("state", 0), new_state=opts["new_state"])
    iotype = opts.get("iotype")
    sector = opts.get("sector", -1)
    return Rule(opts["event"], state=opts.get("state", 0),
                iotypes=_ALL_IOTYPES if iotype is None else 1 << IOTYPES.index(iotype),
                errno=opts.get("errno", _errno.EIO), offset=sector * 512 if sector >= 0 else -1,
                once=opts.get("once", False))


def _config_value(kind: str, key: str, text: str) -> object:
    """One ``key = "value"`` of a config file section as QemuOpts parses it, with QEMU's texts."""
    if key not in _RULE_KEYS[kind]:
        raise VdkitError(f"Invalid parameter '{key}'")
    if key == "event":
        if text not in EVENTS:
            raise VdkitError(f"invalid parameter value: {text}")
        return text
    if key == "iotype":
        if text not in IOTYPES:
            raise VdkitError(f"Parameter 'iotype' does not accept value '{text}'")
        return text
    if key in ("once", "immediately"):
        if text not in ("on", "off"):
            raise VdkitError(f"Parameter '{key}' expects 'on' or 'off'")
        return text == "on"
    try:
        return int(text, 0)
    except ValueError:
        raise VdkitError(f"Parameter '{key}' expects a number") from None


def read_config(path: str) -> list[Rule]:
    """The rules of a config file (``-readconfig``'s format: ``[kind]`` groups of ``key = "value"``)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise VdkitError(f"Could not read blkdebug config file: {os.strerror(exc.errno or _errno.EIO)}",
                         errno=exc.errno) from exc
    sections: list[tuple[str, dict[str, object]]] = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            kind = line[1:-1].strip().strip('"').split(" ")[0]
            if kind not in _RULE_KEYS:
                raise VdkitError(f"There is no option group '{kind}'")
            sections.append((kind, {}))
            continue
        if not sections:
            raise VdkitError("no group defined")
        key, eq, value = line.partition("=")
        value = value.strip()
        if not eq or len(value) < 2 or value[0] != '"' or value[-1] != '"':
            raise VdkitError("parse error")
        kind, members = sections[-1]
        members[key.strip()] = _config_value(kind, key.strip(), value[1:-1])
    rules = []
    for kind, members in sections:
        if "event" not in members:
            raise VdkitError("Missing event name for rule")
        if kind == "set-state" and "new_state" not in members:
            members["new_state"] = 0
        rules.append(_rule(kind, members))
    return rules


def rules_of(opts: dict[str, Any]) -> Rules:
    """The engine for a node's options: the config file's rules, then the listed ones (QEMU's order)."""
    rules = read_config(opts["config"]) if opts.get("config") else []
    for kind in ("inject-error", "set-state"):
        rules += [_rule(kind, r) for r in opts.get(kind) or ()]
    return Rules(rules)


def _check_align(opts: dict[str, Any]) -> None:
    align = opts.get("align")
    if align is not None and (align <= 0 or align & (align - 1)):
        raise VdkitError(f"Cannot meet constraints with align {align}")


# -- the protocol registry's slots -----------------------------------------------------------------------


def split_name(name: str) -> tuple[str, str]:
    """``blkdebug:CONFIG:FILE`` as (CONFIG, FILE)."""
    rest = name[len("blkdebug:"):]
    config, colon, image = rest.partition(":")
    if not colon:
        raise OpenError("Could not parse blkdebug filename: Invalid argument", errno=_errno.EINVAL)
    return config, image


def open_file(name: str, *, readonly: bool, force_share: bool, fmt: str | None) -> tuple[BlkdebugFile, str]:
    """The protocol registry's open of a ``blkdebug:CONFIG:FILE`` name (QEMU's legacy syntax)."""
    config, image = split_name(name)
    rules = Rules(read_config(config) if config else [])
    if not image:
        raise OpenError("The 'file' block driver requires a file name")
    f = BlkdebugFile(image, rules, readonly=readonly, force_share=force_share)
    f.filename = name  # the node's name: what block status (map's File column) reports, as QEMU's
    return f, name


def resolve_backing(image: str, stored: str) -> str | None:
    """A relative backing name below ``blkdebug:CONFIG:FILE``: in FILE's directory (QEMU's path_combine)."""
    file = split_name(image)[1]
    return file[: file.rfind("/") + 1] + stored


FILENAME_OPTION = "filename"  # -drive file=NAME,file.driver=blkdebug: NAME is the image (or a blkdebug: name)


def drive_option(key: str) -> bool:
    """``-drive driver=blkdebug,...``: every key the drive did not take is the blkdebug node's."""
    return not key.startswith("file.")


def name_for_options(opts: dict[str, str], driver: str) -> str:
    """``-drive``/``--image-opts`` with ``driver=blkdebug``: ``config`` and the image (``image.filename``,
    or a file name given beside them) make the node's name ``blkdebug:CONFIG:FILE``, as QEMU names it.
    Rules given as options (``inject-error.*``...) are taken only by ``blockdev-add`` here."""
    config, image = opts.get("config", ""), opts.get("image.filename")
    name = opts.get("filename")
    if name is not None and name.startswith("blkdebug:"):
        named_config, named_image = split_name(name)
        config, image = config or named_config, image or named_image
    elif image is None:
        image = name
    extra = sorted(set(opts) - {"config", "image.filename", "filename"} - ({"image.driver"}
                   if opts.get("image.driver") == "file" else set()))
    if extra:
        raise VdkitError(f"vdkit's blkdebug takes the option '{extra[0]}' only from blockdev-add")
    if not image:
        raise VdkitError("Parameter 'image' is missing")
    return f"blkdebug:{config}:{image}"


def _flatten(prefix: str, value: object, out: dict[str, object]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = value


_NODE_KEYS = ("driver", "node-name", "read-only", "auto-read-only", "discard", "cache", "force-share",
              "detect-zeroes")


def node_name(opts: dict[str, Any]) -> str:
    """The name QEMU gives a ``blockdev-add`` blkdebug node: ``blkdebug:CONFIG:FILE`` when a config file
    (or nothing) is all it was given, else ``json:{...}`` of the options given (the image's nested, the
    rest flattened, in QEMU's dictionary order)."""
    own = [k for k in opts if k not in _NODE_KEYS and k != "image"]
    if not own or own == ["config"]:
        return f"blkdebug:{opts.get('config', '')}:{opts['image']['filename']}"
    return "json:" + options_text(opts)


def options_text(opts: dict[str, Any]) -> str:
    """The node's options as QEMU prints them where it describes the node (``json:`` names of the node
    and of the nodes above it): the image's nested, the rest flattened, in QEMU's dictionary order."""
    from vdkit.info.render_json import dumps_compact

    d: dict[str, object] = {}
    for key, value in opts.items():
        if key == "image":
            d["image"] = value
        elif key not in _NODE_KEYS:
            _flatten(key, value, d)
    d["driver"] = "blkdebug"
    return dumps_compact(d)


def open_blockdev(opts: dict[str, Any], *, readonly: bool, auto_read_only: bool) -> tuple[BlkdebugFile, str, bool]:
    """A ``blockdev-add``/``-blockdev`` blkdebug node over an inline ``file`` image."""
    image = opts["image"]
    if isinstance(image, str):
        raise VdkitError(f"vdkit's blkdebug takes its image inline (driver 'file'), not the node '{image}'")
    if not isinstance(image, dict) or image.get("driver") != "file" or not isinstance(image.get("filename"), str):
        raise VdkitError("vdkit's blkdebug takes only a local file as its image ({'driver': 'file', 'filename': ...})")
    _check_align(opts)
    rules = rules_of(opts)
    ro = readonly
    try:
        f = BlkdebugFile(image["filename"], rules, readonly=ro)
    except OpenError as exc:
        if not (auto_read_only and not ro and exc.errno in (_errno.EACCES, _errno.EROFS)):
            raise
        ro = True
        f = BlkdebugFile(image["filename"], rules, readonly=True)
    from vdkit.io.file import LockMode

    if image.get("locking") != "off":
        f.take_lock(LockMode(0, 0))  # nobody uses a new node yet: no bytes until a parent needs some
    f.open_options = options_text(opts)
    return f, node_name(opts), ro
