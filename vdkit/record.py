"""Dataclass-style record classes that cost almost nothing to import.

``vdkit-img info`` has to start within 1.5x of a bare interpreter, and the
shapes on that path (the QAPI info model, the qcow2 header, snapshot entries,
lock modes, ...) were dataclasses.  The standard module costs about 10 ms to
import (it pulls in ``inspect``, ``ast`` and ``dis``) and about half a
millisecond per class, several times what reading a qcow2 header takes.

:func:`record` keeps the dataclass way of declaring a shape (annotated fields,
defaults, :func:`field` with ``default_factory`` / ``repr``, ``frozen``,
``slots``) and builds only what vdkit uses: a generated ``__init__`` (one small
compiled function, so creating instances costs what it costs with
dataclasses), and shared ``__repr__``, ``__eq__`` and ``__hash__``.  Type
checkers treat it as a dataclass (PEP 681).  Code that is not on the start-up
path keeps using :mod:`dataclasses`; :func:`fields` and :func:`replace` accept
both kinds.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs more than this module
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:

    def dataclass_transform(**_kwargs: object) -> Callable[[T], T]:
        return lambda obj: obj


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Field:
    """What :func:`field` returns; read by :func:`record` and then dropped from the class."""

    __slots__ = ("default", "default_factory", "repr")

    def __init__(self, default: Any, default_factory: Any, repr: bool) -> None:  # noqa: A002 - dataclasses' name
        self.default = default
        self.default_factory = default_factory
        self.repr = repr


def field(*, default: Any = MISSING, default_factory: Callable[[], Any] | Any = MISSING, repr: bool = True) -> Any:  # noqa: A002
    """A field with a per-instance default (``default_factory``) or hidden from ``repr``."""
    return Field(default, default_factory, repr)


def _is_classvar(annotation: object) -> bool:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return isinstance(text, str) and (text.startswith("ClassVar") or text.startswith("typing.ClassVar"))


@dataclass_transform(field_specifiers=(field,))
def record(
    cls: type[T] | None = None, /, *, frozen: bool = False, slots: bool = False
) -> Any:
    """Class decorator: turn annotated class attributes into an ``__init__`` and value semantics."""

    def wrap(c: type[T]) -> type[T]:
        built: type[T] = _build(c, frozen, slots)
        return built

    return wrap if cls is None else wrap(cls)


def _build(cls: Any, frozen: bool, slots: bool) -> Any:
    # Runs once per record class at import, for every class on the start-up path: one pass over the
    # annotations with the common case (string annotations, no record bases, no field()) inline, and
    # the class attributes set one by one (each dunder set on a class updates its slots).
    body = cls.__dict__
    if cls.__bases__ == (object,):
        names: list[str] = []
        defaults: dict[str, Any] = {}
    else:
        names = []
        defaults = {}
        for base in reversed(cls.__mro__[1:]):
            for name in getattr(base, "__record_fields__", ()):
                if name not in names:
                    names.append(name)
            defaults.update(getattr(base, "__record_defaults__", {}))
    hidden: list[str] | None = None
    declared: list[str] | None = None  # fields given a field(...) in this class body
    seen_default = False
    for name, annotation in body.get("__annotations__", {}).items():
        if "ClassVar" in annotation and _is_classvar(annotation) if annotation.__class__ is str \
                else _is_classvar(annotation):
            continue
        if name not in names:
            names.append(name)
        value = body.get(name, MISSING)
        if value.__class__ is Field:
            if declared is None:
                declared = []
            declared.append(name)
            if not value.repr:
                if hidden is None:
                    hidden = []
                hidden.append(name)
            value = value.default if value.default_factory is MISSING else Field(MISSING, value.default_factory, True)
        if value is not MISSING:
            defaults[name] = value
            seen_default = True
        elif name in defaults:
            del defaults[name]
    if seen_default or defaults:
        seen_default = False
        for name in names:
            if name in defaults:
                seen_default = True
            elif seen_default:
                raise TypeError(f"non-default argument {name!r} follows default argument")

    fields_ = tuple(names)
    shown = fields_ if hidden is None else tuple(n for n in names if n not in hidden)
    if slots:
        attrs: dict[str, Any] = {
            "__init__": _deferred_init(), "__record_fields__": fields_, "__record_defaults__": defaults,
            "__record_repr__": shown, "__match_args__": fields_, "__repr__": _repr, "__eq__": _eq,
            "__hash__": _hash if frozen else None,
        }
        if frozen:
            attrs["__setattr__"] = _frozen_setattr
            attrs["__delattr__"] = _frozen_delattr
        body_dict = {k: v for k, v in body.items() if k not in names and k not in ("__dict__", "__weakref__")}
        body_dict.update(attrs, __slots__=tuple(n for n in names if n not in getattr(cls, "__record_fields__", ())))
        return type(cls)(cls.__name__, cls.__bases__, body_dict)
    if declared is not None:
        for name in declared:
            if name in defaults and defaults[name].__class__ is not Field:
                setattr(cls, name, defaults[name])
            else:
                delattr(cls, name)
    cls.__init__ = _deferred_init()
    cls.__record_fields__ = fields_
    cls.__record_defaults__ = defaults
    cls.__record_repr__ = shown
    setattr(cls, "__match_args__", fields_)  # noqa: B010 - mypy refuses the assignment form for this name
    cls.__repr__ = _repr
    cls.__eq__ = _eq
    cls.__hash__ = _hash if frozen else None
    if frozen:
        cls.__setattr__ = _frozen_setattr
        cls.__delattr__ = _frozen_delattr
    return cls


_COMPILE_AFTER = 16  # instances built the generic way before a class gets a compiled __init__


def _deferred_init() -> Callable[..., None]:
    """An ``__init__`` that fills fields generically, then installs a compiled one.

    Compiling costs about 0.1 ms a class; most shapes are built once or never
    in a run (``vdkit-img info`` builds one header and none of the daemon's
    shapes), so only classes built often (snapshot lists) get compiled.
    """
    calls = 0

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        owner: Any = next(c for c in type(self).__mro__ if c.__dict__.get("__init__") is __init__)
        calls += 1
        if calls > _COMPILE_AFTER:
            owner.__init__ = _compile_init(owner)
            owner.__init__(self, *args, **kwargs)
            return
        names = owner.__record_fields__
        if len(args) > len(names):
            raise TypeError(f"{owner.__qualname__}.__init__() takes {len(names) + 1} positional arguments "
                            f"but {len(args) + 1} were given")
        defaults = owner.__record_defaults__
        for i, name in enumerate(names):
            if i < len(args):
                if name in kwargs:
                    raise TypeError(f"{owner.__qualname__}.__init__() got multiple values for argument {name!r}")
                value = args[i]
            elif name in kwargs:
                value = kwargs.pop(name)
            elif name in defaults:
                value = defaults[name]
                if isinstance(value, Field):
                    value = value.default_factory()
            else:
                raise TypeError(f"{owner.__qualname__}.__init__() missing required argument: {name!r}")
            object.__setattr__(self, name, value)
        if kwargs:
            unexpected = next(iter(kwargs))
            raise TypeError(f"{owner.__qualname__}.__init__() got an unexpected keyword argument {unexpected!r}")

    return __init__


def _compile_init(cls: Any) -> Callable[..., None]:
    frozen = cls.__setattr__ is _frozen_setattr
    ns: dict[str, Any] = {"_set": object.__setattr__, "MISSING": MISSING}
    params, body = [], []
    for name in cls.__record_fields__:
        value = cls.__record_defaults__.get(name, MISSING)
        expr = name
        if value is MISSING:
            params.append(name)
        elif isinstance(value, Field):
            ns[f"_f_{name}"] = value.default_factory
            params.append(f"{name}=MISSING")
            expr = f"_f_{name}() if {name} is MISSING else {name}"
        else:
            ns[f"_d_{name}"] = value
            params.append(f"{name}=_d_{name}")
        body.append(f"    _set(self, {name!r}, {expr})" if frozen else f"    self.{name} = {expr}")
    src = f"def __init__(self, {', '.join(params)}):\n" + ("\n".join(body) or "    pass") + "\n"
    exec(src, ns)  # noqa: S102 - the source is built from the class's own field names
    init: Callable[..., None] = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def _repr(self: Any) -> str:
    inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__record_repr__)
    return f"{type(self).__qualname__}({inner})"


def _values(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, n) for n in obj.__record_fields__)


def _eq(self: Any, other: object) -> object:  # bool or NotImplemented
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _frozen_setattr(self: Any, name: str, value: object) -> None:
    raise AttributeError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise AttributeError(f"cannot delete field {name!r}")


def is_record(obj: object) -> bool:
    """True for record or dataclass instances (not classes)."""
    cls = type(obj)
    return hasattr(cls, "__record_fields__") or hasattr(cls, "__dataclass_fields__")


def fields(obj_or_cls: Any) -> tuple[str, ...]:
    """Field names in declaration order, for records and dataclasses alike."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    names: tuple[str, ...] | None = getattr(cls, "__record_fields__", None)
    if names is not None:
        return names
    import dataclasses

    return tuple(f.name for f in dataclasses.fields(cls))


def replace(obj: T, /, **changes: Any) -> T:
    """A copy of ``obj`` with some fields changed (``dataclasses.replace`` for records)."""
    values = {n: getattr(obj, n) for n in fields(obj)}
    values.update(changes)
    return type(obj)(**values)


if TYPE_CHECKING:
    from functools import cached_property as cached_property
else:

    class cached_property:  # noqa: N801 - functools' name, so the type checker's view and this agree
        """``functools.cached_property`` without importing functools (and collections with it) at start-up.

        The first read computes the value and stores it in the instance's ``__dict__`` under the same name,
        where later reads find it before this (non-data) descriptor; ``del obj.name`` forgets it.
        """

        def __init__(self, func):
            self.func = func
            self.attrname = func.__name__
            self.__doc__ = func.__doc__

        def __set_name__(self, owner, name):
            self.attrname = name

        def __get__(self, instance, owner=None):
            if instance is None:
                return self
            value = instance.__dict__[self.attrname] = self.func(instance)
            return value
