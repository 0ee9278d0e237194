"""Wire protocol v1 (docs/protocol.md): message types, tensor payloads, codec, limits and error codes.

Pure: imports numpy and msgpack, never zmq or asyncio. Modules: ``constants`` (mirrors the spec), ``messages``
(headers, schema, encode/decode of whole messages), ``tensors`` (tensor types, packed ``*`` frames, model checks),
``frames`` (the tensor frame codec), ``indices`` (varint/bitmap/raw index encodings), ``zlib_planes`` (the zlib
codec), ``chunks`` (chunked transfers).
"""

from fedctl.wire.constants import EXTRA_SEPARATOR, PROTOCOL_VERSION, ErrorCode
from fedctl.wire.frames import COMPACT_SPARSE_FIELDS, MSGPACK_ERRORS, decode_tensor, encode_tensor
from fedctl.wire.indices import index_encoding, sparse_nbytes
from fedctl.wire.messages import (
    SCHEMA,
    Message,
    decode,
    encode,
    encode_tensors,
    make,
    payload_bytes,
    peek_id,
    peek_type,
)
from fedctl.wire.tensors import (
    PACKED_NAME,
    SparseTensor,
    Tensor,
    TensorSlice,
    check_against_spec,
    densify,
    pack_sparse,
    split_extras,
    unpack_sparse,
)

__all__ = ["COMPACT_SPARSE_FIELDS", "EXTRA_SEPARATOR", "MSGPACK_ERRORS", "PACKED_NAME", "PROTOCOL_VERSION",
           "SCHEMA", "ErrorCode", "Message", "SparseTensor", "Tensor", "TensorSlice", "check_against_spec", "decode",
           "decode_tensor", "densify", "encode", "encode_tensor", "encode_tensors", "index_encoding", "make",
           "pack_sparse", "payload_bytes", "peek_id", "peek_type", "sparse_nbytes", "split_extras", "unpack_sparse"]
