"""Block and snapshot QMP commands: handlers that return model objects.

Each handler runs with the device lock held (the runtime takes it), reads the
drives through ``ctx.machine`` (a :class:`vdkit.devices.registry.DeviceRegistry`)
and builds ``vdkit.info.model`` objects through ``vdkit.info.collect``.  The
same handlers serve QMP and HMP.  Texts of errors are QEMU 7.2's
(``qmp-hmp.md`` §2-§3, §6).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vdkit.block.driver import CorruptionEvent
from vdkit.block.protocol_node import protocol_name, protocol_node
from vdkit.block.snapshot import find_id_then_name, snapshot_info
from vdkit.devices.graph import chain_depth
from vdkit.devices.throttle import THROTTLE_KEYS, ThrottleConfig
from vdkit.errors import VdkitError, os_error_message
from vdkit.info.collect import filter_image_info, image_info
from vdkit.info.model import (
    BlockdevCacheInfo,
    BlockDeviceInfo,
    BlockDeviceStats,
    BlockInfo,
    BlockStats,
    BlockStatsSpecificFile,
    ImageInfo,
    SnapshotInfo,
)
from vdkit.info.render_json import dumps_compact, to_qobject
from vdkit.monitor import bitmap_cmds, external_snapshot, mirror_cmds, nbd_cmds
from vdkit.monitor.commands import Arg, CommandContext, CommandRegistry, DeviceNotFoundError, opt, validate
from vdkit.monitor.qmp_wire import RawJson
from vdkit.protocols.registry import is_protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vdkit.block.jobs import JobFilter, JobList
    from vdkit.block.node import Node
    from vdkit.block.snapshot import SnapshotRecord
    from vdkit.devices.graph import GraphNode
    from vdkit.devices.registry import DeviceRegistry, Drive, Medium
    from vdkit.info.collect import Hole


# --------------------------------------------------------------------------
# node -> info
# --------------------------------------------------------------------------


def _file_image_info(node: Node) -> ImageInfo:
    """The file (protocol) node below a format node."""
    f = node.driver.file
    while getattr(f, "inner", None) is not None:  # raw's offset/size window: the file node is the file below
        f = f.inner  # type: ignore[attr-defined]
    return image_info(protocol_node(node.filename, f, readonly=node.readonly))


def _cache(drive: Drive, medium: Medium, index: int, *, backend: bool) -> BlockdevCacheInfo:
    """The cache mode of one node.

    A snapshot=on overlay is cached and ignores flushes (QEMU's temporary
    snapshot); the image under it keeps the -drive's mode.  A medium inserted
    later into such a drive inherits the overlay's flags on every node, as
    QEMU's BlockBackend keeps them.
    """
    c = drive.spec.cache
    # nodes put above the overlay by external snapshots inherit its flags, as QEMU's do
    if medium.overlay_path is not None:
        snap = index <= medium.overlay_index
    else:
        snap = drive.spec.snapshot if medium.snapshot_flags is None else medium.snapshot_flags
    return BlockdevCacheInfo(writeback=c.writeback if backend else True, direct=c.direct and not snap,
                             no_flush=c.no_flush or snap)


def _chain(medium: Medium) -> list[Node]:
    return list(medium.node.chain())


def _format_node_info(drive: Drive, medium: Medium, index: int, *, backend: bool, flat: bool,
                      hole: Hole | None = None) -> BlockDeviceInfo:
    chain = _chain(medium)
    node = chain[index]
    info = BlockDeviceInfo(
        file=node.filename,
        node_name=medium.names[index][0],
        ro=medium.ro if index == 0 else node.readonly,
        drv=node.format,
        # QEMU names the backing *node's* filename (the path it resolved and opened, or the
        # snapshot=on overlay's base attached in memory), not the name stored in the header
        backing_file=chain[index + 1].filename if index + 1 < len(chain) else None,
        backing_file_depth=0 if flat else len(chain) - 1 - index,
        encrypted=node.driver.encrypted,
        detect_zeroes=(medium.detect_zeroes or drive.spec.detect_zeroes) if index == 0 else "off",
        image=_json_backing_names(node, image_info(node, nested=not flat, hole=hole)),
        cache=_cache(drive, medium, index, backend=backend),
        dirty_bitmaps=bitmap_cmds.dirty_info(node, hole),
    )
    if backend and drive.throttle.enabled:
        t = drive.throttle
        for key in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"):
            setattr(info, key, t.avg[key])
            if t.max[key]:
                setattr(info, key + "_max", t.max[key])
                setattr(info, key + "_max_length", t.length[key])
        if t.iops_size:
            info.iops_size = t.iops_size
        info.group = drive.group
    return info


def _file_node_info(drive: Drive, medium: Medium, index: int) -> BlockDeviceInfo:
    node = _chain(medium)[index]
    overlay = index == medium.overlay_index and medium.overlay_path is not None
    filename = medium.overlay_path if overlay and medium.overlay_path else node.filename
    if filename.startswith("json:"):  # an external snapshot's overlay: the file node keeps its own name
        filename = node.driver.file.filename
    # a network node named by its options (an http cookie, sslverify off) has its own json: name
    filename = getattr(node.driver.file, "json_filename", None) or filename
    image = _file_image_info(node)
    image.filename = filename
    proto = protocol_name(node.driver.file)
    ro = (medium.ro if medium.file_ro is None else medium.file_ro) if index == 0 else node.readonly
    return BlockDeviceInfo(
        file=filename,
        node_name=medium.names[index][1],
        ro=ro if proto == "file" else ro or bool(node.driver.file.readonly),  # auto-read-only below -drive
        drv=proto,
        backing_file_depth=0,
        encrypted=False,
        detect_zeroes="off",
        image=image,
        cache=_cache(drive, medium, index, backend=False),
    )


def block_info(drive: Drive, jobs: JobList | None = None, hole: Hole | None = None) -> BlockInfo:
    """``hole``: the numbers that change with the data (actual sizes, bitmap counts) are placeholders
    (:class:`_Template`)."""
    info = BlockInfo(device=drive.id, qdev=drive.qdev, removable=drive.removable, locked=False)
    if drive.medium is not None and not drive.medium.dead:  # a dead node has no driver: not inserted
        info.inserted = _format_node_info(drive, drive.medium, 0, backend=True, flat=False, hole=hole)
        top_filter = next((f for f in _filters_of(jobs, drive.medium)
                           if f.below is drive.medium.node and f.driver == "copy-before-write"), None)
        if top_filter is not None:
            # a backup's filter is not an implicit one: the drive's root is the filter while the job lives
            inserted = info.inserted
            node = drive.medium.node
            inserted.node_name, inserted.drv = top_filter.name, top_filter.driver
            inserted.backing_file, inserted.backing_file_depth = None, len(_chain(drive.medium))
            inserted.encrypted = False
            inserted.image = filter_image_info(node, top_filter.driver, nested=True, hole=hole)
            inserted.dirty_bitmaps = bitmap_cmds.bitmaps_info(getattr(top_filter, "bitmaps", []), hole)
    if drive.has_tray:
        info.tray_open = drive.tray_open
    if drive.has_io_status:
        info.io_status = "ok"
    return info


def query_block(ctx: CommandContext, args: dict[str, Any]) -> list[BlockInfo]:
    return [block_info(d, ctx.machine.jobs) for d in ctx.machine.drives]


def _files_state(drive: Drive) -> tuple[object, ...]:
    if drive.medium is None:
        return ()
    out: list[object] = []
    for node in drive.medium.node.chain():
        fd = node.driver.file.fd
        if fd < 0:  # an NBD export: nothing cheap tells whether it changed, so the entry is rendered afresh
            out.append((-1, -1, time.monotonic_ns(), -1))
            continue
        st = os.fstat(fd)
        out.append((st.st_size, st.st_blocks, st.st_mtime_ns, st.st_ino))
        out.extend(b.count() for b in node.bitmaps)  # (a bitmap's count changes without its file)
    return tuple(out)


def _data_state(drive: Drive) -> tuple[object, ...]:
    """What a drive's ``query-block`` entry shows that data writes may change, but for the numbers a
    :class:`_Template` fills in: each layer's size (a raw file's follows the file) and dirty flag."""
    if drive.medium is None:
        return ()
    out: list[object] = []
    for node in drive.medium.node.chain():
        drv = node.driver
        if drv.file.fd < 0:  # an NBD export: nothing cheap tells whether it changed, so the entry is rendered afresh
            out.append(time.monotonic_ns())
        out.append((drv, drv.virtual_size, drv.dirty))
    return tuple(out)


_HOLE = 7_000_000_000_000_000_000  # placeholders count up from here: above any size or count


class _Template:
    """A rendered entry whose changing numbers (actual sizes, bitmap counts) are filled in when sent.

    While a job or an NBD client writes, the files' allocation and the dirty
    counts change with every request, but nothing else in a ``query-block``
    entry does: rendering the entry again for every poll cost a third of a
    query's time (and a query then competed longer with the job for the
    interpreter).  So the entry is rendered once with placeholders
    (:data:`Hole`: the model gets ``_HOLE + i`` where the number goes, and
    the function that reads it is kept) and each query reads the numbers
    again and puts them in.  A placeholder that does not show exactly once
    in the text (a name that happens to contain it) makes it a plain
    rendering, re-rendered whenever its key changes.
    """

    def __init__(self, build: Callable[[Hole | None], object]) -> None:
        readers: list[Callable[[], int]] = []

        def hole(read: Callable[[], int]) -> int:
            readers.append(read)
            return _HOLE + len(readers) - 1

        text = dumps_compact(to_qobject(build(hole)))
        marks = [str(_HOLE + i) for i in range(len(readers))]
        if any(text.count(m) != 1 for m in marks):
            text, readers, marks = dumps_compact(to_qobject(build(None))), [], []
        at = sorted((text.index(m), m, read) for m, read in zip(marks, readers, strict=True))
        self.parts: list[str] = []
        self.readers = [read for _, _, read in at]
        pos = 0
        for i, m, _ in at:
            self.parts.append(text[pos:i])
            pos = i + len(m)
        self.parts.append(text[pos:])

    def text(self) -> str | None:
        """The entry with today's numbers (None: one could not be read now; render afresh)."""
        if not self.readers:
            return self.parts[0]
        try:
            values = [str(read()) for read in self.readers]
        except OSError:
            return None
        out = [self.parts[0]]
        for value, part in zip(values, self.parts[1:], strict=True):
            out += (value, part)
        return "".join(out)


def query_block_json(ctx: CommandContext, args: dict[str, Any]) -> RawJson:
    """``query-block`` for QMP, each drive's entry rendered once and reused.

    An entry is rendered again when a command may have changed daemon state
    (``DeviceRegistry.generation``) or a layer of the drive's chain changed
    what data writes can change besides numbers (:func:`_data_state`); the
    numbers themselves (actual sizes, bitmap counts) are read for every query
    (:class:`_Template`).  The same model objects and the same renderer as
    :func:`query_block`, only not repeated for every poll.
    """
    machine = ctx.machine
    parts = []
    for drive in machine.drives:
        key = (machine.generation, _data_state(drive))
        cached = machine.render_cache.get(drive.id)
        text = None
        if cached is not None and cached[0] == key:
            assert isinstance(cached[1], _Template)
            text = cached[1].text()
        if text is None:
            template = _Template(functools.partial(block_info, drive, machine.jobs))
            machine.render_cache[drive.id] = (key, template)
            text = template.text()
            if text is None:  # a number that could be read a moment ago cannot now: as a plain rendering
                text = dumps_compact(to_qobject(block_info(drive, machine.jobs)))
        parts.append(text)
    return RawJson("[" + ", ".join(parts) + "]")


def query_named_block_nodes(ctx: CommandContext, args: dict[str, Any]) -> list[BlockDeviceInfo]:
    flat = bool(args.get("flat", False))
    entries = [(s, _node_info(drive, medium, i, kind, flat, ctx.machine.jobs))
               for s, drive, medium, i, kind in _newest_first(ctx)]
    entries += [(g.serial, graph_node_info(g, flat, ctx.machine.jobs)) for g in ctx.machine.graph.nodes]
    entries += [(f.serial, info) for f, info in _graph_filters(ctx.machine, flat)]
    entries.sort(key=lambda e: -e[0])
    return [info for _, info in entries]


def query_named_block_nodes_json(ctx: CommandContext, args: dict[str, Any]) -> RawJson:
    """``query-named-block-nodes`` for QMP, each drive node's entry rendered once and reused.

    The same staleness rule as :func:`query_block_json`: a command that may
    have changed state, or a change to any file of the node's drive.  Nodes
    of the ``blockdev-add`` graph are rendered every time.
    """
    flat = bool(args.get("flat", False))
    machine = ctx.machine
    states: dict[str, object] = {}
    parts: list[tuple[int, str]] = []
    for serial, drive, medium, i, kind in _newest_first(ctx):
        if drive.id not in states:
            states[drive.id] = _files_state(drive)
        key = (machine.generation, states[drive.id])
        slot = ("node", drive.id, medium is drive.medium, i, kind, flat)  # (a job's target: not the drive's)
        cached = machine.render_cache.get(slot)
        if cached is None or cached[0] != key:
            cached = (key, dumps_compact(to_qobject(_node_info(drive, medium, i, kind, flat, machine.jobs))))
            machine.render_cache[slot] = cached
        assert isinstance(cached[1], str)
        parts.append((serial, cached[1]))
    for g in machine.graph.nodes:
        parts.append((g.serial, dumps_compact(to_qobject(graph_node_info(g, flat, machine.jobs)))))
    for f, info in _graph_filters(machine, flat):
        parts.append((f.serial, dumps_compact(to_qobject(info))))
    parts.sort(key=lambda e: -e[0])
    return RawJson("[" + ", ".join(p for _, p in parts) + "]")


def _json_backing_names(node: Node, image: ImageInfo) -> ImageInfo:
    """A json: filename has no folder: QEMU resolves the header's backing name against the file child's."""
    from vdkit.block.chain import resolve_backing_name

    cur: Node | None = node
    level: ImageInfo | None = image
    while cur is not None and level is not None:
        if level.backing_filename is not None and cur.filename.startswith("json:"):
            level.full_backing_filename = resolve_backing_name(cur.driver.file.filename, level.backing_filename)
        cur, level = cur.backing, level.backing_image
    return image


def _graph_filters(machine: DeviceRegistry, flat: bool) -> list[tuple[JobFilter, BlockDeviceInfo]]:
    """The filter nodes jobs put into ``blockdev-add`` chains (above the graph node they work on)."""
    out = []
    for f in machine.jobs.filters():
        g = next((g for g in machine.graph.nodes if g.node is not None and g.node is f.below), None)
        if g is None:
            continue
        image = filter_image_info(f.below, f.driver, nested=False, filename=f.filename)
        if not flat:
            image.backing_image = _json_backing_names(f.below, image_info(f.below, nested=True))
        out.append((f, BlockDeviceInfo(file=f.filename or g.filename, node_name=f.name, ro=f.ro, drv=f.driver,
                                       backing_file_depth=0 if flat else 1 + chain_depth(g), encrypted=False,
                                       detect_zeroes="off", image=image, cache=BlockdevCacheInfo(),
                                       # a copy-before-write filter's own bitmaps (its access and done maps)
                                       dirty_bitmaps=bitmap_cmds.bitmaps_info(getattr(f, "bitmaps", [])))))
    return out


def _graph_with_filters(g: GraphNode, info: BlockDeviceInfo, jobs: JobList) -> None:
    """A job filter between this graph node and its backing chain counts in the (non-flat) chain shown."""
    filters = jobs.filters()
    if not filters:
        return
    # a backup's fleecing target sits on its source under the job's filter, not above it (QEMU's graph)
    own = {id(j.driver.filter) for j in jobs.jobs if getattr(j.driver, "target", None) is g.node}
    level: ImageInfo | None = info.image
    cur = g.backing
    while cur is not None and level is not None:
        below = level.backing_image
        f = next((f for f in filters if cur.node is not None and f.below is cur.node and id(f) not in own), None)
        if f is not None and cur.node is not None:
            filt = filter_image_info(cur.node, f.driver, nested=False)
            filt.backing_image = below
            level.backing_image = filt
            info.backing_file_depth += 1
        level, cur = below, cur.backing


def graph_node_info(g: GraphNode, flat: bool, jobs: JobList | None = None) -> BlockDeviceInfo:
    """A node of the ``blockdev-add`` graph as ``query-named-block-nodes`` shows it."""
    if g.node is None:
        assert g.file is not None
        proto = protocol_name(g.file)
        image = image_info(protocol_node(g.filename, g.file, readonly=g.ro))
        depth = 0
        if g.child is not None and g.child.file is not None and not flat:  # a filter's image (blkdebug's)
            image.backing_image = image_info(protocol_node(g.child.filename, g.child.file, readonly=g.child.ro))
            depth = 1
        return BlockDeviceInfo(file=g.filename, node_name=g.name, ro=g.ro, drv=proto, backing_file_depth=depth,
                               encrypted=False, detect_zeroes=g.detect_zeroes, image=image,
                               cache=BlockdevCacheInfo(writeback=True, direct=g.cache.direct,
                                                       no_flush=g.cache.no_flush))
    image = _json_backing_names(g.node, image_info(g.node, nested=not flat))
    info = BlockDeviceInfo(
        file=g.filename, node_name=g.name, ro=g.ro, drv=g.driver,
        backing_file=g.backing.filename if g.backing is not None else None,
        backing_file_depth=0 if flat else chain_depth(g),
        encrypted=g.node.driver.encrypted, detect_zeroes=g.detect_zeroes,
        image=image,
        cache=BlockdevCacheInfo(writeback=True, direct=g.cache.direct, no_flush=g.cache.no_flush),
        dirty_bitmaps=bitmap_cmds.dirty_info(g.node),
    )
    if jobs is not None and not flat:
        _graph_with_filters(g, info, jobs)
    return info


def _newest_first(ctx: CommandContext) -> list[tuple[int, Drive, Medium, int, str]]:
    """Named nodes as QEMU lists them (newest first), refusing as QEMU does if one has no driver."""
    nodes = sorted(_nodes(ctx), key=lambda item: item[0])
    for _, _drive, medium, i, kind in nodes:
        if kind == "fmt" and i == 0 and medium.dead:  # QEMU refuses to describe a node without a driver
            raise VdkitError(f"Block device {medium.names[0][0]} is ejected")
    nodes.reverse()
    return nodes


def _nodes(ctx: CommandContext) -> list[tuple[int, Drive, Medium, int, str]]:
    """Every named node: (creation serial, drive, medium, chain index, "fmt"|"file")."""
    out = []
    for drive in ctx.machine.drives:
        medium = drive.medium
        if medium is None:
            continue
        chain = _chain(medium)
        for i, (fmt_serial, file_serial) in enumerate(medium.serials):
            out.append((fmt_serial, drive, medium, i, "fmt"))
            if i >= len(chain) or not is_protocol(chain[i].format):  # driver=nbd|http: one node, no file below
                out.append((file_serial, drive, medium, i, "file"))
        for f in ctx.machine.jobs.filters():  # a job's implicit filter node sits above one of the chain's
            i = next((i for i, n in enumerate(chain) if n is f.below), -1)
            if i >= 0:
                out.append((f.serial, drive, medium, i, "filter"))
        for job in ctx.machine.jobs.jobs:  # a mirror's or backup's target, named while the job holds it
            target = getattr(job.driver, "listed_target", None)
            if target is not None and any(n is job.driver.nodes()[0] for n in chain):
                for i, (fmt_serial, file_serial) in enumerate(target.serials):  # the nodes the job opened
                    out.append((fmt_serial, drive, target, i, "fmt"))
                    out.append((file_serial, drive, target, i, "file"))
    return out


def _node_info(drive: Drive, medium: Medium, index: int, kind: str, flat: bool,
               jobs: JobList | None = None) -> BlockDeviceInfo:
    filters = _filters_of(jobs, medium)
    if kind == "fmt":
        return _with_filters(filters, medium, index,
                             _format_node_info(drive, medium, index, backend=False, flat=flat), flat)
    if kind == "filter":
        return _filter_node_info(filters, medium, index, flat)
    return _file_node_info(drive, medium, index)


def _filter_node_info(filters: list[JobFilter], medium: Medium, index: int, flat: bool) -> BlockDeviceInfo:
    """The implicit filter node a job puts above ``chain[index]`` (``commit_top``, ``copy-on-read``, ...)."""
    chain = _chain(medium)
    f = next(f for f in filters if f.below is chain[index])
    node = chain[index]
    return BlockDeviceInfo(file=f.filename or node.filename, node_name=f.name, ro=f.ro, drv=f.driver,
                           backing_file_depth=0 if flat else len(chain) - index, encrypted=False,
                           detect_zeroes="off", image=filter_image_info(node, f.driver, nested=not flat,
                                                                        filename=f.filename),
                           cache=BlockdevCacheInfo(),
                           dirty_bitmaps=bitmap_cmds.bitmaps_info(getattr(f, "bitmaps", [])))


def _filters_of(jobs: JobList | None, medium: Medium) -> list[JobFilter]:
    if jobs is None:
        return []
    chain = _chain(medium)
    return [f for f in jobs.filters() if any(n is f.below for n in chain)]


def _with_filters(filters: list[JobFilter], medium: Medium, index: int, info: BlockDeviceInfo,
                  flat: bool) -> BlockDeviceInfo:
    """A job filter between this node and its backing chain counts in the (non-flat) chain shown."""
    if flat or not filters:
        return info
    chain = _chain(medium)
    for f in filters:
        j = next(i for i, n in enumerate(chain) if n is f.below)
        if j <= index:
            continue
        info.backing_file_depth += 1
        level = info.image
        for _ in range(j - index - 1):
            assert level.backing_image is not None
            level = level.backing_image
        filt = filter_image_info(chain[j], f.driver, nested=False)
        filt.backing_image = level.backing_image
        level.backing_image = filt
    return info


def _node_stats(medium: Medium, index: int, *, recurse_backing: bool) -> BlockStats:
    fmt_name, file_name = medium.names[index]
    stats = BlockStats(
        stats=BlockDeviceStats(),
        node_name=fmt_name,
        parent=BlockStats(stats=BlockDeviceStats(), node_name=file_name, driver_specific=BlockStatsSpecificFile()),
    )
    if recurse_backing and index + 1 < len(medium.names):
        stats.backing = _node_stats(medium, index + 1, recurse_backing=True)
    return stats


def query_blockstats(ctx: CommandContext, args: dict[str, Any]) -> list[BlockStats]:
    machine = ctx.machine
    out: list[BlockStats] = []
    if args.get("query-nodes", False):
        # every named node, in creation order (file node before its format node), blockdev-add's included
        entries: list[tuple[int, BlockStats]] = []
        for serial, _drive, medium, i, kind in _nodes(ctx):
            if kind == "file":
                entries.append((serial, BlockStats(stats=BlockDeviceStats(), node_name=medium.names[i][1],
                                                   driver_specific=BlockStatsSpecificFile())))
            else:
                entries.append((serial, _node_stats(medium, i, recurse_backing=False)))
        for g in machine.graph.nodes:
            if g.child is None:
                entries.append((g.serial, BlockStats(stats=BlockDeviceStats(), node_name=g.name,
                                                     driver_specific=BlockStatsSpecificFile())))
            else:
                parent = BlockStats(stats=BlockDeviceStats(), node_name=g.child.name,
                                    driver_specific=BlockStatsSpecificFile())
                entries.append((g.serial, BlockStats(stats=BlockDeviceStats(), node_name=g.name, parent=parent)))
        entries.sort(key=lambda e: e[0])
        return [e for _, e in entries]
    for drive in machine.drives:
        backend = drive.stats.to_model()  # NBD I/O accounted to the backend (vdkit.devices.iostats)
        if drive.medium is None:
            out.append(BlockStats(stats=backend, device=drive.id, qdev=drive.qdev))
            continue
        entry = _node_stats(drive.medium, 0, recurse_backing=True)
        entry.stats = backend
        entry.device = drive.id
        entry.qdev = drive.qdev
        out.append(entry)
    return out


# --------------------------------------------------------------------------
# backend lookup, throttling, media
# --------------------------------------------------------------------------


def _get_drive(ctx: CommandContext, args: dict[str, Any]) -> Drive:
    """QEMU's ``qmp_get_blk``: exactly one of ``device`` (backend name) and ``id`` (qdev id)."""
    device, qid = args.get("device"), args.get("id")
    if (device is None) == (qid is None):
        raise VdkitError("Need exactly one of 'device' and 'id'")
    if device is not None:
        drive = ctx.machine.find_drive(device)
        if drive is None:
            raise DeviceNotFoundError(f"Device '{device}' not found")
        return drive
    if qid == "":  # QEMU resolves "" to the peripheral container itself
        raise VdkitError(" is not a hotpluggable device")
    # vdkit has no guest devices, so no other qdev id can name one
    raise DeviceNotFoundError(f"Device '{qid}' not found")


_THROTTLE_SCHEMA = (
    opt("device"), opt("id"),
    Arg("bps", "int"), Arg("bps_rd", "int"), Arg("bps_wr", "int"),
    Arg("iops", "int"), Arg("iops_rd", "int"), Arg("iops_wr", "int"),
    opt("bps_max", "int"), opt("bps_rd_max", "int"), opt("bps_wr_max", "int"),
    opt("iops_max", "int"), opt("iops_rd_max", "int"), opt("iops_wr_max", "int"),
    opt("bps_max_length", "int"), opt("bps_rd_max_length", "int"), opt("bps_wr_max_length", "int"),
    opt("iops_max_length", "int"), opt("iops_rd_max_length", "int"), opt("iops_wr_max_length", "int"),
    opt("iops_size", "int"), opt("group"),
)


def block_set_io_throttle(ctx: CommandContext, args: dict[str, Any]) -> None:
    drive = _get_drive(ctx, args)
    if drive.medium is None:
        raise VdkitError("Device has no medium")
    cfg = ThrottleConfig()
    for key in THROTTLE_KEYS:
        cfg.avg[key] = args[key]
        cfg.max[key] = args.get(key + "_max", 0)
        cfg.length[key] = args.get(key + "_max_length", 1)
    cfg.iops_size = args.get("iops_size", 0)
    cfg.validate()
    # a throttled drive stays in its group unless another is named; limits are the group's
    group = args.get("group") or drive.group or args.get("device") or args.get("id")
    ctx.machine.set_throttle(drive, cfg, group)


def open_error(exc: VdkitError) -> VdkitError:
    """QEMU's monitor reports an open failure once ("Could not open 'x': <reason>"),
    without the extra "Could not open" prefix qemu-img adds; lock conflicts bare."""
    cause = exc.__cause__
    return cause if isinstance(cause, VdkitError) else exc


def _tray_event(ctx: CommandContext, drive: Drive, is_open: bool) -> None:
    ctx.emit("DEVICE_TRAY_MOVED", {"device": drive.id, "id": drive.qdev or "", "tray-open": is_open})


def _remove_medium(ctx: CommandContext, drive: Drive) -> None:
    if drive.medium is not None:
        nbd_cmds.medium_removed(ctx, drive, drive.medium)  # exports of this medium go with it
        ctx.machine.close_medium(drive.medium)
        drive.medium = None


def _check_job(ctx: CommandContext, drive: Drive) -> None:
    """A job on the drive's root blocks eject and change (QEMU's op blocker, ``block-jobs.md`` §8)."""
    from vdkit.monitor.job_cmds import check_root_busy

    check_root_busy(ctx.machine, drive)


def eject(ctx: CommandContext, args: dict[str, Any]) -> None:
    drive = _get_drive(ctx, args)
    if not drive.removable:
        raise VdkitError(f"Device '{drive.id}' is not removable")
    _check_job(ctx, drive)
    if drive.has_tray and not drive.tray_open:
        drive.tray_open = True
        _tray_event(ctx, drive, True)
    _remove_medium(ctx, drive)


def blockdev_change_medium(ctx: CommandContext, args: dict[str, Any]) -> None:
    drive = _get_drive(ctx, args)
    if not drive.removable:
        raise VdkitError(f"Device '{drive.id}' is not removable")
    mode = args.get("read-only-mode", "retain")
    if mode == "retain":  # the previous medium's state (QEMU's root state), kept across ejects
        ro = drive.retained_ro
    else:
        ro = mode == "read-only"
    filename = args["filename"]
    # relative names stay as given, resolved against the daemon's cwd (as QEMU does)
    try:
        if filename.startswith("json:"):  # options, as -drive file=json:{...} takes them
            from vdkit.devices.option_media import open_json_medium

            medium = open_json_medium(ctx.machine, filename, args.get("format"), readonly=ro)
        else:
            medium = ctx.machine.open_medium(filename, args.get("format"), readonly=ro)
    except VdkitError as exc:
        raise open_error(exc) from exc
    try:  # QEMU opens the new medium before the tray's op blocker refuses
        _check_job(ctx, drive)
    except VdkitError:
        ctx.machine.close_medium(medium)
        raise
    if drive.has_tray and not drive.tray_open:
        drive.tray_open = True
        _tray_event(ctx, drive, True)
    _remove_medium(ctx, drive)
    drive.medium = medium
    drive.retained_ro = ro
    if drive.has_tray:
        drive.tray_open = False
        _tray_event(ctx, drive, False)


# --------------------------------------------------------------------------
# internal snapshots
# --------------------------------------------------------------------------


def snapshot_capable(medium: Medium | _GraphMedium) -> bool:
    """The medium's format has internal snapshots (VM snapshots include it; QEMU's ``bdrv_can_snapshot``)."""
    return medium.node.driver.supports_snapshots


@dataclass
class GraphDisk:
    """A ``-blockdev`` node as a disk of VM snapshots: QEMU's ``bdrv_next`` visits the BlockBackends'
    roots, then the monitor-owned nodes (``blockdev-add``'s top level) in creation order."""

    id: str  # errors name the node (QEMU's device-or-node name)
    medium: _GraphMedium
    graph_node: GraphNode | None  # None: a node a block job holds (job_disks)


def graph_disks(machine: DeviceRegistry, *, roots_only: bool) -> list[GraphDisk]:
    """Writable monitor-owned nodes (``roots_only``: those no node uses, as savevm/loadvm/delvm take them;
    ``info snapshots`` lists the others too)."""
    out = []
    for g in machine.graph.nodes:
        if g.implicit or g.ro or (roots_only and machine.graph.parents_of(g)):
            continue
        out.append(GraphDisk(g.name, _graph_medium(g), g))
    return out


def included_drives(machine: DeviceRegistry) -> list[Drive | GraphDisk]:
    """Disks taking part in VM snapshots: inserted and writable (``qmp-hmp.md`` §5.1), the drives first,
    then the ``-blockdev`` roots (QEMU's ``bdrv_all_snapshots_includes_bs``).

    A medium killed by a fatal corruption event is not inserted any more (QEMU: no driver).
    """
    disks: list[Drive | GraphDisk] = [d for d in machine.drives
                                      if d.medium is not None and not d.medium.ro and not d.medium.dead]
    return disks + job_disks(machine) + list(graph_disks(machine, roots_only=True))


def job_disks(machine: DeviceRegistry) -> list[GraphDisk]:
    """Nodes block jobs hold writable through a backend of their own (a commit's base): QEMU's VM
    snapshots include them, after the drives (``block-jobs.md`` §8)."""
    out = []
    for j in machine.jobs.jobs:
        if j.status.value in ("concluded", "null"):
            continue
        for node, name in j.driver.held_writable:
            if not node.readonly:
                out.append(GraphDisk(name, _GraphMedium(node, False), None))
    return out


def vmstate_drive(machine: DeviceRegistry) -> Drive | GraphDisk | None:
    for d in included_drives(machine):
        assert d.medium is not None
        if snapshot_capable(d.medium):
            return d
    return None


def _entries(medium: Medium | _GraphMedium) -> Sequence[SnapshotRecord]:
    return medium.node.driver.snapshots()


@dataclass
class _Target:
    label: str  # the name the client used (errors quote it)
    drive: Drive | None  # None: a -blockdev node
    medium: Medium


@dataclass
class _GraphMedium:
    """A root node of the -blockdev graph seen as the medium internal snapshots act on."""

    node: Node
    ro: bool
    dead: bool = False


def _graph_target(machine: DeviceRegistry, g: GraphNode, device: str) -> _Target:
    """A ``-blockdev`` node named as ``device``: it must be a root."""
    if machine.graph.parents_of(g):
        raise VdkitError("Need a root block node")
    return _Target(device, None, _graph_medium(g))  # type: ignore[arg-type]  # medium-like


def _graph_medium(g: GraphNode) -> _GraphMedium:
    """A graph node as the medium snapshots act on: a protocol node is its own image (an rbd node has
    the RBD snapshots, the others none)."""
    node = g.node
    if node is None:  # without snapshots: QEMU's "Block format 'file' ... does not support internal snapshots"
        assert g.file is not None
        node = protocol_node(g.filename, g.file, readonly=g.ro)
    return _GraphMedium(node, g.ro)


def _resolve_root(ctx: CommandContext, device: str) -> _Target:
    """Backend name first, then node name; the node must be a root with a medium."""
    machine = ctx.machine
    drive = machine.find_drive(device)
    if drive is None:
        for d in machine.drives:
            if d.medium is None:
                continue
            for i, (fmt_name, file_name) in enumerate(d.medium.names):
                if device in (fmt_name, file_name):
                    if i != 0 or device == file_name:
                        raise VdkitError("Need a root block node")
                    drive = d
        if drive is None:
            g = machine.graph.find(device)
            if g is not None:
                return _graph_target(machine, g, device)
            raise VdkitError(f"Cannot find device='{device}' nor node-name='{device}'")
    if drive.medium is not None and machine.jobs.job_on(drive.medium.node) is not None:
        raise VdkitError("Need a root block node")  # the job holds the root as its child
    if drive.medium is None:
        raise VdkitError(f"Device '{device}' has no medium")
    return _Target(device, drive, drive.medium)


def _now() -> tuple[int, int]:
    ns = time.time_ns()
    return ns // 1_000_000_000, (ns % 1_000_000_000) // 1000 * 1000


def _create(medium: Medium | _GraphMedium, name: str, *, date: tuple[int, int], vm_clock_nsec: int,
            vm_state_size: int = 0) -> SnapshotRecord:
    return medium.node.snapshot_create(name, date_sec=date[0], date_nsec=date[1],
                                       vm_clock_nsec=vm_clock_nsec, vm_state_size=vm_state_size)


def _delete(medium: Medium | _GraphMedium, *, snapshot_id: str | None, name: str | None) -> SnapshotRecord:
    return medium.node.snapshot_delete(snapshot_id=snapshot_id, name=name)


def _os_text(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return os_error_message(exc)
    if isinstance(exc, CorruptionEvent) and exc.errno:  # the event was reported; the request saw EIO
        return os.strerror(exc.errno)
    return str(exc)


def _snapshot_create_check(t: _Target, name: str) -> None:
    if t.medium.dead:  # killed by a corruption event: QEMU's node has no driver (not inserted)
        raise VdkitError("Device has no medium")
    if t.medium.ro:
        raise VdkitError(f"Device '{t.label}' is read only")
    if not snapshot_capable(t.medium):
        raise VdkitError(
            f"Block format '{t.medium.node.format}' used by device '{t.label}' does not support internal snapshots"
        )
    if not name:
        raise VdkitError("Name is empty")
    if any(e.name == name for e in _entries(t.medium)):
        raise VdkitError(f"Snapshot with name '{name}' already exists on device '{t.label}'")


def _snapshot_create_do(ctx: CommandContext, t: _Target, name: str) -> SnapshotRecord:
    try:
        return _create(t.medium, name, date=_now(), vm_clock_nsec=ctx.machine.vm_clock_ns())
    except (OSError, VdkitError) as exc:
        raise VdkitError(f"Failed to create snapshot '{name}' on device '{t.label}': {_os_text(exc)}") from exc


def blockdev_snapshot_internal_sync(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.machine.jobs.drain()  # a one-action transaction in QEMU: it drains first
    t = _resolve_root(ctx, args["device"])
    _snapshot_create_check(t, args["name"])
    _snapshot_create_do(ctx, t, args["name"])


def blockdev_snapshot_delete_internal_sync(ctx: CommandContext, args: dict[str, Any]) -> SnapshotInfo:
    t = _resolve_root(ctx, args["device"])
    sid, name = args.get("id"), args.get("name")
    if t.medium.dead:
        raise VdkitError("Device has no medium")
    if sid is None and name is None:
        raise VdkitError("Name or id must be provided")
    if not snapshot_capable(t.medium):
        raise VdkitError("Failed to get a snapshot list: Operation not supported")
    found = None
    for e in _entries(t.medium):
        if (sid is None or e.id_str == sid) and (name is None or e.name == name):
            found = e
            break
    if found is None:
        raise VdkitError(
            f"Snapshot with id '{sid if sid is not None else 'null'}' and name "
            f"'{name if name is not None else 'null'}' does not exist on device '{t.label}'"
        )
    before = snapshot_info(found)
    if t.medium.ro:
        # QEMU drops the entry from its in-memory table, then fails writing the
        # table (EPERM): the image is unchanged, but the open node no longer
        # lists the snapshot until the medium is opened again
        t.medium.node.driver.forget_snapshot(found)
        raise VdkitError("Failed to remove snapshot from snapshot list: Operation not permitted")
    try:
        # the driver gets the caller's ID and name, as QEMU passes them (rbd refuses an ID without a name)
        _delete(t.medium, snapshot_id=sid, name=name)
    except (OSError, VdkitError) as exc:
        raise VdkitError(_os_text(exc)) from exc
    return before


# QAPI TransactionAction types (7.2); vdkit implements the internal snapshot and ``abort``
ACTION_TYPES = (
    "abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge", "blockdev-backup",
    "blockdev-snapshot", "blockdev-snapshot-internal-sync", "blockdev-snapshot-sync", "drive-backup",
)
_ACTION_DATA = {
    "abort": (),
    "blockdev-snapshot-internal-sync": (Arg("device"), Arg("name")),
    "blockdev-snapshot-sync": external_snapshot.SYNC_SCHEMA,
    "blockdev-snapshot": external_snapshot.SNAPSHOT_SCHEMA,
    **bitmap_cmds.ACTION_SCHEMAS,
    "drive-backup": mirror_cmds.DRIVE_BACKUP_SCHEMA,
    "blockdev-backup": mirror_cmds.BLOCKDEV_BACKUP_SCHEMA,
}


def transaction(ctx: CommandContext, args: dict[str, Any]) -> None:
    """All or nothing, as QEMU: every action is prepared in order; if one fails, the prepared ones are undone.

    Later actions see what earlier ones did (two snapshots of one device
    chain up; an internal snapshot taken before an external one lands in the
    image that was active before the transaction).  Files created by
    external snapshots stay on disk after a rollback, as in QEMU.
    """
    actions = args["actions"]
    datas = []
    for i, action in enumerate(actions):
        schema = _ACTION_DATA.get(action["type"])
        if schema is None:
            raise VdkitError(f"Action type '{action['type']}' is not supported by vdkit")
        datas.append(validate(schema, action["data"], prefix=f"actions[{i}].data."))
    grouped = args.get("properties", {}).get("completion-mode") == "grouped"
    ctx.machine.jobs.drain()  # QEMU drains all I/O before any action (jobs pause and resume: events)
    undo: list[Callable[[], None]] = []
    starts: list[Callable[[], None]] = []  # backup jobs start once every action is prepared
    try:
        for action, data in zip(actions, datas, strict=True):
            kind = action["type"]
            if kind == "abort":
                raise VdkitError("Transaction aborted using Abort action")
            if grouped:
                raise VdkitError(f"Action '{kind}' does not support Transaction property "
                                 "completion-mode = grouped")
            if kind == "blockdev-snapshot-sync":
                undo.append(external_snapshot.prepare_sync(ctx, data))
            elif kind == "blockdev-snapshot":
                undo.append(external_snapshot.prepare_snapshot(ctx, data))
            elif kind.startswith("block-dirty-bitmap-"):
                undo.append(bitmap_cmds.prepare_action(ctx.machine, kind, data))
            elif kind in ("drive-backup", "blockdev-backup"):
                start, undo_job = mirror_cmds.backup_action(ctx.machine, kind, data)
                undo.append(undo_job)
                starts.append(start)
            else:
                t = _resolve_root(ctx, data["device"])
                _snapshot_create_check(t, data["name"])
                entry = _snapshot_create_do(ctx, t, data["name"])
                undo.append(functools.partial(_undo_internal, t, entry))
    except VdkitError:
        for fn in reversed(undo):
            try:
                fn()
            except (OSError, VdkitError):
                pass
        raise
    for start in starts:
        start()


def _undo_internal(t: _Target, entry: SnapshotRecord) -> None:
    _delete(t.medium, snapshot_id=entry.id_str, name=entry.name)


# --------------------------------------------------------------------------
# VM snapshots: savevm / loadvm / delvm and query-snapshots
# --------------------------------------------------------------------------

# The daemon's "VM state": run state, VM clock, throttling and media.  It is
# stored in the VM-state area of the first snapshot-capable disk.  It starts
# with this magic, NOT with QEMU's migration magic "QEVM", so QEMU never tries
# to load it as a migration stream.
VMSTATE_MAGIC = b"VDKITVM1\n"


def _encode_vmstate(machine: DeviceRegistry, run_state: str) -> bytes:
    state = {
        "run_state": run_state,
        "vm_clock_nsec": machine.vm_clock_ns(),
        "drives": [
            {
                "id": d.id,
                "throttle": d.throttle.to_state() if d.throttle.enabled else None,
                "group": d.group,
                "tray_open": d.tray_open,
                "medium": None if d.medium is None else {"file": d.medium.node.filename,
                                                         "format": d.medium.node.format, "ro": d.medium.ro},
            }
            for d in machine.drives
        ],
    }
    return VMSTATE_MAGIC + json.dumps(state, sort_keys=True).encode()


def _apply_vmstate(machine: DeviceRegistry, raw: bytes) -> None:
    if not raw.startswith(VMSTATE_MAGIC):
        raise VdkitError("Error -22 while loading VM state")
    try:
        state = json.loads(raw[len(VMSTATE_MAGIC):])
    except ValueError as exc:
        raise VdkitError("Error -22 while loading VM state") from exc
    machine.set_vm_clock_ns(int(state.get("vm_clock_nsec", 0)))
    for ds in state.get("drives", []):
        drive = machine.find_drive(ds.get("id"))
        if drive is None:
            continue
        if ds.get("throttle"):
            machine.set_throttle(drive, ThrottleConfig.from_state(ds["throttle"]), ds.get("group") or drive.id)
        else:
            machine.set_throttle(drive, ThrottleConfig(), None)
        if drive.has_tray:
            drive.tray_open = bool(ds.get("tray_open", False))
        _restore_medium(machine, drive, ds.get("medium"))


def _restore_medium(machine: DeviceRegistry, drive: Drive, recorded: dict[str, Any] | None) -> None:
    """Put the recorded medium back into a drive whose medium changed since the savevm."""
    current = drive.medium
    if recorded is None:
        if current is not None and current.ro:
            machine.close_medium(current)
            drive.medium = None
        return
    if current is not None and current.node.filename == recorded.get("file"):
        return
    if current is not None and not current.ro:
        return  # a writable disk took part in the snapshot: it was reverted, keep it
    try:
        medium = machine.open_medium(recorded["file"], recorded.get("format"), readonly=bool(recorded.get("ro")))
    except (OSError, VdkitError, KeyError):
        return  # the image is gone: leave the drive as it is
    if current is not None:
        machine.close_medium(current)
    drive.medium = medium
    drive.retained_ro = medium.ro


def _all_capable(machine: DeviceRegistry) -> list[Drive | GraphDisk]:
    disks = included_drives(machine)
    for d in disks:
        assert d.medium is not None
        if not snapshot_capable(d.medium):
            raise VdkitError(f"Device '{d.id}' is writable but does not support snapshots")
    return disks


def savevm(ctx: CommandContext, args: dict[str, Any]) -> None:
    machine = ctx.machine
    disks = _all_capable(machine)
    first = vmstate_drive(machine)
    if first is not None and first.medium is not None and not getattr(first.medium.node.driver, "stores_vmstate", True):
        # QEMU deletes an existing snapshot NAME on every disk first and only then fails to write the
        # state to a disk that stores none (rbd): vdkit refuses before touching anything (docs/rbd.md)
        raise VdkitError("Error while writing VM state: Input/output error")
    date = _now()
    name = args.get("name")
    if name is not None:  # "" is a name (QEMU makes one up only when none is given)
        _delete_first_named(disks, name)
    else:
        name = time.strftime("vm-%Y%m%d%H%M%S", time.localtime(date[0]))
        name = name.encode()[:255].decode(errors="ignore")
    vmdisk = vmstate_drive(machine)
    if vmdisk is None:
        raise VdkitError("no block device can store vmstate for snapshot")
    was_running = machine.stop()
    if was_running:
        ctx.emit("STOP")
    try:
        vm_state = _encode_vmstate(machine, "running" if was_running else machine.run_state)
        clock = machine.vm_clock_ns()
        assert vmdisk.medium is not None
        try:
            vmdisk.medium.node.driver.save_vmstate(vm_state)
        except (OSError, VdkitError) as exc:
            raise VdkitError(f"Error while writing VM state: {_os_text(exc)}") from exc
        made: list[tuple[Drive | GraphDisk, SnapshotRecord]] = []
        for d in disks:
            assert d.medium is not None
            try:
                made.append((d, _create(d.medium, name, date=date, vm_clock_nsec=clock,
                                        vm_state_size=len(vm_state) if d.medium.node is vmdisk.medium.node
                                        else 0)))
            except (OSError, VdkitError) as exc:
                for m, e in made:  # undo exactly the snapshots this savevm made
                    assert m.medium is not None
                    try:
                        _delete(m.medium, snapshot_id=e.id_str, name=e.name)
                    except (OSError, VdkitError):
                        pass
                raise VdkitError(f"Could not create snapshot '{name}' on '{d.id}'") from exc
    finally:
        if was_running:
            machine.cont()
            ctx.emit("RESUME")


def loadvm(ctx: CommandContext, args: dict[str, Any]) -> None:
    machine = ctx.machine
    name = args["name"]
    disks = _all_capable(machine)
    for d in disks:
        assert d.medium is not None
        if not any(e.name == name for e in _entries(d.medium)):
            raise VdkitError(f"Snapshot '{name}' does not exist in one or more devices")
    vmdisk = vmstate_drive(machine)
    if vmdisk is None:
        raise VdkitError("no block device can store vmstate for snapshot")
    assert vmdisk.medium is not None
    if not getattr(vmdisk.medium.node.driver, "stores_vmstate", True):
        # QEMU rolls every disk back and then fails to read the state (rbd stores none): vdkit refuses
        # first, with QEMU's final error, and leaves the disks as they are (docs/rbd.md)
        raise VdkitError("Error -22 while loading VM state")
    entry = next(e for e in _entries(vmdisk.medium) if e.name == name)
    if entry.vm_state_size == 0:
        raise VdkitError("This is a disk-only snapshot. Revert to it  offline using qemu-img")
    was_running = machine.stop()
    if was_running:
        ctx.emit("STOP")
    for d in disks:
        assert d.medium is not None
        found = find_id_then_name(_entries(d.medium), name)
        try:
            if found is None:
                raise VdkitError(f"Can't find snapshot '{name}'")
            d.medium.node.snapshot_revert(found)
        except (OSError, VdkitError) as exc:
            raise VdkitError(f"Could not load snapshot '{name}' on '{d.id}': {_os_text(exc)}") from exc
    machine.set_vm_clock_ns(entry.vm_clock_nsec)
    try:
        raw = vmdisk.medium.node.driver.read_vmstate(entry)
    except (OSError, VdkitError) as exc:
        raise VdkitError("Error -5 while loading VM state") from exc
    # A state vdkit did not write (e.g. QEMU's "QEVM" migration stream) holds
    # guest devices vdkit does not have: the disks are reverted, nothing else.
    if raw.startswith(VMSTATE_MAGIC):
        _apply_vmstate(machine, raw)
    if was_running:
        machine.cont()
        ctx.emit("RESUME")


def delvm(ctx: CommandContext, args: dict[str, Any]) -> None:
    _delete_first_named(_all_capable(ctx.machine), args["name"])


def _delete_first_named(disks: list[Drive | GraphDisk], name: str) -> None:
    """Delete the first snapshot called ``name`` on each disk (QEMU's rule for savevm and delvm)."""
    for d in disks:
        assert d.medium is not None
        e = next((e for e in _entries(d.medium) if e.name == name), None)
        if e is None:
            continue
        try:
            _delete(d.medium, snapshot_id=e.id_str, name=e.name)
        except (OSError, VdkitError) as exc:
            raise VdkitError(f"Could not delete snapshot '{name}' on '{d.id}': {_os_text(exc)}") from exc


def query_snapshots(ctx: CommandContext, args: dict[str, Any]) -> list[SnapshotInfo]:
    """Snapshots present (by name) on every included disk, as the VM-state disk lists them.

    Same selection as the first section of HMP ``info snapshots`` (so disk-only
    snapshots are listed too; ``loadvm`` refuses those with its own error).
    """
    machine = ctx.machine
    vmdisk = vmstate_drive(machine)
    if vmdisk is None:
        return []
    assert vmdisk.medium is not None
    included = included_drives(machine)
    names = []
    for d in included:
        assert d.medium is not None
        names.append({e.name for e in _entries(d.medium)} if snapshot_capable(d.medium) else set())
    return [snapshot_info(e) for e in _entries(vmdisk.medium) if all(e.name in n for n in names)]


def register(reg: CommandRegistry) -> None:
    r = reg.register
    r("query-block", render=query_block_json)(query_block)
    r("query-named-block-nodes", opt("flat", "bool"), render=query_named_block_nodes_json)(query_named_block_nodes)
    r("query-blockstats", opt("query-nodes", "bool"))(query_blockstats)
    r("block_set_io_throttle", *_THROTTLE_SCHEMA)(block_set_io_throttle)
    r("eject", opt("device"), opt("id"), opt("force", "bool"))(eject)
    r("blockdev-change-medium", opt("device"), opt("id"), Arg("filename"), opt("format"), opt("force", "bool"),
      opt("read-only-mode", enum=("retain", "read-only", "read-write")))(blockdev_change_medium)
    r("query-snapshots")(query_snapshots)
    r("blockdev-snapshot-internal-sync", Arg("device"), Arg("name"))(blockdev_snapshot_internal_sync)
    r("blockdev-snapshot-delete-internal-sync", Arg("device"), opt("id"), opt("name"))(
        blockdev_snapshot_delete_internal_sync)
    action = Arg("actions[]", "object", members=(Arg("type", enum=ACTION_TYPES, enum_label="type"),
                                                  Arg("data", "object")))
    props = opt("properties", "object", members=(
        opt("completion-mode", enum=("individual", "grouped"), enum_label="completion-mode"),))
    r("transaction", Arg("actions", "array", items=action), props)(transaction)
    r("blockdev-snapshot-sync", *external_snapshot.SYNC_SCHEMA)(external_snapshot.blockdev_snapshot_sync)
    r("blockdev-snapshot", *external_snapshot.SNAPSHOT_SCHEMA)(external_snapshot.blockdev_snapshot)
