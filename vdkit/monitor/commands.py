"""QMP command registry: name -> handler, argument schemas, dispatch.

Argument validation follows QEMU's input visitor (``qmp-hmp.md`` §1.4): the
schema's members are visited in schema order, so a missing mandatory member
or a wrongly typed one is reported first, and unknown members only after all
declared ones were accepted.  The texts are QEMU's.

Handlers return model objects (or plain JSON values); the dispatcher turns
them into JSON values with ``render_json.to_qobject``.  A handler signals a
failure by raising a :class:`~vdkit.errors.VdkitError`; its ``qmp_class``
becomes the QMP error class.  Handlers never see the wire: HMP calls the same
handlers through :meth:`CommandRegistry.call`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vdkit.errors import VdkitError
from vdkit.info.render_json import to_qobject
from vdkit.monitor.qmp_wire import RawJson

if TYPE_CHECKING:
    from vdkit.devices.registry import DeviceRegistry
    from vdkit.monitor.qmp_wire import QmpSession

class DeviceNotFoundError(VdkitError):
    """No device, node or job of the given name (QMP's ``DeviceNotFound`` error class)."""

    qmp_class = "DeviceNotFound"


class CommandNotFoundError(VdkitError):
    """An unknown command, or one the capabilities negotiation does not allow yet (``CommandNotFound``)."""

    qmp_class = "CommandNotFound"


_TYPE_NAMES = {"str": "string", "int": "integer", "bool": "boolean", "array": "array", "object": "object",
               "number": "number"}


@dataclass(frozen=True)
class Arg:
    """One schema member.

    ``type`` is ``str``/``int``/``bool``/``number``/``any``/``array``/``object``;
    ``enum`` restricts a ``str``; ``items`` describes array elements; ``members``
    describes an ``object`` (a nested struct).
    """

    name: str
    type: str = "str"
    optional: bool = False
    enum: tuple[str, ...] | None = None
    items: Arg | None = None
    members: tuple[Arg, ...] | None = None
    # QEMU 7.2 prints the enum element of a list without a name ('null')
    enum_label: str | None = None


def opt(name: str, type: str = "str", **kw: Any) -> Arg:
    return Arg(name, type, optional=True, **kw)


def _check_value(arg: Arg, value: Any, path: str) -> Any:
    t = arg.type
    if t == "any":
        return value
    if t == "str":
        if not isinstance(value, str):
            raise VdkitError(f"Invalid parameter type for '{path}', expected: string")
        if arg.enum is not None and value not in arg.enum:
            label = arg.enum_label if arg.enum_label is not None else path
            raise VdkitError(f"Parameter '{label}' does not accept value '{value}'")
        return value
    if t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise VdkitError(f"Invalid parameter type for '{path}', expected: integer")
        if not -(1 << 63) <= value < (1 << 63):  # QEMU's parser made it a uint64 or a double
            raise VdkitError(f"Invalid parameter type for '{path}', expected: integer")
        return value
    if t == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise VdkitError(f"Invalid parameter type for '{path}', expected: number")
        return value
    if t == "bool":
        if not isinstance(value, bool):
            raise VdkitError(f"Invalid parameter type for '{path}', expected: boolean")
        return value
    if t == "array":
        if not isinstance(value, list):
            raise VdkitError(f"Invalid parameter type for '{path}', expected: array")
        assert arg.items is not None
        return [_check_value(arg.items, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if t == "object":
        if not isinstance(value, dict):
            raise VdkitError(f"Invalid parameter type for '{path}', expected: object")
        if arg.members is None:
            return value
        return validate(arg.members, value, prefix=f"{path}.")
    raise AssertionError(f"unknown schema type {t}")


def validate(schema: tuple[Arg, ...], args: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """Check ``args`` against ``schema``; returns a dict with only the given members."""
    out: dict[str, Any] = {}
    for arg in schema:
        path = prefix + arg.name
        if arg.name not in args:
            if not arg.optional:
                raise VdkitError(f"Parameter '{path}' is missing")
            continue
        out[arg.name] = _check_value(arg, args[arg.name], path)
    for key in args:
        if key not in out and all(a.name != key for a in schema):
            raise VdkitError(f"Parameter '{prefix}{key}' is unexpected")
    return out


Handler = Callable[["CommandContext", dict[str, Any]], Any]


@dataclass
class CommandContext:
    """What a handler may touch: the machine (drives, run state, the export service) and event sinks.

    ``events`` collects ``(name, data)`` pairs; the runtime broadcasts them
    before it sends the command's response, as QEMU does, and ``late_events``
    right after it (an NBD export deleted while clients were connected).
    ``session`` is the QMP session for ``qmp_capabilities`` (None when HMP
    calls a handler).  ``registry`` is the registry running the command
    (``query-commands``, ``human-monitor-command``); dispatching sets it.
    """

    machine: DeviceRegistry
    session: QmpSession | None = None
    events: list[tuple[str, dict[str, Any] | None]] = field(default_factory=list)
    late_events: list[tuple[str, dict[str, Any] | None]] = field(default_factory=list)
    registry: CommandRegistry | None = None

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((name, data))


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    schema: tuple[Arg, ...] = ()
    allow_oob: bool = False
    # commands the negotiation mode accepts
    negotiation: bool = False
    # optional QMP fast path returning the result already rendered (HMP uses ``handler``)
    render: Callable[[CommandContext, dict[str, Any]], RawJson] | None = None


class CommandRegistry:
    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def register(self, name: str, *schema: Arg, allow_oob: bool = False, negotiation: bool = False,
                 render: Callable[[CommandContext, dict[str, Any]], RawJson] | None = None,
                 ) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self._commands[name] = Command(name, fn, tuple(schema), allow_oob, negotiation, render)
            return fn

        return deco

    def names(self) -> list[str]:
        return list(self._commands)

    def __contains__(self, name: str) -> bool:
        return name in self._commands

    def dispatch(self, ctx: CommandContext, name: str, arguments: dict[str, Any], *, oob: bool = False,
                 negotiated: bool = True) -> Any:
        """Look up, validate and run one command; returns the JSON value of its result.

        ``negotiated`` False means the connection is still in capabilities
        negotiation mode.
        """
        if ctx.registry is None:
            ctx.registry = self
        if not negotiated:
            cmd = self._commands.get(name)
            if cmd is None or not cmd.negotiation:
                raise CommandNotFoundError("Expecting capabilities negotiation with 'qmp_capabilities'")
        else:
            if name == "qmp_capabilities":
                raise CommandNotFoundError("Capabilities negotiation is already complete, command ignored")
            cmd = self._commands.get(name)
            if cmd is None:
                raise CommandNotFoundError(f"The command {name} has not been found")
        if oob and not cmd.allow_oob:
            raise VdkitError(f"The command {name} does not support OOB")
        args = validate(cmd.schema, arguments)
        if cmd.render is not None:
            return cmd.render(ctx, args)
        result = cmd.handler(ctx, args)
        return {} if result is None else to_qobject(result)

    def call(self, ctx: CommandContext, name: str, arguments: dict[str, Any]) -> Any:
        """Run a handler for HMP: validated like QMP, but the model object is returned as is."""
        if ctx.registry is None:
            ctx.registry = self
        cmd = self._commands[name]
        return cmd.handler(ctx, validate(cmd.schema, arguments))
