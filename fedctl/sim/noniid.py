"""The non-IID comparison (``fedctl bench noniid``, docs/results.md): FedAvg against the algorithms built for
heterogeneous data, each tuned on the same grid budget.

Every run is an ordinary ``fedctl bench fl`` preset (``cmp-<setting>-<strategy>-<knob><value>``), so any one of
them can be run, resumed and reported alone. The method, the same for every algorithm:

1. **Tuning.** Each algorithm has one knob (its most sensitive hyper-parameter) and a multiplicative grid of three
   values. Each grid point runs :attr:`Setting.grid_rounds` rounds; the point with the best test accuracy so far
   at that round wins (ties: the smaller value). Every algorithm gets the same number of points and rounds.
2. **The run.** The winning point continues (the broker resumes its state) to :attr:`Setting.budget_rounds`. The
   table gives the rounds to the setting's target (monotone curve, interpolated, as in McMahan et al.) and the
   accuracy after the budget; the plots give accuracy against the round and against the bytes on the wire.
3. **The reference.** FedAvg is what every other algorithm is measured against (their rounds to target as a
   fraction of FedAvg's). Where FedAvg has not reached the target by the budget, its run continues, stopping at the
   target, up to :attr:`Setting.reference_rounds`, so that the fraction has a denominator; its accuracy after the
   budget, its bytes and its wall time stay those of the budget, as for every other algorithm.

All algorithms share E, B and C; the workers' learning rate is :data:`CLIENT_LR` for every algorithm whose knob is
not the workers' rate itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedctl.sim.presets import Preset

CLIENT_LR = 0.05
"""The workers' learning rate where the knob is something else (FedAvg's own best non-IID LeNet-5 rate)."""
EPOCHS, BATCH, FRACTION = 1, 10, 0.1


@dataclass(frozen=True)
class Setting:
    """A data setting of the comparison: dataset, partition, model, target and round budgets."""

    key: str
    dataset: str
    model: str
    target: float
    grid_rounds: int
    budget_rounds: int
    dirichlet: float | None = None
    eval_every: int = 1
    reference_rounds: int | None = None
    """How far FedAvg (the reference) may run past the budget to reach the target; None: not past the budget."""

    @property
    def label(self) -> str:
        split = ("pathological non-IID (2 label shards)" if self.dirichlet is None
                 else f"Dirichlet(α={self.dirichlet:g})")
        return f"{self.model} on {self.dataset}, {split}, target {self.target:g}"


@dataclass(frozen=True)
class Contender:
    """An algorithm and the grid of its knob: ``lr`` (the workers' rate) or one of its ``--opt`` names."""

    strategy: str
    knob: str
    grid: tuple[float, ...]
    fixed: tuple[tuple[str, str], ...] = ()


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    # The 2NN is ~25x cheaper than the CNN: its budget covers FedAvg's paper figure (664 rounds to 97%).
    Setting("mnist-2nn", "mnist", "2nn", 0.97, grid_rounds=100, budget_rounds=1000),
    # FedAvg may run on to 450 rounds: the paper's CNN needs 350 at E = 1 B = 10 on this split (Table 2).
    Setting("mnist-cnn", "mnist", "cnn", 0.99, grid_rounds=20, budget_rounds=150, eval_every=5,
            reference_rounds=450),
    Setting("fmnist-a0.1-cnn", "fashion-mnist", "cnn", 0.85, grid_rounds=20, budget_rounds=100, dirichlet=0.1,
            eval_every=5, reference_rounds=300),
    Setting("fmnist-a0.5-cnn", "fashion-mnist", "cnn", 0.85, grid_rounds=20, budget_rounds=100, dirichlet=0.5,
            eval_every=5, reference_rounds=300),
    # For tests: the bundled sample, seconds per run (not part of the default comparison).
    Setting("smoke", "mnist-sample", "mlp", 0.7, grid_rounds=2, budget_rounds=3, dirichlet=0.5, reference_rounds=10),
)}
DEFAULT_SETTINGS = ("mnist-2nn", "mnist-cnn", "fmnist-a0.1-cnn", "fmnist-a0.5-cnn")

REFERENCE = "fedavg"
"""The algorithm the others are measured against."""

CONTENDERS: tuple[Contender, ...] = (
    Contender("fedavg", "lr", (0.025, 0.05, 0.1)),
    Contender("fedavgm", "eta", (0.3, 0.6, 1.0), (("beta", "0.9"),)),
    Contender("fedadagrad", "eta", (0.003, 0.01, 0.03)),
    Contender("fedadam", "eta", (0.001, 0.003, 0.01)),
    Contender("fedyogi", "eta", (0.001, 0.003, 0.01)),
    Contender("fedprox", "mu", (0.01, 0.1, 1.0)),
    Contender("scaffold", "lr", (0.025, 0.05, 0.1)),
)


def preset_name(setting: Setting, contender: Contender, value: float) -> str:
    return f"cmp-{setting.key}-{contender.strategy}-{contender.knob}{value:g}"


def preset(setting: Setting, contender: Contender, value: float) -> Preset:
    """The ``fedctl bench fl`` preset of one grid point."""
    from fedctl.sim.presets import Preset  # (presets.py registers these: imported there at its end)

    lr = value if contender.knob == "lr" else CLIENT_LR
    options = dict(contender.fixed)
    if contender.knob != "lr":
        options[contender.knob] = f"{value:g}"
    return Preset(preset_name(setting, contender, value), setting.model, contender.strategy, EPOCHS, BATCH, lr,
                  fraction=FRACTION, dataset=setting.dataset, iid=False, max_rounds=setting.budget_rounds,
                  eval_every=setting.eval_every, options=tuple(sorted(options.items())), dirichlet=setting.dirichlet,
                  target_accuracy=setting.target)


def presets() -> Iterator[Preset]:
    for setting in SETTINGS.values():
        for contender in CONTENDERS:
            for value in contender.grid:
                yield preset(setting, contender, value)
