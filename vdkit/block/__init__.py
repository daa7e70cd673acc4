"""The block layer: nodes and chains (``node``, ``chain``), the driver interface (``driver``), guest
I/O through a chain (``io``), generic snapshot records and lookups (``snapshot``) and the engines the
front ends and block jobs run: copy (``copy``, ``target``), commit (``commit``), ``progress``.
Submodules load on first attribute access."""


def __getattr__(name: str) -> object:
    from vdkit import _submodule

    return _submodule(__name__, name)
