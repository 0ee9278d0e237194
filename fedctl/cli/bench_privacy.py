"""``fedctl bench privacy``: secure aggregation's overhead, DP-FedAvg's privacy–utility curve and Selective SGD's
DP variant, through the real broker and workers; results in OUT/privacy.{json,md,png} (docs/results.md)."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import click

from fedctl.api.inputs import missing_dataset_fix
from fedctl.cli.simulate import console, quiet_workers
from fedctl.fsio import check_writable_dir
from fedctl.sim import privacy_bench as pb
from fedctl.sim.privacy_report import write_privacy_report


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _floats(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


@click.command("privacy")
@click.option("--part", "parts", multiple=True, type=click.Choice(["secagg", "dp", "ssgd"]),
              help="What to measure (repeatable) [default: all three].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True, help="Directory for privacy.{json,md,png} and the runs' state.")
@click.option("--source-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the MNIST IDX files are (otherwise the usual search path).")
@click.option("--models", default="mlp,lenet5", show_default=True, help="secagg: the models, comma-separated.")
@click.option("--workers", default="10,50", show_default=True, callback=_ints, help="secagg: worker counts.")
@click.option("--secagg-rounds", type=click.IntRange(min=2), default=5, show_default=True,
              help="secagg: rounds per run (round 1 is left out of the medians).")
@click.option("--lost", default="0.1,0.3", show_default=True, callback=_floats,
              help="secagg: fractions of workers lost after sending their masked input (round 2).")
@click.option("--dp-clients", type=click.IntRange(min=10), default=1000, show_default=True,
              help="dp: clients the MNIST training set is split among.")
@click.option("--dp-sampled", type=click.IntRange(min=1), default=100, show_default=True,
              help="dp: clients per round (m).")
@click.option("--dp-rounds", type=click.IntRange(min=1), default=50, show_default=True, help="dp: rounds.")
@click.option("--epsilons", default="1,2,4,8", show_default=True, callback=_floats, help="dp: target ε values.")
@click.option("--dp-clip", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="dp: the L2 clip S.")
@click.option("--ssgd-epsilons", default="0.1,1,10,100", show_default=True, callback=_floats,
              help="ssgd: ε per uploaded value.")
@click.option("--ssgd-rounds", type=click.IntRange(min=1), default=100, show_default=True, help="ssgd: rounds.")
@click.option("--dataset", type=click.Choice(["mnist", "mnist-sample"]), default="mnist", show_default=True,
              help="dp and ssgd: the dataset (mnist-sample, bundled, for a quick look; ssgd then has 10 clients).")
@click.option("--parallel", type=click.IntRange(min=1), default=2, show_default=True, help="Training threads.")
def bench_privacy(parts: tuple[str, ...], out: Path, source_dir: Path | None, models: str, workers: list[int],
                  secagg_rounds: int, lost: list[float], dp_clients: int, dp_sampled: int, dp_rounds: int,
                  epsilons: list[float], dp_clip: float, ssgd_epsilons: list[float], ssgd_rounds: int,
                  dataset: str, parallel: int) -> None:
    """Measure what privacy costs: secure aggregation against the same run without it (round time, bytes per
    worker, with workers lost mid-round), DP-FedAvg's accuracy at several ε on MNIST, and Selective SGD's DP
    variant at several per-value ε. Results merge into OUT/privacy.json (a part re-run replaces its rows)."""
    quiet_workers()
    check_writable_dir(out, "--out")
    if dp_sampled > dp_clients:
        raise click.BadParameter(f"{dp_sampled} per round of {dp_clients} clients", param_hint="--dp-sampled")
    chosen = parts or ("secagg", "dp", "ssgd")
    env = (f"{time.strftime('%Y-%m-%d')} · {platform.processor() or platform.machine()} · Python "
           f"{platform.python_version()} · `fedctl bench privacy {' '.join('--part ' + p for p in chosen)}`")
    results: dict[str, object] = {"environment": env}
    started = time.perf_counter()
    with missing_dataset_fix(has_download=False):
        if "secagg" in chosen:
            results["secagg"] = pb.secagg_rows(out, [m.strip() for m in models.split(",") if m.strip()], workers,
                                               secagg_rounds, lost, parallel, console.print)
        if "dp" in chosen:
            results["dp"] = pb.dp_rows(out, dp_clients, dp_sampled, dp_rounds, epsilons, dp_clip, 1e-5, source_dir,
                                       parallel, console.print, dataset)
        if "ssgd" in chosen:
            results["ssgd"] = pb.ssgd_rows(out, ssgd_epsilons, ssgd_rounds, source_dir, parallel, console.print,
                                           dataset, 100 if dataset == "mnist" else 10)
    write_privacy_report(out, results)
    click.echo(f"results in {out / 'privacy.md'} (and .json, .png); {time.perf_counter() - started:.0f} s")
