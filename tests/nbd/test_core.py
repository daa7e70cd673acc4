"""The sans-I/O NBD core driven with bytes only: handshake, options, request validation, replies, fuzz."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdkit.nbd import wire as w
from vdkit.nbd.server import NEED_DATA, Closed, ExportChosen, ExportInfo, NbdServer, Phase, Request

EXPORTS = {"disk": ExportInfo("disk", 1 << 20, readonly=False, description="a disk"),
           "ro": ExportInfo("ro", 65536, readonly=True)}


def server() -> NbdServer:
    return NbdServer(EXPORTS.get, lambda: list(EXPORTS.values()))


def events(s: NbdServer, data: bytes = b"") -> list[object]:
    s.receive_data(data)
    out = []
    while (ev := s.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def opt(o: int, data: bytes = b"") -> bytes:
    return w.OPTION_HEADER.pack(w.IHAVEOPT, o, len(data)) + data


def replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(raw):
        magic, o, rep, n = w.OPTION_REPLY.unpack_from(raw, pos)
        assert magic == w.REPLY_MAGIC_OPT
        pos += w.OPTION_REPLY.size
        out.append((o, rep, raw[pos:pos + n]))
        pos += n
    return out


def name_req(name: str, *infos: int) -> bytes:
    b = name.encode()
    return w.U32.pack(len(b)) + b + w.U16.pack(len(infos)) + b"".join(w.U16.pack(i) for i in infos)


def meta(name: str, *queries: str) -> bytes:
    b = name.encode()
    return (w.U32.pack(len(b)) + b + w.U32.pack(len(queries))
            + b"".join(w.U32.pack(len(q.encode())) + q.encode() for q in queries))


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7) -> bytes:
    return w.REQUEST.pack(w.REQUEST_MAGIC, flags, cmd, handle, offset, length)


def negotiated(export: str = "disk", *, structured: bool = True, meta_ctx: bool = True) -> NbdServer:
    s = server()
    assert s.greeting() == w.GREETING.pack(w.NBDMAGIC, w.IHAVEOPT, 3)
    data = w.CLIENT_FLAGS.pack(3)
    if structured:
        data += opt(w.OPT_STRUCTURED_REPLY)
        if meta_ctx:
            data += opt(w.OPT_SET_META_CONTEXT, meta(export, w.BASE_ALLOCATION))
    data += opt(w.OPT_GO, name_req(export))
    evs = events(s, data)
    assert evs == [ExportChosen(EXPORTS[export])]
    s.data_to_send()
    return s


def simple_error(raw: bytes) -> tuple[int, int]:
    magic, err, handle = w.SIMPLE_REPLY.unpack(raw)
    assert magic == w.SIMPLE_REPLY_MAGIC
    return err, handle


def structured_error(raw: bytes) -> int:
    magic, flags, rtype, handle, n = w.STRUCTURED_HEADER.unpack_from(raw)
    assert magic == w.STRUCTURED_REPLY_MAGIC and flags == w.REPLY_FLAG_DONE and rtype == w.REPLY_TYPE_ERROR
    return w.U32.unpack_from(raw, w.STRUCTURED_HEADER.size)[0]


def test_go_reports_export_block_sizes_and_name() -> None:
    s = server()
    events(s, w.CLIENT_FLAGS.pack(1) + opt(w.OPT_INFO, name_req("disk", w.INFO_NAME, w.INFO_DESCRIPTION)))
    reps = replies(s.data_to_send())
    assert [r[1] for r in reps] == [w.REP_INFO] * 4 + [w.REP_ACK]
    assert reps[0][2] == w.U16.pack(w.INFO_NAME) + b"disk"
    assert reps[1][2] == w.U16.pack(w.INFO_DESCRIPTION) + b"a disk"
    assert reps[2][2] == w.INFO_BLOCK_SIZE_DATA.pack(w.INFO_BLOCK_SIZE, 1, 4096, w.MAX_PAYLOAD)
    typ, size, flags = w.INFO_EXPORT_DATA.unpack(reps[3][2])
    assert (typ, size) == (w.INFO_EXPORT, 1 << 20)
    assert flags & w.TFLAG_SEND_WRITE_ZEROES and not flags & w.TFLAG_READ_ONLY and not flags & w.TFLAG_SEND_DF
    assert s.phase is Phase.OPTIONS  # INFO does not end haggling


def test_unknown_export_and_bad_option_data() -> None:
    s = server()
    events(s, w.CLIENT_FLAGS.pack(1) + opt(w.OPT_GO, name_req("nope")) + opt(w.OPT_GO, b"\0\0\0\x09x")
           + opt(w.OPT_LIST, b"x") + opt(99) + opt(w.OPT_STARTTLS)
           + opt(w.OPT_SET_META_CONTEXT, meta("disk", w.BASE_ALLOCATION)))
    assert [r[1] for r in replies(s.data_to_send())] == [
        w.REP_ERR_UNKNOWN, w.REP_ERR_INVALID, w.REP_ERR_INVALID, w.REP_ERR_UNSUP, w.REP_ERR_POLICY,
        w.REP_ERR_INVALID]  # meta contexts need structured replies first
    assert s.phase is Phase.OPTIONS


def test_list_and_meta_contexts() -> None:
    s = server()
    events(s, w.CLIENT_FLAGS.pack(1) + opt(w.OPT_LIST) + opt(w.OPT_STRUCTURED_REPLY) + opt(w.OPT_STRUCTURED_REPLY)
           + opt(w.OPT_LIST_META_CONTEXT, meta("disk")) + opt(w.OPT_SET_META_CONTEXT, meta("disk", "qemu:x"))
           + opt(w.OPT_SET_META_CONTEXT, meta("nope", w.BASE_ALLOCATION)))
    reps = replies(s.data_to_send())
    assert reps[0] == (w.OPT_LIST, w.REP_SERVER, w.U32.pack(4) + b"disk" + b"a disk")
    assert reps[1] == (w.OPT_LIST, w.REP_SERVER, w.U32.pack(2) + b"ro")
    assert [r[1] for r in reps[2:]] == [w.REP_ACK, w.REP_ACK, w.REP_ERR_INVALID, w.REP_META_CONTEXT, w.REP_ACK,
                                        w.REP_ACK, w.REP_ERR_UNKNOWN]
    assert reps[5][2].endswith(b"base:allocation")
    assert not s.meta_base_allocation


def test_export_name_old_style_and_zero_padding() -> None:
    s = server()
    evs = events(s, w.CLIENT_FLAGS.pack(1) + opt(w.OPT_EXPORT_NAME, b"ro"))
    assert evs == [ExportChosen(EXPORTS["ro"])]
    out = s.data_to_send()
    assert len(out) == 10 + 124
    size, flags = w.EXPORT_NAME_REPLY.unpack_from(out)
    assert size == 65536 and flags & w.TFLAG_READ_ONLY
    s2 = server()
    assert events(s2, w.CLIENT_FLAGS.pack(1) + opt(w.OPT_EXPORT_NAME, b"nope")) == [
        Closed("export 'nope' not present")]


def test_bad_client_flags_and_abort() -> None:
    s = server()
    assert isinstance(events(s, w.CLIENT_FLAGS.pack(0x80000001))[0], Closed)
    s = server()
    assert isinstance(events(s, w.CLIENT_FLAGS.pack(1) + opt(w.OPT_ABORT))[0], Closed)
    assert replies(s.data_to_send()) == [(w.OPT_ABORT, w.REP_ACK, b"")]
    s = server()
    assert isinstance(events(s, w.CLIENT_FLAGS.pack(1) + w.OPTION_HEADER.pack(w.IHAVEOPT, 1, 1 << 30))[0], Closed)


def test_requests_validated() -> None:
    s = negotiated("ro", structured=False)
    evs = events(s, req(w.CMD_READ, 0, 512, handle=1) + req(w.CMD_WRITE, 0, 2, handle=2) + b"ab"
                 + req(w.CMD_READ, 65000, 1000, handle=3) + req(42, handle=4)
                 + req(w.CMD_READ, 0, 1, flags=w.CMDFLAG_DF, handle=5) + req(w.CMD_BLOCK_STATUS, 0, 1, handle=6)
                 + req(w.CMD_TRIM, 0, 1, handle=8) + req(w.CMD_FLUSH, handle=9))
    assert evs == [Request(w.CMD_READ, 0, 1, 0, 512), Request(w.CMD_FLUSH, 0, 9, 0, 0)]
    out = s.data_to_send()
    errs = [simple_error(out[i:i + 16]) for i in range(0, len(out), 16)]
    assert errs == [(w.EPERM, 2), (w.EINVAL, 3), (w.EINVAL, 4), (w.EINVAL, 5), (w.EINVAL, 6), (w.EPERM, 8)]


def test_write_past_end_is_enospc_and_payload_limits() -> None:
    s = negotiated("disk")
    evs = events(s, req(w.CMD_WRITE, (1 << 20) - 1, 2, handle=1) + b"xy" + req(w.CMD_READ, 0, w.MAX_PAYLOAD + 1))
    assert evs == []
    out = s.data_to_send()
    assert structured_error(out) == w.ENOSPC
    assert structured_error(out[w.STRUCTURED_HEADER.size + 6 + w.STRUCTURED_HEADER.unpack_from(out)[4] - 6:]) \
        == w.EINVAL
    # an oversized write is answered and its payload skipped: the connection stays usable
    big = w.MAX_PAYLOAD + 10
    assert events(s, req(w.CMD_WRITE, 0, big, handle=3)) == []
    assert structured_error(s.data_to_send()) == w.EINVAL
    for _ in range(big // (1 << 20)):
        assert events(s, bytes(1 << 20)) == []
    assert events(s, bytes(big % (1 << 20)) + req(w.CMD_WRITE, 4, 3, handle=4) + b"abc") == [
        Request(w.CMD_WRITE, 0, 4, 4, 3, b"abc")]


def test_split_input_and_replies() -> None:
    s = negotiated("disk")
    raw = req(w.CMD_WRITE, 10, 5, flags=w.CMDFLAG_FUA, handle=11) + b"hello" + req(w.CMD_BLOCK_STATUS, 0, 100)
    evs: list[object] = []
    for i in range(len(raw)):
        evs += events(s, raw[i:i + 1])
    assert evs == [Request(w.CMD_WRITE, w.CMDFLAG_FUA, 11, 10, 5, b"hello"), Request(w.CMD_BLOCK_STATUS, 0, 7, 0, 100)]
    rd = s.reply_read(Request(w.CMD_READ, 0, 3, 8, 2), b"zz")
    assert rd == w.STRUCTURED_HEADER.pack(w.STRUCTURED_REPLY_MAGIC, 1, w.REPLY_TYPE_OFFSET_DATA, 3, 10) + \
        struct.pack(">Q", 8) + b"zz"
    bs = s.reply_block_status(Request(w.CMD_BLOCK_STATUS, w.CMDFLAG_REQ_ONE, 5, 0, 9), [(0, [(4, 0), (5, 3)])])
    assert bs.endswith(w.EXTENT.pack(4, 0)) and len(bs) == w.STRUCTURED_HEADER.size + 12
    # one chunk per context, DONE on the last only
    bs = s.reply_block_status(Request(w.CMD_BLOCK_STATUS, 0, 5, 0, 9), [(0, [(9, 0)]), (2, [(4, 1), (5, 0)])])
    first = w.STRUCTURED_HEADER.unpack_from(bs)
    assert first[1] == 0 and w.U32.unpack_from(bs, w.STRUCTURED_HEADER.size) == (0,)
    second = w.STRUCTURED_HEADER.unpack_from(bs, w.STRUCTURED_HEADER.size + 12)
    assert second[1] == w.REPLY_FLAG_DONE and second[4] == 4 + 16 and bs.endswith(w.EXTENT.pack(5, 0))
    assert isinstance(events(s, req(w.CMD_DISC))[0], Closed)
    assert events(s, req(w.CMD_READ, 0, 1)) == []  # nothing after the end


def test_bad_magic_closes() -> None:
    s = negotiated("disk")
    assert isinstance(events(s, b"\0" * 28)[0], Closed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=8), st.booleans())
def test_fuzz_random_bytes(chunks: list[bytes], after_go: bool) -> None:
    """Random input never raises; only valid requests come out; everything sent is well framed."""
    s = negotiated("disk") if after_go else server()
    for chunk in chunks:
        for ev in events(s, chunk):
            assert isinstance(ev, Request | ExportChosen | Closed)
            if isinstance(ev, Request):
                assert ev.offset + ev.length <= 1 << 20 and ev.cmd in w.CMD_NAMES
            if isinstance(ev, Closed):
                assert s.phase is Phase.CLOSED
        s.data_to_send()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 0xFFFF), st.integers(0, 1 << 21),
                          st.integers(0, 1 << 21)), max_size=6))
def test_fuzz_structured_requests(reqs: list[tuple[int, int, int, int]]) -> None:
    """Well-framed requests with random fields: each gets exactly one event or one error reply."""
    s = negotiated("disk")
    for cmd, flags, offset, length in reqs:
        payload = bytes(min(length, 4096)) if cmd == w.CMD_WRITE else b""
        if cmd == w.CMD_WRITE:
            length = len(payload)
        evs = events(s, req(cmd, offset, length, flags) + payload)
        out = s.data_to_send()
        if cmd == w.CMD_DISC:
            assert isinstance(evs[0], Closed)
            return
        assert (len(evs) == 1 and not out) or (not evs and structured_error(out) in (w.EINVAL, w.ENOSPC, w.EPERM))
