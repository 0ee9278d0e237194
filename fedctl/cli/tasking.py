"""``--task`` on serve, join, simulate and demo (the option; what it means is :mod:`fedctl.api.tasking`)."""

from __future__ import annotations

import click

task_option = click.option(
    "--task", "task_ref", default=None, metavar="FILE.py|MODULE|NAME",
    help="The model to federate: your task file or importable module (docs/tasks.md: model(), and optionally "
         "load_data, loss, metrics, optimizer), or a built-in model name (mlp, lenet5, 2nn, cnn). Overrides --model.")


def model_given(ctx: click.Context) -> bool:
    """Whether ``--model`` came from the command line or the environment (not its default)."""
    source = ctx.get_parameter_source("model")
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
