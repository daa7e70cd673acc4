"""Sans-I/O QMP session: bytes in, requests out; replies in, bytes out.

This module contains no networking and no block-layer code (in the manner of
h11): the runtime feeds received bytes to :meth:`QmpSession.receive_data`,
pulls :class:`Request` / :class:`InputError` objects from
:meth:`QmpSession.next_event`, and writes the bytes returned by
:meth:`QmpSession.reply`, :meth:`QmpSession.error` and
:meth:`QmpSession.event`.  That keeps the protocol testable and fuzzable
without sockets.

The JSON stream is split the way QEMU's lexer/streamer pair does it (see
``qmp-hmp.md`` §1.1): a message ends when the bracket depth returns to zero,
so objects may span lines, share a line, or arrive without any delimiter;
single-quoted strings are accepted; a top-level scalar is a complete message
as soon as a delimiter follows it.  A lexical error discards the partial
message and is reported as ``JSON parse error, stray '...'``.

Limits (deliberate, documented): QEMU caps a message at 64 MiB of tokens, 2M
tokens and nesting depth 1024.  This session caps a message at
``max_message_size`` bytes (default 1 MiB: QMP requests are tiny) and nesting
at ``max_nesting`` (default 256, so that echoing a pathological ``id`` stays
within Python's recursion limit).  Exceeding a limit discards the partial
message and reports QEMU's texts ``JSON token size limit exceeded`` /
``JSON nesting depth limit exceeded``.
"""

from __future__ import annotations

import codecs
import enum
import re
import time
from dataclasses import dataclass, field
from typing import Any

from vdkit.info.render_json import dumps_compact, qdict_order

# QEMU 7.2 behaviour is what we implement; the numbers are those of the
# QEMU release whose QMP/HMP transcripts the implementation follows (the
# Debian 7.2.22 build used as the oracle).  ``package`` names vdkit, so a
# client can always tell the two apart.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 22}


def version_info(package: str) -> dict[str, Any]:
    """The ``VersionInfo`` shape of ``query-version`` and the greeting."""
    return {"qemu": dict(QEMU_VERSION), "package": package}


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _NeedData.NEED_DATA


class SessionState(enum.Enum):
    NEGOTIATION = "negotiation"
    COMMAND = "command"


class RawJson(str):
    """A result already rendered as compact QMP JSON; :meth:`QmpSession.reply` splices it in as is."""


@dataclass(frozen=True)
class Request:
    """A syntactically valid request: the command still has to be looked up."""

    name: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False
    oob: bool = False


@dataclass(frozen=True)
class InputError:
    """Input that cannot become a request; the runtime answers with :meth:`QmpSession.error`."""

    desc: str
    error_class: str = "GenericError"
    id: Any = None
    has_id: bool = False


# --------------------------------------------------------------------------
# Lexer: text -> tokens (kind, value, raw text)
# --------------------------------------------------------------------------

_WS = " \t\r\n"
_PUNCT = "{}[]:,"


class _Tok(enum.Enum):
    LCURLY = "{"
    RCURLY = "}"
    LSQUARE = "["
    RSQUARE = "]"
    COLON = ":"
    COMMA = ","
    STRING = "string"
    NUMBER = "number"
    KEYWORD = "keyword"
    ERROR = "error"


_PUNCT_KIND = {c: _Tok(c) for c in _PUNCT}
_KEYWORD_RE = re.compile(r"[a-z]+")


@dataclass
class _Token:
    kind: _Tok
    text: str


def _scan_string(buf: str, pos: int) -> int | None:
    """End index (exclusive) of the quoted string starting at ``pos``; None if incomplete."""
    quote = buf[pos]
    i = pos + 1
    n = len(buf)
    while True:
        j = buf.find(quote, i)
        k = buf.find("\\", i)
        if j < 0 and k < 0:
            return None
        if k >= 0 and (j < 0 or k < j):
            if k + 1 >= n:
                return None
            i = k + 2
            continue
        return j + 1


# number lexer states: transitions, and which states may end a number
_NUM_TRANS: dict[str, dict[str, str]] = {
    "start": {"-": "minus", "0": "zero", **{d: "int" for d in "123456789"}},
    "minus": {"0": "zero", **{d: "int" for d in "123456789"}},
    "zero": {".": "dot", "e": "e", "E": "e"},
    "int": {".": "dot", "e": "e", "E": "e", **{d: "int" for d in "0123456789"}},
    "dot": {d: "frac" for d in "0123456789"},
    "frac": {"e": "e", "E": "e", **{d: "frac" for d in "0123456789"}},
    "e": {"+": "esign", "-": "esign", **{d: "exp" for d in "0123456789"}},
    "esign": {d: "exp" for d in "0123456789"},
    "exp": {d: "exp" for d in "0123456789"},
}
_NUM_FINAL = frozenset({"zero", "int", "frac", "exp"})


def _scan_number(buf: str, pos: int) -> tuple[int, bool] | None:
    """(end, ok) of the number at ``pos``; None if more input is needed.

    As in QEMU's lexer, a character that cannot continue a number ends it
    when the number is complete (it is then lexed on its own), and otherwise
    makes the run *including that character* one erroneous token (``-}`` and
    ``01`` are single stray tokens).
    """
    state = "start"
    i = pos
    n = len(buf)
    while i < n:
        nxt = _NUM_TRANS[state].get(buf[i])
        if nxt is None:
            if state in _NUM_FINAL and not (state == "zero" and buf[i].isdigit()):
                return i, True
            return i + 1, False
        state = nxt
        i += 1
    return None


# --------------------------------------------------------------------------
# Parser: one message's tokens -> Python value
# --------------------------------------------------------------------------


class _ParseError(Exception):
    pass


_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


_BAD_UTF8 = re.compile("[\udc80-\udcff]")


def _decode_string(raw: str) -> str:
    body = raw[1:-1]
    if _BAD_UTF8.search(body):  # bytes the UTF-8 decoder could not decode
        raise _ParseError("invalid UTF-8 sequence in string")
    if "\\" not in body:
        return body
    out: list[str] = []
    i = 0
    n = len(body)
    while i < n:
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
            continue
        if e != "u":
            raise _ParseError("invalid escape sequence in string")
        hexd = body[i + 2 : i + 6]
        if len(hexd) != 4 or any(h not in "0123456789abcdefABCDEF" for h in hexd):
            raise _ParseError("invalid hex escape sequence in string")
        cp = int(hexd, 16)
        i += 6
        if 0xD800 <= cp <= 0xDBFF and body[i : i + 2] == "\\u":
            low = body[i + 2 : i + 6]
            if len(low) == 4 and all(h in "0123456789abcdefABCDEF" for h in low):
                lo = int(low, 16)
                if 0xDC00 <= lo <= 0xDFFF:
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                    i += 6
        if 0xD800 <= cp <= 0xDFFF:
            raise _ParseError("invalid \\u escape (unpaired surrogate)")
        if cp == 0:
            raise _ParseError("\\u0000 is not supported")
        out.append(chr(cp))
    return "".join(out)


def _number(text: str) -> int | float:
    if not any(c in text for c in ".eE"):
        v = int(text)
        if -(1 << 63) <= v < (1 << 64):
            return v
    return float(text)


def _parse_message(tokens: list[_Token]) -> Any:
    """Iterative recursive-descent (no Python recursion, whatever the depth)."""
    pos = 0
    n = len(tokens)

    def peek() -> _Token | None:
        return tokens[pos] if pos < n else None

    def scalar(tok: _Token) -> Any:
        if tok.kind is _Tok.STRING:
            return _decode_string(tok.text)
        if tok.kind is _Tok.NUMBER:
            return _number(tok.text)
        if tok.kind is _Tok.KEYWORD:
            if tok.text == "true":
                return True
            if tok.text == "false":
                return False
            if tok.text == "null":
                return None
            raise _ParseError(f"invalid keyword '{tok.text}'")
        raise _ParseError("expecting value")

    # stack frames: [container, pending_key, expecting] where expecting is
    # one of "first", "value", "sep", "key"
    stack: list[list[Any]] = []
    result: Any = None
    have_result = False

    def start_value() -> tuple[bool, Any]:
        """Consume a value start; returns (is_container_opened, scalar_value)."""
        nonlocal pos
        tok = peek()
        if tok is None:
            raise _ParseError("expecting value")
        pos += 1
        if tok.kind is _Tok.LCURLY:
            stack.append([{}, None, "first"])
            return True, None
        if tok.kind is _Tok.LSQUARE:
            stack.append([[], None, "first"])
            return True, None
        return False, scalar(tok)

    def deliver(value: Any) -> None:
        nonlocal result, have_result
        if not stack:
            result = value
            have_result = True
            return
        frame = stack[-1]
        if isinstance(frame[0], dict):
            frame[0][frame[1]] = value
        else:
            frame[0].append(value)
        frame[2] = "sep"

    opened, value = start_value()
    if not opened:
        deliver(value)
    while stack:
        frame = stack[-1]
        container, _, expecting = frame
        is_dict = isinstance(container, dict)
        tok = peek()
        if expecting == "first":
            closer = _Tok.RCURLY if is_dict else _Tok.RSQUARE
            if tok is not None and tok.kind is closer:
                pos += 1
                stack.pop()
                deliver(container)
                continue
            expecting = "key" if is_dict else "value"
        if expecting == "sep":
            if tok is None:
                raise _ParseError("expected separator in dict" if is_dict else "expected separator in list")
            if tok.kind is _Tok.COMMA:
                pos += 1
                frame[2] = "key" if is_dict else "value"
                continue
            if tok.kind is (_Tok.RCURLY if is_dict else _Tok.RSQUARE):
                pos += 1
                stack.pop()
                deliver(container)
                continue
            raise _ParseError("expected separator in dict" if is_dict else "expected separator in list")
        if expecting == "key":
            if tok is None or tok.kind in (_Tok.RCURLY, _Tok.RSQUARE, _Tok.COMMA, _Tok.COLON):
                raise _ParseError("expecting value")
            if tok.kind is not _Tok.STRING:
                if tok.kind is _Tok.KEYWORD and tok.text not in ("true", "false", "null"):
                    raise _ParseError(f"invalid keyword '{tok.text}'")
                raise _ParseError("key is not a string in object")
            pos += 1
            frame[1] = _decode_string(tok.text)
            colon = peek()
            if colon is None or colon.kind is not _Tok.COLON:
                raise _ParseError("missing : in object pair")
            pos += 1
            frame[2] = "value"
            expecting = "value"
        if expecting == "value":
            frame[2] = "sep"  # provisional; deliver() sets it again
            opened, value = start_value()
            if not opened:
                deliver(value)
    assert have_result
    return result


# --------------------------------------------------------------------------
# The session
# --------------------------------------------------------------------------


@dataclass
class QmpSession:
    """One QMP connection's protocol state (server side)."""

    package: str = ""
    max_message_size: int = 1 << 20
    max_nesting: int = 256
    offer_oob: bool = True
    state: SessionState = SessionState.NEGOTIATION
    oob_enabled: bool = False
    _buf: str = ""
    _tokens: list[_Token] = field(default_factory=list)
    _depth_curly: int = 0
    _depth_square: int = 0
    _msg_size: int = 0
    _events: list[Request | InputError] = field(default_factory=list)
    _discard_quote: str | None = None
    _discard_escape: bool = False
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("surrogateescape")
    )

    # -- output -------------------------------------------------------------
    def greeting(self) -> bytes:
        caps = ["oob"] if self.offer_oob else []
        return self._line({"QMP": {"version": version_info(self.package), "capabilities": caps}})

    @staticmethod
    def _line(obj: Any) -> bytes:
        return (dumps_compact(obj) + "\r\n").encode("ascii")

    def reply(self, request: Request, value: Any) -> bytes:
        if isinstance(value, RawJson):
            # pre-rendered result: QEMU prints "return" before "id"
            text = '{"return": ' + value
            if request.has_id:
                text += ', "id": ' + dumps_compact(request.id)
            return (text + "}\r\n").encode("ascii")
        msg: dict[str, Any] = {"return": value}
        if request.has_id:
            msg["id"] = request.id
        return self._line(msg)

    def error(self, error_class: str, desc: str, *, id: Any = None, has_id: bool = False) -> bytes:
        msg: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
        if has_id:
            msg["id"] = id
        return self._line(msg)

    def input_error(self, err: InputError) -> bytes:
        return self.error(err.error_class, err.desc, id=err.id, has_id=err.has_id)

    def event(self, name: str, data: dict[str, Any] | None = None, *, timestamp: float | None = None) -> bytes:
        """An event line, or ``b""`` while the client is still negotiating."""
        if self.state is not SessionState.COMMAND:
            return b""
        return self._line(format_event(name, data, timestamp=timestamp))

    # -- negotiation ----------------------------------------------------------
    def negotiate(self, enable: list[str]) -> None:
        """``qmp_capabilities`` succeeded: enter command mode."""
        self.state = SessionState.COMMAND
        self.oob_enabled = "oob" in enable

    # -- input ------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self._buf += self._decoder.decode(data)
        self._lex()

    def next_event(self) -> Request | InputError | _NeedData:
        if self._events:
            return self._events.pop(0)
        return NEED_DATA

    def _reset_message(self) -> None:
        self._tokens = []
        self._depth_curly = self._depth_square = 0
        self._msg_size = 0

    def _lex(self) -> None:
        buf = self._buf
        pos = 0
        n = len(buf)
        while pos < n:
            if self._discard_quote is not None:
                pos = self._discard(buf, pos)
                continue
            c = buf[pos]
            if c in _WS:
                pos += 1
                continue
            if c in _PUNCT:
                self._token(_Token(_PUNCT_KIND[c], c))
                pos += 1
                continue
            if c == '"' or c == "'":
                end = _scan_string(buf, pos)
                if end is None:
                    if self._msg_size + (n - pos) > self.max_message_size:
                        # drop the rest of this string as it arrives, then resume
                        self._limit("JSON token size limit exceeded")
                        self._discard_quote = c
                        self._discard_escape = False
                        pos += 1
                        continue
                    break
                self._token(_Token(_Tok.STRING, buf[pos:end]))
                pos = end
                continue
            if c == "-" or c.isdigit() and c.isascii():
                scanned = _scan_number(buf, pos)
                if scanned is None:
                    break
                end, ok = scanned
                self._token(_Token(_Tok.NUMBER if ok else _Tok.ERROR, buf[pos:end]))
                pos = end
                continue
            if "a" <= c <= "z":
                m = _KEYWORD_RE.match(buf, pos)
                assert m is not None
                if m.end() >= n:
                    break
                self._token(_Token(_Tok.KEYWORD, m.group()))
                pos = m.end()
                continue
            self._token(_Token(_Tok.ERROR, c))
            pos += 1
        self._buf = buf[pos:]

    def _discard(self, buf: str, pos: int) -> int:
        """Skip an oversized string's remaining characters; returns the new position."""
        n = len(buf)
        while pos < n:
            ch = buf[pos]
            pos += 1
            if self._discard_escape:
                self._discard_escape = False
            elif ch == "\\":
                self._discard_escape = True
            elif ch == self._discard_quote:
                self._discard_quote = None
                break
        return pos

    def _limit(self, desc: str) -> None:
        self._reset_message()
        self._events.append(InputError(desc))

    def _token(self, tok: _Token) -> None:
        if tok.kind is _Tok.ERROR:
            self._reset_message()
            self._events.append(InputError(f"JSON parse error, stray '{tok.text}'"))
            return
        self._tokens.append(tok)
        self._msg_size += len(tok.text)
        if tok.kind is _Tok.LCURLY:
            self._depth_curly += 1
        elif tok.kind is _Tok.RCURLY:
            self._depth_curly -= 1
        elif tok.kind is _Tok.LSQUARE:
            self._depth_square += 1
        elif tok.kind is _Tok.RSQUARE:
            self._depth_square -= 1
        if self._msg_size > self.max_message_size:
            self._limit("JSON token size limit exceeded")
            return
        if self._depth_curly + self._depth_square > self.max_nesting:
            self._limit("JSON nesting depth limit exceeded")
            return
        inside = self._depth_curly > 0 or self._depth_square > 0
        if inside and self._depth_curly >= 0 and self._depth_square >= 0:
            return  # message still open
        tokens = self._tokens
        self._reset_message()
        try:
            value = _parse_message(tokens)
        except _ParseError as exc:
            self._events.append(InputError(f"JSON parse error, {exc}"))
            return
        self._events.append(self._validate(value))

    def _validate(self, obj: Any) -> Request | InputError:
        """The request-object checks of ``qmp-hmp.md`` §1.4, in QEMU's order."""
        if not isinstance(obj, dict):
            return InputError("QMP input must be a JSON object")
        has_id = "id" in obj
        rid = obj.get("id")
        exec_key: str | None = None
        # QEMU walks the members in its hash-table order (first clash wins)
        for key in qdict_order(list(obj)):
            value = obj[key]
            if key == "execute" or key == "exec-oob" and self.oob_enabled:
                if not isinstance(value, str):
                    return InputError(f"QMP input member '{key}' must be a string", id=rid, has_id=has_id)
                if exec_key is not None:
                    return InputError(f"QMP input member '{key}' clashes with '{exec_key}'", id=rid,
                                      has_id=has_id)
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    return InputError("QMP input member 'arguments' must be an object", id=rid, has_id=has_id)
            elif key == "id":
                continue
            else:
                return InputError(f"QMP input member '{key}' is unexpected", id=rid, has_id=has_id)
        if exec_key is None:
            return InputError("QMP input lacks member 'execute'", id=rid, has_id=has_id)
        return Request(obj[exec_key], obj.get("arguments", {}), rid, has_id, exec_key == "exec-oob")


def format_event(name: str, data: dict[str, Any] | None = None, *, timestamp: float | None = None) -> dict[str, Any]:
    """An event object: ``timestamp`` (host wall clock), ``event``, and ``data`` unless empty."""
    now = time.time() if timestamp is None else timestamp
    sec = int(now)
    msg: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": sec, "microseconds": int((now - sec) * 1_000_000)},
    }
    if data is not None:
        msg["data"] = data
    return msg
