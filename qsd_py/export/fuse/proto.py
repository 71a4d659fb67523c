"""The FUSE kernel protocol (include/uapi/linux/fuse.h, protocol 7.45): constants and layouts.

Everything here is data: precompiled :class:`struct.Struct` objects so that the engine and the
transports decode and encode with ``unpack_from``/``pack_into`` on caller buffers and never
build format strings or intermediate objects on the I/O path. All layouts are little endian
with the kernel's natural alignment (x86-64 and every other 64-bit Linux target).
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45
ROOT_ID = 1
MIN_READ_BUFFER = 8192  # the kernel refuses smaller read() buffers on /dev/fuse

# --- opcodes (enum fuse_opcode) ------------------------------------------------------------
LOOKUP = 1
FORGET = 2  # no reply
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42  # no reply
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51
STATX = 52

# requests the kernel expects no reply to
NO_REPLY_OPS = frozenset((FORGET, BATCH_FORGET, INTERRUPT))

# --- INIT flags (fuse_init_in/out.flags; bits 32..63 travel in flags2) ----------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
ALLOW_IDMAP = 1 << 40
OVER_IO_URING = 1 << 41
REQUEST_TIMEOUT = 1 << 42

# --- OPEN reply flags (fuse_open_out.open_flags) --------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# --- SETATTR valid bits (fuse_setattr_in.valid) ---------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# --- misc ----------------------------------------------------------------------------------
FSYNC_FDATASYNC = 1 << 0
INT_REQ_BIT = 1 << 0  # set in ``unique`` of an INTERRUPT request
FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)

# --- layouts -------------------------------------------------------------------------------
# fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
# fuse_out_header: len, error (-errno), unique
OUT_HEADER = struct.Struct("<IiQ")
# fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11]
INIT_IN = struct.Struct("<IIIII44x")
INIT_IN_COMPAT = struct.Struct("<IIII")  # before 7.36 only the first four fields exist
# fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold,
# max_write, time_gran, max_pages, map_alignment, flags2, max_stack_depth, request_timeout,
# unused[11] (u16)
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
# fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode,
# nlink, uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
# fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then fuse_attr
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])
# fuse_getattr_in: getattr_flags, dummy, fh
GETATTR_IN = struct.Struct("<IIQ")
# fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec,
# mtimensec, ctimensec, mode, unused4, uid, gid, unused5
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
# fuse_open_in: flags, open_flags
OPEN_IN = struct.Struct("<II")
# fuse_open_out: fh, open_flags, backing_id
OPEN_OUT = struct.Struct("<QIi")
# fuse_release_in: fh, flags, release_flags, lock_owner
RELEASE_IN = struct.Struct("<QIIQ")
# fuse_flush_in: fh, unused, padding, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
# fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
READ_IN = struct.Struct("<QQIIQII")
# fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("<QQIIQII")
# offset and size of a fuse_read_in or fuse_write_in (both begin fh, offset, size): all the
# fast paths read of them
IO_EXTENT = struct.Struct("<8xQI")
# fuse_write_out: size, padding
WRITE_OUT = struct.Struct("<II")
# fuse_statfs_out (fuse_kstatfs): blocks, bfree, bavail, files, ffree, bsize, namelen,
# frsize, padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
# fuse_fsync_in: fh, fsync_flags, padding
FSYNC_IN = struct.Struct("<QII")
# fuse_fallocate_in: fh, offset, length, mode, padding
FALLOCATE_IN = struct.Struct("<QQQII")
# fuse_lseek_in: fh, offset, whence, padding
LSEEK_IN = struct.Struct("<QQII")
# fuse_lseek_out: offset
LSEEK_OUT = struct.Struct("<Q")
# fuse_interrupt_in: unique
INTERRUPT_IN = struct.Struct("<Q")
# fuse_forget_in: nlookup
FORGET_IN = struct.Struct("<Q")
# fuse_batch_forget_in: count, dummy; followed by count x fuse_forget_one (nodeid, nlookup)
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")

# --- FUSE-over-io_uring (7.42+): the per-entry header buffer ---------------------------------
# struct fuse_uring_req_header: in/out header area, op-specific first argument, ent_in_out.
URING_IN_OUT_HEADER_SZ = 128
URING_OP_IN_OUT_SZ = 128
URING_HEADER_OFFSET = 0
URING_ARG_OFFSET = 128
URING_ENT_OFFSET = 256
URING_REQ_HEADER_SZ = 288
# fuse_uring_ent_in_out: flags, commit_id, payload_sz, padding, reserved
URING_ENT_IN_OUT = struct.Struct("<QQII8x")
# fuse_uring_cmd_req (in the SQE command area): flags, commit_id, qid, padding[6]
URING_CMD_REQ = struct.Struct("<QQH6x")
URING_CMD_REGISTER = 1
URING_CMD_COMMIT_AND_FETCH = 2

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16
assert INIT_IN.size == 64 and INIT_OUT.size == 64
assert ATTR.size == 88 and ATTR_OUT.size == 104
assert SETATTR_IN.size == 88 and READ_IN.size == 40 and WRITE_IN.size == 40
assert STATFS_OUT.size == 80 and FALLOCATE_IN.size == 32 and LSEEK_IN.size == 24
assert URING_ENT_IN_OUT.size == 32 and URING_CMD_REQ.size == 24
