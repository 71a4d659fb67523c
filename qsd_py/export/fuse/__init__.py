"""FUSE block exports: protocol engine, /dev/fuse transport, mounting."""
