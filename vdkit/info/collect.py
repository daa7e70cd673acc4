"""Node -> image info: the one place that turns driver state into reported info.

The CLI (``info``, ``snapshot -l``), QMP (``query-block``,
``query-snapshots``, ``query-named-block-nodes``) and HMP all call these
functions, so every front end reports the same facts: format nodes, bare
protocol nodes (:func:`vdkit.block.protocol_node.protocol_node` makes them
nodes) and job filters.  The counterpart of QEMU's ``block/qapi.c``.
"""

from __future__ import annotations

from vdkit.info.model import ImageInfo

TYPE_CHECKING = False  # typing itself is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from collections.abc import Callable

    from vdkit.block.node import Node

    # a renderer's placeholder for a number that changes without anything else changing (a file's
    # allocation): given the function that reads it, returns the number to put in the model meanwhile
    Hole = Callable[[Callable[[], int]], int]


def image_info(node: Node, *, nested: bool = False, hole: Hole | None = None) -> ImageInfo:
    """Info of one node (``nested``: with ``backing-image`` filled down the chain).

    ``hole``: ``actual-size`` is its placeholder (a cached rendering fills in the size when it is
    sent: :mod:`vdkit.monitor.block_cmds`)."""
    driver = node.driver
    try:
        actual: int | None = driver.allocated_size()
    except OSError:
        actual = None
    if actual is not None and hole is not None:
        actual = hole(driver.allocated_size)
    info = ImageInfo(
        filename=node.display_name or node.filename,
        format=driver.format_name,
        virtual_size=driver.virtual_size,
        dirty_flag=driver.dirty,
        actual_size=actual,
        cluster_size=driver.cluster_size or None,
        encrypted=True if driver.encrypted else None,
    )
    stored = driver.backing_file
    if stored is not None:
        info.backing_filename = stored
        info.full_backing_filename = node.backing_filename_resolved
        info.backing_filename_format = driver.backing_format
    entries = driver.snapshots()
    if entries:  # the generic snapshot layer loads only for an image that lists some
        from vdkit.block.snapshot import snapshot_infos

        snaps = snapshot_infos(driver, entries)
        if snaps:
            info.snapshots = snaps
    spec = driver.specific_info()
    if spec is not None:
        info.format_specific = spec
    if nested and node.backing is not None:
        info.backing_image = image_info(node.backing, nested=True, hole=hole)
    return info


def filter_image_info(node: Node, driver: str, *, nested: bool, filename: str | None = None,
                      hole: Hole | None = None) -> ImageInfo:
    """A block job's implicit filter node above ``node`` (``commit_top``, ``copy-on-read``, ...): its
    child's sizes under the filter's driver name, the child itself as ``backing-image`` when ``nested``."""
    child = image_info(node, nested=False, hole=hole)
    return ImageInfo(filename=filename or child.filename, format=driver, virtual_size=child.virtual_size,
                     dirty_flag=False, actual_size=child.actual_size, cluster_size=child.cluster_size,
                     backing_image=image_info(node, nested=True, hole=hole) if nested else None)
