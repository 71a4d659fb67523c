"""The QMP server: QEMU's JSON dialect, sessions, socket chardevs and the core commands."""
