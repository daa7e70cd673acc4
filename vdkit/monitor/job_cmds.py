"""Block job commands: queries, the ``block-job-*`` and ``job-*`` control verbs, and the job types.

The engine (states, events, speed, pause/cancel) is :mod:`vdkit.block.jobs`;
the jobs live in ``DeviceRegistry.jobs``.  This module checks arguments in
QEMU's order and with its texts (``block-jobs.md`` §3, §4, §5) and maps
them onto the engine.  ``block-job-*`` commands name a job by ``device``
(which is the job id, QEMU's legacy naming) and report an unknown one as
``DeviceNotActive``; ``job-*`` commands take ``id`` and say ``Job not found``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from vdkit.errors import VdkitError
from vdkit.io.file import Perm
from vdkit.monitor.commands import Arg, opt
from vdkit.record import record

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from vdkit.block.jobs import Job, JobDriver
    from vdkit.block.node import Node
    from vdkit.devices.graph import GraphNode
    from vdkit.devices.registry import DeviceRegistry, Drive, Medium
    from vdkit.monitor.commands import CommandContext, CommandRegistry

ON_ERROR = ("report", "ignore", "stop", "enospc")


class DeviceNotActiveError(VdkitError):
    qmp_class = "DeviceNotActive"


@record
class BlockJobInfo:
    """QAPI ``BlockJobInfo`` (7.2 member order)."""

    type: str
    device: str
    len: int
    offset: int
    busy: bool
    paused: bool
    speed: int
    io_status: str
    ready: bool
    status: str
    auto_finalize: bool
    auto_dismiss: bool
    error: str | None = None


@record
class JobInfo:
    """QAPI ``JobInfo`` (7.2 member order)."""

    id: str
    type: str
    status: str
    current_progress: int
    total_progress: int
    error: str | None = None


def block_job_info(job: Job) -> BlockJobInfo:
    return BlockJobInfo(type=job.type, device=job.id, len=job.len, offset=job.offset, busy=job.busy,
                        paused=job.paused, speed=job.speed, io_status=job.io_status, ready=job.ready,
                        status=job.status.value, auto_finalize=job.auto_finalize, auto_dismiss=job.auto_dismiss,
                        error=job.error)


def query_block_jobs(ctx: CommandContext, args: dict[str, Any]) -> list[BlockJobInfo]:
    ctx.machine.jobs.settle()
    return [block_job_info(j) for j in ctx.machine.jobs.jobs]


def query_jobs(ctx: CommandContext, args: dict[str, Any]) -> list[JobInfo]:
    ctx.machine.jobs.settle()
    return [JobInfo(id=j.id, type=j.type, status=j.status.value, current_progress=j.offset, total_progress=j.len,
                    error=j.error) for j in ctx.machine.jobs.jobs]


def _block_job(ctx: CommandContext, job_id: str) -> Job:
    job = ctx.machine.jobs.find(job_id)
    if job is None:
        raise DeviceNotActiveError(f"Block job '{job_id}' not found")
    return job


def _job(ctx: CommandContext, job_id: str) -> Job:
    job = ctx.machine.jobs.find(job_id)
    if job is None:
        raise VdkitError("Job not found")
    return job


def block_job_set_speed(ctx: CommandContext, args: dict[str, Any]) -> None:
    _block_job(ctx, args["device"]).set_speed(args["speed"])


def block_job_pause(ctx: CommandContext, args: dict[str, Any]) -> None:
    _block_job(ctx, args["device"]).pause()


def block_job_resume(ctx: CommandContext, args: dict[str, Any]) -> None:
    _block_job(ctx, args["device"]).resume()


def block_job_cancel(ctx: CommandContext, args: dict[str, Any]) -> None:
    job = _block_job(ctx, args["device"])
    force = args.get("force", False)
    if job.user_paused and not force:
        raise VdkitError(f"The block job for device '{job.id}' is currently paused")
    job.cancel(force=force)


def block_job_complete(ctx: CommandContext, args: dict[str, Any]) -> None:
    _block_job(ctx, args["device"]).complete()


def block_job_finalize(ctx: CommandContext, args: dict[str, Any]) -> None:
    _finalize(_block_job(ctx, args["id"]))


def block_job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> None:
    _dismiss(_block_job(ctx, args["id"]))


def _finalize(job: Job) -> None:
    job.check_verb("finalize")
    job.finalize()


def _dismiss(job: Job) -> None:
    job.check_verb("dismiss")
    job.dismiss()


def job_pause(ctx: CommandContext, args: dict[str, Any]) -> None:
    _job(ctx, args["id"]).pause()


def job_resume(ctx: CommandContext, args: dict[str, Any]) -> None:
    _job(ctx, args["id"]).resume()


def job_cancel(ctx: CommandContext, args: dict[str, Any]) -> None:
    _job(ctx, args["id"]).cancel(force=True)


def job_complete(ctx: CommandContext, args: dict[str, Any]) -> None:
    _job(ctx, args["id"]).complete()


def job_finalize(ctx: CommandContext, args: dict[str, Any]) -> None:
    _finalize(_job(ctx, args["id"]))


def job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> None:
    _dismiss(_job(ctx, args["id"]))


# -- the chain a job works on ---------------------------------------------------------------------


def _find_device(machine: DeviceRegistry, name: str) -> tuple[Drive, int] | None:
    """A backend name, or the node name of a drive's chain member: (drive, index in its chain)."""
    drive = machine.find_drive(name)
    if drive is not None:
        return drive, 0
    for d in machine.drives:
        if d.medium is not None:
            for i, (fmt_name, _file_name) in enumerate(d.medium.names):
                if fmt_name == name:
                    return d, i
    return None


def _medium(drive: Drive) -> Medium:
    if drive.medium is None or drive.medium.dead:
        raise VdkitError("Device has no medium")
    return drive.medium


def check_root_busy(machine: DeviceRegistry, drive: Drive, *, drain: bool = False) -> None:
    """Eject, change and external snapshots refuse a drive whose root a job works on (§8).

    ``drain``: the command drains the node first (an external snapshot does),
    so the job pauses and resumes (its events) before the refusal.
    """
    if drive.medium is None:
        return
    job = machine.jobs.job_on(drive.medium.node)
    if job is None:
        return
    if drain:
        job.drain()
    raise VdkitError(f"Node '{drive.id}' is busy: block device is in use by block job: {job.type}")


def find_backing_image(chain: list[Node], start: int, name: str) -> int | None:
    """QEMU's bdrv_find_backing_image: the index of the image below ``chain[start]`` that ``name`` means.

    Below a node whose backing is not the one its header names (a ``json:``
    filename), only the backing node's filename matches.  With a protocol in
    either name, the names are compared as strings (the header's, or its
    resolution).  Otherwise both are made absolute (relative names from the
    overlay's folder) and their real paths compared: files that do not exist
    match nothing.
    """
    import os

    from vdkit.block.chain import has_protocol, resolve_backing_name

    for i in range(start, len(chain) - 1):
        overlay, below = chain[i], chain[i + 1]
        if overlay.filename.startswith("json:"):
            if name == below.filename:
                return i + 1
            continue
        stored = overlay.driver.backing_file
        if stored is None:
            continue
        if has_protocol(name) or has_protocol(stored):
            if name in (stored, resolve_backing_name(overlay.filename, stored)):
                return i + 1
            continue
        wanted = resolve_backing_name(overlay.filename, name)
        actual = resolve_backing_name(overlay.filename, stored)
        if wanted is None or actual is None or not os.path.exists(wanted) or not os.path.exists(actual):
            continue
        if os.path.realpath(wanted) == os.path.realpath(actual):
            return i + 1
    return None


def _chain_changed(machine: DeviceRegistry, medium: Medium, chain: list[Node]) -> Any:
    """The bookkeeping after a job changed ``medium``'s chain (``chain`` as it was): names, closing, caches."""

    def changed(dropped: list[Node], rewritten: Node | None) -> None:
        from vdkit.devices.graph import describe_node, json_filename

        gone = [i for i, n in enumerate(chain) if any(n is d for d in dropped)]
        for i in reversed(gone):
            fmt_name, file_name = medium.names[i]
            machine.release_name(fmt_name)
            machine.release_name(file_name)
            machine.monitor_owned.discard(fmt_name)
            machine.monitor_owned.discard(file_name)
            del medium.names[i]
            del medium.serials[i]
        if medium.overlay_path is not None:  # a snapshot=on drive: where its temporary overlay is now
            if medium.overlay_index in gone:
                medium.overlay_path = None
                medium.overlay_index = 0
                medium.snapshot_flags = False  # the nodes left were opened below it: their own flags
            else:
                medium.overlay_index -= sum(1 for i in gone if i < medium.overlay_index)
        if gone and gone[0] == 0:  # a pivot: the first remaining node is the drive's root now
            medium.node = chain[gone[-1] + 1]
            if medium.ro:  # a read-only drive stays read-only on its new root
                from vdkit.block.jobs import reopen_node

                reopen_node(medium.node, readonly=True)
        for node in dropped:
            node.backing = None
            try:
                node.driver.close()
            except OSError:
                pass
        if rewritten is not None:
            # a header was rewritten: QEMU's filename rule compares the name now stored (its
            # auto_backing_file) with the backing node's filename
            node = rewritten
            below = node.backing
            stored = node.driver.backing_file
            if below is not None and stored != below.filename:
                node.filename = json_filename(node, describe_node(below))
            elif node.filename.startswith("json:"):
                node.filename = node.driver.file.filename
        machine._hook_corruption(medium)
        machine.generation += 1

    return changed


def _job_options(args: dict[str, Any]) -> dict[str, Any]:
    return {"speed": args.get("speed", 0), "auto_finalize": args.get("auto-finalize", True),
            "auto_dismiss": args.get("auto-dismiss", True), "on_error": args.get("on-error", "report")}


def hold_lock(node: Node, *, perms: int = 0, unshared: int = 0) -> Callable[[], None]:
    """The lock bytes a job's permissions add to a drive node's file while the job lives (QEMU's job
    and filter edges on the node, observed in ``/proc/locks`` against qemu-system-x86_64): a mirror's
    target refuses others' consistent reads, a stream writes unchanged data into its top, a commit's
    intermediate nodes refuse others' consistent reads.  Returns what drops them again (nothing if the
    node was reopened or closed meanwhile: its file then holds its own bytes).  Graph nodes' files
    follow :func:`vdkit.devices.graph.lock_file_node` instead."""
    from vdkit.io.file import ImageFile, LockMode

    f = node.driver.file
    lock = f.lock if type(f) is ImageFile else None
    if lock is None:
        return lambda: None
    before = lock.mode
    added = LockMode(perms & ~before.perms, unshared & ~before.unshared)
    if not added.perms and not added.unshared:
        return lambda: None
    lock.switch(LockMode(before.perms | added.perms, before.unshared | added.unshared))

    def restore() -> None:
        if node.driver.file is f and f.fd >= 0 and f.lock is lock:
            mode = lock.mode
            try:
                lock.switch(LockMode(mode.perms & ~added.perms, mode.unshared & ~added.unshared))
            except VdkitError:
                pass  # fewer bytes than before cannot conflict; kept as they are if it still did
    return restore


def _start(machine: DeviceRegistry, job_id: str, driver: JobDriver, args: dict[str, Any],
           filter: tuple[str, Node, bool] | None = None, *, filter_first: bool = True,
           filter_prefix: str = "", locks: Sequence[tuple[Node, int, int]] = ()) -> Job:
    """Create and start the job; ``filter`` (driver name, node below, read-only) is its implicit filter node.

    Its name is ``filter-node-name`` if given, checked as QEMU checks it:
    before the job is created (``filter_first``), or after (an intermediate
    commit: ``created`` and ``null`` are sent before the error).  ``locks``: (node, perms, unshared)
    the job holds on drive nodes' files (:func:`hold_lock`) until it concludes.
    """
    from vdkit.block.jobs import JobFilter
    from vdkit.monitor.graph_cmds import check_node_name

    name = args.get("filter-node-name") if filter is not None else None

    def check() -> None:
        if name is not None:
            try:
                check_node_name(machine, name)
            except VdkitError as exc:
                raise exc.prefixed(filter_prefix) from exc

    if filter_first:
        check()
    restores: list[Callable[[], None]] = []

    def unlock() -> None:
        for fn in reversed(restores):
            fn()
        restores.clear()

    try:
        for node, perms, unshared in locks:
            restores.append(hold_lock(node, perms=perms, unshared=unshared))
        job = machine.jobs.create(job_id, driver, **_job_options(args))
    except BaseException:
        unlock()
        raise
    if not filter_first:
        try:
            check()
        except VdkitError:
            machine.jobs.discard(job)
            unlock()
            raise
    if filter is not None:
        drv, below, ro = filter
        release: Callable[[], None] | None = unlock if restores else None
        if name is not None:
            machine.claim_name(name)
            release = functools.partial(_release_all, [unlock, functools.partial(machine.release_name, name)])
        driver.filter = JobFilter(drv, below, ro=ro, name=name if name is not None else machine.auto_name(),
                                  serial=machine.next_serial(), release=release)
        if name is not None and drv == "copy-on-read":
            # QEMU opens a named copy-on-read filter from options: it is called by them (json:)
            import json

            from vdkit.devices.graph import describe_node

            driver.filter.filename = "json:" + json.dumps({"driver": drv, "file": describe_node(below)},
                                                          sort_keys=True)
    job.start()
    return job


def _release_all(fns: list[Callable[[], None]]) -> None:
    for fn in fns:
        fn()


class JobChain:
    """The chain a job works on, wherever it lives: a drive's medium or ``-blockdev`` graph nodes.

    ``nodes`` top first; ``names`` their node names; ``label(i)`` the name
    QEMU's messages use (the backend name for a drive's root);
    ``default_id`` the job-id when none is given (a drive's name, else
    empty: QEMU then says ``Invalid job ID ''``); ``changed(dropped)`` the
    bookkeeping after a job changed the chain; ``reopen(i, ro)`` reopens one
    node read-write or read-only; ``is_root`` whether ``nodes[0]`` has no
    parent (a drive's root, a graph node nothing uses).
    """

    def __init__(self, nodes: list[Node], names: list[str], labels: list[str], default_id: str,
                 is_root: bool, changed: Any, reopen: Any) -> None:
        self.nodes = nodes
        self.names = names
        self.labels = labels
        self.default_id = default_id
        self.is_root = is_root
        self.changed = changed
        self.reopen = reopen

    def label(self, index: int) -> str:
        return self.labels[index]

    def index_of(self, name: str) -> int | None:
        return next((i for i, n in enumerate(self.names) if n == name), None)


def _drive_chain(machine: DeviceRegistry, drive: Drive) -> JobChain:
    from vdkit.block.jobs import reopen_node

    medium = _medium(drive)
    nodes = list(medium.node.chain())
    names = [fmt for fmt, _file in medium.names]
    labels = [drive.id, *names[1:]]
    return JobChain(nodes, names, labels, drive.id, True, _chain_changed(machine, medium, nodes),
                    lambda i, ro: reopen_node(nodes[i], readonly=ro))


def _graph_chain(machine: DeviceRegistry, g: GraphNode) -> JobChain:
    gchain: list[GraphNode] = []
    cur: GraphNode | None = g
    while cur is not None and cur.node is not None:
        gchain.append(cur)
        cur = cur.backing
    nodes = [x.node for x in gchain if x.node is not None]
    names = [x.name for x in gchain]
    return JobChain(nodes, names, names, "", not machine.graph.parents_of(g),
                    _graph_changed(machine, gchain), lambda i, ro: _reopen_graph(machine, gchain[i], ro))


def _lookup_chain(machine: DeviceRegistry, name: str) -> tuple[JobChain, int] | None:
    """``device`` as QEMU's bdrv_lookup_bs finds it: a backend name, else a node name; (chain, index)."""
    found = _find_device(machine, name)
    if found is not None:
        drive, index = found
        return _drive_chain(machine, drive), index
    g = machine.graph.find(name)
    if g is not None and g.node is not None:
        return _graph_chain(machine, g), 0
    return None


def _node_exists(machine: DeviceRegistry, name: str) -> bool:
    return _find_device(machine, name) is not None or machine.graph.find(name) is not None


def _check_chain_busy(machine: DeviceRegistry, chain: JobChain, indices: range) -> None:
    """QEMU's op blockers down the chain; a job's filter node between two nodes is met (and named) first."""
    for i in indices:
        if i > indices.start:
            for j in machine.jobs.jobs:
                f = j.driver.filter
                if f is not None and f.below is chain.nodes[i] and f in machine.jobs.filters():
                    raise VdkitError(f"Node '{f.name}' is busy: block device is in use by block job: {j.type}")
        job = machine.jobs.job_on(chain.nodes[i])
        if job is not None:
            raise VdkitError(f"Node '{chain.label(i)}' is busy: block device is in use by block job: {job.type}")


def _reopen_graph(machine: DeviceRegistry, g: GraphNode, ro: bool) -> None:
    """Reopen a graph format node read-write (or read-only again); an inline file node goes with it.

    A file node added by reference stays as it is: a read-only one cannot
    give a writer (``Block node is read-only``, as QEMU); a writable one
    only gets its format layer reopened.
    """
    import os

    from vdkit.block.driver import OpenContext
    from vdkit.devices.graph import _BorrowedFile, lock_file_node
    from vdkit.formats import registry as formats
    from vdkit.io.file import ImageFile

    node, child = g.node, g.child
    assert node is not None and child is not None and child.file is not None
    if node.readonly == ro:
        return
    if not child.implicit and child.ro and not ro:
        raise VdkitError("Block node is read-only")
    own_file = child.implicit
    path = child.file.filename
    st = os.fstat(child.file.fd)
    hook = node.driver.corruption_hook

    def open_as(mode: bool) -> None:
        f = ImageFile(path, readonly=mode) if own_file else child.file
        assert f is not None
        try:
            nst = os.fstat(f.fd)
            if (nst.st_dev, nst.st_ino) != (st.st_dev, st.st_ino):
                raise VdkitError(f"Could not reopen '{path}': the file was replaced")
            ctx = OpenContext(path, readonly=mode)
            drv = formats.open_driver(g.driver, _BorrowedFile(f), ctx)
            drv.open_children(ctx)
        except BaseException:
            if own_file:
                f.close()
            raise
        drv.corruption_hook = hook
        if own_file:
            child.file, child.ro = f, mode
        node.driver, node.readonly, g.ro = drv, mode, mode

    was = node.readonly
    if not own_file and not ro:  # a file node by reference: write permission before the writer opens
        g.ro = False
        try:
            lock_file_node(machine, child)
        except BaseException:
            g.ro = was
            raise
    node.driver.close()
    if own_file:
        child.file.close()
    try:
        open_as(ro)
    except BaseException:
        open_as(was)
        if not own_file:
            lock_file_node(machine, child)
        raise
    if not own_file and ro:  # and dropped once the writer is closed
        lock_file_node(machine, child)


def _graph_changed(machine: DeviceRegistry, gchain: list[GraphNode]) -> Any:
    """Bookkeeping after a job changed a graph chain: the node above the dropped ones gets the new backing
    (QEMU's filename rule), dropped nodes opened from headers are deleted, the user's stay."""

    def changed(dropped: list[Node], rewritten: Node | None) -> None:
        from vdkit.devices.graph import delete_node, refresh_filename

        gone = [i for i, g in enumerate(gchain) if any(g.node is d for d in dropped)]
        if gone and gone[0] > 0:
            above = gchain[gone[0] - 1]
            above.backing = gchain[gone[-1] + 1] if gone[-1] + 1 < len(gchain) else None
            for i in gone:
                g = gchain[i]
                if g.implicit and not machine.graph.parents_of(g):
                    delete_node(machine, g)
        for g in gchain:
            if rewritten is not None and g.node is rewritten:
                g.backing_override = True  # its header now names what the job wrote: QEMU's rule decides
        # QEMU refreshes filenames up the graph: a json: name describes the nodes below it
        for _ in range(len(machine.graph.nodes)):
            before = [g.filename for g in machine.graph.nodes]
            for g in machine.graph.nodes:
                refresh_filename(g)
            if before == [g.filename for g in machine.graph.nodes]:
                break
        machine.generation += 1

    return changed


def _job_id(chain: JobChain, args: dict[str, Any]) -> str:
    return str(args.get("job-id", chain.default_id))


def block_stream(ctx: CommandContext, args: dict[str, Any]) -> None:
    """``block-stream`` (``block-jobs.md`` §5) on a drive's chain or a ``-blockdev`` chain."""
    from vdkit.block.stream import StreamJob

    machine = ctx.machine
    device = args["device"]
    base, base_node, bottom = args.get("base"), args.get("base-node"), args.get("bottom")
    if base is not None and base_node is not None:
        raise VdkitError("'base' and 'base-node' cannot be specified at the same time")
    if base is not None and bottom is not None:
        raise VdkitError("'base' and 'bottom' cannot be specified at the same time")
    if bottom is not None and base_node is not None:
        raise VdkitError("'bottom' and 'base-node' cannot be specified at the same time")
    found = _lookup_chain(machine, device)
    if found is None:
        raise VdkitError(f"Cannot find device='{device}' nor node-name='{device}'")
    chain, index = found  # index > 0: streaming into a backing node of a drive
    nodes = chain.nodes
    root = index == 0 and chain.is_root
    base_index: int | None = None
    if base is not None:
        base_index = find_backing_image(nodes, index, base)
        if base_index is None:
            raise VdkitError(f"Can't find '{base}' in the backing chain")
    if base_node is not None:
        hit = chain.index_of(base_node)
        if hit is None and not _node_exists(machine, base_node):
            raise VdkitError(f"Cannot find device='' nor node-name='{base_node}'")
        if hit is None or hit <= index:
            raise VdkitError(f"Node '{base_node}' is not a backing image of '{device}'")
        base_index = hit
    if bottom is not None:
        hit = chain.index_of(bottom)
        if hit is None and not _node_exists(machine, bottom):
            raise VdkitError(f"Cannot find device='' nor node-name='{bottom}'")
        if hit is None or hit < index:
            raise VdkitError(f"Node '{bottom}' is not in a chain starting from '{device}'")
        base_index = hit + 1 if hit + 1 < len(nodes) else None
    _check_chain_busy(machine, chain, range(index, len(nodes) if base_index is None else base_index))
    if base_index is None and args.get("backing-file") is not None:
        raise VdkitError("backing file specified, but streaming the entire chain")
    target = nodes[index]
    reopened = target.readonly  # a backing node is written by the stream: read-write meanwhile
    if reopened:
        chain.reopen(index, False)
    try:
        driver = StreamJob(nodes[index:], None if base_index is None else base_index - index,
                           args.get("backing-file"), chain.changed,
                           reopen=(lambda ro: chain.reopen(index, ro)) if reopened else None)
        # the default job-id is the backend's name: a node below the root has none
        job_id = str(args.get("job-id", chain.default_id if root else ""))
        _start(machine, job_id, driver, args, filter=("copy-on-read", target, False),
               filter_prefix="Could not create node: ", locks=[(target, Perm.WRITE_UNCHANGED, 0)])
    except BaseException:
        if reopened:
            chain.reopen(index, True)
        raise


def block_commit(ctx: CommandContext, args: dict[str, Any]) -> None:
    """``block-commit`` (``block-jobs.md`` §4): intermediate (top below the root) or active."""
    from vdkit.block.commit import CommitJob
    from vdkit.monitor.commands import DeviceNotFoundError

    machine = ctx.machine
    device = args["device"]
    found = _lookup_chain(machine, device)
    if found is None:
        raise DeviceNotFoundError(f"Device '{device}' not found")
    chain, index = found
    nodes = chain.nodes
    if index or not chain.is_root or machine.jobs.job_on(nodes[0]) is not None:
        raise VdkitError("Need a root block node")
    top_arg, top_node = args.get("top"), args.get("top-node")
    base_arg, base_node = args.get("base"), args.get("base-node")
    top_index: int | None = 0
    if top_arg is not None and top_node is not None:
        raise VdkitError("'top-node' and 'top' are mutually exclusive")
    if top_node is not None:
        top_index = chain.index_of(top_node)
        if top_index is None:
            if not _node_exists(machine, top_node):
                raise VdkitError(f"Cannot find device='' nor node-name='{top_node}'")
            raise VdkitError(f"'{top_node}' is not in this backing file chain")
    elif top_arg is not None and top_arg != nodes[0].filename:
        top_index = find_backing_image(nodes, 0, top_arg)
    if top_index is None:
        raise VdkitError(f"Top image file {top_arg} not found")
    if base_arg is not None and base_node is not None:
        raise VdkitError("'base-node' and 'base' are mutually exclusive")
    if base_node is not None:
        hit = chain.index_of(base_node)
        if hit is None and not _node_exists(machine, base_node):
            raise VdkitError(f"Cannot find device='' nor node-name='{base_node}'")
        if hit is None or hit < top_index:
            raise VdkitError(f"'{base_node}' is not in this backing file chain")
        base_index = hit
    elif base_arg is not None:
        found_base = find_backing_image(nodes, top_index, base_arg)
        if found_base is None:
            raise VdkitError(f"Can't find '{base_arg}' in the backing chain")
        base_index = found_base
    else:
        base_index = len(nodes) - 1
    _check_chain_busy(machine, chain, range(top_index, base_index + 1))
    if top_index == base_index:
        raise VdkitError("cannot commit an image into itself")
    if top_index == 0 and args.get("backing-file") is not None:
        raise VdkitError("'backing-file' specified, but 'top' is the active layer")
    base = nodes[base_index]
    base_was_ro = base.readonly
    if base_was_ro:
        chain.reopen(base_index, False)
    try:
        driver = CommitJob(nodes, top_index, base_index, args.get("backing-file"), chain.changed,
                           base_was_ro=base_was_ro, reopen=chain.reopen)
        driver.held_writable = [(base, chain.names[base_index])]
        below = nodes[top_index]
        # the nodes the commit drops (between the active image or its top and the base) refuse others' reads
        _start(machine, _job_id(chain, args), driver, args,
               filter=("mirror_top", below, False) if top_index == 0 else ("commit_top", below, True),
               filter_first=top_index == 0,
               locks=[(n, 0, Perm.CONSISTENT_READ) for n in nodes[max(top_index, 1):base_index]])
    except BaseException:
        if base_was_ro:
            chain.reopen(base_index, True)
        raise


_JOB_COMMON = (opt("speed", "int"), opt("on-error", enum=ON_ERROR), opt("filter-node-name"),
               opt("auto-finalize", "bool"), opt("auto-dismiss", "bool"))


def register(reg: CommandRegistry) -> None:
    r = reg.register
    r("query-block-jobs")(query_block_jobs)
    r("query-jobs")(query_jobs)
    r("block-job-set-speed", Arg("device"), Arg("speed", "int"))(block_job_set_speed)
    r("block-job-cancel", Arg("device"), opt("force", "bool"))(block_job_cancel)
    r("block-job-pause", Arg("device"))(block_job_pause)
    r("block-job-resume", Arg("device"))(block_job_resume)
    r("block-job-complete", Arg("device"))(block_job_complete)
    r("block-job-finalize", Arg("id"))(block_job_finalize)
    r("block-job-dismiss", Arg("id"))(block_job_dismiss)
    r("job-pause", Arg("id"))(job_pause)
    r("job-resume", Arg("id"))(job_resume)
    r("job-cancel", Arg("id"))(job_cancel)
    r("job-complete", Arg("id"))(job_complete)
    r("job-dismiss", Arg("id"))(job_dismiss)
    r("job-finalize", Arg("id"))(job_finalize)
    r("block-stream", opt("job-id"), Arg("device"), opt("base"), opt("base-node"), opt("backing-file"),
      opt("bottom"), *_JOB_COMMON)(block_stream)
    r("block-commit", opt("job-id"), Arg("device"), opt("base-node"), opt("base"), opt("top-node"), opt("top"),
      opt("backing-file"), *_JOB_COMMON)(block_commit)


def hmp_commit(ctx: CommandContext, device: str) -> str:
    """HMP ``commit device|all``: the offline commit QEMU runs without a job (``block-jobs.md`` §9).

    The active image's own data goes into its backing image (reopened
    read-write meanwhile), then the active image is emptied; the chain stays.
    Failures print QEMU's ``'commit' error for 'X': <strerror>`` (no ``Error:``).
    """
    import errno
    import os

    machine = ctx.machine
    if device == "all":
        targets = [d for d in machine.drives if d.medium is not None and d.medium.node.backing is not None]
    else:
        drive = machine.find_drive(device)
        if drive is None:
            return f"Device '{device}' not found\n"
        targets = [drive]
    for drive in targets:
        try:
            _commit_offline(machine, drive)
        except (OSError, VdkitError) as exc:
            code = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else errno.EIO
            # a read-only top cannot be emptied: QEMU reports why first (error_report), then the errno
            why = f"{exc.message}\n" if isinstance(exc, VdkitError) and code == errno.EPERM else ""
            return f"{why}'commit' error for '{device}': {os.strerror(code)}\n"
    return ""


def _commit_offline(machine: DeviceRegistry, drive: Drive) -> None:
    import errno

    from vdkit.block import io as bio
    from vdkit.block.commit import JOB_CHUNK, copy_down
    from vdkit.block.jobs import reopen_node

    if drive.medium is None or drive.medium.dead:
        raise VdkitError("No medium found", errno=errno.ENOMEDIUM)
    top = drive.medium.node
    base = top.backing
    if base is None:
        raise VdkitError("Operation not supported", errno=errno.ENOTSUP)
    if machine.jobs.job_on(top) is not None:
        raise VdkitError("Device or resource busy", errno=errno.EBUSY)
    if top.readonly:  # the top is emptied afterwards: it needs a writer
        raise VdkitError("Block node is read-only", errno=errno.EPERM)
    was_ro = base.readonly
    if was_ro:
        reopen_node(base, readonly=False)
    try:
        size = top.driver.virtual_size
        if base.driver.virtual_size < size:
            bio.truncate(base, size)
        offset = 0
        while offset < size:
            n, _ = copy_down(top, base, offset, min(JOB_CHUNK, size - offset), zero_writes=False)
            offset += n
        bio.flush(base)
        top.driver.make_empty()
        bio.flush(top)
    finally:
        if was_ro:
            reopen_node(base, readonly=True)
    machine.generation += 1
