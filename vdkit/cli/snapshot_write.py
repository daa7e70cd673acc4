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
    from vdkit.block.driver import FormatDriver


def warn_if_probed(driver: FormatDriver, fmt: str | None, filename: str) -> None:
    """The warning a format guessed by probing prints as it opens writable (the driver's text).

    Given to :func:`open_image` as ``on_open``: QEMU prints it before it locks a raw file.
    """
    warning = driver.probed_open_warning(filename) if fmt is None else None
    if warning is not None:
        write_err(warning)


def run(action: str | None, arg: str | None, filename: str, fmt: str | None, *,
        force_share: bool, quiet: bool) -> int:
    """Open ``filename`` read-write and perform ``action`` ('c', 'a', 'd' or None)."""
    from vdkit.block import snapshot as generic
    from vdkit.block.node import open_image

    if force_share:
        raise VdkitError(f"Could not open '{filename}': force-share=on can only be used with read-only images")
    with open_image(filename, fmt, readonly=False, force_share=False, share_writes=True,
                    on_open=lambda drv: warn_if_probed(drv, fmt, filename)) as node:
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
                    # qemu-img's fallback closes and reopens the image: a second warning
                    warn_if_probed(driver, fmt, filename)
                    raise driver._unsupported()
                if driver.snapshot_unsupported_reason() is not None:  # external data file
                    raise VdkitError("Failed to load snapshot: Operation not supported", errno=errno.ENOTSUP)
                # a format passing its file's snapshots down (raw over rbd) is closed, the file rolled back
                # and the node opened again, which warns again, whatever the rollback gave
                reopened = fmt is None and driver.snapshot_revert_reopens
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
                        warn_if_probed(driver, fmt, filename)
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
