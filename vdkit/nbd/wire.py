"""NBD protocol constants and struct layouts (NetworkBlockDevice ``doc/proto.md``).

Only numbers and byte layouts live here, so the server core reads like the
specification and tests can build raw client messages from the same names.
All integers on the wire are big-endian.
"""

from __future__ import annotations

import struct

# -- handshake --------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC_OPT = 0x0003E889045565A9

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_RESIZE = 1 << 9
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# -- transmission ---------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8
CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disc", CMD_FLUSH: "flush", CMD_TRIM: "trim",
             CMD_CACHE: "cache", CMD_WRITE_ZEROES: "write_zeroes", CMD_BLOCK_STATUS: "block_status"}

CMDFLAG_FUA = 1 << 0
CMDFLAG_NO_HOLE = 1 << 1
CMDFLAG_DF = 1 << 2
CMDFLAG_REQ_ONE = 1 << 3
CMDFLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:NAME contexts

# NBD error values (not host errnos: the protocol fixes them)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP = "qemu:dirty-bitmap:"  # + a bitmap's name: one context per exported bitmap
ALLOCATION_DEPTH = "qemu:allocation-depth"  # extents valued by the layer that allocates them (0: none)

# -- layouts --------------------------------------------------------------------------------
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+ 124 zero bytes)
INFO_EXPORT_DATA = struct.Struct(">HQH")
INFO_BLOCK_SIZE_DATA = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
STRUCTURED_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXTENT = struct.Struct(">II")

# limits (QEMU's values)
MAX_STRING = 4096  # NBD_MAX_STRING_SIZE: export names, descriptions, context names
MAX_PAYLOAD = 32 * 1024 * 1024  # NBD_MAX_BUFFER_SIZE
MAX_OPTION_LENGTH = 1 << 20  # larger option data is a protocol violation: disconnect
