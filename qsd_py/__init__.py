"""qsd-py: a Python storage daemon that speaks QEMU's interfaces (QMP, CLI, QAPI, FUSE exports)."""

__version__ = "0.1.0"

# The QEMU version qsd-py models its interfaces on (QMP greeting, query-version).
QEMU_VERSION = (11, 1, 3)
