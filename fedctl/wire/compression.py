"""When the zlib codec (docs/protocol.md §4.4) pays for itself: compress a frame only where the seconds it saves on
the link exceed the seconds it costs to deflate and inflate — docs/protocol.md §4.4.

Pure: the sender keeps a :class:`CodecCost` (its measured deflate speed and ratio) and the link's throughput as
last observed (``link_bps``: a push's bytes over the time from sending it to its ``ack``), and asks
:func:`worth_compressing` per message.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("auto", "always", "never")

DEFLATE_BPS = 25e6
"""Assumed deflate speed (bytes of float32 byte planes per second, level 1) until one is measured: this machine's
2-core x86 does 23–26 MB/s."""
RATIO = 0.86
"""Assumed compressed / raw size of trained float32 weights until one is measured."""
INFLATE_SHARE = 0.3
"""The receiver's inflate and un-planing cost, as a share of the sender's deflate time (66 ms against 225 ms for
5.2 MB, measured here)."""


@dataclass
class CodecCost:
    """What compressing costs this sender: deflate speed and ratio, moving averages of what it measured."""

    deflate_bps: float = DEFLATE_BPS
    ratio: float = RATIO

    def observe(self, raw_bytes: int, compressed_bytes: int, seconds: float) -> None:
        """Fold in one measured compression of ``raw_bytes`` (ignored when too small to time)."""
        if raw_bytes < 65536 or seconds <= 0:
            return
        self.deflate_bps = 0.5 * self.deflate_bps + 0.5 * raw_bytes / seconds
        self.ratio = 0.5 * self.ratio + 0.5 * min(compressed_bytes / raw_bytes, 1.0)

    def seconds(self, raw_bytes: int) -> float:
        """Deflate here plus inflate at the receiver, for ``raw_bytes``."""
        return (1 + INFLATE_SHARE) * raw_bytes / self.deflate_bps


def worth_compressing(raw_bytes: int, link_bps: float | None, cost: CodecCost, mode: str = "auto") -> bool:
    """``always`` / ``never`` as said; ``auto``: only when the link's throughput is known and the transfer time
    saved, (1 − ratio) · raw / link_bps, exceeds :meth:`CodecCost.seconds` — never on an unmeasured link (a fast
    one is the common case, and one round of uncompressed bytes measures it)."""
    if mode == "always":
        return True
    if mode == "never" or not link_bps or link_bps <= 0:
        return False
    return (1 - cost.ratio) * raw_bytes / link_bps > cost.seconds(raw_bytes)


def check_mode(mode: str, option: str = "--compress") -> str:
    from fedctl.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"{option} must be one of {', '.join(MODES)}, got {mode!r}", f"e.g. {option} auto")
    return mode
