"""The daemon's machine model, below the monitor: drives, media, throttling, I/O accounting.

No asyncio and no monitor code: the monitor's handlers read and change this
state, and the daemon plugs its services in (the NBD export service through
:class:`vdkit.devices.exports.ExportService`).
"""
