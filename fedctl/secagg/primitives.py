"""Every cryptographic primitive of secure aggregation, each a thin call into a well-kept library (none is written
here): X25519 key agreement, HKDF-SHA256, ChaCha20-Poly1305 AEAD and the ChaCha20 keystream as a PRG from
``cryptography``; Shamir's t-of-n sharing of 16-byte secrets over GF(2^128) from PyCryptodome.

Every derived key is bound to its purpose and to the attempt (round and attempt id) by HKDF's ``info``, so keys
of one attempt never serve another.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedctl.secagg.errors import SecAggError

KEY_BYTES = 32
SECRET_BYTES = 16
"""Shamir shares 16-byte secrets (PyCryptodome); a 32-byte private key is shared as two halves."""
NONCE_BYTES = 12
LABEL = b"fedctl-secagg-v1"


def context(round_no: int, attempt: int) -> bytes:
    """The attempt's binding, part of every derived key's ``info`` and every ciphertext's associated data."""
    return struct.pack(">QQ", round_no, attempt)


class KeyPair:
    """An X25519 key pair, fresh from the OS's randomness; ``public`` is the raw 32 bytes."""

    def __init__(self, private: bytes | None = None) -> None:
        self._key = X25519PrivateKey.generate() if private is None else X25519PrivateKey.from_private_bytes(private)
        self.public = self._key.public_key().public_bytes_raw()

    @property
    def private(self) -> bytes:
        return self._key.private_bytes_raw()

    def agree(self, peer_public: bytes, purpose: bytes, ctx: bytes) -> bytes:
        """The 32-byte key this pair shares with ``peer_public`` for ``purpose`` in attempt ``ctx`` (X25519, then
        HKDF-SHA256). Raises :class:`SecAggError` for a malformed or low-order public key."""
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as err:
            raise SecAggError(f"a public key is not a usable X25519 key ({err})") from None
        return derive(shared, purpose, ctx)


def derive(secret: bytes, purpose: bytes, ctx: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=LABEL + b"|" + purpose + b"|" + ctx).derive(secret)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``nonce || ChaCha20-Poly1305(key, nonce, plaintext, aad)`` with a random 96-bit nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The plaintext of :func:`seal`; :class:`SecAggError` when it was not sealed with ``key`` and ``aad``."""
    if len(sealed) < NONCE_BYTES + 16:
        raise SecAggError(f"a ciphertext of {len(sealed)} bytes is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError("a ciphertext does not authenticate (wrong sender, recipient or attempt)") from None


def expand(key: bytes, n: int) -> np.ndarray:
    """``n`` uint32 values of the ChaCha20 keystream under ``key`` (a fresh key per use: the nonce is fixed)."""
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(b"\0" * (4 * n))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def split(secret: bytes, threshold: int, shares: int) -> list[bytes]:
    """Shamir shares of a secret of a multiple of 16 bytes, for holders 1..``shares``: share i (of holder i + 1)
    is the 16-byte shares of each 16-byte block, concatenated."""
    blocks = [secret[i:i + SECRET_BYTES] for i in range(0, len(secret), SECRET_BYTES)]
    per_block = [Shamir.split(threshold, shares, block) for block in blocks]
    return [b"".join(block[i][1] for block in per_block) for i in range(shares)]


def combine(parts: dict[int, bytes]) -> bytes:
    """The secret from at least ``threshold`` shares ``{holder: share}`` (holders numbered from 1)."""
    length = {len(p) for p in parts.values()}
    if len(length) != 1 or next(iter(length)) % SECRET_BYTES:
        raise SecAggError("shares of different or odd lengths")
    size = next(iter(length))
    return b"".join(Shamir.combine([(holder, share[i:i + SECRET_BYTES]) for holder, share in parts.items()])
                    for i in range(0, size, SECRET_BYTES))
