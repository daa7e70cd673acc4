"""``vdkit-img snapshot -c/-a/-d``: the write side of the snapshot command.

The image is opened read-write (taking QEMU's write lock), the action runs,
and failures are reported with qemu-img's exact wording: creation errors as
``-errno (strerror)``, apply errors through "Failed to load snapshot", and
delete looks the snapshot up by name only, like qemu-img does.
"""

from __future__ import annotations

import errno
import os
import time

from vdkit.cli.main import write_err
from vdkit.errors import VdkitError, errno_text

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.block.node import Node

_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, "
    "write operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
)


def probe_warning(node: Node, filename: str) -> str:
    """The probed-raw warning for ``node``: QEMU names the protocol node, whose name is the file name
    except for protocols that report a ``json:`` name (an rbd image)."""
    file = node.driver.file
    return _PROBE_WARNING.format(file.filename if getattr(file, "protocol", None) == "rbd" else filename)


def run(action: str | None, arg: str | None, filename: str, fmt: str | None, *,
        force_share: bool, quiet: bool) -> int:
    """Open ``filename`` read-write and perform ``action`` ('c', 'a', 'd' or None)."""
    from vdkit.block import snapshot as generic
    from vdkit.block.node import open_image

    if force_share:
        raise VdkitError(f"Could not open '{filename}': force-share=on can only be used with read-only images")
    with open_image(filename, fmt, readonly=False, force_share=False) as node:
        if fmt is None and node.format == "raw":
            write_err(probe_warning(node, filename))
        driver = node.driver
        if action == "c":
            assert arg is not None
            now_us = time.time_ns() // 1000
            try:
                node.snapshot_create(arg, date_sec=now_us // 1_000_000, date_nsec=now_us % 1_000_000 * 1000,
                                     vm_clock_nsec=0, vm_state_size=0, icount=0)
            except VdkitError as exc:
                raise VdkitError(f"Could not create snapshot '{arg}': {errno_text(exc.errno or errno.EIO)}") from exc
        elif action == "a":
            assert arg is not None
            try:
                blocker = node.snapshot_goto_blocker()
                if blocker is not None:
                    raise blocker
                if not driver.supports_snapshots:
                    if fmt is None and node.format == "raw":
                        # qemu-img's fallback closes and reopens the image: a second warning
                        write_err(_PROBE_WARNING.format(filename))
                    raise driver._unsupported()
                if driver.snapshot_unsupported_reason() is not None:  # external data file
                    raise VdkitError("Failed to load snapshot: Operation not supported", errno=errno.ENOTSUP)
                # raw passes an rbd image's snapshots down: QEMU closes the raw node, rolls the image back
                # and opens it again, which warns again, whatever the rollback gave
                reopened = fmt is None and node.format == "raw" and getattr(driver.file, "protocol", None) == "rbd"
                try:
                    entry = generic.find_id_then_name(driver.snapshots(), arg)
                    if entry is None:
                        raise VdkitError("Failed to load snapshot: No such file or directory", errno=errno.ENOENT)
                    try:
                        node.snapshot_revert(entry)
                    except VdkitError as exc:
                        err = exc.errno or errno.EIO
                        raise VdkitError(f"Failed to load snapshot: {os.strerror(err)}", errno=err) from exc
                finally:
                    if reopened:
                        write_err(probe_warning(node, filename))
            except VdkitError as exc:
                raise exc.prefixed(f"Could not apply snapshot '{arg}': ") from exc
        elif action == "d":
            assert arg is not None
            entry = generic.find_by_name(driver.snapshots(), arg)
            if entry is None:
                raise VdkitError(f"Could not delete snapshot '{arg}': snapshot not found")
            try:
                node.snapshot_delete(snapshot_id=generic.id_of(entry), name=generic.name_of(entry))
            except VdkitError as exc:
                raise exc.prefixed(f"Could not delete snapshot '{arg}': ") from exc
    return 0
