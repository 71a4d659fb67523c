"""Benchmark harness for qsd-py (``scripts/bench``).

Runs one fio client against several *targets* (the bare backing file, qsd-py's FUSE exports,
QEMU's qemu-storage-daemon in the real-qsd chroot) over several *backends* (raw image on disk,
raw image on tmpfs, null-co), interleaving targets round by round so machine drift cancels,
and reports ratios. It never imports qsd_py: daemons are measured from the outside, as users
see them.
"""
