"""drive-mirror / blockdev-mirror and drive-backup / blockdev-backup: starting the jobs, and the pivot.

The jobs themselves are :mod:`vdkit.block.mirror` and :mod:`vdkit.block.backup`
on the engine of :mod:`vdkit.block.jobs`; this module checks the arguments
in QEMU 7.2's order with its texts (``block-jobs.md`` §6, §7), creates or
opens the target, and does the graph work when a mirror pivots: the drive's
medium moves onto the target (with the source's backing chain below it for
``sync: top``, the source itself for ``none``, the target's own backing chain
for ``mode: existing``), and the nodes no longer used are closed.

Target files created before a late check fails stay on disk, as in QEMU.
"""

from __future__ import annotations

import errno
import functools
from typing import TYPE_CHECKING, Any

from vdkit.errors import VdkitError
from vdkit.monitor.commands import Arg, CommandContext, CommandRegistry, opt

if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.jobs import Job
    from vdkit.block.node import Node
    from vdkit.devices.graph import GraphNode
    from vdkit.devices.registry import DeviceRegistry, Drive, Medium

ON_ERROR = ("report", "ignore", "stop", "enospc")
SYNC_MODES = ("top", "full", "none", "incremental", "bitmap")


# -- lookups ---------------------------------------------------------------------------------------


def _lookup(machine: DeviceRegistry, name: str) -> tuple[Drive, int]:
    """``bdrv_lookup_bs(name, name)`` over the drives: (drive, index of the node in its chain)."""
    drive = machine.find_drive(name)
    if drive is not None:
        if drive.medium is None or drive.medium.dead:
            raise VdkitError(f"Device '{name}' has no medium")
        return drive, 0
    for d in machine.drives:
        if d.medium is None:
            continue
        for i, (fmt_name, file_name) in enumerate(d.medium.names):
            if name in (fmt_name, file_name):
                if name == file_name:
                    raise VdkitError("Jobs on protocol nodes are not supported by vdkit")
                return d, i
    if machine.graph.find(name) is not None:
        raise VdkitError("Jobs on nodes of the blockdev-add graph are not supported by vdkit (use a -drive)")
    raise VdkitError(f"Cannot find device='{name}' nor node-name='{name}'")


def _root(machine: DeviceRegistry, name: str) -> tuple[Drive, int, Medium]:
    """A mirror's source: a drive's root node (QEMU's ``qmp_get_root_bs``; a job holding it is above it)."""
    drive, index = _lookup(machine, name)
    assert drive.medium is not None
    if index or machine.jobs.job_on(drive.medium.node) is not None:
        raise VdkitError("Need a root block node")
    return drive, index, drive.medium


def _label(drive: Drive, index: int) -> str:
    assert drive.medium is not None
    return drive.id if index == 0 else drive.medium.names[index][0]


class _Source:
    """A backup's source: a node of a drive's chain, or a ``blockdev-add`` format node.

    ``root`` is the node a job on the same chain holds (the drive's top, or the graph node itself),
    ``label`` what QEMU's messages call it, ``default_id`` the job-id when none is given (the
    backend's name; a node without one has none: QEMU then says ``Invalid job ID ''``).
    """

    def __init__(self, node: Node, root: Node, label: str, default_id: str, drive: Drive | None) -> None:
        self.node, self.root, self.label, self.default_id, self.drive = node, root, label, default_id, drive

    def busy(self, machine: DeviceRegistry) -> None:
        """QEMU's op blocker: a job holding the chain makes the source busy."""
        job = machine.jobs.job_on(self.root)
        if job is not None:
            raise VdkitError(f"Node '{self.label}' is busy: block device is in use by block job: {job.type}")


def _backup_source(machine: DeviceRegistry, name: str) -> _Source:
    g = machine.graph.find(name)
    if g is not None and machine.find_drive(name) is None:
        if g.node is None:
            raise VdkitError("Backups of protocol nodes are not supported by vdkit")
        return _Source(g.node, g.node, g.name, "", None)
    drive, index = _lookup(machine, name)
    assert drive.medium is not None
    return _Source(list(drive.medium.node.chain())[index], drive.medium.node, _label(drive, index),
                   drive.id if index == 0 else "", drive)


def _create(path: str, fmt: str, size: int, backing: Node | None) -> None:
    """``bdrv_img_create`` for a target: the source's size, the backing node's filename and format."""
    from vdkit.formats.registry import FORMATS, format_module, is_known
    from vdkit.io.file import ImageFile
    from vdkit.opts import CreateOpts, with_file_options

    if not is_known(fmt):
        raise VdkitError(f"Unknown file format '{fmt}'")
    if fmt not in FORMATS or not hasattr(format_module(fmt), "create_image"):
        raise VdkitError(f"Creating '{fmt}' images is not supported by vdkit")
    mod = format_module(fmt)
    opts = CreateOpts(with_file_options(mod.create_options()))
    if backing is not None:
        if "backing_file" not in opts.by_name:
            raise VdkitError(f"Backing file not supported for file format '{fmt}'")
        opts.set("backing_file", backing.filename)
        opts.set("backing_fmt", backing.format)
    opts.set_number("size", size)
    if path.startswith("json:"):  # options name no file to create (QEMU looks for a protocol 'json')
        raise VdkitError("Unknown protocol 'json'")
    try:  # a file this daemon (or anyone) holds is refused before it is overwritten, as QEMU does
        ImageFile(path, readonly=False).close()
    except VdkitError as exc:
        if exc.errno != 2:
            raise
    try:
        mod.create_image(path, opts)
    except (OSError, VdkitError) as exc:
        if exc.errno != errno.EFBIG:
            raise
        # the file may not grow (RLIMIT_FSIZE, the file system's limit): QEMU's text, hint included
        raise VdkitError(f"The image size is too large for file format '{fmt}' (try using a larger cluster "
                         "size)") from exc


def _open_target(path: str, fmt: str | None) -> Node:
    """The target, without its backing file: a header that names one makes it QEMU's ``json:`` name."""
    from vdkit.block.node import open_image
    from vdkit.devices.graph import json_filename
    from vdkit.monitor.block_cmds import open_error

    try:
        if path.startswith("json:"):  # options, as -drive file=json:{...} takes them
            from vdkit.devices.option_media import open_json_image

            node = open_json_image(path, fmt, readonly=False, backing=False)
        else:
            node = open_image(path, fmt, readonly=False, backing=False)
    except VdkitError as exc:
        raise open_error(exc) from exc
    if node.driver.backing_file is not None:
        node.filename = json_filename(node, None)
    return node


def _job_id(args: dict[str, Any], drive: Drive, index: int) -> str:
    # the default id is the backend's name; a node without one gets '' (refused as an invalid id)
    return str(args.get("job-id", drive.id if index == 0 else ""))


# -- the pivot ------------------------------------------------------------------------------------------


def _pivot(machine: DeviceRegistry, drive: Drive, medium: Medium, target: Node, names: tuple[str, str],
           serials: tuple[int, int], *, keep_from: int | None, open_own_backing: bool) -> None:
    """The target takes the source's place under the drive (the Medium, so exports follow).

    ``keep_from``: the index of the old chain that becomes the target's backing
    (1 for ``top``, 0 for ``none``), None to drop the whole old chain.
    """
    from vdkit.devices.graph import describe_node, json_filename

    old_chain = list(medium.node.chain())
    old_names, old_serials = list(medium.names), list(medium.serials)
    new_names = [names]
    new_serials = [serials]
    if keep_from is not None:
        below = old_chain[keep_from]
        target.backing = below
        new_names += old_names[keep_from:]
        new_serials += old_serials[keep_from:]
        dropped = old_chain[:keep_from]
        if keep_from == 0:
            below.flush()  # the old source is the target's backing now (QEMU leaves it writable)
    else:
        dropped = old_chain
        if open_own_backing and target.driver.backing_file is not None:
            from vdkit.block.chain import BackingWalk
            from vdkit.block.node import _open_backing

            _open_backing(target, force_share=False, no_io=False, walk=BackingWalk())
            for _ in list(target.chain())[1:]:
                fs, ss = machine.next_serial(), machine.next_serial()
                new_names.append((machine.auto_name(), machine.auto_name()))
                new_serials.append((ss, fs))
    stored = target.driver.backing_file
    if target.backing is not None and stored != target.backing.filename:
        target.filename = json_filename(target, describe_node(target.backing))
    elif target.backing is not None or stored is None:
        target.filename = target.driver.file.filename  # the graph is what the header says: the plain name
    medium.node = target
    medium.names = new_names
    medium.serials = new_serials
    for fmt_name, file_name in old_names[: len(old_names) if keep_from is None else keep_from]:
        machine.release_name(fmt_name)
        machine.release_name(file_name)
        machine.monitor_owned.discard(fmt_name)
        machine.monitor_owned.discard(file_name)
    for node in dropped:
        node.backing = None
        try:
            node.driver.close()
        except (OSError, VdkitError):
            pass
    machine._hook_corruption(medium)
    machine.generation += 1


# -- mirror -------------------------------------------------------------------------------------------


def _mirror_common_checks(args: dict[str, Any]) -> tuple[int, int]:
    """``blockdev_mirror_common``/``mirror_start_job`` argument checks: (granularity, buf-size), 0 = default."""
    granularity = args.get("granularity", 0)
    if granularity and not 512 <= granularity <= 64 * 1024 * 1024:
        raise VdkitError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise VdkitError("Parameter 'granularity' expects a power of 2")
    return granularity, args.get("buf-size", 0)


class _MirrorSource:
    """A mirror's source: a drive's root node, or a ``-blockdev``/``blockdev-add`` format node without
    parents (``graph`` set; its NBD exports' backend, if any, moves onto the target at the pivot).

    ``names``: what ``replaces`` may name (the source itself); ``default_id``: the job-id when none is
    given (the backend's name; a graph node has none: QEMU then says ``Invalid job ID ''``).
    """

    def __init__(self, node: Node, names: tuple[str, ...], default_id: str, drive: Drive | None = None,
                 medium: Medium | None = None, graph: GraphNode | None = None) -> None:
        self.node, self.names, self.default_id = node, names, default_id
        self.drive, self.medium, self.graph = drive, medium, graph


def _mirror_source(machine: DeviceRegistry, name: str) -> _MirrorSource:
    """QEMU's ``qmp_get_root_bs`` for a mirror: a drive's root, or a graph format node no parent holds."""
    g = machine.graph.find(name)
    if g is not None and machine.find_drive(name) is None:
        if machine.graph.parents_of(g) or (g.node is not None and machine.jobs.job_on(g.node) is not None):
            raise VdkitError("Need a root block node")
        if g.node is None:
            raise VdkitError("Jobs on protocol nodes are not supported by vdkit")
        return _MirrorSource(g.node, (g.name,), "", graph=g)
    drive, index, medium = _root(machine, name)
    return _MirrorSource(medium.node, (medium.names[index][0], drive.id), _job_id({}, drive, index), drive, medium)


def _start_mirror(machine: DeviceRegistry, src: _MirrorSource, target: Node, args: dict[str, Any], *,
                  sync: str, zero_target: bool, keeps_backing: bool, pivot: Any, release: Any,
                  target_unmaps: bool = False, names: tuple[str, str, int, int] | None = None) -> None:
    from vdkit.block.dirty_bitmap import default_granularity
    from vdkit.block.mirror import DEFAULT_BUF_SIZE, MirrorJob

    granularity, buf_size = _mirror_common_checks(args)
    replaces = args.get("replaces")
    if replaces is not None and replaces not in src.names:
        if replaces not in machine.all_node_names():
            raise VdkitError(f"Failed to find node with node-name='{replaces}'")
        raise VdkitError(f"Replacing node '{replaces}' is not supported by vdkit")
    if sync in ("incremental", "bitmap"):
        raise VdkitError(f"Sync mode '{sync}' not supported")
    if not granularity:
        granularity = default_granularity(target.driver.cluster_size)  # QEMU asks bdrv_get_info
    if buf_size < 0:
        raise VdkitError("Invalid parameter 'buf-size'")
    source = src.node
    if source is target:
        raise VdkitError("Can't mirror node into itself")
    job_driver = MirrorJob(source, target, sync=sync, granularity=granularity, buf_size=buf_size or DEFAULT_BUF_SIZE,
                           zero_target=zero_target, target_unmaps=target_unmaps, unmap=args.get("unmap", True),
                           keeps_backing=keeps_backing,
                           on_source_error=args.get("on-source-error", "report"),
                           on_target_error=args.get("on-target-error", "report"), pivot=pivot, release=release,
                           write_blocking=args.get("copy-mode") == "write-blocking")
    if names is not None and src.drive is not None:  # drive-mirror's target nodes are listed while the job
        # holds them (not yet for a graph source)
        from vdkit.devices.registry import Medium

        job_driver.listed_target = Medium(target, [(names[0], names[1])], False, [(names[2], names[3])])
    from vdkit.block.jobs import JobFilter
    from vdkit.io.file import Perm
    from vdkit.monitor.job_cmds import hold_lock

    filter_name = args.get("filter-node-name")  # blockdev-mirror's: QEMU opens the named filter first
    if filter_name is not None:
        from vdkit.monitor.graph_cmds import check_node_name

        check_node_name(machine, filter_name)
    # the job's target backend writes and shares only unchanged writes: others may not read the target's
    # file consistently (a drive's node: its lock bytes; a graph node: its file node's, by the graph's rule)
    unlock = hold_lock(target, unshared=Perm.CONSISTENT_READ)
    target_g = next((g for g in machine.graph.nodes if g.node is target), None)
    if target_g is not None:
        unlock = _graph_target_use(machine, target_g)
    try:
        job = machine.jobs.create(str(args.get("job-id", src.default_id)), job_driver, speed=args.get("speed", 0),
                                  auto_finalize=args.get("auto-finalize", True),
                                  auto_dismiss=args.get("auto-dismiss", True))
    except BaseException:
        unlock()
        raise
    # the mirror_top filter QEMU puts above the source (listed while the job lives; no I/O goes through it)
    release_filter = unlock
    if filter_name is not None:
        machine.claim_name(filter_name)
        release_filter = functools.partial(_release_both, unlock, functools.partial(machine.release_name,
                                                                                    filter_name))
    job_driver.filter = JobFilter("mirror_top", source, ro=False,
                                  name=filter_name if filter_name is not None else machine.auto_name(),
                                  serial=machine.next_serial(), release=release_filter)
    job.start()


def _release_both(first: Callable[[], None], then: Callable[[], None]) -> None:
    first()
    then()


def _pivot_export(machine: DeviceRegistry, src: GraphNode, target: GraphNode) -> bool:
    """The pivot of a graph source: its NBD exports' backend (its only possible parent) moves onto the
    target, as QEMU replaces the source by the target under every parent; False when nothing is exported
    (then nothing moves)."""
    from vdkit.monitor.external_snapshot import _exported, _move_backend

    if not _exported(machine, src):
        return False
    _move_backend(machine, src, target)
    machine.generation += 1
    return True


def _graph_drive_mirror(machine: DeviceRegistry, src: _MirrorSource, args: dict[str, Any], *, sync: str,
                        fmt: str | None, existing: bool, keep_from: int | None) -> None:
    """drive-mirror of a graph node: the target opened as graph nodes (listed while the job holds them,
    ``"backing": null``), which an export of the source moves onto at the pivot (the target then gets the
    backing ``keep_from`` says, or its header's chain for ``mode: existing``, and lives as long as the
    export's backend); without an export, or after a cancel, they go with the job."""
    from vdkit.devices.graph import (
        _open_header_backing,
        delete_node,
        refresh_filename,
    )

    g = src.graph
    assert g is not None
    child, tg = _open_graph_target(machine, g, args["target"], fmt, name=args.get("node-name"),
                                   detect_zeroes="off", backing=None)
    assert tg.node is not None
    target = tg.node

    def pivot() -> None:
        if not _pivot_export(machine, g, tg):
            return
        from vdkit.block.chain import BackingWalk

        if keep_from is not None:
            below = g if keep_from == 0 else g.backing
            tg.backing = below
            target.backing = below.node if below is not None else None
        elif existing and target.driver.backing_file is not None:
            tg.backing_override = False  # the header's chain: the plain name, which it is resolved against
            refresh_filename(tg)
            walk = BackingWalk()
            assert child.file is not None
            walk.visit(tg.filename, child.file.fd)
            tg.backing = _open_header_backing(machine, tg, walk)
            target.backing = tg.backing.node
        refresh_filename(tg)

    def release(pivoted: bool) -> None:
        if tg.backend is None:  # not an export's node now: QEMU frees it with the job
            tg.backing = None
            target.backing = None
            delete_node(machine, tg)

    try:
        _start_mirror(machine, src, target, args, sync=sync, zero_target=sync == "full" and existing,
                      keeps_backing=keep_from is not None or existing, pivot=pivot, release=release)
    except BaseException:
        release(False)
        raise


def _graph_target_use(machine: DeviceRegistry, g: GraphNode) -> Callable[[], None]:
    """A mirror's BlockBackend on a graph target (writes, shares unchanged writes only): the file node's
    lock bytes follow (QEMU: the target's file refuses others' reads too); the returned function ends it."""
    from vdkit.devices.graph import lock_file_node
    from vdkit.io.file import Perm

    def relock() -> None:
        if g.child is not None and g.child.file is not None:
            lock_file_node(machine, g.child)

    g.job_use = (Perm.WRITE, Perm.WRITE_UNCHANGED)
    try:
        relock()
    except VdkitError:
        g.job_use = (0, 0x1F)
        relock()
        raise

    def end() -> None:
        g.job_use = (0, 0x1F)
        relock()

    return end


def drive_mirror(ctx: CommandContext, args: dict[str, Any]) -> None:
    machine = ctx.machine
    src = _mirror_source(machine, args["device"])
    chain = list(src.node.chain())
    source = chain[0]
    existing = args.get("mode", "absolute-paths") == "existing"
    fmt = args.get("format", None if existing else source.format)
    sync = args["sync"]
    backing: Node | None = chain[1] if len(chain) > 1 else None
    if backing is None and sync == "top":
        sync = "full"
    if sync == "none":
        backing = source
    if "replaces" in args and "node-name" not in args:
        raise VdkitError("a node-name must be provided when replacing a named node of the graph")
    path = args["target"]
    if not existing:
        _create(path, fmt or source.format, source.size, None if sync == "full" else backing)
    if "node-name" in args:
        from vdkit.monitor.graph_cmds import check_node_name

        check_node_name(machine, args["node-name"])
    keep_from = None if existing or sync == "full" else (0 if sync == "none" else 1)
    if src.graph is not None:
        _graph_drive_mirror(machine, src, args, sync=sync, fmt=fmt, existing=existing, keep_from=keep_from)
        return
    target = _open_target(path, fmt)
    (fmt_name, file_name), (fmt_serial, file_serial) = machine.name_new_node(args.get("node-name"))
    names = (fmt_name, file_name, fmt_serial, file_serial)
    drive, medium = src.drive, src.medium

    def pivot() -> None:
        assert drive is not None and medium is not None
        _pivot(machine, drive, medium, target, (names[0], names[1]), (names[2], names[3]), keep_from=keep_from,
               open_own_backing=existing)

    def release(pivoted: bool) -> None:
        if not pivoted:
            machine.release_name(names[0])
            machine.release_name(names[1])
            target.backing = None
            target.close()

    try:
        _start_mirror(machine, src, target, args, sync=sync, zero_target=sync == "full" and existing,
                      keeps_backing=keep_from is not None or existing, pivot=pivot, release=release, names=names)
    except BaseException:
        release(False)
        raise


def _graph_target(machine: DeviceRegistry, name: str) -> GraphNode:
    g = machine.graph.find(name)
    if g is None:
        if machine.find_drive(name) is not None or any(
                name in n for d in machine.drives if d.medium is not None for n in d.medium.names):
            raise VdkitError("A target in use by a drive is not supported by vdkit")
        raise VdkitError(f"Cannot find device='{name}' nor node-name='{name}'")
    if g.node is None or g.child is None or not g.child.implicit or g.backing is not None \
            or machine.graph.parents_of(g):
        raise VdkitError("Only a blockdev-add format node with its own file node and no backing or parent "
                         "can be a target in vdkit")
    return g


def blockdev_mirror(ctx: CommandContext, args: dict[str, Any]) -> None:
    from vdkit.devices.graph import _BorrowedFile

    machine = ctx.machine
    src = _mirror_source(machine, args["device"])
    g = _graph_target(machine, args["target"])
    assert g.node is not None and g.child is not None
    target = g.node
    child = g.child
    sync = args["sync"]
    if sync == "top" and src.node.backing is None:
        sync = "full"
    drive, medium, source_g = src.drive, src.medium, src.graph

    def pivot() -> None:
        if source_g is not None:  # its export (if any) moves onto the target; the target stays as it is
            _pivot_export(machine, source_g, g)
            return
        assert drive is not None and medium is not None
        machine.graph.nodes.remove(g)
        machine.graph.nodes.remove(child)
        if isinstance(target.driver.file, _BorrowedFile):
            target.driver.file.owns = True  # the drive's medium closes the file from now on
        # QEMU leaves the target's backing as the user set it: none here
        _pivot(machine, drive, medium, target, (g.name, child.name), (g.serial, child.serial), keep_from=None,
               open_own_backing=False)
        machine.monitor_owned.add(g.name)

    _start_mirror(machine, src, target, args, sync=sync, zero_target=sync == "full", keeps_backing=False,
                  pivot=pivot, release=lambda pivoted: None, target_unmaps=g.discard == "unmap")


# -- backup -------------------------------------------------------------------------------------------


def _backup_common(machine: DeviceRegistry, src: _Source, target: Node, args: dict[str, Any], *,
                   sync: str, target_has_backing: bool, release: Any) -> Job:
    """``do_backup_common`` and ``backup_job_create``: bitmap rules, then the job (created, not started)."""
    from vdkit.block.backup import BackupJob
    from vdkit.block.dirty_bitmap import CHECK_ALLOW_RO, CHECK_DEFAULT

    source = src.node
    mode = args.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and "bitmap" not in args:
        raise VdkitError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise VdkitError("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
        sync, mode = "bitmap", "on-success"
    bitmap = None
    if "bitmap" in args:
        bitmap = source.find_bitmap(args["bitmap"])
        if bitmap is None:
            raise VdkitError(f"Bitmap '{args['bitmap']}' could not be found")
        if mode is None:
            raise VdkitError("Bitmap sync mode must be given when providing a bitmap")
        bitmap.check(CHECK_ALLOW_RO)
        if sync == "none":
            raise VdkitError("sync mode 'none' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise VdkitError(f"Bitmap sync mode 'never' has no meaningful effect when combined with sync mode "
                             f"'{sync}'")
    elif mode is not None:
        raise VdkitError("Cannot specify bitmap sync mode without a bitmap")
    if source is target:
        raise VdkitError("Source and target cannot be the same")
    compress = bool(args.get("compress", False))
    from vdkit.formats.registry import format_module

    if compress and not getattr(format_module(target.format), "SUPPORTS_COMPRESSION", False):
        raise VdkitError("Compression is not supported for this drive ")  # QEMU names the target's (no) device
    src.busy(machine)
    if bitmap is not None and mode != "never":
        bitmap.check(CHECK_DEFAULT)
    name = args.get("filter-node-name")
    if name is not None:  # the copy-before-write filter is named so (checked before the job exists)
        from vdkit.monitor.graph_cmds import check_node_name

        try:
            check_node_name(machine, name)
        except VdkitError as exc:
            raise exc.prefixed("Could not create node: ") from exc
    job_driver = BackupJob(source, target, sync=sync, bitmap=bitmap, bitmap_mode=mode or "on-success",
                           target_has_backing=target_has_backing, compress=compress,
                           on_source_error=args.get("on-source-error", "report"),
                           on_target_error=args.get("on-target-error", "report"), release=release)
    job = machine.jobs.create(str(args.get("job-id", src.default_id)), job_driver, speed=args.get("speed", 0),
                              auto_finalize=args.get("auto-finalize", True),
                              auto_dismiss=args.get("auto-dismiss", True))
    job_driver.attach(job)
    from vdkit.block.backup import CbwFilter

    # the copy-before-write filter QEMU puts above the source (listed, the drive's root while the job
    # lives; the write hook does its work)
    release_name: Callable[[], None] | None = None
    if name is not None:
        machine.claim_name(name)
        release_name = functools.partial(machine.release_name, name)
    job_driver.filter = CbwFilter(source, name=name if name is not None else machine.auto_name(),
                                  serial=machine.next_serial(), release=release_name)
    return job


def _start_backup(job: Job) -> None:
    from vdkit.block.jobs import Status

    job.start()
    # QEMU drains the source as the job starts: a running job shows a paused/running pair at once
    job._transition(Status.PAUSED)
    job._transition(Status.RUNNING)


def prepare_backup(machine: DeviceRegistry, kind: str, args: dict[str, Any]) -> Job:
    """``drive-backup`` / ``blockdev-backup`` up to the created job (a transaction starts it at commit)."""
    if kind == "blockdev-backup":
        return _prepare_blockdev_backup(machine, args)
    src = _backup_source(machine, args["device"])
    source = src.node
    existing = args.get("mode", "absolute-paths") == "existing"
    fmt = args.get("format", None if existing else source.format)
    machine.jobs.drain()  # then the source (jobs at a pause point show a pause/resume pair again)
    src.busy(machine)
    sync = args["sync"]
    backing: Node | None = None
    if sync == "top":
        backing = source.backing
        if backing is None:
            sync = "full"
    if sync == "none":
        backing = source
    path = args["target"]
    if not existing:
        _create(path, fmt or source.format, source.size, backing)
    graph_src = machine.graph.find(args["device"]) if src.drive is None else None
    if graph_src is not None:
        # a graph node's backup: the target opened as graph nodes, listed while the job holds them (sync
        # none: over the live source, a fleecing overlay)
        target, release_graph = _graph_backup_target(machine, graph_src, path, fmt,
                                                     backing=graph_src if sync == "none" else "header")
        try:
            return _backup_common(machine, src, target, args, sync=sync,
                                  target_has_backing=target.backing is not None
                                  or target.driver.backing_file is not None, release=release_graph)
        except BaseException:
            release_graph()
            raise
    # QEMU opens the target with the backing chain its header names (``none``: the live source instead,
    # a fleecing overlay), with detect-zeroes=unmap
    target = _open_backup_target(path, fmt, chain=sync != "none")
    if sync == "none":
        target.backing = source
    owned = list(target.chain()) if sync != "none" else [target]
    names = [machine.name_new_node(None) for _ in owned]

    def release() -> None:
        for (fmt_name, file_name), _ in names:
            machine.release_name(fmt_name)
            machine.release_name(file_name)
        if sync == "none":
            target.backing = None
        target.close()

    try:
        job = _backup_common(machine, src, target, args, sync=sync,
                             target_has_backing=target.backing is not None or target.driver.backing_file is not None,
                             release=release)
    except BaseException:
        release()
        raise
    from vdkit.devices.registry import Medium

    if src.drive is not None:  # listed with the drive's nodes (a graph source's are graph nodes)
        job.driver.listed_target = Medium(target, [n for n, _ in names], False,  # type: ignore[attr-defined]
                                          [s for _, s in names], detect_zeroes="unmap")
    return job


def _open_graph_target(machine: DeviceRegistry, g: GraphNode, path: str, fmt: str | None, *, name: str | None,
                       detect_zeroes: str, backing: GraphNode | str | None) -> tuple[GraphNode, GraphNode]:
    """A job's target of a graph node ``g`` as implicit graph nodes (QEMU lists them while the job holds
    them): the file node for ``path``, then the format node over it (``fmt``, or probed); a refusal
    closes what was opened and answers with the monitor's open error.  Returns (file node, format node)."""
    from vdkit.devices.graph import delete_node, open_file_node, open_format_node
    from vdkit.formats import registry as formats
    from vdkit.monitor.block_cmds import open_error

    try:
        child = open_file_node(machine, {"filename": path}, name=None, ro=False, auto_ro=False, cache=g.cache,
                               implicit=True)
    except VdkitError as exc:
        raise open_error(exc) from exc
    try:
        assert child.file is not None
        driver = fmt or formats.probe_format(child.file.pread(0, formats.PROBE_SIZE), path)
        tg = open_format_node(machine, driver, child, name=name, ro=False, cache=g.cache,
                              detect_zeroes=detect_zeroes, discard="ignore", auto_ro=False, implicit=True,
                              backing=backing)
    except VdkitError as exc:
        delete_node(machine, child)
        if exc.message.startswith("Could not open backing file: "):
            raise  # QEMU's monitor keeps this prefix (a backing locked by the daemon's own writable node)
        raise open_error(exc) from exc
    return child, tg


def _graph_backup_target(machine: DeviceRegistry, g: GraphNode, path: str, fmt: str | None, *,
                         backing: GraphNode | str) -> tuple[Node, Callable[[], None]]:
    """drive-backup's target of a graph node ``g``: opened as implicit graph nodes (QEMU lists them while
    the job holds them) with detect-zeroes=unmap and ``backing`` (``"header"``: the chain its header
    names; sync none: the source node itself); the function returned closes them (the job's end)."""
    from vdkit.devices.graph import delete_node

    _child, tg = _open_graph_target(machine, g, path, fmt, name=None, detect_zeroes="unmap", backing=backing)
    assert tg.node is not None

    def release() -> None:
        if isinstance(backing, str):
            delete_node(machine, tg)
            return
        tg.backing = None  # the source stays
        assert tg.node is not None
        tg.node.backing = None
        delete_node(machine, tg)

    return tg.node, release


def _open_backup_target(path: str, fmt: str | None, *, chain: bool) -> Node:
    from vdkit.block.node import open_image
    from vdkit.monitor.block_cmds import open_error

    try:
        if path.startswith("json:"):  # options, as -drive file=json:{...} takes them
            from vdkit.devices.option_media import open_json_image

            return open_json_image(path, fmt, readonly=False, backing=chain)
        return open_image(path, fmt, readonly=False, backing=chain)
    except VdkitError as exc:
        raise open_error(exc) from exc


def _prepare_blockdev_backup(machine: DeviceRegistry, args: dict[str, Any]) -> Job:
    src = _backup_source(machine, args["device"])
    g = machine.graph.find(args["target"])
    if g is None:
        raise VdkitError(f"Cannot find device='{args['target']}' nor node-name='{args['target']}'")
    if g.node is None:
        raise VdkitError("A protocol node as backup target is not supported by vdkit")
    machine.jobs.drain()
    sync = args["sync"]
    if sync == "top" and src.node.backing is None:
        sync = "full"
    return _backup_common(machine, src, g.node, args, sync=sync, target_has_backing=g.backing is not None,
                          release=lambda: None)


def backup_action(machine: DeviceRegistry, kind: str, data: dict[str, Any]) -> tuple[Callable[[], None],
                                                                                        Callable[[], None]]:
    """A backup action of a ``transaction``: (start at commit, undo at abort)."""
    job = prepare_backup(machine, kind, data)

    def undo() -> None:
        job.cancel(force=True)

    return (lambda: _start_backup(job)), undo


def drive_backup(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.machine.jobs.drain()  # QEMU runs it as a one-action transaction, which drains everything first
    _start_backup(prepare_backup(ctx.machine, "drive-backup", args))


def blockdev_backup(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.machine.jobs.drain()  # a one-action transaction: everything is drained first
    _start_backup(prepare_backup(ctx.machine, "blockdev-backup", args))


_COMMON = (opt("speed", "int"), opt("on-source-error", enum=ON_ERROR), opt("on-target-error", enum=ON_ERROR),
           opt("auto-finalize", "bool"), opt("auto-dismiss", "bool"))
# drive-mirror has no filter-node-name in QEMU 7.2's schema (blockdev-mirror and the backups have)
MIRROR_SCHEMA = (opt("job-id"), Arg("device"), Arg("target"), opt("format"), opt("node-name"), opt("replaces"),
                 Arg("sync", enum=SYNC_MODES), opt("mode", enum=("existing", "absolute-paths")),
                 opt("granularity", "int"), opt("buf-size", "int"), opt("unmap", "bool"),
                 opt("copy-mode", enum=("background", "write-blocking")), *_COMMON)
BLOCKDEV_MIRROR_SCHEMA = (opt("job-id"), Arg("device"), Arg("target"), opt("replaces"), Arg("sync", enum=SYNC_MODES),
                          opt("granularity", "int"), opt("buf-size", "int"),
                          opt("copy-mode", enum=("background", "write-blocking")), *_COMMON,
                          opt("filter-node-name"))
_BACKUP_COMMON = (opt("job-id"), Arg("device"), Arg("sync", enum=SYNC_MODES), opt("bitmap"),
                  opt("bitmap-mode", enum=("on-success", "never", "always")), opt("compress", "bool"),
                  opt("x-perf", "object"), *_COMMON, opt("filter-node-name"))
DRIVE_BACKUP_SCHEMA = (*_BACKUP_COMMON, Arg("target"), opt("format"), opt("mode", enum=("existing", "absolute-paths")))
BLOCKDEV_BACKUP_SCHEMA = (*_BACKUP_COMMON, Arg("target"))


def register(reg: CommandRegistry) -> None:
    r = reg.register
    r("drive-mirror", *MIRROR_SCHEMA)(drive_mirror)
    r("blockdev-mirror", *BLOCKDEV_MIRROR_SCHEMA)(blockdev_mirror)
    r("drive-backup", *DRIVE_BACKUP_SCHEMA)(drive_backup)
    r("blockdev-backup", *BLOCKDEV_BACKUP_SCHEMA)(blockdev_backup)
