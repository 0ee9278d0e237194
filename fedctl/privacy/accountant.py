"""Privacy accounting for DP-FedAvg with Google's ``dp-accounting`` library (its RDP accountant).

Each round is one sampled Gaussian mechanism on the sum of clipped updates, noise multiplier z (std z·S for clip
S). How the round's workers are sampled decides the event, and fedctl states it as it does it:

* ``fixed`` (what fedctl's rounds do): m = max(⌊C·K⌋, 1) of the K connected workers, uniformly without
  replacement — ``SampledWithoutReplacementDpEvent(K, m, Gaussian(z))`` under the replace-one relation (a worker's
  data replaced by another's; the library's analysis of sampling without replacement is for that relation).
* ``poisson``: each worker independently with probability q — ``PoissonSampledDpEvent(q, Gaussian(z))`` under
  add-or-remove-one, the analysis of McMahan et al. and of Opacus; fedctl uses it to cross-check against Opacus
  (tests/unit/test_privacy.py), not to account its own rounds.

Rounds are kept as (K, m, z) triples, so a run whose population changes is accounted round by round, and a resumed
run recomputes ε from its state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)
DEFAULT_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512])
"""RDP orders α: the accountant takes ε = min over α of the RDP conversion (the same grid as Opacus's)."""


@dataclass(frozen=True)
class RoundEvent:
    """One round's sampled Gaussian mechanism: ``sampled`` of ``population`` workers, noise multiplier ``z``."""

    population: int
    sampled: int
    z: float


class Accountant:
    """ε after a sequence of rounds, at ``delta``.

    Raises
    ------
    ImportError
        ``dp-accounting`` is not installed (``pip install 'fedctl[dp]'``).
    """

    def __init__(self, delta: float, sampling: str = "fixed", orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        import absl.logging
        import dp_accounting

        absl.logging.set_verbosity(absl.logging.ERROR)  # non-converging orders are dropped with a WARNING each
        if sampling not in ("fixed", "poisson"):
            raise ValueError(f"sampling is fixed or poisson, not {sampling!r}")
        self._dpa, self.delta, self.sampling, self.orders = dp_accounting, delta, sampling, tuple(orders)

    def _event(self, r: RoundEvent) -> object:
        dpa = self._dpa
        gaussian = dpa.GaussianDpEvent(r.z)
        if self.sampling == "poisson":
            return dpa.PoissonSampledDpEvent(r.sampled / r.population, gaussian)
        if r.sampled >= r.population:
            return gaussian
        return dpa.SampledWithoutReplacementDpEvent(r.population, r.sampled, gaussian)

    def epsilon(self, rounds: Sequence[RoundEvent]) -> float:
        """ε of the composition of ``rounds`` at :attr:`delta` (0 for no round)."""
        if not rounds:
            return 0.0
        from dp_accounting.rdp import rdp_privacy_accountant as rdp

        relation = (self._dpa.NeighboringRelation.ADD_OR_REMOVE_ONE if self.sampling == "poisson"
                    else self._dpa.NeighboringRelation.REPLACE_ONE)
        accountant = rdp.RdpAccountant(list(self.orders), relation)
        runs: list[tuple[RoundEvent, int]] = []
        for r in rounds:  # equal consecutive rounds compose as one self-composed event (fast for long runs)
            if runs and runs[-1][0] == r:
                runs[-1] = (r, runs[-1][1] + 1)
            else:
                runs.append((r, 1))
        for r, count in runs:
            accountant.compose(self._dpa.SelfComposedDpEvent(self._event(r), count))
        eps = float(accountant.get_epsilon(self.delta))
        return eps if math.isfinite(eps) else float("inf")
