"""Sans-I/O QMP session: bytes in, requests out; replies in, bytes out.

This module contains no networking and no block-layer code (in the manner of
h11): the runtime feeds received bytes to :meth:`QmpSession.receive_data`,
pulls :class:`Request` / :class:`InputError` objects from
:meth:`QmpSession.next_event`, and writes the bytes returned by
:meth:`QmpSession.reply`, :meth:`QmpSession.error` and
:meth:`QmpSession.event`.  That keeps the protocol testable and fuzzable
without sockets.

The JSON stream is read by :class:`vdkit.qjson.JsonStreamer` (QEMU's lexer,
streamer and parser, shared with the JSON given on command lines): messages
split by bracket depth, lexical errors reported and recovered from as QEMU
does, modified UTF-8, duplicate keys refused.  A session caps a message at
``max_message_size`` bytes (default 1 MiB: QMP requests are tiny; QEMU's cap
is 64 MiB) and nesting at ``max_nesting`` (default 256, so that echoing a
pathological ``id`` stays within Python's recursion limit; QEMU's is 1024),
with QEMU's texts when exceeded.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from vdkit.info.render_json import dumps_compact, qdict_order
from vdkit.qjson import JsonStreamer

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
    _stream: JsonStreamer | None = None  # (made on the first input, with the limits as set by then)
    _events: list[Request | InputError] = field(default_factory=list)

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
        stream = self._stream
        if stream is None:
            stream = self._stream = JsonStreamer(max_message_size=self.max_message_size,
                                                 max_nesting=self.max_nesting)
        stream.feed(data)
        for ok, item in stream.out:
            self._events.append(self._validate(item) if ok else InputError(item))
        stream.out.clear()

    def next_event(self) -> Request | InputError | _NeedData:
        if self._events:
            return self._events.pop(0)
        return NEED_DATA

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
