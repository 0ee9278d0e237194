"""The ``fedctl partition`` command: split a dataset into per-client shard files plus a manifest."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from fedctl.api.inputs import missing_dataset_fix
from fedctl.data.datasets import DATASETS
from fedctl.data.local import load_local
from fedctl.data.partition import SCHEMES, write_local_partition, write_partition
from fedctl.errors import ConfigError
from fedctl.fsio import check_writable_dir

log = logging.getLogger(__name__)

#: More classes than this and the histogram shows each client's class count and largest class instead.
MAX_CLASS_COLUMNS = 20
_SCHEME_FIX = ("pass exactly one of --iid and --shards-per-client N, --dirichlet ALPHA, --quantity-skew BETA (--iid: "
               "shuffle and cut; N: McMahan et al.'s non-IID label shards per client; ALPHA: Dirichlet label skew, "
               "smaller is more skewed; BETA: Dirichlet client sizes, labels IID)")
_INPUT_ONLY = ("label_column", "test_fraction", "image_size")
_DATASET_ONLY = ("dataset", "source_dir", "download")


def _image_size(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not match or not all(int(g) > 0 for g in match.groups()):
        raise click.BadParameter(f"{value!r} is not HEIGHTxWIDTH in pixels, e.g. 32x32", ctx, param)
    return int(match[1]), int(match[2])


@click.command("partition")
@click.option("--dataset", type=click.Choice(list(DATASETS)), default="mnist", show_default=True,
              help="Registered dataset to partition (mnist-sample ships with fedctl); or see --input.")
@click.option("--input", "input_path", type=click.Path(path_type=Path), default=None,
              help="Partition your own dataset instead: .npz (arrays x, y), CSV/TSV or Parquet (--label-column, "
                   "numeric features), or a folder with one sub-folder of PNG/JPEG images per class.")
@click.option("--label-column", default="label", show_default=True, help="--input table: the label column.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="--input: fraction set aside (seeded, stratified) as test.npz for `serve --eval-data test`.")
@click.option("--image-size", callback=_image_size, default=None, metavar="HxW",
              help="--input image folder: resize every image to HxW pixels (otherwise sizes must agree).")
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
@click.option("--dirichlet", "alpha", type=click.FloatRange(min=0, min_open=True), default=None, metavar="ALPHA",
              help="Label skew of Hsu et al.: each class is shared among the clients in proportions ~ Dir(ALPHA) "
                   "(0.1: a few classes per client; 100: nearly IID).")
@click.option("--quantity-skew", "beta", type=click.FloatRange(min=0, min_open=True), default=None, metavar="BETA",
              help="Client sizes in proportions ~ Dir(BETA), labels IID (0.5: a few large clients; 100: equal).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the partition's RNG.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory for shard*.npz, test.npz and manifest.json.")
@click.pass_context
def partition_cmd(ctx: click.Context, dataset: str, input_path: Path | None, label_column: str,
                  test_fraction: float, image_size: tuple[int, int] | None, source_dir: Path | None,
                  download: bool, clients: int, iid: bool, shards_per_client: int | None, alpha: float | None,
                  beta: float | None, seed: int, out_dir: Path) -> None:
    """Partition a dataset among CLIENTS workers and write one shard file per client.

    The dataset is a registered one's training split (--dataset; its test split becomes test.npz) or your own
    (--input; a --test-fraction of it becomes test.npz). Exactly one split is required: --iid,
    --shards-per-client N, --dirichlet ALPHA or --quantity-skew BETA; every client gets at least one example.
    Files are written atomically; manifest.json (written last) records each shard's size, label histogram and
    SHA-256, which workers verify before training. The per-client label histogram is printed too.
    """
    scheme = _choose_scheme(iid, shards_per_client, alpha, beta)
    _check_sources(ctx, input_path)
    check_writable_dir(out_dir, "--out")
    params: dict[str, Any] = {"shards_per_client": shards_per_client, "alpha": alpha, "beta": beta}
    if input_path is None:
        name = dataset
        with missing_dataset_fix(has_download=True):
            manifest = _run_with_progress(name, clients, lambda progress: write_partition(
                dataset, out_dir, clients, scheme, seed=seed, source_dir=source_dir, download=download,
                on_progress=progress, **params))
    else:
        data = load_local(input_path, label_column=label_column, image_size=image_size)
        name = input_path.name
        manifest = _run_with_progress(name, clients, lambda progress: write_local_partition(
            data, out_dir, clients, scheme, seed=seed, test_fraction=test_fraction, on_progress=progress, **params))
    print_histogram(manifest)
    sizes = [s["num_examples"] for s in manifest["shards"]]
    per_client = str(sizes[0]) if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
    param = SCHEMES[scheme].param
    how = SCHEMES[scheme].describe(params[param] if param else None)
    click.echo(f"{name}: {clients} clients ({how}), {per_client} examples per client, "
               f"{manifest['test']['num_examples']} test examples -> {out_dir}")


def _choose_scheme(iid: bool, shards_per_client: int | None, alpha: float | None, beta: float | None) -> str:
    chosen = [(flag, scheme) for flag, scheme, given in (
        ("--iid", "iid", iid), ("--shards-per-client", "shards", shards_per_client is not None),
        ("--dirichlet", "dirichlet", alpha is not None), ("--quantity-skew", "quantity", beta is not None)) if given]
    if len(chosen) == 1:
        return chosen[0][1]
    flags = [flag for flag, _ in chosen]
    if not flags:
        cause = "no split was chosen"
    elif len(flags) == 2:
        cause = f"both {flags[0]} and {flags[1]} were given"
    else:
        cause = f"{', '.join(flags[:-1])} and {flags[-1]} were all given"
    raise ConfigError(cause, _SCHEME_FIX)


def _check_sources(ctx: click.Context, input_path: Path | None) -> None:
    """--input and the registered dataset's options exclude each other; so do --dataset and --input's options."""
    explicit = {name for name in (*_INPUT_ONLY, *_DATASET_ONLY)
                if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    wrong = explicit & set(_DATASET_ONLY if input_path is not None else _INPUT_ONLY)
    if not wrong:
        return
    flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(wrong))
    many = len(wrong) > 1
    if input_path is not None:
        raise ConfigError(f"--input {input_path} was given with {flags}, which {'are' if many else 'is'} for a "
                          "registered dataset", f"drop {flags} (or --input)")
    raise ConfigError(f"{flags} only {'apply' if many else 'applies'} to --input (your own dataset)",
                      f"drop {flags}, or pass --input PATH instead of --dataset")


def _run_with_progress(name: str, clients: int, write: Callable[[Callable[[int, int], None]], dict]) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    console = Console(stderr=True)  # off a terminal the bar would leave only a blank line behind
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"writing {name} shards", total=clients + 1)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return write(on_progress)


def print_histogram(manifest: dict[str, Any]) -> None:
    """The per-client label histogram of a partition manifest as a table on stdout (one row per shard)."""
    from rich.console import Console
    from rich.table import Table

    classes = manifest.get("classes") or [str(i) for i in range(manifest["num_classes"])]
    wide = len(classes) > MAX_CLASS_COLUMNS
    table = Table(title=f"label histogram ({manifest['scheme']}, seed {manifest['seed']})", title_justify="left")
    table.add_column("shard")
    table.add_column("examples", justify="right")
    headers = ["classes", "largest class"] if wide else [c if len(c) <= 10 else c[:9] + "…" for c in classes]
    for header in headers:
        table.add_column(header, justify="right")
    for entry in [*manifest["shards"], manifest["test"]]:
        counts = entry["label_histogram"]
        if wide:
            top = max(range(len(counts)), key=counts.__getitem__) if counts else 0
            share = counts[top] / max(entry["num_examples"], 1)
            cells = [str(sum(1 for c in counts if c)), f"{classes[top]} ({share:.0%})"]
        else:
            cells = [str(c) for c in counts]
        table.add_row(entry["name"], str(entry["num_examples"]), *cells)
    console = Console()
    if not console.is_terminal:  # piped or captured: no wrapping at 80 columns
        console.width = max(80, 24 + 8 * len(headers))
    console.print(table)
