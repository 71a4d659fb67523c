"""Disk encryption as QEMU's block layer does it: the LUKS1 header and its key slots
(:mod:`.luks`) and the sector ciphers that encrypt a payload 512 bytes at a time
(:mod:`.cipher`). Engines only: they take and give bytes; the ``luks`` driver and qcow2 do
the I/O. The primitives are the ``cryptography`` package's (OpenSSL underneath)."""
