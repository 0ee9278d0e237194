"""Client-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018): clipping, Gaussian noise on the sum,
adaptive clipping (Andrew et al., NeurIPS 2021) and the privacy accountant (Google's ``dp-accounting``). Pure: no
broker or worker state; the broker's round driver and the worker's secure round call it (docs/privacy.md)."""

from fedctl.privacy.accountant import Accountant, RoundEvent
from fedctl.privacy.dp import AdaptiveClip, DPConfig, clip_l2, noisy_mean

__all__ = ["Accountant", "AdaptiveClip", "DPConfig", "RoundEvent", "clip_l2", "noisy_mean"]
