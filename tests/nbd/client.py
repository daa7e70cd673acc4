"""A small synchronous NBD client for tests: raw protocol, so replies are checked byte by byte.

Real clients (qemu-img, qemu-io, nbdinfo, nbdcopy) cover interoperability; this
one exists for what they cannot express: exact error codes, flags, pipelining,
requests held while the VM is stopped.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from vdkit.nbd import wire as w


@dataclass
class Reply:
    error: int = 0
    data: bytes = b""
    extents: list[tuple[int, int]] = field(default_factory=list)
    message: str = ""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return bytes(buf)


class NbdClient:
    def __init__(self, path: str | tuple[str, int], export: str, *, structured: bool = True,
                 meta: bool = True, timeout: float = 60.0) -> None:
        fam = socket.AF_UNIX if isinstance(path, str) else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.structured = False
        magic, opt, hflags = w.GREETING.unpack(_recv_exact(self.sock, w.GREETING.size))
        assert (magic, opt) == (w.NBDMAGIC, w.IHAVEOPT)
        assert hflags & w.FLAG_FIXED_NEWSTYLE
        self.sock.sendall(w.CLIENT_FLAGS.pack(w.FLAG_FIXED_NEWSTYLE | w.FLAG_NO_ZEROES))
        if structured:
            assert self.option(w.OPT_STRUCTURED_REPLY)[-1][0] == w.REP_ACK
            self.structured = True
        if meta and structured:
            name = export.encode()
            q = w.BASE_ALLOCATION.encode()
            self.option(w.OPT_SET_META_CONTEXT, w.U32.pack(len(name)) + name + w.U32.pack(1) + w.U32.pack(len(q)) + q)
        name = export.encode()
        replies = self.option(w.OPT_GO, w.U32.pack(len(name)) + name + w.U16.pack(0))
        if replies[-1][0] != w.REP_ACK:
            raise ConnectionRefusedError(f"GO failed: {replies[-1]}")
        for rep, data in replies:
            if rep == w.REP_INFO and w.U16.unpack_from(data)[0] == w.INFO_EXPORT:
                _, self.size, self.flags = w.INFO_EXPORT_DATA.unpack(data)
        self._handle = 0
        self._reads: dict[int, int] = {}  # handle -> length, for simple read replies

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; return ``(reply type, data)`` up to the final (non-SERVER/INFO/META) reply."""
        self.sock.sendall(w.OPTION_HEADER.pack(w.IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, ropt, rep, length = w.OPTION_REPLY.unpack(_recv_exact(self.sock, w.OPTION_REPLY.size))
            assert magic == w.REPLY_MAGIC_OPT and ropt == opt
            out.append((rep, _recv_exact(self.sock, length)))
            if rep not in (w.REP_SERVER, w.REP_INFO, w.REP_META_CONTEXT):
                return out

    def send(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> int:
        self._handle += 1
        if cmd == w.CMD_READ:
            self._reads[self._handle] = length
        self.sock.sendall(w.REQUEST.pack(w.REQUEST_MAGIC, flags, cmd, self._handle, offset, length) + data)
        return self._handle

    def receive(self) -> tuple[int, Reply]:
        """The next complete reply: ``(handle, Reply)``."""
        magic = w.U32.unpack(_recv_exact(self.sock, 4))[0]
        if magic == w.SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", _recv_exact(self.sock, 12))
            n = self._reads.pop(handle, 0)
            return handle, Reply(err, _recv_exact(self.sock, n) if n and not err else b"")
        assert magic == w.STRUCTURED_REPLY_MAGIC, hex(magic)
        reply = Reply()
        while True:
            flags, rtype, handle, length = struct.unpack(">HHQI", _recv_exact(self.sock, 16))
            payload = _recv_exact(self.sock, length)
            if rtype == w.REPLY_TYPE_OFFSET_DATA:
                reply.data += payload[8:]
            elif rtype == w.REPLY_TYPE_OFFSET_HOLE:
                reply.data += bytes(w.U32.unpack_from(payload, 8)[0])
            elif rtype == w.REPLY_TYPE_BLOCK_STATUS:
                reply.extents += [w.EXTENT.unpack_from(payload, 4 + 8 * i) for i in range((length - 4) // 8)]
            elif rtype & (1 << 15):
                reply.error = w.U32.unpack_from(payload)[0]
                reply.message = payload[6:].decode()
            if flags & w.REPLY_FLAG_DONE:
                return handle, reply
            magic = w.U32.unpack(_recv_exact(self.sock, 4))[0]
            assert magic == w.STRUCTURED_REPLY_MAGIC

    def request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> Reply:
        handle = self.send(cmd, offset, length, data, flags)
        got, reply = self.receive()
        assert got == handle
        return reply

    def read(self, offset: int, length: int) -> bytes:
        r = self.request(w.CMD_READ, offset, length)
        assert r.error == 0, r
        return r.data

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        return self.request(w.CMD_WRITE, offset, len(data), data, flags).error

    def close(self) -> None:
        try:
            self.sock.sendall(w.REQUEST.pack(w.REQUEST_MAGIC, 0, w.CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()
