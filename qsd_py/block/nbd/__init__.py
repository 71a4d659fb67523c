"""The NBD client's I/O: a connection on an asyncio loop and the session that reconnects it.

The protocol itself is qsd_py/nbd/client.py (no I/O); the block driver is
qsd_py/block/drivers/nbd.py, the only user of this package.
"""
