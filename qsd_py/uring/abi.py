"""The io_uring kernel ABI (``include/uapi/linux/io_uring.h``) as Python constants and structs.

Only what qsd-py uses or checks is here. Layouts are x86-64/little-endian (the structs are
naturally aligned, so they hold on other 64-bit little-endian ABIs too).
"""

from __future__ import annotations

import ctypes
import struct

# --- syscall numbers (identical on every architecture that uses the generic table, and x86-64)
NR_IO_URING_SETUP = 425
NR_IO_URING_ENTER = 426
NR_IO_URING_REGISTER = 427

# --- io_uring_setup() flags
SETUP_IOPOLL = 1 << 0
SETUP_SQPOLL = 1 << 1
SETUP_SQ_AFF = 1 << 2
SETUP_CQSIZE = 1 << 3
SETUP_CLAMP = 1 << 4
SETUP_ATTACH_WQ = 1 << 5
SETUP_R_DISABLED = 1 << 6
SETUP_SUBMIT_ALL = 1 << 7
SETUP_COOP_TASKRUN = 1 << 8
SETUP_TASKRUN_FLAG = 1 << 9
SETUP_SQE128 = 1 << 10
SETUP_CQE32 = 1 << 11
SETUP_SINGLE_ISSUER = 1 << 12
SETUP_DEFER_TASKRUN = 1 << 13
SETUP_NO_MMAP = 1 << 14
SETUP_REGISTERED_FD_ONLY = 1 << 15
SETUP_NO_SQARRAY = 1 << 16

# --- io_uring_params.features
FEAT_SINGLE_MMAP = 1 << 0
FEAT_NODROP = 1 << 1
FEAT_SUBMIT_STABLE = 1 << 2
FEAT_RW_CUR_POS = 1 << 3
FEAT_CUR_PERSONALITY = 1 << 4
FEAT_FAST_POLL = 1 << 5
FEAT_POLL_32BITS = 1 << 6
FEAT_SQPOLL_NONFIXED = 1 << 7
FEAT_EXT_ARG = 1 << 8
FEAT_NATIVE_WORKERS = 1 << 9
FEAT_RSRC_TAGS = 1 << 10
FEAT_CQE_SKIP = 1 << 11
FEAT_LINKED_FILE = 1 << 12

#: ``off`` value meaning "the file position" (-1 as the kernel's u64) for READ/WRITE on streams.
OFF_CURRENT = (1 << 64) - 1

# --- mmap offsets
OFF_SQ_RING = 0
OFF_CQ_RING = 0x8000000
OFF_SQES = 0x10000000

# --- io_uring_enter() flags
ENTER_GETEVENTS = 1 << 0
ENTER_SQ_WAKEUP = 1 << 1
ENTER_SQ_WAIT = 1 << 2
ENTER_EXT_ARG = 1 << 3
ENTER_REGISTERED_RING = 1 << 4

# --- flags the kernel sets in the SQ ring's ``flags`` word
SQ_NEED_WAKEUP = 1 << 0
SQ_CQ_OVERFLOW = 1 << 1
SQ_TASKRUN = 1 << 2

# --- flags in the CQ ring's ``flags`` word (written by the application)
CQ_EVENTFD_DISABLED = 1 << 0

# --- SQE flags (byte 1 of the SQE)
SQE_FIXED_FILE = 1 << 0
SQE_IO_DRAIN = 1 << 1
SQE_IO_LINK = 1 << 2
SQE_IO_HARDLINK = 1 << 3
SQE_ASYNC = 1 << 4
SQE_BUFFER_SELECT = 1 << 5
SQE_CQE_SKIP_SUCCESS = 1 << 6

# --- CQE flags
CQE_F_BUFFER = 1 << 0
CQE_F_MORE = 1 << 1

# --- per-opcode flags
FSYNC_DATASYNC = 1 << 0
ASYNC_CANCEL_ALL = 1 << 0
ASYNC_CANCEL_ANY = 1 << 2

# --- opcodes
OP_NOP = 0
OP_READV = 1
OP_WRITEV = 2
OP_FSYNC = 3
OP_READ_FIXED = 4
OP_WRITE_FIXED = 5
OP_POLL_ADD = 6
OP_POLL_REMOVE = 7
OP_SYNC_FILE_RANGE = 8
OP_TIMEOUT = 11
OP_ASYNC_CANCEL = 14
OP_FALLOCATE = 17
OP_OPENAT = 18
OP_CLOSE = 19
OP_FILES_UPDATE = 20
OP_STATX = 21
OP_READ = 22
OP_WRITE = 23
OP_FADVISE = 24
OP_URING_CMD = 46
OP_FTRUNCATE = 55
OP_LAST_KNOWN = 64  # probe buffers are sized for this many opcodes

# --- io_uring_register() opcodes
REGISTER_BUFFERS = 0
UNREGISTER_BUFFERS = 1
REGISTER_FILES = 2
UNREGISTER_FILES = 3
REGISTER_EVENTFD = 4
UNREGISTER_EVENTFD = 5
REGISTER_FILES_UPDATE = 6
REGISTER_EVENTFD_ASYNC = 7
REGISTER_PROBE = 8
REGISTER_ENABLE_RINGS = 12
REGISTER_RING_FDS = 20
UNREGISTER_RING_FDS = 21

IO_URING_OP_SUPPORTED = 1 << 0


# --- structs shared with the kernel through io_uring_setup() / io_uring_register()
def _u32s(*names: str) -> list[tuple[str, type[ctypes.c_uint32]]]:
    return [(n, ctypes.c_uint32) for n in names]


class SqRingOffsets(ctypes.Structure):
    """``struct io_sqring_offsets``: byte offsets of the SQ ring's fields in its mmap."""

    _fields_ = _u32s(
        "head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1"
    ) + [("user_addr", ctypes.c_uint64)]


class CqRingOffsets(ctypes.Structure):
    """``struct io_cqring_offsets``: byte offsets of the CQ ring's fields in its mmap."""

    _fields_ = _u32s(
        "head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1"
    ) + [("user_addr", ctypes.c_uint64)]


class Params(ctypes.Structure):
    """``struct io_uring_params``: in/out argument of io_uring_setup()."""

    _fields_ = _u32s(
        "sq_entries",
        "cq_entries",
        "flags",
        "sq_thread_cpu",
        "sq_thread_idle",
        "features",
        "wq_fd",
    ) + [
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", SqRingOffsets),
        ("cq_off", CqRingOffsets),
    ]


class IoVec(ctypes.Structure):
    """``struct iovec``."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class FilesUpdate(ctypes.Structure):
    """``struct io_uring_files_update``."""

    _fields_ = [("offset", ctypes.c_uint32), ("resv", ctypes.c_uint32), ("fds", ctypes.c_uint64)]


class GeteventsArg(ctypes.Structure):
    """``struct io_uring_getevents_arg`` for ENTER_EXT_ARG (a wait with a timeout)."""

    _fields_ = [
        ("sigmask", ctypes.c_uint64),
        ("sigmask_sz", ctypes.c_uint32),
        ("min_wait_usec", ctypes.c_uint32),
        ("ts", ctypes.c_uint64),
    ]


class KernelTimespec(ctypes.Structure):
    """``struct __kernel_timespec``."""

    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64)]


class ProbeOp(ctypes.Structure):
    """``struct io_uring_probe_op``."""

    _fields_ = [
        ("op", ctypes.c_uint8),
        ("resv", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("resv2", ctypes.c_uint32),
    ]


class Probe(ctypes.Structure):
    """``struct io_uring_probe`` with room for :data:`OP_LAST_KNOWN` ops."""

    _fields_ = [
        ("last_op", ctypes.c_uint8),
        ("ops_len", ctypes.c_uint8),
        ("resv", ctypes.c_uint16),
        ("resv2", ctypes.c_uint32 * 3),
        ("ops", ProbeOp * OP_LAST_KNOWN),
    ]


assert ctypes.sizeof(Params) == 120
assert ctypes.sizeof(Probe) == 16 + 8 * OP_LAST_KNOWN

# --- SQE layout (64 bytes; SQE128 rings append 64 more bytes to the command area)
#  0 opcode u8 | 1 flags u8 | 2 ioprio u16 | 4 fd s32 | 8 off (u64) / cmd_op u32 + pad u32
# 16 addr u64 | 24 len u32 | 28 op-specific flags u32 | 32 user_data u64
# 40 buf_index u16 | 42 personality u16 | 44 file_index/splice_fd_in s32 | 48 addr3 u64 | 56 pad u64
# A URING_CMD's command area starts at byte 48: 16 bytes on a 64-byte SQE, 80 on SQE128.
SQE_SIZE = 64
SQE128_SIZE = 128
SQE_CMD_OFFSET = 48
SQE_CMD_SIZE = 16
SQE128_CMD_SIZE = 80

#: Whole 64-byte SQE: (opcode, flags, ioprio, fd, off, addr, len, op_flags, user_data,
#: buf_index, personality, file_index, addr3, pad2). Writing all of it zero-fills the SQE.
SQE = struct.Struct("<BBHiQQIIQHHiQQ")
#: First 48 bytes of a URING_CMD SQE: (opcode, flags, ioprio, fd, cmd_op, pad1, addr, len,
#: uring_cmd_flags, user_data, buf_index, personality, pad): the command area follows.
SQE_CMD_HEAD = struct.Struct("<BBHiIIQIIQHHi")
#: A 16-byte CQE: (user_data, res, flags).
CQE = struct.Struct("<QiI")
CQE_SIZE = 16
CQE32_SIZE = 32

assert SQE.size == SQE_SIZE
assert SQE_CMD_HEAD.size == SQE_CMD_OFFSET
