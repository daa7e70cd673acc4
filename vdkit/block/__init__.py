"""The block layer: nodes and chains (``node``, ``chain``), the driver interface (``driver``) and guest
I/O through a chain (``io``).  Submodules load on first attribute access."""


def __getattr__(name: str) -> object:
    from vdkit import _submodule

    return _submodule(__name__, name)
