"""Secure aggregation (Bonawitz et al., CCS 2017) with the SecAgg+ neighbourhood graph (Bell et al., CCS 2020).

The broker learns the sum of the surviving workers' quantised updates and nothing about any one of them. This
package is pure: no sockets, no broker or worker state — the two sides' state machines
(:class:`~fedctl.secagg.client.ClientSession`, :class:`~fedctl.secagg.server.ServerSession`), the fixed-point
field (:mod:`~fedctl.secagg.field`), the neighbourhood graph (:mod:`~fedctl.secagg.graph`) and thin wrappers of
well-kept libraries for every primitive (:mod:`~fedctl.secagg.primitives`: X25519, HKDF, ChaCha20-Poly1305 and the
ChaCha20 keystream from ``cryptography``, Shamir sharing over GF(2^128) from PyCryptodome). The protocol, its
messages and its arithmetic are in docs/protocol.md §7.4 and docs/privacy.md.
"""

from fedctl.secagg.client import ClientSession
from fedctl.secagg.errors import SecAggAbort, SecAggError
from fedctl.secagg.field import Field
from fedctl.secagg.graph import neighbourhoods, threshold_for
from fedctl.secagg.server import ServerSession

__all__ = ["ClientSession", "Field", "SecAggAbort", "SecAggError", "ServerSession", "neighbourhoods",
           "threshold_for"]
