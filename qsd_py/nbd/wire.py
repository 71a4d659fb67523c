"""The fixed-size records of the NBD protocol, as ``struct.Struct`` objects.

All fields are big-endian. Both engines (server and client) pack and unpack with these, so a
layout is written once. Sizes are in the comments because the protocol document names them.
"""

from __future__ import annotations

import struct

# Handshake.
SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags (18 bytes)
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, payload length (16 bytes)
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, payload length (20 bytes)
EXPORT_NAME_REPLY = struct.Struct(">QH")  # export size, transmission flags (+124 zero bytes
EXPORT_NAME_PADDING = 124  # unless both sides agreed on NO_ZEROES)
INFO_TYPE = struct.Struct(">H")
INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
META_CONTEXT_ID = struct.Struct(">I")  # NBD_REP_META_CONTEXT payload: id, then the name
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

# Transmission: requests.
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length (28 bytes)
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")  # same with a 64-bit length (32 bytes)

# Transmission: replies.
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie (16 bytes)
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length (20 bytes)
EXTENDED_REPLY = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length (32)
OFFSET = struct.Struct(">Q")  # NBD_REPLY_TYPE_OFFSET_DATA payload starts with the offset
OFFSET_HOLE = struct.Struct(">QI")  # offset, hole size
ERROR = struct.Struct(">IH")  # error, message length (then the message)
ERROR_OFFSET = struct.Struct(">Q")  # follows the message of NBD_REPLY_TYPE_ERROR_OFFSET
BLOCK_STATUS = struct.Struct(">I")  # context id, then descriptors
BLOCK_DESCRIPTOR = struct.Struct(">II")  # length, status flags
BLOCK_STATUS_EXT = struct.Struct(">II")  # context id, descriptor count
BLOCK_DESCRIPTOR_EXT = struct.Struct(">QQ")  # length, status flags
