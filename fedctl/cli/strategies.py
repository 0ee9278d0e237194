"""``fedctl strategies``: the registered algorithms, what they push and their ``--opt`` settings."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from fedctl.strategies.registry import get_strategy_class, strategy_names


@click.command("strategies")
def strategies_cmd() -> None:
    """List the strategies and their options (set with --opt KEY=VALUE on serve, simulate and bench)."""
    console = Console()
    for name in strategy_names():
        cls = get_strategy_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        policies = ", ".join(cls.policies)
        console.print(f"[bold]{name}[/]  (pushes {cls.update_kind}; --policy {policies})  {doc}")
        if not cls.options:
            console.print("  no options\n")
            continue
        table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
        for column in ("option", "type", "default", "meaning"):
            table.add_column(column)
        for key, opt in cls.options.items():
            table.add_row(key, opt.type.__name__, str(opt.default), opt.help)
        console.print(table)
        console.print()
