"""QEMU's JSON reader (its lexer, streamer and parser), for QMP and for JSON given on a command line.

QEMU reads QMP input and command-line JSON (``json:{...}`` names, ``-blockdev
{...}``) with one parser, so they accept the same texts and fail with the same
words.  :class:`JsonStreamer` takes bytes as they arrive and splits them into
messages the way QEMU's streamer does (see ``qmp-hmp.md`` §1.1): a message
ends when the bracket depth returns to zero, so objects may span reads or
share one; single-quoted strings are accepted; a top-level scalar is a
complete message as soon as a delimiter follows it.  A lexical error discards
the partial message and is reported as ``JSON parse error, stray '...'``; the
lexer then skips input up to a structural or control character (QEMU's
recovery).  The lexer works on bytes: strings are decoded by the parser as
QEMU's modified UTF-8 (``C0 80`` and ``\\u0000`` are NUL; surrogates and
noncharacters are refused), duplicate keys are an error, and numbers that
QEMU holds as doubles are echoed as it prints them (``%.17g``).
:func:`loads` reads one whole text as QEMU's ``qobject_from_json`` does.

Limits: QEMU caps a message at 64 MiB of tokens, 2M tokens and nesting depth
1024.  A streamer caps a message at ``max_message_size`` bytes and nesting at
``max_nesting`` (the QMP session's defaults are 1 MiB and 256, so that echoing
a pathological ``id`` stays within Python's recursion limit); exceeding one
discards the partial message with QEMU's texts ``JSON token size limit
exceeded`` / ``JSON nesting depth limit exceeded``.
"""

from __future__ import annotations

import enum
import re

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

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


class _Token:
    __slots__ = ("kind", "text")

    def __init__(self, kind: _Tok, text: str) -> None:
        self.kind = kind
        self.text = text


# what ends a run of ordinary string bytes: the quote, a backslash, a control character, 0xFE, 0xFF
_STOP_IN = {q: re.compile("[" + q + r"\\\x00-\x1f\xfe\xff]") for q in "\"'"}
# what lexical-error recovery skips: everything but structural characters, control characters except
# tab, and the bytes 0xFE/0xFF (each of those ends recovery and is lexed again)
_RECOVERY_SKIP = re.compile(r"[^\x00-\x08\x0a-\x1f\xfe\xff{}\[\]:,]*")


def _scan_string(buf: str, pos: int) -> tuple[int, bool] | None:
    """(end, ok) of the quoted string starting at ``pos``; None if incomplete.

    ``buf`` holds bytes (latin-1).  A control character or a byte 0xFE/0xFF
    inside the string, also right after a backslash, is a lexical error: the
    erroneous token runs from the quote up to and including that byte.
    """
    quote = buf[pos]
    stop = _STOP_IN[quote]
    i = pos + 1
    n = len(buf)
    while True:
        m = stop.search(buf, i)
        if m is None:
            return None
        j = m.start()
        c = buf[j]
        if c == "\\":
            if j + 1 >= n:
                return None
            e = buf[j + 1]
            if e < " " or e in "\xfe\xff":
                return j + 2, False
            i = j + 2
            continue
        return j + 1, c == quote


# number lexer states: transitions, and which states may end a number
_NUM_TRANS: dict[str, dict[str, str]] = {
    "start": {"-": "minus", "0": "zero", **{d: "int" for d in "123456789"}},
    "minus": {"0": "zero", **{d: "int" for d in "123456789"}},
    "zero": {".": "dot"},  # QEMU: "0e5" is the number 0, then the keyword "e"
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
            if state in _NUM_FINAL and not (state == "zero" and buf[i] in "0123456789"):
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
_HEX = frozenset("0123456789abcdefABCDEF")
# lead byte -> (sequence length, smallest code point that needs that length)
_UTF8_LEAD = {**{b: (2, 0x80) for b in range(0xC0, 0xE0)}, **{b: (3, 0x800) for b in range(0xE0, 0xF0)},
              **{b: (4, 0x10000) for b in range(0xF0, 0xF8)}, **{b: (5, 0x200000) for b in range(0xF8, 0xFC)},
              **{b: (6, 0x4000000) for b in range(0xFC, 0xFE)}}


def _bad_code_point(cp: int) -> bool:
    """Surrogates, beyond U+10FFFF, and noncharacters: QEMU accepts none of them."""
    return 0xD800 <= cp <= 0xDFFF or cp > 0x10FFFF or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE


def _utf8_char(text: str, i: int) -> tuple[int | None, int]:
    """Decode the (modified) UTF-8 sequence at ``text[i]`` (bytes as latin-1 chars).

    Returns (code point or None if invalid, index after the bytes consumed).
    As observed in QEMU: the lead byte fixes the length (up to 6 bytes);
    continuation bytes are consumed while they come, so a truncated sequence
    is one invalid unit; a complete one is invalid when overlong (except the
    two-byte NUL ``C0 80``), a surrogate, past U+10FFFF or a noncharacter.
    """
    b0 = ord(text[i])
    if b0 < 0x80:
        return b0, i + 1
    lead = _UTF8_LEAD.get(b0)
    if lead is None:  # continuation byte or 0xFE/0xFF
        return None, i + 1
    length, smallest = lead
    cp = b0 & (0x7F >> length)
    j = i + 1
    end = min(i + length, len(text))
    while j < end and 0x80 <= ord(text[j]) < 0xC0:
        cp = cp << 6 | ord(text[j]) & 0x3F
        j += 1
    if j < i + length:
        return None, j
    if cp == 0 and length == 2:
        return 0, j
    if cp < smallest or _bad_code_point(cp):
        return None, j
    return cp, j


def qemu_text(raw: str) -> str:
    """Bytes (latin-1 chars) as QEMU prints them: cut at NUL, invalid UTF-8 as U+FFFD (one per unit)."""
    raw = raw.split("\x00", 1)[0]
    if raw.isascii():
        return raw
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        cp, i = _utf8_char(raw, i)
        out.append("\ufffd" if cp is None else chr(cp))
    return "".join(out)


def _decode_string(raw: str) -> str:
    """A string token's value; ``raw`` is the token with its quotes, bytes as latin-1 chars."""
    n = len(raw) - 1  # the closing quote
    if raw.isascii() and "\\" not in raw:
        return raw[1:n]
    out: list[str] = []
    i = 1
    while i < n:
        c = raw[i]
        if c == "\\":
            e = raw[i + 1]
            if e in _ESCAPES:
                out.append(_ESCAPES[e])
                i += 2
                continue
            if e != "u":
                raise _ParseError("invalid escape sequence in string")
            cp, j = _hex_escape(raw, i)
            out.append(chr(cp))
            i = j
            continue
        if c < "\x80":
            out.append(c)
            i += 1
            continue
        ucp, i = _utf8_char(raw, i)  # the closing quote is no continuation byte
        if ucp is None:
            raise _ParseError("invalid UTF-8 sequence in string")
        out.append(chr(ucp))
    return "".join(out)


def _hex_escape(raw: str, i: int) -> tuple[int, int]:
    """The ``\\uXXXX`` escape (or surrogate pair) at ``raw[i]``: (code point, index after it)."""
    hexd = raw[i + 2 : i + 6]  # up to four characters, the closing quote included
    if len(hexd) != 4 or not _HEX.issuperset(hexd):
        raise _ParseError(f"{qemu_text(raw[i : i + 2 + len(hexd)])} is not a valid Unicode character")
    cp = int(hexd, 16)
    j = i + 6
    if 0xD800 <= cp <= 0xDBFF:
        low = raw[j + 2 : j + 6]
        if raw[j : j + 2] == "\\u" and len(low) == 4 and _HEX.issuperset(low) and 0xDC00 <= int(low, 16) <= 0xDFFF:
            cp = 0x10000 + ((cp - 0xD800) << 10) + (int(low, 16) - 0xDC00)
            j += 6
    if _bad_code_point(cp):
        raise _ParseError(f"{raw[i:j]} is not a valid Unicode character")
    return cp, j


class QFloat(float):
    """A JSON number QEMU holds as a double: echoed as QEMU prints it (``%.17g``: 1500, 0.10000000000000001)."""

    def __repr__(self) -> str:
        return "%.17g" % self

    __str__ = __repr__


def _number(text: str) -> int | float:
    if not any(c in text for c in ".eE"):
        v = int(text)
        if -(1 << 63) <= v < (1 << 64):
            return v
    return QFloat(text)


def _parse_message(tokens: list[_Token]) -> Any:
    """One message's tokens -> its value: iterative recursive-descent (no Python recursion, whatever the
    depth); tokens that end before the value does are "premature EOI" (only a text's end does that)."""
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
            raise _ParseError("premature EOI")
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
            if frame[1] in frame[0]:
                raise _ParseError("duplicate key")
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
                raise _ParseError("premature EOI")
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
            if tok is None:
                raise _ParseError("premature EOI")
            if tok.kind in (_Tok.RCURLY, _Tok.RSQUARE, _Tok.COMMA, _Tok.COLON):
                raise _ParseError("expecting value")
            if tok.kind is not _Tok.STRING:
                if tok.kind is _Tok.KEYWORD and tok.text not in ("true", "false", "null"):
                    raise _ParseError(f"invalid keyword '{tok.text}'")
                raise _ParseError("key is not a string in object")
            pos += 1
            frame[1] = _decode_string(tok.text)
            colon = peek()
            if colon is None:
                raise _ParseError("premature EOI")
            if colon.kind is not _Tok.COLON:
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
# Streamer: bytes -> messages (values or errors, in order)
# --------------------------------------------------------------------------


class JsonStreamer:
    """Bytes in (:meth:`feed`), messages out (:attr:`out`): ``(True, value)`` or ``(False, error text)``."""

    def __init__(self, *, max_message_size: int, max_nesting: int) -> None:
        self.max_message_size = max_message_size
        self.max_nesting = max_nesting
        self.out: list[tuple[bool, Any]] = []
        self._buf = ""
        self._tokens: list[_Token] = []
        self._depth_curly = self._depth_square = 0
        self._msg_size = 0
        self._discard_quote: str | None = None
        self._discard_escape = False
        self._recovering = False

    def feed(self, data: bytes) -> None:
        # the lexer works on bytes, as QEMU's does (one latin-1 char per byte);
        # strings are UTF-8-decoded by the parser
        self._buf += data.decode("latin-1")
        self._lex()

    def finish(self) -> None:
        """The end of the input (QEMU's flush): the token being lexed ends here (a number or keyword
        as it stands, an open string as a stray one), and tokens of a value still open are parsed
        (their error: where it is, else "premature EOI")."""
        rest, self._buf = self._buf, ""
        if rest and self._discard_quote is None and not self._recovering:
            c = rest[0]
            if c in "\"'":
                self._token(_Token(_Tok.ERROR, rest))
            elif c == "-" or "0" <= c <= "9":
                scanned = _scan_number(rest + " ", 0)
                ok = scanned is not None and scanned[1] and scanned[0] == len(rest)
                self._token(_Token(_Tok.NUMBER if ok else _Tok.ERROR, rest))
            else:
                self._token(_Token(_Tok.KEYWORD, rest))
        if self._tokens:
            self._parse()

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
            if self._recovering:
                pos = _RECOVERY_SKIP.match(buf, pos).end()  # type: ignore[union-attr]
                if pos < n:
                    self._recovering = False
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
                scanned = _scan_string(buf, pos)
                if scanned is None:
                    if self._msg_size + (n - pos) > self.max_message_size:
                        # drop the rest of this string as it arrives, then resume
                        self._limit("JSON token size limit exceeded")
                        self._discard_quote = c
                        self._discard_escape = False
                        pos += 1
                        continue
                    break
                end, ok = scanned
                self._token(_Token(_Tok.STRING if ok else _Tok.ERROR, buf[pos:end]))
                pos = end
                continue
            if c == "-" or "0" <= c <= "9":
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
        self.out.append((False, desc))

    def _token(self, tok: _Token) -> None:
        if tok.kind is _Tok.ERROR:
            # the partial message is dropped; the lexer skips to a likely start of a new token
            self._reset_message()
            self._recovering = True
            self.out.append((False, f"JSON parse error, stray '{qemu_text(tok.text)}'"))
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
        self._parse()

    def _parse(self) -> None:
        tokens = self._tokens
        self._reset_message()
        try:
            value = _parse_message(tokens)
        except _ParseError as exc:
            self.out.append((False, f"JSON parse error, {exc}"))
            return
        self.out.append((True, value))


class JsonError(ValueError):
    """A text QEMU's parser refuses; the message is QEMU's."""


def loads(data: bytes, *, max_nesting: int = 256) -> Any:
    """One JSON value from a whole text, as QEMU's ``qobject_from_json`` reads one: the first error
    is the text's; a second value after the first is "Expecting at most one JSON value", none at
    all "Expecting a JSON value".  (The nesting cap keeps callers that recurse into the value
    within Python's recursion limit.)"""
    stream = JsonStreamer(max_message_size=64 << 20, max_nesting=max_nesting)
    stream.feed(data)
    stream.finish()
    if not stream.out:
        raise JsonError("Expecting a JSON value")
    ok, first = stream.out[0]
    if not ok:
        raise JsonError(first)
    if len(stream.out) > 1:
        raise JsonError("Expecting at most one JSON value")
    return first
