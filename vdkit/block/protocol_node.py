"""A protocol node on its own (a ``-blockdev`` file, nbd or rbd node, the file node below a drive's
format) as a :class:`~vdkit.block.node.Node`, so that info and snapshots ask it as they ask any node.

QEMU's protocol drivers answer ``bdrv_query_image_info`` themselves: the length in whole sectors, the
allocated size, a dirty flag only for a local file.  A protocol whose module names a ``NODE_FORMAT``
(RBD: object size, snapshots, an empty specific block) answers through that registered format's driver
instead, which is what it is when it is the top node (``driver=rbd``).
"""

from __future__ import annotations

from vdkit.block.driver import FormatDriver

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from vdkit.block.node import Node
    from vdkit.io.file import ImageFile


class ProtocolNodeDriver(FormatDriver):
    """The operations table of a bare protocol node: its bytes, no format layer, no snapshots
    (one subclass per protocol name, :func:`_driver_class`, as ``format_name`` is a class fact)."""

    @property
    def virtual_size(self) -> int:
        """The protocol layer reports its length in whole 512-byte sectors."""
        return -(-self.file.size() // 512) * 512

    @property
    def dirty(self) -> bool | None:
        """Only the local file protocol has a ``dirty-flag`` (False); network protocols report none."""
        return False if self.format_name == "file" or getattr(self.file, "has_image_child", False) else None


_CLASSES: dict[str, type[ProtocolNodeDriver]] = {}


def _driver_class(protocol: str) -> type[ProtocolNodeDriver]:
    cls = _CLASSES.get(protocol)
    if cls is None:
        cls = _CLASSES[protocol] = type("ProtocolNodeDriver", (ProtocolNodeDriver,), {"format_name": protocol})
    return cls


def protocol_name(file: object) -> str:
    """The driver name of the protocol ``file`` was opened with: ``file``, or the network protocol's."""
    return str(getattr(file, "protocol_driver", "file"))


def protocol_node(filename: str, file: ImageFile, *, readonly: bool) -> Node:
    """``file`` as a node of its own under ``filename``."""
    from vdkit.block.node import Node

    proto = protocol_name(file)
    fmt = None
    if proto != "file":
        from vdkit.protocols.registry import node_format

        fmt = node_format(proto)
    if fmt is None:
        return Node(filename, _driver_class(proto)(file), readonly=readonly)
    from vdkit.block.driver import OpenContext
    from vdkit.formats.registry import open_driver

    return Node(filename, open_driver(fmt, file, OpenContext(filename, readonly=readonly)), readonly=readonly)
