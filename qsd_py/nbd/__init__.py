"""The NBD protocol: wire constants and the two protocol engines (server and client).

The engines do no I/O: they take bytes in and hand bytes and events out, so the NBD export
(``qsd_py/export/nbd/``) and the NBD client driver (``qsd_py/block/drivers/nbd.py``) drive
the same code from their own sockets. This package sits below both layers.
"""
