"""DP-FedAvg's pieces (fedctl/privacy): the accountant agrees with Opacus's RDP accountant, clipping bounds the L2
norm, the noise on the sum has the promised scale, adaptive clipping tracks its quantile."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedctl.privacy import Accountant, AdaptiveClip, DPConfig, RoundEvent, clip_l2, noisy_mean
from fedctl.privacy.accountant import DEFAULT_ORDERS


@pytest.mark.parametrize("q, z, steps", [(0.01, 1.1, 1000), (0.1, 1.0, 100), (0.05, 2.0, 500), (0.3, 0.8, 20)])
def test_the_accountant_agrees_with_opacus(q: float, z: float, steps: int) -> None:
    """Same RDP orders, Poisson sampling rate q, noise multiplier z, steps: ε within 1%."""
    rdp = pytest.importorskip("opacus.accountants.analysis.rdp")
    orders = list(DEFAULT_ORDERS)
    theirs, _ = rdp.get_privacy_spent(orders=orders, rdp=rdp.compute_rdp(q=q, noise_multiplier=z, steps=steps,
                                                                         orders=orders), delta=1e-5)
    ours = Accountant(1e-5, "poisson").epsilon([RoundEvent(1000, int(q * 1000), z)] * steps)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_fixed_size_sampling_is_accounted_per_round() -> None:
    acc = Accountant(1e-5)
    eps = [acc.epsilon([RoundEvent(1000, 100, 1.0)] * r) for r in (1, 10, 100)]
    assert 0 < eps[0] < eps[1] < eps[2] and acc.epsilon([]) == 0.0
    # Everyone every round: no amplification, the Gaussian mechanism composed.
    assert acc.epsilon([RoundEvent(10, 10, 1.0)] * 5) > acc.epsilon([RoundEvent(1000, 10, 1.0)] * 5)
    # Replace-one (fixed-size sampling) is charged more than add/remove-one (Poisson) at the same rate.
    assert acc.epsilon([RoundEvent(1000, 100, 1.0)] * 50) > Accountant(1e-5, "poisson").epsilon(
        [RoundEvent(1000, 100, 1.0)] * 50)
    # A population that changes is accounted round by round.
    mixed = [RoundEvent(1000, 100, 1.0)] * 5 + [RoundEvent(500, 100, 1.0)] * 5
    assert acc.epsilon(mixed[:5]) < acc.epsilon(mixed) < acc.epsilon([RoundEvent(500, 100, 1.0)] * 10)


def test_clipping_bounds_the_l2_norm() -> None:
    v = np.array([3.0, 4.0])
    assert clip_l2(v, 10.0)[1] and np.array_equal(clip_l2(v, 10.0)[0], v)
    clipped, within = clip_l2(v, 1.0)
    assert not within and math.isclose(float(np.linalg.norm(clipped)), 1.0) and np.allclose(clipped, [0.6, 0.8])


def test_the_noise_on_the_sum_has_std_z_times_s() -> None:
    rng = np.random.default_rng(0)
    vectors = [np.zeros(200_000) for _ in range(4)]
    mean = noisy_mean(vectors, bound=0.5, z=2.0, rng=rng)
    assert float(np.std(mean * 4)) == pytest.approx(1.0, rel=0.01)  # std of the sum: z·S = 1


def test_adaptive_clipping_tracks_its_quantile() -> None:
    rng = np.random.default_rng(1)
    norms = rng.lognormal(0.0, 0.5, size=100_000)  # median 1
    clip = AdaptiveClip(5.0, quantile=0.5, lr=0.2)
    for _ in range(300):
        sample = rng.choice(norms, 100)
        clip.update(int(np.sum(sample <= clip.bound)), 100, count_noise=5.0, rng=rng)
    assert 0.8 < clip.bound < 1.25
    fixed = AdaptiveClip(5.0)
    assert math.isnan(fixed.update(3, 10, 1.0, rng)) and fixed.bound == 5.0


def test_adaptive_clipping_keeps_the_total_noise_multiplier() -> None:
    cfg = DPConfig(1.0, 1.0, adaptive_quantile=0.5)
    z_update, sigma_b = cfg.update_noise(100), cfg.count_noise(100)
    assert (z_update ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(1.0)
    assert DPConfig(1.0, 1.0).update_noise(100) == 1.0
    with pytest.raises(ValueError, match="σ_b must exceed z/2"):
        DPConfig(0.2, 1.0, adaptive_quantile=0.5).update_noise(1)  # σ_b = 1/20 is below z/2 = 0.1
