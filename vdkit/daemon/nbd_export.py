"""NBD exports of the daemon's drives: the listener and client connections.

The daemon's side of the export service (:class:`vdkit.devices.exports.ExportService`);
the QMP commands that drive it live in :mod:`vdkit.monitor.nbd_cmds`.  Three
parts, labelled as in ``runtime.py``:

* **Service calls** (from QMP handlers: worker thread, device lock held)
  change the :class:`NbdService` tables directly; the listener socket is
  bound by the call (so bind errors are the command's) and its accept task is
  handed to the event loop thread-safely; clients are hung up with
  ``shutdown()``.
* **Accept task** (event loop): accepts clients and gives each its own
  connection thread.
* **Connection thread** (one per client, blocking socket): reads bytes,
  feeds the sans-I/O :class:`vdkit.nbd.server.NbdServer`, waits while the
  VM is ``paused`` (``stop`` quiesces I/O until ``cont``) and while the
  drive's throttle group says so, runs each batch of requests under the
  device lock (so ``savevm``/``transaction``/``query-block`` only ever see
  drained I/O) and writes the replies.  Every request is accounted to the
  drive's ``query-blockstats`` counters.

  Why a thread per client rather than a connection task handing each batch
  to ``asyncio.to_thread``: on a loaded machine every thread hand-off costs
  a scheduler slice, and the task/worker/task round trip made a 4 KiB
  request ~15x slower than QEMU's; one thread that reads, runs and answers
  needs a single wake-up per request.  The event loop never blocks on NBD.

Decisions: ``-nbd unix:PATH|tcp:HOST:PORT`` starts the server at start-up
and exports every drive that has a medium under its drive id (writable
unless the drive is read-only).  An export is bound to the medium it was
created on; if that medium is ejected or changed, requests fail with EIO
and an export made by ``nbd-server-add`` is removed (QEMU's on-eject rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vdkit.block import io as bio
from vdkit.block.copy import plain_file
from vdkit.block.driver import OFFSET_VALID
from vdkit.devices import iostats
from vdkit.devices.exports import ExportEntry, RemovedExport
from vdkit.devices.throttle import Throttle
from vdkit.errors import VdkitError
from vdkit.nbd import wire as w
from vdkit.nbd.server import (
    ALLOCATION_DEPTH_ID,
    BASE_ALLOCATION_ID,
    BITMAP_ID_BASE,
    MAX_EXTENTS,
    NEED_DATA,
    Closed,
    ExportChosen,
    ExportInfo,
    NbdServer,
    Request,
)

if TYPE_CHECKING:
    import concurrent.futures

    from vdkit.block.dirty_bitmap import DirtyBitmap
    from vdkit.devices.exports import Address
    from vdkit.devices.registry import DeviceRegistry, Drive, Medium

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
SPARSE_READ_MIN = 65536  # smaller reads go out as one data chunk (a status walk costs more than it saves)
PAUSE_POLL_S = 0.02
_CHANGES = (w.CMD_WRITE, w.CMD_WRITE_ZEROES, w.CMD_TRIM, w.CMD_FLUSH)
_KINDS = {w.CMD_READ: iostats.READ, w.CMD_WRITE: iostats.WRITE, w.CMD_WRITE_ZEROES: iostats.WRITE,
          w.CMD_FLUSH: iostats.FLUSH, w.CMD_TRIM: iostats.UNMAP}
STATUS_WINDOW = 64 << 20  # how far one block-status walk looks ahead for the following reads
STATUS_BACK = 1 << 20  # how far below a kept run a walk may start (see NbdService._status)
SEND_AFTER = 1 << 20  # reply bytes a connection sends before running more of its batch


@dataclass(eq=False)
class _Conn:
    core: NbdServer
    sock: socket.socket
    export: Export | None = None
    # the last block-status run this connection's reads walked (see NbdService._status)
    status: tuple[int, Any, int, int, int, str | None, int] | None = None
    # reply bytes not sent yet, in order (see _queue_out)
    outq: list[memoryview] = field(default_factory=list)
    outq_bytes: int = 0


@dataclass(eq=False)
class Export:
    id: str
    name: str
    medium: Medium
    writable: bool
    description: str = ""
    on_eject_drive: str | None = None  # nbd-server-add: removed when this drive's medium goes
    conns: set[_Conn] = field(default_factory=set)
    # a -blockdev node's export: the unnamed backend standing in for a drive (stats, no throttling)
    backend: Drive | None = None
    # dirty bitmaps served as qemu:dirty-bitmap:NAME contexts (busy while exported)
    bitmaps: list[DirtyBitmap] = field(default_factory=list)
    allocation_depth: bool = False  # the qemu:allocation-depth context is served

    @property
    def node_name(self) -> str:
        return self.medium.node_name


def bind_private(sock: socket.socket, path: str) -> None:
    """Bind a unix socket whose file is mode 0600 from the moment it exists (docs/daemon.md).

    Why not umask: it is process-wide, and the QMP handlers that bind run in worker threads while
    other threads create files.  Linux gives the socket file the mode of the socket's own inode
    (less the umask), so an ``fchmod`` before ``bind`` leaves no window; the ``chmod`` after it
    covers systems where it does not.
    """
    os.fchmod(sock.fileno(), 0o600)
    sock.bind(path)
    try:
        os.chmod(path, 0o600)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


class NbdService:
    """The daemon's one NBD server: listener, exports, throttle state (an ``ExportService``)."""

    def __init__(self, machine: DeviceRegistry, loop: asyncio.AbstractEventLoop) -> None:
        self.machine = machine
        self.loop = loop
        self.server: socket.socket | None = None
        self._accept_task: concurrent.futures.Future[None] | None = None
        self.unix_path: str | None = None
        self.exports: list[Export] = []  # creation order
        self._throttles: dict[str, tuple[dict[str, int], Throttle]] = {}
        self._throttle_lock = threading.Lock()
        self._conns: set[_Conn] = set()

    # -- catalogue for the protocol core (connection threads) ---------------------------------------------
    def _find(self, name: str) -> Export | None:
        for e in self.exports:
            if e.name == name:
                return e
        return None

    def _info(self, e: Export) -> ExportInfo:
        node = e.medium.node
        return ExportInfo(e.name, node.driver.virtual_size, readonly=not e.writable or e.medium.ro,
                          description=e.description, bitmaps=tuple(b.name or "" for b in e.bitmaps),
                          allocation_depth=e.allocation_depth)

    def lookup(self, name: str) -> ExportInfo | None:
        e = self._find(name)
        return None if e is None else self._info(e)

    def listing(self) -> list[ExportInfo]:
        return [self._info(e) for e in self.exports]

    # -- ExportService (QMP handlers, worker thread, device lock held) ------------------------------------
    @property
    def running(self) -> bool:
        return self.server is not None

    def list_exports(self) -> list[ExportEntry]:
        return [ExportEntry(e.id, e.name, e.node_name, e.medium.node) for e in self.exports]

    def start(self, addr: Address) -> None:
        """Bind the listener here (so bind errors are the command's), accept on the event loop."""
        if self.server is not None:
            raise VdkitError("NBD server already running")
        if addr.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with contextlib.suppress(FileNotFoundError):
                    if os.path.exists(addr.path) and not os.path.isdir(addr.path):
                        os.unlink(addr.path)
                bind_private(sock, addr.path)
            except OSError as exc:
                sock.close()
                raise VdkitError(f"Failed to bind socket to {addr.path}: {os.strerror(exc.errno or 0)}") from None
        else:
            try:
                infos = socket.getaddrinfo(addr.host or None, addr.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise VdkitError(f"address resolution failed for {addr.host}:{addr.port}: {exc.strerror}") from None
            family, _, _, _, sa = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sa)
            except OSError as exc:
                sock.close()
                raise VdkitError(f"Failed to bind socket: {os.strerror(exc.errno or 0)}") from None
        sock.listen(128)
        sock.setblocking(False)
        self.server = sock
        self.unix_path = addr.path if addr.kind == "unix" else None
        self._accept_task = asyncio.run_coroutine_threadsafe(self._accept(sock), self.loop)

    def stop(self) -> list[RemovedExport]:
        if self.server is None:
            raise VdkitError("NBD server not running")
        removed = [self._delete(e) for e in list(self.exports)]
        self._close_listener()
        if self.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
            self.unix_path = None
        return removed

    def check_name(self, name: str, description: str = "") -> None:
        """The checks a new export's name and description meet before anything else about it."""
        if self.server is None:
            raise VdkitError("NBD server not running")
        if len(name.encode()) > w.MAX_STRING:
            raise VdkitError(f"export name '{name}' too long")
        if len(description.encode()) > w.MAX_STRING:
            raise VdkitError(f"description '{description}' too long")
        if self._find(name) is not None:
            raise VdkitError(f"NBD server already has export named '{name}'")

    def add(self, *, id: str, medium: Medium, name: str, writable: bool, description: str = "",
            on_eject_drive: str | None = None, backend: Drive | None = None,
            bitmaps: list[DirtyBitmap] | None = None, allocation_depth: bool = False) -> None:
        """The NBD side of adding an export (the monitor checked the id is well-formed and free, and
        that the bitmaps may be exported: they are busy until the export goes, as in QEMU)."""
        self.check_name(name, description)
        exp = Export(id, name, medium, writable, description, on_eject_drive, backend=backend,
                     bitmaps=list(bitmaps or ()), allocation_depth=allocation_depth)
        for bm in exp.bitmaps:
            bm.busy = True
        self.exports.append(exp)

    def remove(self, id: str, mode: str) -> RemovedExport:
        exp = next((e for e in self.exports if e.id == id), None)
        if exp is None:
            raise VdkitError(f"Export '{id}' is not found")
        if mode == "safe" and exp.conns:
            raise VdkitError(f"export '{id}' still in use", hint="Use mode='hard' to force client disconnect")
        return self._delete(exp)

    def remove_for_medium(self, drive_id: str, medium: Medium) -> list[RemovedExport]:
        return [self._delete(e) for e in list(self.exports) if e.medium is medium and e.on_eject_drive == drive_id]

    def _delete(self, exp: Export) -> RemovedExport:
        self.exports.remove(exp)
        for bm in exp.bitmaps:
            bm.busy = False
        busy = bool(exp.conns)
        for conn in list(exp.conns):
            self._hang_up(conn)
        exp.conns.clear()
        return RemovedExport(exp.id, busy)

    @staticmethod
    def _hang_up(conn: _Conn) -> None:
        # wakes the connection thread's recv(); it closes the socket on its way out
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)

    def _close_listener(self) -> None:
        server, self.server = self.server, None
        task, self._accept_task = self._accept_task, None
        if task is not None:
            task.cancel()  # a concurrent future: cancels the accept task on the loop
        if server is not None:
            self.loop.call_soon_threadsafe(server.close)

    def close_all(self) -> None:
        """Daemon shutdown: drop the listener and every client."""
        self.exports.clear()
        self._close_listener()
        for conn in list(self._conns):
            self._hang_up(conn)
        if self.unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)

    def _current_drive(self, exp: Export) -> Drive | None:
        for d in self.machine.drives:
            if d.medium is exp.medium:
                return d
        return exp.backend

    def _throttle(self, drive: Drive) -> Throttle | None:
        cfg = drive.throttle
        if not cfg.enabled:
            return None
        key = drive.group or drive.id
        state = cfg.to_state()
        cached = self._throttles.get(key)
        if cached is None or cached[0] != state:
            cached = (state, Throttle.from_config(cfg))
            self._throttles[key] = cached
        return cached[1]

    # -- accept task (event loop) ------------------------------------------------------------------
    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as exc:  # listener closed
                log.debug("NBD listener closed: %s", exc)
                return
            client.setblocking(True)
            conn = _Conn(NbdServer(self.lookup, self.listing), client)
            self._conns.add(conn)
            threading.Thread(target=self._connection, args=(conn,), name="nbd-client", daemon=True).start()

    # -- connection thread ------------------------------------------------------------------------
    def _connection(self, conn: _Conn) -> None:
        log.debug("NBD client connected")
        sock, core = conn.sock, conn.core
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        poller = select.poll()
        polling = False
        try:
            sock.sendall(core.greeting())
            while True:
                # Replies still queued: take the client's next requests as they come while the
                # rest drains (it reads them as it sends more), rather than blocking in send.
                if conn.outq:
                    if not polling:
                        poller.register(sock, select.POLLIN | select.POLLOUT)
                        polling = True
                    ready = 0
                    for _, got in poller.poll():
                        ready |= got
                    if ready & select.POLLOUT:
                        _push(conn, block=False)
                    if not ready & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        continue
                    try:
                        n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                else:
                    n = sock.recv_into(buf)
                if not n:
                    break
                log.debug("--> %d bytes", n)
                core.receive_data(view[:n])  # copied into the core's buffer
                batch: list[Request] = []
                closed = False
                while (ev := core.next_event()) is not NEED_DATA:
                    if isinstance(ev, Closed):
                        log.debug("NBD client closing: %s", ev.reason)
                        closed = True
                        break
                    if isinstance(ev, ExportChosen):
                        exp = self._find(ev.export.name)
                        if exp is None:  # removed while haggling
                            closed = True
                            break
                        conn.export = exp
                        exp.conns.add(conn)
                    else:
                        assert isinstance(ev, Request)
                        batch.append(ev)
                out = core.data_to_send()
                if out:
                    _queue_out(conn, [out])
                if batch:
                    self._serve(conn, batch)
                if closed or conn.export is not None and conn.export not in self.exports:
                    break
            _push(conn, block=True)
        except OSError as exc:
            log.debug("NBD client gone: %s", exc)
        except Exception:  # a bug: log it, drop this client, keep serving the others
            log.exception("NBD connection failed")
        finally:
            self._conns.discard(conn)
            if conn.export is not None:
                conn.export.conns.discard(conn)
            sock.close()

    def _serve(self, conn: _Conn, batch: list[Request]) -> None:
        """Run ``batch`` in order: wait for ``cont`` and the throttle, then the I/O under the lock."""
        exp = conn.export
        assert exp is not None
        while batch:
            if self.machine.run_state == "paused" or self._throttles:
                _push(conn, block=True)  # what is answered leaves before any wait
            while self.machine.run_state == "paused" and exp in self.exports:
                time.sleep(PAUSE_POLL_S)
            drive = self._current_drive(exp)
            throttle = self._throttle(drive) if drive is not None else None
            if throttle is not None:
                req = batch[0]
                is_write = req.cmd in (w.CMD_WRITE, w.CMD_WRITE_ZEROES)
                while True:
                    with self._throttle_lock:  # a group is shared by every client of its drives
                        wait = throttle.wait_ns(is_write, time.monotonic_ns())
                        if wait <= 0:
                            if req.cmd in (w.CMD_READ, w.CMD_WRITE, w.CMD_WRITE_ZEROES):
                                throttle.account(is_write, req.length)
                            break
                    time.sleep(wait / 1e9)
                todo = batch[:1]
            else:
                todo = batch
            replies, done = self._run_batch(conn, exp, todo)
            _queue_out(conn, replies)
            batch = todo[done:] + batch[len(todo):]

    # -- I/O (connection thread, device lock) -----------------------------------------------------------------------
    def _run_batch(self, conn: _Conn, exp: Export, batch: list[Request]) -> tuple[list[bytes], int]:
        """Execute requests under the device lock; stops early (count returned) if the VM got paused.

        Returns the reply buffers (a read's data is its own buffer, sent without copying).  Also
        stops once ``SEND_AFTER`` bytes of replies are ready: the client gets them (and sends its
        next requests) while the rest runs, and other connections take the lock in between,
        instead of a whole pipeline's data being read before its first byte leaves.
        """
        replies: list[bytes] = []
        ready = 0
        with self.machine.lock:
            if exp not in self.exports:  # deleted (hard) while these waited: drop them, as QEMU does
                return [], len(batch)
            drive = self._current_drive(exp)
            try:
                for i, req in enumerate(batch):
                    if self.machine.run_state == "paused" or ready >= SEND_AFTER:
                        return replies, i
                    out = self._one(conn.core, exp, drive, req, conn)
                    replies += out
                    ready += sum(len(b) for b in out)
            finally:
                if any(r.cmd in _CHANGES for r in batch):
                    self.machine.generation += 1  # cached query-block renderings are stale
        return replies, len(batch)

    def _one(self, core: NbdServer, exp: Export, drive: Drive | None, req: Request,
             conn: _Conn | None = None) -> list[bytes]:
        kind = _KINDS.get(req.cmd)
        if drive is None:
            return [core.reply_error(req.handle, w.EIO, "export's medium is gone")]
        node = exp.medium.node
        start = time.monotonic_ns()
        try:
            if req.cmd == w.CMD_READ and core.structured and not req.flags & w.CMDFLAG_DF \
                    and req.length >= SPARSE_READ_MIN:
                reply = core.reply_read_sparse(req, self._sparse_pieces(node, req, conn))
            elif req.cmd == w.CMD_READ:
                data = bio.read(node, req.offset, req.length)
                reply = [core.reply_read_header(req), data]
            elif req.cmd == w.CMD_BLOCK_STATUS:
                reply = [core.reply_block_status(req, [
                    (cid, self._extents(node, req) if cid == BASE_ALLOCATION_ID
                     else _depth_extents(node, req) if cid == ALLOCATION_DEPTH_ID
                     else _bitmap_extents(exp.bitmaps[cid - BITMAP_ID_BASE], req))
                    for cid in core.meta_contexts])]
            elif req.cmd == w.CMD_CACHE:
                reply = [core.reply_ok(req)]
            else:
                if conn is not None:
                    conn.status = None  # the mapping may change: the next read walks afresh
                if req.cmd == w.CMD_WRITE:
                    bio.write(node, req.offset, req.data)
                elif req.cmd == w.CMD_WRITE_ZEROES:
                    if (req.flags & w.CMDFLAG_FAST_ZERO and req.flags & w.CMDFLAG_NO_HOLE
                            and node.driver.slow_allocated_zeroes):
                        # the driver can only write these zeros slowly: tell the client to fall back
                        return [core.reply_error(req.handle, w.ENOTSUP, "fast zeroing not possible")]
                    bio.write_zeroes(node, req.offset, req.length, unmap=not req.flags & w.CMDFLAG_NO_HOLE)
                elif req.cmd == w.CMD_TRIM:
                    bio.discard(node, req.offset, req.length)
                if req.cmd == w.CMD_FLUSH or req.flags & w.CMDFLAG_FUA:
                    bio.flush(node)
                reply = [core.reply_ok(req)]
        except (OSError, VdkitError) as exc:
            log.warning("NBD %s at %d+%d failed: %s", req.name, req.offset, req.length, exc)
            if kind is not None:
                drive.stats.done(kind, req.length, start, ok=False)
            code = getattr(exc, "errno", None)
            err = w.ENOSPC if code == _errno.ENOSPC else w.EPERM if code in (_errno.EPERM, _errno.EROFS) else w.EIO
            if code == _errno.ENOMEDIUM:  # a node killed by a corruption event; NBD has no such code (QEMU: EINVAL)
                err = w.EINVAL
            return [core.reply_error(req.handle, err, str(exc))]
        if kind is not None:
            nbytes = 0 if kind == iostats.FLUSH else req.length
            drive.stats.done(kind, nbytes, start, end_offset=req.offset + req.length)
        return reply

    def _status(self, node: Any, pos: int, conn: _Conn | None) -> tuple[int, int, str | None, int]:
        """``(end, flags, host file, host offset - guest offset)`` of the chain's status run at ``pos``.

        Reads come in sequences (a copy, a guest's streaming read), so a run is asked for up
        to ``STATUS_WINDOW`` bytes and kept on the connection: the next requests inside it walk
        no status at all.  It is valid only while nothing changed: the device lock is held, and
        every change bumps ``machine.generation`` before releasing it (this connection's own
        writes drop it at once, in :meth:`_one`).
        """
        gen = self.machine.generation
        c = conn.status if conn is not None else None
        if c is not None and c[0] == gen and c[1] is node:
            if c[2] <= pos < c[3]:
                return c[3], c[4], c[5], c[6]
            # A client's parallel requests often arrive highest offset first (qemu-img's do):
            # just below the kept run, walk up from further below once, so that the run kept
            # starts low enough for the requests still to come.
            q = max(0, c[2] - STATUS_BACK) if c[2] - STATUS_BACK <= pos < c[2] else pos
        else:
            q = pos
        size = node.driver.virtual_size
        for _ in range(4):
            st = bio.above_status(node, q, max(1, min(size - q, STATUS_WINDOW)))
            n = st.length if st.length > 0 else max(1, size - q)
            if q + n > pos:
                break
            q += n
        else:  # fragmented below: ask at pos itself
            q = pos
            st = bio.above_status(node, q, max(1, min(size - q, STATUS_WINDOW)))
            n = st.length if st.length > 0 else max(1, size - q)
        file = st.file if st.flags & OFFSET_VALID else None
        delta = st.offset - q if file is not None else 0
        if conn is not None:
            conn.status = (gen, node, q, q + n, st.flags, file, delta)
        return q + n, st.flags, file, delta

    def _sparse_pieces(self, node: Any, req: Request, conn: _Conn | None = None) -> list[tuple[int, int, bytes | None]]:
        """The request as runs of data (read) and holes (ranges the chain reads as zeros), as QEMU sends.

        A data run that block status places in a plain local file (a raw image, a qcow2 data
        cluster run) is read from that file at its host offset: one ``pread`` into a fresh bytes
        object, without the format's read path (the walk has just answered where the bytes are,
        and the device lock keeps them there until the read is done).
        """
        runs: list[list[Any]] = []  # [offset, length, is_hole, [data parts]]
        pos, end = req.offset, req.offset + req.length
        while pos < end:
            run_end, flags, file, delta = self._status(node, pos, conn)
            n = min(run_end, end) - pos
            hole = bool(flags & bio.ZERO)
            part = None
            if not hole:
                f = plain_file(node, file) if file else None
                part = f.pread(pos + delta, n) if f is not None else bio.read(node, pos, n)
            if runs and runs[-1][2] == hole:
                runs[-1][1] += n
                runs[-1][3].append(part)
            else:
                runs.append([pos, n, hole, [part]])
            pos += n
        return [(off, n, None if hole else parts[0] if len(parts) == 1 else b"".join(parts))
                for off, n, hole, parts in runs]

    @staticmethod
    def _extents(node: Any, req: Request) -> list[tuple[int, int]]:
        """base:allocation extents: HOLE where the chain has no data, ZERO where it reads zeros."""
        out: list[tuple[int, int]] = []
        pos, end = req.offset, req.offset + req.length
        while pos < end and len(out) < 4096:
            st = bio.above_status(node, pos, end - pos)
            if st.length <= 0:
                break
            flags = (0 if st.flags & bio.DATA else w.STATE_HOLE) | (w.STATE_ZERO if st.flags & bio.ZERO else 0)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + st.length, flags)
            elif out and req.flags & w.CMDFLAG_REQ_ONE:
                break  # one extent: as long as the status stays the same (across layers too, as QEMU's)
            else:
                out.append((st.length, flags))
            pos += st.length
        return [(min(length, 0xFFFFFFFF), f) for length, f in out]


def _depth_extents(node: Any, req: Request) -> list[tuple[int, int]]:
    """qemu:allocation-depth extents: the layer that allocates each range, counted from 1 at the top
    (zero clusters included), 0 where no layer does; at most ``MAX_EXTENTS``, one with ``REQ_ONE``."""
    out: list[tuple[int, int]] = []
    limit = 1 if req.flags & w.CMDFLAG_REQ_ONE else MAX_EXTENTS
    for entry in bio.map_entries(node, req.offset, req.offset + req.length):
        depth = entry.depth + 1 if entry.present else 0
        if out and out[-1][1] == depth:
            out[-1] = (out[-1][0] + entry.length, depth)
            continue
        if len(out) >= limit:
            break
        out.append((entry.length, depth))
    return out


def _bitmap_extents(bm: DirtyBitmap, req: Request) -> list[tuple[int, int]]:
    """qemu:dirty-bitmap extents: ``STATE_DIRTY`` over the granules the bitmap marks, clipped to the
    request (a range past the bitmap's disk reads clean); at most ``MAX_EXTENTS``, one with ``REQ_ONE``."""
    out: list[tuple[int, int]] = []
    pos, end = req.offset, req.offset + req.length
    limit = 1 if req.flags & w.CMDFLAG_REQ_ONE else MAX_EXTENTS
    for off, n in bm.dirty_runs(pos, end):
        if off > pos:
            out.append((off - pos, 0))
        if len(out) < limit:
            out.append((n, w.STATE_DIRTY))
        pos = off + n
        if len(out) >= limit:
            return out[:limit]
    if pos < end:
        out.append((end - pos, 0))
    return out


_IOV_MAX = 1024


OUT_LIMIT = 2 << 20  # queued reply bytes above which a connection waits for its client to read


def _queue_out(conn: _Conn, bufs: list[bytes]) -> None:
    """Queue replies in order and send what the socket takes now (all of it past ``OUT_LIMIT``)."""
    for b in bufs:
        if len(b):
            mv = memoryview(b)
            conn.outq.append(mv)
            conn.outq_bytes += mv.nbytes
    _push(conn, block=conn.outq_bytes > OUT_LIMIT)


def _push(conn: _Conn, *, block: bool) -> None:
    """Send queued replies, gathered into as few ``sendmsg`` calls as possible (no joining copies);
    without ``block``, only what the socket takes without waiting."""
    q = conn.outq
    flags = 0 if block else socket.MSG_DONTWAIT
    while q:
        try:
            n = conn.sock.sendmsg(q[:_IOV_MAX], [], flags)
        except BlockingIOError:
            return
        conn.outq_bytes -= n
        done = 0
        while done < len(q) and n >= q[done].nbytes:
            n -= q[done].nbytes
            done += 1
        del q[:done]
        if n:
            q[0] = q[0][n:]


# -- daemon hooks -------------------------------------------------------------------------------------


async def attach(machine: DeviceRegistry, addrs: list[Address]) -> NbdService:
    """Daemon start (event loop): create the service, hand it to the machine; ``-nbd`` exports every
    drive with a medium."""
    svc = NbdService(machine, asyncio.get_running_loop())
    machine.exports = svc
    for addr in addrs:
        try:
            await asyncio.to_thread(_start_from_cli, svc, machine, addr)
        except VdkitError as exc:  # the daemon reports start-up OSErrors as "could not listen"
            raise OSError(0, exc.message) from None
    return svc


def _start_from_cli(svc: NbdService, machine: DeviceRegistry, addr: Address) -> None:
    with machine.lock:
        svc.start(addr)
        for d in machine.drives:
            if d.medium is not None:
                svc.add(id=d.id, medium=d.medium, name=d.id, writable=not d.medium.ro, on_eject_drive=d.id)
