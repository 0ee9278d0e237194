"""The non-IID comparison's tuning (``fedctl bench noniid``) through the real broker and workers on the bundled
sample: a grid point whose training diverges is recorded as such and not chosen; a grid that diverges everywhere
stops with one error."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedctl.cli.bench_noniid import compare, write_report
from fedctl.errors import TrainingFailed
from fedctl.sim.noniid import SETTINGS, Contender

pytestmark = pytest.mark.timeout(240)


def test_a_diverging_grid_point_is_a_result_not_the_end(tmp_path: Path) -> None:
    row = compare(SETTINGS["smoke"], Contender("fedavg", "lr", (0.05, 5e4)), tmp_path, None, 1)
    stable, wild = row["grid"]
    assert "diverged_at" not in stable and stable["best_accuracy"] > 0.3
    assert wild["diverged_at"] == 1, "the learning rate 5e4 gives NaN in the first round"
    assert row["chosen"] == 0.05 and row["rounds_run"] == 3
    write_report([row], tmp_path)
    assert "| fedavg | lr: 0.05 (0." in (tmp_path / "noniid.md").read_text()
    assert "50000 (diverged in round 1) | 0.05 |" in (tmp_path / "noniid.md").read_text()


def test_a_grid_diverging_everywhere_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingFailed, match="diverged at every point of its lr grid") as err:
        compare(SETTINGS["smoke"], Contender("fedavgm", "lr", (5e4, 1e5)), tmp_path, None, 1)
    assert err.value.diverged and err.value.fix
