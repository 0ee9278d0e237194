"""Constants of fedctl wire protocol v1, mirroring docs/protocol.md: version, message types, limits, error codes."""

from __future__ import annotations

from enum import IntEnum

PROTOCOL_VERSION = 1
"""Version carried by every header as ``v``. A peer MUST refuse a message whose version it does not speak."""

# Message types (header field "type").
JOIN = "join"
WELCOME = "welcome"
PULL = "pull"
MODEL = "model"
PUSH = "push"
ACK = "ack"
ERROR = "error"
HEARTBEAT = "heartbeat"
LEAVE = "leave"
DONE = "done"
CHUNK = "chunk"
CREDIT = "credit"
EVALUATE = "evaluate"
"""Federated evaluation (docs/protocol.md §7.2): the broker answers a pull with the model to evaluate ..."""
EVALUATION = "evaluation"
"""... and the worker sends back its metrics on its held-out data, weighted by its example count."""
FAILED = "failed"
"""The worker could not train on the model it was handed (its task raised); the round goes on without it."""
# Secure aggregation (docs/protocol.md §7.4), in the order of one attempt.
SA_KEYS = "sa_keys"
"""Worker: its two public keys for the attempt (answered by ``sa_peers``)."""
SA_PEERS = "sa_peers"
"""Broker: the worker's index, its neighbours' public keys and the threshold."""
SA_SHARES = "sa_shares"
"""Worker: its secrets' shares, one sealed to each neighbour (answered by ``sa_inbox``)."""
SA_INBOX = "sa_inbox"
"""Broker: the shares the worker's neighbours sealed to it."""
SA_INPUT = "sa_input"
"""Worker: its masked update, one field-element frame (answered by ``sa_unmask``)."""
SA_UNMASK = "sa_unmask"
"""Broker: which neighbours survived and which dropped after sharing."""
SA_REVEAL = "sa_reveal"
"""Worker: its shares of survivors' self-mask seeds and of dropped workers' mask keys (answered by ``ack``)."""
SECURE_AGGREGATION = frozenset({SA_KEYS, SA_PEERS, SA_SHARES, SA_INBOX, SA_INPUT, SA_UNMASK, SA_REVEAL})

STATUS = "status"
"""A read-only question from an operator's client (``fedctl status``), no join needed (docs/protocol.md §7.5) ..."""
STATUS_REPLY = "status_reply"
"""... answered with the run's state: round, model, workers, bytes, refusals."""

WORKER_TO_BROKER = frozenset({JOIN, PULL, PUSH, HEARTBEAT, LEAVE, CHUNK, CREDIT, EVALUATION, FAILED, SA_KEYS,
                              SA_SHARES, SA_INPUT, SA_REVEAL, STATUS})
BROKER_TO_WORKER = frozenset({WELCOME, MODEL, ACK, ERROR, HEARTBEAT, DONE, CHUNK, CREDIT, EVALUATE, SA_PEERS,
                              SA_INBOX, SA_UNMASK, STATUS_REPLY})
MESSAGE_TYPES = WORKER_TO_BROKER | BROKER_TO_WORKER

# Limits.
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 4096
"""Tensor frames of one message: every tensor of a model fits in one (ResNet-152 federates 777)."""
MAX_NAME_CHARS = 128
MAX_NDIM = 8
MAX_TENSOR_ELEMENTS = 2**40
"""Bound on the product of a tensor's non-zero dimensions, so a hostile shape cannot overflow numpy's sizes."""
MAX_ID_CHARS = 128
"""Longest ``worker`` id of ``join`` and ``welcome``."""
MAX_BACKEND_CHARS = 32
MAX_MODEL_NAME_CHARS = 64
"""Longest ``model`` name a ``join`` may ask for."""
MAX_HOST_CHARS = 255
MAX_MODEL_TENSORS = MAX_TENSORS
"""Most entries of a join's model signature (``params``); the 64 KiB header bounds it further."""
MAX_SECAGG_PEERS = 256
"""Most neighbours of one worker in a secure-aggregation attempt (entries of ``sa_peers``, ``sa_shares``, ...)."""
MAX_SEALED_BYTES = 256
"""Longest sealed share (``sa_shares``, ``sa_inbox``); fedctl's are 88 bytes."""
MAX_REASON_CHARS = 1024
"""Longest ``reason`` (error, leave, done) and ``fix`` (error)."""
MAX_STATUS_WORKERS = 100
"""Workers listed in one ``status_reply`` (the first in join order; ``workers_total`` counts them all)."""
MAX_STATUS_EVENTS = 20
"""Recent events listed in one ``status_reply`` (the newest)."""
MAX_METRICS = 64
"""Most entries in a push's ``metrics`` map."""
MAX_FRAME_FIELDS = 16
"""Most entries in a tensor frame's map (msgpack limit applied before anything is built)."""
MAX_FRAME_STR_BYTES = 1024
"""Longest str (UTF-8 bytes) anywhere in a tensor frame."""
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Default ZMQ_MAXMSGSIZE of the broker's socket: a larger frame is dropped by libzmq with the connection."""

# Tensor payload encodings (tensor frame field "enc").
ENC_DENSE = "dense"
ENC_SPARSE = "sparse"
ENC_SLICE = "slice"
"""A run of consecutive elements of a tensor (chunked transfers, docs/protocol.md §4 (slice frames))."""
DEFAULT_CHUNK_BYTES = 256 * 1024
"""Tensor bytes per chunk message of a chunked push or model."""
MAX_CHUNKS = 2**24
ALLOWED_DTYPES = frozenset({"<f4", "<f2", "<f8"})
ALLOWED_INDEX_DTYPES = frozenset({"<u4", "<u8", "<i8"})
FIELD_DTYPES = frozenset({"<u4"})
"""The dtype of a masked input's dense frame (``sa_input``, elements of Z_2^32), and only there."""
"""Index dtypes of ``index_enc`` "raw" (the only sparse layout before ``index_enc`` existed)."""

# Index encodings of a sparse frame (tensor frame field "index_enc"; absent means "raw").
INDEX_RAW = "raw"
INDEX_VARINT = "varint"
INDEX_BITMAP = "bitmap"
INDEX_ENCODINGS = (INDEX_VARINT, INDEX_BITMAP, INDEX_RAW)
"""In the encoder's order of preference when two encodings take the same number of bytes."""
CODEC_ZLIB = "zlib"
"""Sparse frame field "codec": indices and byte-plane-shuffled values are each one zlib stream."""
MAX_INFLATE_RATIO = 64
"""A zlib field may inflate to at most this many times its own length (a bound on decompression bombs)."""
MAX_VARINT_BYTES = 6
"""Longest LEB128 gap a decoder accepts: 6 × 7 bits cover every gap below MAX_TENSOR_ELEMENTS = 2**40."""

# Statuses of an ``ack`` (header field "status").
ACK_ACCEPTED = "accepted"
ACK_DUPLICATE = "duplicate"
ACK_STATUSES = frozenset({ACK_ACCEPTED, ACK_DUPLICATE})

EXTRA_SEPARATOR = "/"
"""Between a strategy's extra-tensor prefix and the model tensor the extra tensor shadows: ``scaffold.c/fc1.weight``
(docs/protocol.md §5.6)."""

# Update kinds a push may carry (header field "kind").
KIND_WEIGHTS = "weights"
KIND_GRADIENT = "gradient"
KIND_DELTA = "delta"
UPDATE_KINDS = frozenset({KIND_WEIGHTS, KIND_GRADIENT, KIND_DELTA})


class ErrorCode(IntEnum):
    """Stable numeric error codes carried by ``error`` messages. Never renumber; only append."""

    MALFORMED = 100
    """A frame is not valid msgpack, or the header is not a map."""
    UNSUPPORTED_VERSION = 101
    UNKNOWN_TYPE = 102
    MISSING_FIELD = 103
    BAD_FIELD = 104
    TOO_LARGE = 105
    BAD_TENSOR = 110
    """A tensor frame violates the payload rules (dtype, shape, declared vs actual size, encoding)."""
    NON_FINITE = 111
    MODEL_MISMATCH = 112
    """Tensor names or shapes do not match the run's model."""
    NOT_JOINED = 200
    """The sender must send ``join`` before anything else (also after a broker restart)."""
    ALREADY_JOINED = 201
    STALE_UPDATE = 202
    """The update is for a round or model version that is no longer open."""
    NOT_SELECTED = 203
    """The worker was not sampled for this round."""
    DUPLICATE = 204
    WRONG_KIND = 205
    """The update kind does not match the run's strategy."""
    UNKNOWN_TRANSFER = 206
    """A ``chunk`` or ``credit`` names no open chunked transfer (it ended, failed, or never began)."""
    SECAGG_REFUSED = 207
    """A secure-aggregation message breaks the protocol (stage, attempt, peers, a second input); §7.4."""
    SECAGG_ABORTED = 208
    """The secure-aggregation attempt was abandoned (too few workers left); nothing of it is applied: pull again."""
    RUN_FINISHED = 300
    SHUTTING_DOWN = 301
    INTERNAL = 500
