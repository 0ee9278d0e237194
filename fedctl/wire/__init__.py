"""Wire protocol v1 (docs/protocol.md): message types, tensor payloads, codec, limits and error codes.

Pure: imports numpy and msgpack, never zmq or asyncio.
"""

from fedctl.wire.constants import PROTOCOL_VERSION, ErrorCode
from fedctl.wire.messages import Message, decode, encode, make, payload_bytes, peek_id
from fedctl.wire.tensors import SparseTensor, Tensor, check_against_spec, densify, pack_sparse, unpack_sparse

__all__ = ["PROTOCOL_VERSION", "ErrorCode", "Message", "SparseTensor", "Tensor", "check_against_spec", "densify",
           "decode", "encode", "make", "pack_sparse", "payload_bytes", "peek_id", "unpack_sparse"]
