"""The ``fedctl partition`` command: split a dataset into per-client shard files plus a manifest."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from fedctl.cli.common import missing_dataset_fix
from fedctl.data.datasets import DATASETS
from fedctl.data.partition import write_partition
from fedctl.errors import ConfigError
from fedctl.fsio import check_writable_dir

log = logging.getLogger(__name__)


@click.command("partition")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default="mnist", show_default=True,
              help="Dataset to partition (mnist-sample ships with fedctl).")
@click.option("--source-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory holding the four IDX files (.gz or raw); otherwise searched in "
                   "$FEDCTL_DATA_DIR/<dataset>, system packages and ~/.cache/fedctl/<dataset>.")
@click.option("--download/--no-download", default=False, show_default=True,
              help="Download the dataset if it is not found (verified by SHA-256).")
@click.option("--clients", type=click.IntRange(min=1), default=100, show_default=True,
              help="Number of client shards.")
@click.option("--iid", is_flag=True, default=False, help="IID split: shuffle and cut into equal parts.")
@click.option("--shards-per-client", type=click.IntRange(min=1), default=None,
              help="Non-IID split of McMahan et al.: sort by label, give each client N label shards.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the partition's RNG.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory for shard*.npz, test.npz and manifest.json.")
def partition_cmd(dataset: str, source_dir: Path | None, download: bool, clients: int, iid: bool,
                  shards_per_client: int | None, seed: int, out_dir: Path) -> None:
    """Partition a dataset's training split among CLIENTS workers and write one shard file per client.

    Exactly one of --iid and --shards-per-client N is required. The test split is written as test.npz for
    centralised evaluation. Files are written atomically; manifest.json (written last) records each shard's
    size, label histogram and SHA-256, which workers verify before training.
    """
    if iid == (shards_per_client is not None):
        given = "both --iid and --shards-per-client were given" if iid else "no split was chosen"
        raise ConfigError(given, "pass exactly one of --iid and --shards-per-client N (--iid: shuffle and cut; N: "
                                 "McMahan et al.'s non-IID label shards per client)")
    check_writable_dir(out_dir, "--out")
    scheme = "iid" if iid else "shards"
    with missing_dataset_fix(has_download=True):
        manifest = _run_with_progress(dataset, out_dir, clients, scheme, shards_per_client, seed, source_dir,
                                      download)
    sizes = [s["num_examples"] for s in manifest["shards"]]
    per_client = str(sizes[0]) if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
    how = "IID" if iid else f"{shards_per_client} label shards each"
    click.echo(f"{dataset}: {clients} clients ({how}), {per_client} examples per client, "
               f"{manifest['test']['num_examples']} test examples -> {out_dir}")


def _run_with_progress(dataset: str, out_dir: Path, clients: int, scheme: str, shards_per_client: int | None,
                       seed: int, source_dir: Path | None, download: bool) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    console = Console(stderr=True)  # off a terminal the bar would leave only a blank line behind
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"writing {dataset} shards", total=clients + 1)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return write_partition(dataset, out_dir, clients, scheme, shards_per_client, seed, source_dir,
                               download, on_progress=on_progress)
