"""Image info: collected as typed records (``collect``, ``model``), rendered as qemu-img/QMP do
(``render_human``, ``render_json``).  Submodules load on first attribute access."""


def __getattr__(name: str) -> object:
    from vdkit import _submodule

    return _submodule(__name__, name)
