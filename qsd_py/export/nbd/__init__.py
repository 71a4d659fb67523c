"""The NBD export: the daemon's NBD server, its exports and client connections."""
