"""Block exports: the registry and the export types (``fuse``)."""
