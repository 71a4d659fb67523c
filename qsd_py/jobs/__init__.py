"""Background jobs: QEMU's job state machine, block jobs and the jobs that run in the daemon.

A layer between QMP and the block layer: jobs use nodes (through the block layer's children,
drain and permissions), and the QMP commands of ``commands.py`` drive them.
"""
