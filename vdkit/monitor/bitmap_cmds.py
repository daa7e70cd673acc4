"""Dirty bitmap QMP commands: block-dirty-bitmap-add/remove/clear/enable/disable/merge.

A bitmap lives on one format node (:class:`vdkit.block.dirty_bitmap.DirtyBitmap`
in ``Node.bitmaps``); every write the daemon makes to that node (NBD clients,
jobs) marks the recording ones.  Persistent bitmaps of qcow2 nodes are stored
in the image when the node closes (``quit``, eject, blockdev-del) and loaded
when it opens.  Texts and checking order are QEMU 7.2's (``blockdev.c`` /
``block/monitor/bitmap-qmp-cmds.c`` behaviour, observed against
qemu-system-x86_64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vdkit.block.dirty_bitmap import (
    CHECK_ALLOW_RO,
    CHECK_BUSY,
    CHECK_DEFAULT,
    CHECK_RO,
    DirtyBitmap,
    add_bitmap,
    merge_bitmaps,
    remove_bitmap,
)
from vdkit.errors import VdkitError
from vdkit.info.model import BlockDirtyInfo
from vdkit.monitor.commands import Arg, CommandContext, CommandRegistry, opt

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from vdkit.block.node import Node
    from vdkit.devices.registry import DeviceRegistry
    from vdkit.info.collect import Hole


def lookup_node(machine: DeviceRegistry, name: str) -> tuple[Node, str] | None:
    """QEMU's ``bdrv_lookup_bs(name, name)``: a drive's root node, else a format node by name.

    Returns the node and what QEMU calls it in messages (the drive's name for
    a drive's root node, else the node name), or None.
    """
    drive = machine.find_drive(name)
    if drive is not None:
        if drive.medium is None or drive.medium.dead:
            raise VdkitError(f"Device '{name}' has no medium")
        return drive.medium.node, drive.id
    for drive in machine.drives:
        m = drive.medium
        if m is None:
            continue
        chain = list(m.node.chain())
        for i, (fmt_name, file_name) in enumerate(m.names):
            if fmt_name == name:
                return chain[i], (drive.id if i == 0 else name)
            if file_name == name:
                raise VdkitError("Dirty bitmaps on protocol nodes are not supported by vdkit")
    g = machine.graph.find(name)
    if g is not None:
        if g.node is None:
            raise VdkitError("Dirty bitmaps on protocol nodes are not supported by vdkit")
        return g.node, name
    return None


def dirty_info(node: Node, hole: Hole | None = None) -> list[BlockDirtyInfo] | None:
    """``dirty-bitmaps`` of a node as query-block shows it, newest first; None without any.

    The anonymous bitmaps of jobs (a mirror's or an active commit's dirty map) are listed too,
    without a name, as QEMU lists them.
    """
    return bitmaps_info(node.bitmaps, hole)


def bitmaps_info(bitmaps: list[DirtyBitmap], hole: Hole | None = None) -> list[BlockDirtyInfo] | None:
    """``hole``: each ``count`` is its placeholder (see :func:`vdkit.info.collect.image_info`)."""
    out = [
        BlockDirtyInfo(name=b.name, count=b.count() if hole is None else hole(b.count), granularity=b.granularity,
                       recording=b.recording, busy=b.busy, persistent=b.persistent,
                       inconsistent=True if b.inconsistent else None)
        for b in bitmaps
    ]
    return out or None


def _find(machine: DeviceRegistry, node: str, name: str) -> tuple[Node, DirtyBitmap]:
    """``block_dirty_bitmap_lookup``: the node (``Node 'x' not found``), then the bitmap."""
    try:
        found = lookup_node(machine, node)
    except VdkitError as exc:
        if exc.message.startswith("Dirty bitmaps on protocol"):
            raise
        found = None
    if found is None:
        raise VdkitError(f"Node '{node}' not found")
    bm = found[0].find_bitmap(name)
    if bm is None:
        raise VdkitError(f"Dirty bitmap '{name}' not found")
    return found[0], bm


def _granularity(args: dict[str, Any]) -> int | None:
    g = args.get("granularity")
    if g is not None and not 0 <= g < 1 << 32:
        raise VdkitError("Parameter 'granularity' expects uint32_t")
    return g


def add(machine: DeviceRegistry, args: dict[str, Any]) -> DirtyBitmap:
    granularity = _granularity(args)
    name = args["name"]
    if not name:
        raise VdkitError("Bitmap name cannot be empty")
    node = args["node"]
    found = lookup_node(machine, node)
    if found is None:
        raise VdkitError(f"Cannot find device='{node}' nor node-name='{node}'")
    target, label = found
    return add_bitmap(target, name, granularity=granularity, persistent=bool(args.get("persistent", False)),
                      disabled=bool(args.get("disabled", False)), label=label)


def block_dirty_bitmap_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    add(ctx.machine, args)


def remove(machine: DeviceRegistry, args: dict[str, Any], *, release: bool = True) -> tuple[Node, DirtyBitmap]:
    node, bm = _find(machine, args["node"], args["name"])
    if release:
        remove_bitmap(node, bm)
    return node, bm


def block_dirty_bitmap_remove(ctx: CommandContext, args: dict[str, Any]) -> None:
    remove(ctx.machine, args)


def block_dirty_bitmap_clear(ctx: CommandContext, args: dict[str, Any]) -> None:
    _, bm = _find(ctx.machine, args["node"], args["name"])
    bm.check(CHECK_DEFAULT)
    bm.clear()


def block_dirty_bitmap_enable(ctx: CommandContext, args: dict[str, Any]) -> None:
    _, bm = _find(ctx.machine, args["node"], args["name"])
    bm.check(CHECK_ALLOW_RO)
    bm.enabled = True


def block_dirty_bitmap_disable(ctx: CommandContext, args: dict[str, Any]) -> None:
    _, bm = _find(ctx.machine, args["node"], args["name"])
    bm.check(CHECK_ALLOW_RO)
    bm.enabled = False


def _merge_sources(machine: DeviceRegistry, node: Node, refs: list[Any]) -> Iterator[DirtyBitmap]:
    """The ``bitmaps`` of a merge one by one (a name on the target's node, or a node and a name), found
    as the merge reaches each: a missing one fails after the ones before it were checked."""
    for src_ref in refs:
        if isinstance(src_ref, str):
            src = node.find_bitmap(src_ref)
            if src is None:
                raise VdkitError(f"Dirty bitmap '{src_ref}' not found")
        elif isinstance(src_ref, dict) and isinstance(src_ref.get("node"), str) \
                and isinstance(src_ref.get("name"), str):
            _, src = _find(machine, src_ref["node"], src_ref["name"])
        else:
            raise VdkitError("Invalid parameter type for 'bitmaps', expected: BlockDirtyBitmapOrStr")
        yield src


def merge(machine: DeviceRegistry, args: dict[str, Any]) -> tuple[DirtyBitmap, bytearray]:
    """Merge ``bitmaps`` into ``target``: (the target, its bits before), which undo the merge; a
    failure changes nothing."""
    node, dst = _find(machine, args["node"], args["target"])
    old = dst.bits.copy()
    merge_bitmaps(dst, _merge_sources(machine, node, args["bitmaps"]))
    return dst, old


def block_dirty_bitmap_merge(ctx: CommandContext, args: dict[str, Any]) -> None:
    merge(ctx.machine, args)


# -- transaction actions (prepare; the returned callable undoes) ------------------------------------


def prepare_action(machine: DeviceRegistry, kind: str, data: dict[str, Any]) -> Callable[[], None]:
    """One bitmap action of a ``transaction``: done now, undone by the returned callable on rollback."""
    if kind == "block-dirty-bitmap-add":
        bm = add(machine, data)
        found = lookup_node(machine, data["node"])
        assert found is not None
        node = found[0]
        return lambda: node.bitmaps.remove(bm) if bm in node.bitmaps else None
    if kind == "block-dirty-bitmap-remove":
        # QEMU hides the bitmap at prepare and drops it at commit; a removal cannot be undone on disk,
        # so vdkit checks at prepare and removes at once (the last action of a transaction is safest)
        node, bm = _find(machine, data["node"], data["name"])
        bm.check(CHECK_BUSY | CHECK_RO)
        remove(machine, data)
        return lambda: None
    if kind == "block-dirty-bitmap-merge":
        dst, old = merge(machine, data)

        def undo_merge() -> None:
            dst.bits = old
        return undo_merge
    _, bm = _find(machine, data["node"], data["name"])
    if kind == "block-dirty-bitmap-clear":
        bm.check(CHECK_DEFAULT)
        old_bits = bm.bits.copy()
        bm.clear()

        def undo_clear() -> None:
            bm.bits = old_bits
        return undo_clear
    bm.check(CHECK_ALLOW_RO)
    was = bm.enabled
    bm.enabled = kind == "block-dirty-bitmap-enable"

    def undo_toggle() -> None:
        bm.enabled = was
    return undo_toggle


ADD_SCHEMA = (Arg("node"), Arg("name"), opt("granularity", "int"), opt("persistent", "bool"),
              opt("disabled", "bool"))
NAME_SCHEMA = (Arg("node"), Arg("name"))
MERGE_SCHEMA = (Arg("node"), Arg("target"), Arg("bitmaps", "array", items=Arg("bitmaps[]", "any")))
ACTION_SCHEMAS = {
    "block-dirty-bitmap-add": ADD_SCHEMA,
    "block-dirty-bitmap-remove": NAME_SCHEMA,
    "block-dirty-bitmap-clear": NAME_SCHEMA,
    "block-dirty-bitmap-enable": NAME_SCHEMA,
    "block-dirty-bitmap-disable": NAME_SCHEMA,
    "block-dirty-bitmap-merge": MERGE_SCHEMA,
}


def register(reg: CommandRegistry) -> None:
    r = reg.register
    r("block-dirty-bitmap-add", *ADD_SCHEMA)(block_dirty_bitmap_add)
    r("block-dirty-bitmap-remove", *NAME_SCHEMA)(block_dirty_bitmap_remove)
    r("block-dirty-bitmap-clear", *NAME_SCHEMA)(block_dirty_bitmap_clear)
    r("block-dirty-bitmap-enable", *NAME_SCHEMA)(block_dirty_bitmap_enable)
    r("block-dirty-bitmap-disable", *NAME_SCHEMA)(block_dirty_bitmap_disable)
    r("block-dirty-bitmap-merge", *MERGE_SCHEMA)(block_dirty_bitmap_merge)
