"""NBD (Network Block Device) protocol support: :mod:`wire` layouts and the sans-I/O :mod:`server` core.

Nothing in this package imports asyncio or the block layer; the daemon's
``vdkit.daemon.nbd_export`` connects the core to sockets and drives.
"""
