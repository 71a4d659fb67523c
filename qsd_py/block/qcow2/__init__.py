"""The qcow2 format: its on-disk structures as pure functions on bytes, and (later) the driver.

``header`` parses and writes the header cluster, ``entries`` decodes L1/L2 entries and refcount
cells, ``compress`` inflates compressed clusters, ``snapshots`` reads the internal snapshot
table. None of them does I/O: the driver reads the bytes and hands them over, so the format
rules can be tested on their own against images made by qemu-img.
"""
