"""Sans-I/O NBD server core: fixed-newstyle handshake, option haggling, transmission.

The core never touches a socket, asyncio or the block layer.  The runtime
feeds it bytes (:meth:`NbdServer.receive_data`), pulls events
(:meth:`NbdServer.next_event`) and writes back what :meth:`data_to_send`
and the ``reply_*`` builders return.  Everything the protocol can decide on
its own is decided here, so the runtime only sees *valid* I/O requests:

* the handshake and every option (``EXPORT_NAME``, ``ABORT``, ``LIST``,
  ``INFO``, ``GO``, ``STRUCTURED_REPLY``, ``LIST_META_CONTEXT`` and
  ``SET_META_CONTEXT`` with ``base:allocation``, ``qemu:allocation-depth`` and
  ``qemu:dirty-bitmap:NAME``; the rest get
  ``NBD_REP_ERR_UNSUP``/``_POLICY``) produce their replies internally;
* malformed or forbidden requests (bad flags, out of bounds, read-only,
  too large, unknown command, block status without a negotiated context)
  are answered with the NBD error QEMU uses and never reach the runtime;
* a protocol violation the connection cannot recover from (bad magic, an
  unknown export after ``NBD_OPT_EXPORT_NAME``, absurd option length)
  yields :class:`Closed`, after which the runtime sends what is pending and
  hangs up.

The export catalogue is two callables, so exports added or removed while a
client haggles are seen at the moment of each option, as in QEMU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from vdkit.nbd import wire as w

# Context ids as QEMU numbers them (a client may compare them across servers): base:allocation 0,
# qemu:allocation-depth 1, the export's bitmaps from 2 in the export's order
BASE_ALLOCATION_ID = 0
ALLOCATION_DEPTH_ID = 1
BITMAP_ID_BASE = 2
MAX_EXTENTS = (1 << 20) // w.EXTENT.size  # extents in one context's block status chunk (1 MiB, as QEMU)


@dataclass(frozen=True)
class ExportInfo:
    """What a client may learn about an export before transmission."""

    name: str
    size: int
    readonly: bool
    description: str = ""
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = w.MAX_PAYLOAD
    # exported dirty bitmaps, in order: the ``qemu:dirty-bitmap:NAME`` contexts (ids from BITMAP_ID_BASE)
    bitmaps: tuple[str, ...] = ()
    allocation_depth: bool = False  # the qemu:allocation-depth context is served

    def context_name(self, cid: int) -> str:
        if cid == BASE_ALLOCATION_ID:
            return w.BASE_ALLOCATION
        if cid == ALLOCATION_DEPTH_ID:
            return w.ALLOCATION_DEPTH
        return w.DIRTY_BITMAP + self.bitmaps[cid - BITMAP_ID_BASE]

    def transmission_flags(self, *, structured: bool) -> int:
        # every request is served under one lock straight to the image file,
        # so a flush on one connection covers writes completed on all: multi-conn is safe
        flags = (w.TFLAG_HAS_FLAGS | w.TFLAG_SEND_FLUSH | w.TFLAG_SEND_FUA | w.TFLAG_SEND_CACHE
                 | w.TFLAG_CAN_MULTI_CONN)
        if self.readonly:
            flags |= w.TFLAG_READ_ONLY
        else:
            flags |= w.TFLAG_SEND_TRIM | w.TFLAG_SEND_WRITE_ZEROES | w.TFLAG_SEND_FAST_ZERO
        if structured:
            flags |= w.TFLAG_SEND_DF
        return flags


@dataclass(frozen=True)
class Request:
    """A valid transmission request for the runtime to execute."""

    cmd: int
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes = b""

    @property
    def name(self) -> str:
        return w.CMD_NAMES.get(self.cmd, str(self.cmd))


@dataclass(frozen=True)
class ExportChosen:
    """Option haggling ended: transmission on ``export`` starts."""

    export: ExportInfo


@dataclass(frozen=True)
class Closed:
    """The connection is over (client ``DISC``/``ABORT``, or a protocol violation)."""

    reason: str


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
Event = Request | ExportChosen | Closed | _NeedData


class Phase(Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


_VALID_CMD_FLAGS = {
    w.CMD_READ: w.CMDFLAG_FUA | w.CMDFLAG_DF,
    w.CMD_WRITE: w.CMDFLAG_FUA,
    w.CMD_FLUSH: w.CMDFLAG_FUA,
    w.CMD_TRIM: w.CMDFLAG_FUA,
    w.CMD_CACHE: w.CMDFLAG_FUA,
    w.CMD_WRITE_ZEROES: w.CMDFLAG_FUA | w.CMDFLAG_NO_HOLE | w.CMDFLAG_FAST_ZERO,
    w.CMD_BLOCK_STATUS: w.CMDFLAG_FUA | w.CMDFLAG_REQ_ONE,
}
_WRITES = (w.CMD_WRITE, w.CMD_TRIM, w.CMD_WRITE_ZEROES)


class NbdServer:
    """One client connection's protocol state (server side)."""

    def __init__(self, lookup: Callable[[str], ExportInfo | None],
                 listing: Callable[[], list[ExportInfo]], *, max_payload: int = w.MAX_PAYLOAD) -> None:
        self._lookup = lookup
        self._listing = listing
        self.max_payload = max_payload
        self.phase = Phase.CLIENT_FLAGS
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None
        # SET_META_CONTEXT result: the export it was negotiated for and the context ids chosen, ascending
        self._meta_export: str | None = None
        self._meta_ids: tuple[int, ...] = ()
        self._buf = bytearray()
        self._pos = 0
        self._out = bytearray()
        self._skip = 0  # payload bytes of a rejected oversized write still to be discarded
        self._pending_write: tuple[int, int, int, int, int] | None = None

    # -- bytes in / out --------------------------------------------------------------------
    def greeting(self) -> bytes:
        """The server's first message: magic, ``IHAVEOPT``, fixed-newstyle + no-zeroes."""
        return w.GREETING.pack(w.NBDMAGIC, w.IHAVEOPT, w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES)

    def receive_data(self, data: bytes | memoryview) -> None:
        if self.phase is not Phase.CLOSED:
            self._buf += data

    def data_to_send(self) -> bytes:
        """Bytes the core produced by itself (handshake replies, rejected requests)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def meta_base_allocation(self) -> bool:
        return BASE_ALLOCATION_ID in self._meta_ids

    @property
    def meta_contexts(self) -> tuple[int, ...]:
        """The ids of the contexts block status answers for, in the order of its chunks."""
        return self._meta_ids

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes | None:
        if self._avail() < n:
            return None
        with memoryview(self._buf) as mv:  # one copy, and the view is gone before the buffer shrinks
            data = bytes(mv[self._pos:self._pos + n])
        self._pos += n
        if self._pos > 1 << 20 or self._pos == len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        return data

    def _peek(self, n: int) -> bytes | None:
        if self._avail() < n:
            return None
        return bytes(self._buf[self._pos:self._pos + n])

    def _close(self, reason: str) -> Closed:
        self.phase = Phase.CLOSED
        self._buf.clear()
        self._pos = 0
        return Closed(reason)

    # -- events ----------------------------------------------------------------------------
    def next_event(self) -> Event:
        """Parse as far as the buffered bytes allow; return the next event for the runtime."""
        while True:
            if self.phase is Phase.CLOSED:
                return NEED_DATA
            if self.phase is Phase.CLIENT_FLAGS:
                raw = self._take(4)
                if raw is None:
                    return NEED_DATA
                (flags,) = w.CLIENT_FLAGS.unpack(raw)
                if flags & ~w.CLIENT_FLAGS_KNOWN or not flags & w.FLAG_FIXED_NEWSTYLE:
                    # the spec: unknown client flags (or old newstyle) -> disconnect
                    return self._close(f"unsupported client flags 0x{flags:x}")
                self.no_zeroes = bool(flags & w.FLAG_NO_ZEROES)
                self.phase = Phase.OPTIONS
                continue
            if self.phase is Phase.OPTIONS:
                ev = self._option()
            else:
                ev = self._transmission()
            if ev is None:
                continue
            return ev

    # -- option haggling -------------------------------------------------------------------
    def _opt_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out += w.OPTION_REPLY.pack(w.REPLY_MAGIC_OPT, opt, rep, len(data)) + data

    def _opt_error(self, opt: int, rep: int, message: str) -> None:
        self._opt_reply(opt, rep, message.encode())

    def _option(self) -> Event | None:
        head = self._peek(w.OPTION_HEADER.size)
        if head is None:
            return NEED_DATA
        magic, opt, length = w.OPTION_HEADER.unpack(head)
        if magic != w.IHAVEOPT:
            return self._close("bad option magic")
        if length > w.MAX_OPTION_LENGTH:
            return self._close(f"option {opt} length {length} too large")
        if self._avail() < w.OPTION_HEADER.size + length:
            return NEED_DATA
        self._take(w.OPTION_HEADER.size)
        data = self._take(length) or b""
        handler = _OPTION_HANDLERS.get(opt)
        if handler is None:
            self._opt_error(opt, w.REP_ERR_UNSUP, f"Unsupported option {opt}")
            return None
        return handler(self, opt, data)

    def _opt_export_name(self, opt: int, data: bytes) -> Event | None:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            return self._close("export name is not UTF-8")
        exp = self._lookup(name) if len(data) <= w.MAX_STRING else None
        if exp is None:
            return self._close(f"export '{name}' not present")  # the only answer EXPORT_NAME allows
        self._out += w.EXPORT_NAME_REPLY.pack(exp.size, exp.transmission_flags(structured=self.structured))
        if not self.no_zeroes:
            self._out += bytes(124)
        return self._enter_transmission(exp)

    def _enter_transmission(self, exp: ExportInfo) -> ExportChosen:
        if self._meta_export != exp.name:
            self._meta_ids = ()
        # an export replaced under the same name between SET and GO keeps only the ids it still has
        self._meta_ids = tuple(i for i in self._meta_ids if i < BITMAP_ID_BASE + len(exp.bitmaps)
                               and (i != ALLOCATION_DEPTH_ID or exp.allocation_depth))
        self.export = exp
        self.phase = Phase.TRANSMISSION
        return ExportChosen(exp)

    def _opt_abort(self, opt: int, data: bytes) -> Event:
        self._opt_reply(opt, w.REP_ACK)
        return self._close("client aborted the handshake")

    def _opt_list(self, opt: int, data: bytes) -> None:
        if data:
            self._opt_error(opt, w.REP_ERR_INVALID, "option 'NBD_OPT_LIST' should have zero length")
            return
        for exp in self._listing():
            name = exp.name.encode()
            self._opt_reply(opt, w.REP_SERVER, w.U32.pack(len(name)) + name + exp.description.encode())
        self._opt_reply(opt, w.REP_ACK)

    def _opt_starttls(self, opt: int, data: bytes) -> None:
        self._opt_error(opt, w.REP_ERR_POLICY, "TLS not configured")

    def _opt_structured(self, opt: int, data: bytes) -> None:
        if data:
            self._opt_error(opt, w.REP_ERR_INVALID, "option 'NBD_OPT_STRUCTURED_REPLY' should have zero length")
        elif self.structured:
            self._opt_error(opt, w.REP_ERR_INVALID, "structured reply already negotiated")
        else:
            self.structured = True
            self._opt_reply(opt, w.REP_ACK)

    @staticmethod
    def _string(data: bytes, pos: int) -> tuple[str, int] | None:
        """A U32-length-prefixed UTF-8 string at ``pos``; None if malformed."""
        if len(data) < pos + 4:
            return None
        (n,) = w.U32.unpack_from(data, pos)
        if n > w.MAX_STRING or len(data) < pos + 4 + n:
            return None
        try:
            return data[pos + 4:pos + 4 + n].decode(), pos + 4 + n
        except UnicodeDecodeError:
            return None

    def _opt_info(self, opt: int, data: bytes) -> Event | None:
        parsed = self._string(data, 0)
        if parsed is None or len(data) < parsed[1] + 2:
            self._opt_error(opt, w.REP_ERR_INVALID, "Invalid NBD_OPT_INFO/GO data")
            return None
        name, pos = parsed
        (nreq,) = w.U16.unpack_from(data, pos)
        pos += 2
        if len(data) != pos + 2 * nreq:
            self._opt_error(opt, w.REP_ERR_INVALID, "Invalid NBD_OPT_INFO/GO data")
            return None
        wanted = {w.U16.unpack_from(data, pos + 2 * i)[0] for i in range(nreq)}
        exp = self._lookup(name)
        if exp is None:
            self._opt_error(opt, w.REP_ERR_UNKNOWN, f"export '{name}' not present")
            return None
        if w.INFO_NAME in wanted:
            self._opt_reply(opt, w.REP_INFO, w.U16.pack(w.INFO_NAME) + exp.name.encode())
        if w.INFO_DESCRIPTION in wanted and exp.description:
            self._opt_reply(opt, w.REP_INFO, w.U16.pack(w.INFO_DESCRIPTION) + exp.description.encode())
        # block sizes are always sent (as QEMU does): they tell clients the payload limit
        self._opt_reply(opt, w.REP_INFO, w.INFO_BLOCK_SIZE_DATA.pack(
            w.INFO_BLOCK_SIZE, exp.min_block, exp.pref_block, min(exp.max_block, self.max_payload)))
        self._opt_reply(opt, w.REP_INFO, w.INFO_EXPORT_DATA.pack(
            w.INFO_EXPORT, exp.size, exp.transmission_flags(structured=self.structured)))
        self._opt_reply(opt, w.REP_ACK)
        if opt == w.OPT_GO:
            return self._enter_transmission(exp)
        return None

    def _opt_meta(self, opt: int, data: bytes) -> None:
        label = "NBD_OPT_LIST_META_CONTEXT" if opt == w.OPT_LIST_META_CONTEXT else "NBD_OPT_SET_META_CONTEXT"
        if not self.structured:
            self._opt_error(opt, w.REP_ERR_INVALID,
                            f"request option '{label}' when structured reply is not negotiated")
            return
        parsed = self._string(data, 0)
        if parsed is None or len(data) < parsed[1] + 4:
            self._opt_error(opt, w.REP_ERR_INVALID, f"Invalid {label} data")
            return
        name, pos = parsed
        (nq,) = w.U32.unpack_from(data, pos)
        pos += 4
        queries: list[str] = []
        for _ in range(nq):
            q = self._string(data, pos)
            if q is None:
                self._opt_error(opt, w.REP_ERR_INVALID, f"Invalid {label} data")
                return
            queries.append(q[0])
            pos = q[1]
        if pos != len(data):
            self._opt_error(opt, w.REP_ERR_INVALID, f"Invalid {label} data")
            return
        exp = self._lookup(name)
        if exp is None:
            self._opt_error(opt, w.REP_ERR_UNKNOWN, f"export '{name}' not present")
            return
        listing = opt == w.OPT_LIST_META_CONTEXT
        ids = self._select_contexts(exp, queries, listing=listing)
        for cid in ids:
            # a listed context has no id yet (0); a chosen one gets the id its block status chunks carry
            ctx = exp.context_name(cid).encode()
            self._opt_reply(opt, w.REP_META_CONTEXT, w.U32.pack(0 if listing else cid) + ctx)
        if not listing:
            self._meta_export = name
            self._meta_ids = ids
        self._opt_reply(opt, w.REP_ACK)

    @staticmethod
    def _select_contexts(exp: ExportInfo, queries: list[str], *, listing: bool) -> tuple[int, ...]:
        """The context ids ``queries`` name, as QEMU 7.2 matches them (checked against qemu-storage-daemon).

        Exact names select a context (a bitmap exported twice: its first id; ``qemu:allocation-depth``
        only where the export serves it); listing also takes no query at all (everything), ``base:``,
        ``qemu:`` and ``qemu:dirty-bitmap:`` as prefixes of every context below them.  Replies come
        in id order, whatever the order of the queries.
        """
        every_bitmap = range(BITMAP_ID_BASE, BITMAP_ID_BASE + len(exp.bitmaps))
        depth = (ALLOCATION_DEPTH_ID,) if exp.allocation_depth else ()
        chosen: set[int] = set()
        if listing and not queries:
            chosen.update((BASE_ALLOCATION_ID, *depth, *every_bitmap))
        for q in queries:
            if q == w.BASE_ALLOCATION or (listing and q == "base:"):
                chosen.add(BASE_ALLOCATION_ID)
            elif q == w.ALLOCATION_DEPTH:
                chosen.update(depth)
            elif listing and q == "qemu:":
                chosen.update((*depth, *every_bitmap))
            elif listing and q == w.DIRTY_BITMAP:
                chosen.update(every_bitmap)
            elif q.startswith(w.DIRTY_BITMAP) and q[len(w.DIRTY_BITMAP):] in exp.bitmaps:
                chosen.add(BITMAP_ID_BASE + exp.bitmaps.index(q[len(w.DIRTY_BITMAP):]))
        return tuple(sorted(chosen))

    # -- transmission ------------------------------------------------------------------------
    def _reject(self, handle: int, err: int, message: str) -> None:
        self._out += self.reply_error(handle, err, message)

    def _transmission(self) -> Event | None:
        if self._skip:
            n = min(self._skip, self._avail())
            self._pos += n
            self._skip -= n
            if self._pos == len(self._buf):
                self._buf.clear()
                self._pos = 0
            return NEED_DATA if self._skip else None
        if self._pending_write is not None:
            flags, cmd, handle, offset, length = self._pending_write
            data = self._take(length)
            if data is None:
                return NEED_DATA
            self._pending_write = None
            return self._validate(cmd, flags, handle, offset, length, data)
        raw = self._take(w.REQUEST.size)
        if raw is None:
            return NEED_DATA
        magic, flags, cmd, handle, offset, length = w.REQUEST.unpack(raw)
        if magic != w.REQUEST_MAGIC:
            return self._close(f"bad request magic 0x{magic:x}")
        if cmd == w.CMD_DISC:
            return self._close("client disconnected")
        if cmd == w.CMD_WRITE:
            if length > self.max_payload:
                self._skip = length
                self._reject(handle, w.EINVAL, f"len ({length}) is larger than max len ({self.max_payload})")
                return None
            self._pending_write = (flags, cmd, handle, offset, length)
            return None
        return self._validate(cmd, flags, handle, offset, length, b"")

    def _validate(self, cmd: int, flags: int, handle: int, offset: int, length: int, data: bytes) -> Event | None:
        assert self.export is not None
        exp = self.export
        valid = _VALID_CMD_FLAGS.get(cmd)
        if valid is None:
            self._reject(handle, w.EINVAL, f"invalid request type ({cmd}) received")
            return None
        if cmd == w.CMD_READ and self.structured is False:
            valid &= ~w.CMDFLAG_DF
        if flags & ~valid:
            self._reject(handle, w.EINVAL, f"unsupported flags 0x{flags:x} for command {w.CMD_NAMES[cmd]}")
            return None
        if cmd == w.CMD_READ and length > self.max_payload:
            self._reject(handle, w.EINVAL, f"len ({length}) is larger than max len ({self.max_payload})")
            return None
        if cmd != w.CMD_FLUSH and (offset > exp.size or length > exp.size - offset):
            err = w.ENOSPC if cmd in (w.CMD_WRITE, w.CMD_WRITE_ZEROES) else w.EINVAL
            self._reject(handle, err, f"operation past EOF; From: {offset}, Len: {length}, Size: {exp.size}")
            return None
        if cmd in _WRITES and exp.readonly:
            self._reject(handle, w.EPERM, "Export is read-only")
            return None
        if cmd == w.CMD_BLOCK_STATUS:
            if not self._meta_ids:
                self._reject(handle, w.EINVAL, "CMD_BLOCK_STATUS not negotiated")
                return None
            if length == 0:
                self._reject(handle, w.EINVAL, "block status of zero length")
                return None
        return Request(cmd, flags, handle, offset, length, data)

    # -- reply builders (the runtime calls these for Request events) ---------------------------
    def _chunk(self, handle: int, rtype: int, payload: bytes, *, done: bool = True) -> bytes:
        return w.STRUCTURED_HEADER.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE if done else 0, rtype,
                                        handle, len(payload)) + payload

    def reply_ok(self, req: Request) -> bytes:
        """Success without data (write, flush, trim, write_zeroes, cache)."""
        if self.structured:
            return self._chunk(req.handle, w.REPLY_TYPE_NONE, b"")
        return w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, req.handle)

    def reply_read(self, req: Request, data: bytes) -> bytes:
        return self.reply_read_header(req) + data

    def reply_read_header(self, req: Request) -> bytes:
        """What precedes ``req.length`` bytes of data in a successful read reply.

        Lets the runtime send large data without copying it behind the header.
        """
        if not self.structured:
            return w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, 0, req.handle)
        if not req.length:
            return self._chunk(req.handle, w.REPLY_TYPE_NONE, b"")
        return w.STRUCTURED_HEADER.pack(w.STRUCTURED_REPLY_MAGIC, w.REPLY_FLAG_DONE, w.REPLY_TYPE_OFFSET_DATA,
                                        req.handle, 8 + req.length) + w.U64.pack(req.offset)

    def reply_read_sparse(self, req: Request, pieces: list[tuple[int, int, bytes | None]]) -> list[bytes]:
        """A structured read reply in chunks: ``(offset, length, data)``, ``data`` None for a hole.

        The pieces cover the request in order; holes go out as ``OFFSET_HOLE``
        (no zeros on the wire), the last chunk carries ``DONE``.  Only for
        structured replies without ``DF`` (the client must accept fragments).
        """
        assert self.structured and not req.flags & w.CMDFLAG_DF and pieces
        out: list[bytes] = []
        for i, (offset, length, data) in enumerate(pieces):
            flags = w.REPLY_FLAG_DONE if i == len(pieces) - 1 else 0
            if data is None:
                out.append(w.STRUCTURED_HEADER.pack(w.STRUCTURED_REPLY_MAGIC, flags, w.REPLY_TYPE_OFFSET_HOLE,
                                                    req.handle, 12) + w.U64.pack(offset) + w.U32.pack(length))
            else:
                out.append(w.STRUCTURED_HEADER.pack(w.STRUCTURED_REPLY_MAGIC, flags, w.REPLY_TYPE_OFFSET_DATA,
                                                    req.handle, 8 + len(data)) + w.U64.pack(offset))
                out.append(data)
        return out

    def reply_error(self, handle: int, err: int, message: str = "") -> bytes:
        if not self.structured:
            return w.SIMPLE_REPLY.pack(w.SIMPLE_REPLY_MAGIC, err, handle)
        msg = message.encode()[:w.MAX_STRING]
        return self._chunk(handle, w.REPLY_TYPE_ERROR, w.U32.pack(err) + w.U16.pack(len(msg)) + msg)

    def reply_block_status(self, req: Request, contexts: list[tuple[int, list[tuple[int, int]]]]) -> bytes:
        """One chunk per negotiated context, in :attr:`meta_contexts` order: ``(context id, extents)``,
        extents ``(length, NBD_STATE_* flags)`` covering the start of the request (``REQ_ONE``: the first)."""
        out = bytearray()
        for i, (cid, extents) in enumerate(contexts):
            if req.flags & w.CMDFLAG_REQ_ONE:
                extents = extents[:1]
            payload = bytearray(w.U32.pack(cid))
            for length, flags in extents:
                payload += w.EXTENT.pack(length, flags)
            out += self._chunk(req.handle, w.REPLY_TYPE_BLOCK_STATUS, bytes(payload), done=i == len(contexts) - 1)
        return bytes(out)

_OPTION_HANDLERS: dict[int, Callable[[NbdServer, int, bytes], Event | None]] = {
    w.OPT_EXPORT_NAME: NbdServer._opt_export_name,
    w.OPT_ABORT: NbdServer._opt_abort,
    w.OPT_LIST: NbdServer._opt_list,
    w.OPT_STARTTLS: NbdServer._opt_starttls,
    w.OPT_INFO: NbdServer._opt_info,
    w.OPT_GO: NbdServer._opt_info,
    w.OPT_STRUCTURED_REPLY: NbdServer._opt_structured,
    w.OPT_LIST_META_CONTEXT: NbdServer._opt_meta,
    w.OPT_SET_META_CONTEXT: NbdServer._opt_meta,
}
