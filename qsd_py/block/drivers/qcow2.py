"""The ``qcow2`` driver: its node lives with the rest of the format in qsd_py/block/qcow2/."""

from qsd_py.block.qcow2.node import Qcow2Node as NODE

__all__ = ["NODE"]
