"""Gradient compression: stateless selection of what to send (exact and sampled top-k), pure numpy.

The state that makes compression lossless over time (residuals, momentum, masks) lives with the strategy that
uses a selector, keyed by tensor name, never here and never on the wire.
"""

from fedctl.compress.topk import exact_topk, index_dtype, sampled_topk, time_selection

__all__ = ["exact_topk", "index_dtype", "sampled_topk", "time_selection"]
