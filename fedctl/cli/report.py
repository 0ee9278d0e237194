"""``fedctl report STATE_DIR``: a self-contained HTML page and a PNG of a run, from its state directory."""

from __future__ import annotations

from pathlib import Path

import click

from fedctl.api.report import report


@click.command("report")
@click.argument("state_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write (the PNG goes beside it) [default: STATE_DIR/report.html].")
def report_cmd(state_dir: Path, out: Path | None) -> None:
    """Write a report of the run in STATE_DIR (finished or running): its curves, per-round table, bytes ledger,
    the workers that took part and its configuration, as one HTML page needing nothing else, and a PNG."""
    written = report(state_dir, out)
    click.echo(f"wrote {written.html} ({written.rounds} rounds) and {written.png}")
