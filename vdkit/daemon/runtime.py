"""The daemon's asyncio runtime: the only asyncio code in vdkit.

Listeners accept QMP and HMP connections; each connection task (the "upper
half") reads bytes, feeds them to its sans-I/O core
(:class:`vdkit.monitor.qmp_wire.QmpSession`, or the HMP line splitter here),
and hands each request to a worker thread (the "bottom half") that runs the
command handler with the device lock held.  Blocking image I/O therefore
never stalls the event loop, and the lock serialises all commands of all
clients.  Events a command raises are broadcast to every negotiated QMP
client *before* that command's response is written, as QEMU orders them.

Anything a handler raises that is not a :class:`~vdkit.errors.VdkitError` is
a bug: it is logged with its traceback and answered as a ``GenericError``, and
the daemon keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vdkit.daemon import nbd_export
from vdkit.devices.exports import Address
from vdkit.devices.registry import DeviceRegistry
from vdkit.errors import VdkitError
from vdkit.monitor.commands import CommandContext, CommandRegistry
from vdkit.monitor.hmp import run_line
from vdkit.monitor.qmp_wire import (
    NEED_DATA,
    InputError,
    QmpSession,
    Request,
    SessionState,
    format_event,
    version_info,
)

log = logging.getLogger(__name__)

READ_CHUNK = 65536
# commands that only read daemon state (all others invalidate cached renderings)
PURE_COMMANDS = frozenset({"query-block", "query-named-block-nodes", "query-blockstats", "query-snapshots",
                           "query-status", "query-version", "query-commands"})
HMP_MAX_LINE = 1 << 16
SWITCH_INTERVAL = 0.0005  # seconds: how long a thread may keep the GIL while another wants it (see serve)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _process_name(pid: int) -> str:
    """What QEMU prints for a signal's sender: its argv[0], from /proc."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode("utf-8", "replace")
    except OSError:
        return "<unknown process>"


PROG = "vdkit-daemon"


def error_report(message: str) -> None:
    """One line on stderr with the program's name, as QEMU's error_report prints."""
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def _hmp_bytes(text: str) -> bytes:
    """HMP output as bytes: undecodable input bytes (kept as surrogate escapes) go back out unchanged."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that did not come from the input
        return text.encode("utf-8", "replace")


@dataclass(eq=False)
class _QmpConn:
    session: QmpSession
    writer: asyncio.StreamWriter

    def send(self, data: bytes) -> None:
        if data and not self.writer.is_closing():
            log.debug("<-- %r", data[:200])
            self.writer.write(data)


@dataclass
class Daemon:
    machine: DeviceRegistry
    # every command the monitors answer (assembled by vdkit.daemon.main.build_registry)
    registry: CommandRegistry
    qmp_addrs: list[Address] = field(default_factory=list)
    hmp_addrs: list[Address] = field(default_factory=list)
    nbd_addrs: list[Address] = field(default_factory=list)
    _qmp_conns: set[_QmpConn] = field(default_factory=set)
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _unix_paths: list[str] = field(default_factory=list)
    _stop: asyncio.Event | None = None
    _nbd: nbd_export.NbdService | None = None

    # -- commands (bottom half: runs in a worker thread) ------------------------
    def _context(self, session: QmpSession | None = None) -> CommandContext:
        return CommandContext(self.machine, session, registry=self.registry)

    def _hmp_line(self, ctx: CommandContext, *, text: str) -> str:
        """One HMP command line run against the machine (what a monitor connection's worker calls)."""
        return run_line(self.registry, ctx, text)

    def _execute(self, fn: Callable[[CommandContext], Any], ctx: CommandContext, *, pure: bool = False) -> Any:
        with self.machine.lock:
            try:
                return fn(ctx)
            finally:
                if not pure:
                    self.machine.generation += 1  # whatever it did, cached renderings are stale

    def _query(self, fn: Callable[[CommandContext], Any], ctx: CommandContext, how: int) -> Any:
        """A pure query run as ``how`` says (:meth:`DeviceLock.acquire_query`), the hold ended after.

        Read beside a job's data I/O (``SHARED``), a query that fails is run
        again with the lock held (its answer then is the one the lock gives;
        a pure query changes nothing, so running it twice is harmless)."""
        lock = self.machine.lock
        try:
            return fn(ctx)
        except Exception:
            if how != lock.SHARED:
                raise
        finally:
            lock.end_query(how)
        return self._execute(fn, ctx, pure=True)

    def _wait_query(self, fn: Callable[[CommandContext], Any], ctx: CommandContext) -> Any:
        return self._query(fn, ctx, self.machine.lock.acquire_query())

    async def _run(self, fn: Callable[[CommandContext], Any], ctx: CommandContext, *, pure: bool = False) -> Any:
        # A query that finds the lock free, or a job moving data (DeviceLock's
        # I/O phase: it reads beside the job), runs right here: its answer is a
        # cached rendering plus a few stat() calls, and the thread hand-off
        # would cost more than the query.  A query that would have to wait
        # (a command in progress, a job between two I/O phases) waits in a
        # worker; so does anything else.
        if pure:
            how = self.machine.lock.acquire_query(blocking=False)
            if how == self.machine.lock.SHARED:
                try:
                    return fn(ctx)
                except Exception:  # (not run again here: the retry under the lock may wait)
                    pass
                finally:
                    self.machine.lock.end_query(how)
            elif how:
                return self._query(fn, ctx, how)
            return await asyncio.to_thread(self._wait_query, fn, ctx)
        return await asyncio.to_thread(self._execute, fn, ctx, pure=pure)

    def _broadcast(self, events: list[tuple[str, dict[str, Any] | None]]) -> None:
        for name, data in events:
            ev = format_event(name, data)
            for conn in list(self._qmp_conns):
                if conn.session.state is SessionState.COMMAND:
                    conn.send(QmpSession._line(ev))

    # -- QMP connection (upper half) -------------------------------------------------
    async def _qmp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _QmpConn(QmpSession(package=self.machine.package), writer)
        self._qmp_conns.add(conn)
        log.debug("QMP client connected")
        try:
            conn.send(conn.session.greeting())
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                log.debug("--> %r", data[:200])
                conn.session.receive_data(data)
                while (ev := conn.session.next_event()) is not NEED_DATA:
                    if isinstance(ev, InputError):
                        conn.send(conn.session.input_error(ev))
                    else:
                        await self._qmp_request(conn, ev)
                    if self.machine.shutdown_requested:
                        break
                await writer.drain()
                if self.machine.shutdown_requested:
                    self._request_stop()
                    # stay connected until shutdown closes the connection: the events of the jobs it
                    # cancels still reach this client, as QEMU's do
                    await asyncio.get_running_loop().create_future()
        except (ConnectionError, OSError) as exc:
            log.debug("QMP client gone: %s", exc)
        finally:
            self._qmp_conns.discard(conn)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _qmp_request(self, conn: _QmpConn, req: Request) -> None:
        session = conn.session
        ctx = self._context(session)
        negotiated = session.state is SessionState.COMMAND

        def run(c: CommandContext) -> Any:
            return self.registry.dispatch(c, req.name, req.arguments, oob=req.oob, negotiated=negotiated)

        try:
            result = await self._run(run, ctx, pure=req.name in PURE_COMMANDS)
        except VdkitError as exc:
            self._broadcast(ctx.events)
            conn.send(session.error(exc.qmp_class, exc.message, id=req.id, has_id=req.has_id))
            return
        except Exception as exc:  # a bug: log it, answer, keep serving
            log.exception("internal error in %s", req.name)
            self._broadcast(ctx.events)
            conn.send(session.error("GenericError", f"internal error: {exc}", id=req.id, has_id=req.has_id))
            return
        self._broadcast(ctx.events)
        conn.send(session.reply(req, result))
        self._broadcast(ctx.late_events)  # events QEMU sends after the answer (a busy export's deletion)

    # -- HMP connection ------------------------------------------------------------------
    async def _hmp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Line mode: no echo or cursor control; output, then the ``(qemu) `` prompt."""
        v = version_info(self.machine.package)["qemu"]
        writer.write(f"QEMU {v['major']}.{v['minor']}.{v['micro']} monitor - type 'help' for more "
                     f"information\r\n(qemu) ".encode())
        buf = b""
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                buf += data
                # a line ends at \n, \r or \r\n (a trailing \r waits for a possible \n)
                complete = buf if not buf.endswith(b"\r") else buf[:-1]
                lines = complete.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
                buf = lines.pop() + buf[len(complete):]
                if len(buf) > HMP_MAX_LINE:
                    buf = b""
                    writer.write(b"line too long\r\n(qemu) ")
                for line in lines:
                    text = line.decode("utf-8", "surrogateescape")  # bytes echo back as QEMU echoes them
                    ctx = self._context()
                    try:
                        out = await self._run(functools.partial(self._hmp_line, text=text), ctx)
                    except Exception as exc:  # a bug
                        log.exception("internal error in HMP %r", text)
                        out = f"Error: internal error: {exc}\r\n"
                    self._broadcast(ctx.events)
                    writer.write(_hmp_bytes(out) + b"(qemu) ")
                    self._broadcast(ctx.late_events)  # after the answer (a busy export's deletion)
                    await writer.drain()
                    if self.machine.shutdown_requested:
                        self._request_stop()
                        return
        except (ConnectionError, OSError) as exc:
            log.debug("HMP client gone: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- listeners and lifecycle -------------------------------------------------------
    def _track(self, coro_fn: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]) -> Callable[..., None]:
        def cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(coro_fn(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return cb

    async def _listen(self, addr: Address, handler: Callable[..., None]) -> None:
        if addr.kind == "unix":
            # bind and listen under a temporary name, then rename: the path
            # appears only once connections are accepted, already mode 0600
            tmp = f"{addr.path}.{os.getpid()}.tmp"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                nbd_export.bind_private(sock, tmp)
                sock.listen(128)
                os.replace(tmp, addr.path)
            except BaseException:
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            server = await asyncio.start_unix_server(handler, sock=sock)
            self._unix_paths.append(addr.path)
        else:
            server = await asyncio.start_server(handler, host=addr.host, port=addr.port, reuse_address=True)
        self._servers.append(server)

    async def start(self) -> None:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # events met in worker/NBD threads (qcow2 corruption) go out from the loop, in order
        def event_sink(events: list[tuple[str, dict[str, Any] | None]]) -> None:
            loop.call_soon_threadsafe(self._broadcast, events)

        self.machine.event_sink = event_sink
        # NBD first: a -nbd address that cannot be bound leaves no monitor socket behind
        self._nbd = await nbd_export.attach(self.machine, self.nbd_addrs)
        for a in self.qmp_addrs:
            await self._listen(a, self._track(self._qmp_client))
        for a in self.hmp_addrs:
            await self._listen(a, self._track(self._hmp_client))

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _on_signal(self, signo: int, pid: int = 0) -> None:
        if not self.machine.shutdown_requested:
            # QEMU's line on stderr, naming the sender when the kernel told us who it was
            sender = f" from pid {pid} ({_process_name(pid)})" if pid else ""
            error_report(f"terminating on signal {signo}{sender}")
            self.machine.shutdown_requested = "host-signal"
            from vdkit.monitor.machine_cmds import shutdown_events

            self._broadcast(list(shutdown_events(self.machine, "host-signal")))
        self._request_stop()

    def _watch_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take the stop signals with ``sigwaitinfo``, which tells the sender's pid (a handler does not).

        The signals are blocked in this thread and in every thread started
        after it (threads inherit the mask), so the kernel hands them to
        ``sigwaitinfo``; the loop's handlers stay as a fallback for a thread
        that existed before.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

        def wait() -> None:
            while True:
                info = signal.sigwaitinfo(STOP_SIGNALS)
                try:
                    loop.call_soon_threadsafe(self._on_signal, info.si_signo, info.si_pid)
                except RuntimeError:  # the loop has closed: shutdown is under way already
                    return

        threading.Thread(target=wait, name="signals", daemon=True).start()

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        # The event loop must get the interpreter soon after a client's bytes arrive, also while a job's
        # thread runs Python: at the default 5 ms switch interval it waited for that thread's turn, which
        # on a busy machine made a query during a stream several times slower (median 7-12 ms against
        # 2-3 ms at 0.5 ms).  Threads that wait in system calls are not affected; without a second
        # runnable thread nothing switches.
        sys.setswitchinterval(SWITCH_INTERVAL)
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._watch_signals(loop)
        await self.start()
        if ready is not None:
            ready()
        assert self._stop is not None
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        for s in self._servers:
            s.close()
        # running jobs are cancelled first, as QEMU does on its way out: their events still reach the
        # clients, and they end before their images close
        await asyncio.to_thread(self.machine.jobs.cancel_all)
        await asyncio.sleep(0)  # the events the job threads queued go out before the writers drain
        for conn in list(self._qmp_conns):
            with contextlib.suppress(Exception):
                await conn.writer.drain()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self._nbd is not None:
            self._nbd.close_all()
        with self.machine.lock:
            self.machine.close_all()
