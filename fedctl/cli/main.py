"""The ``fedctl`` command group and the one place errors become messages and exit codes."""

from __future__ import annotations

import builtins
import importlib
import logging
import sys

import click
from click.core import ParameterSource

from fedctl import __version__
from fedctl.cli.common import setup_logging
from fedctl.errors import FedctlError
from fedctl.memory import reuse_large_buffers

COMMANDS = {
    "serve": "fedctl.cli.serve:serve_cmd", "join": "fedctl.cli.join:join_cmd",
    "keygen": "fedctl.cli.keygen:keygen_cmd", "partition": "fedctl.cli.partition:partition_cmd",
    "demo": "fedctl.cli.demo:demo_cmd", "simulate": "fedctl.cli.simulate:simulate_cmd",
    "strategies": "fedctl.cli.strategies:strategies_cmd", "bench": "fedctl.cli.bench:bench_group",
    "export": "fedctl.cli.export:export_cmd", "status": "fedctl.cli.status:status_cmd",
    "report": "fedctl.cli.report:report_cmd",
}
"""Each command and where it is defined: imported when it runs (or for --help), so that a long-running `fedctl
serve` or `join` holds only what it uses — the simulator, benchmarks and datasets cost ~15 MB of RSS."""


class LazyGroup(click.Group):
    """A click group whose commands (:data:`COMMANDS`) are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *super().list_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, name = target.split(":")  # (resolve_command below keeps click's "did you mean" for typos)
        command = getattr(importlib.import_module(module), name)
        assert isinstance(command, click.Command)
        return command

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                           list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None and not ctx.resilient_parsing:
            raise click.exceptions.NoSuchCommand(name, possibilities=self.list_commands(ctx), ctx=ctx)
        return super().resolve_command(ctx, args)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "FEDCTL"})
@click.version_option(__version__, prog_name="fedctl")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """fedctl: federated learning over ZeroMQ — the data stays with the workers; only model updates travel."""
    setup_logging(verbose, quiet)




def main(argv: list[str] | None = None) -> None:
    """Console entry point: a user's mistake ends in one line ``error: cause — fix`` and a non-zero exit code.

    A FedctlError (also one raised inside an ``asyncio.TaskGroup``, which wraps it in an exception group) and
    click's usage errors become that line; so does an OSError on a named file, the environment's refusal (disk
    full, permission denied) rather than a bug — ``-v`` logs its traceback. Anything else is a bug and keeps its
    traceback.
    """
    reuse_large_buffers()
    try:
        cli.main(args=argv, prog_name="fedctl", standalone_mode=False)
    except BaseException as err:
        code = _report(_only_leaf(err))
        if code is None:
            raise
        sys.exit(code)


_GROUP: type[BaseException] | None = getattr(builtins, "BaseExceptionGroup", None)
"""What ``asyncio.TaskGroup`` raises (Python 3.11+)."""


def _only_leaf(error: BaseException) -> BaseException:
    """The single exception inside nested one-member exception groups, or ``error`` itself."""
    while _GROUP is not None and isinstance(error, _GROUP) and len(getattr(error, "exceptions", ())) == 1:
        error = error.exceptions[0]  # type: ignore[attr-defined]
    return error


def _report(err: BaseException) -> int | None:
    """Print the one line for ``err`` and return the exit code, or None when ``err`` is a bug to re-raise."""
    if isinstance(err, FedctlError):
        click.echo(f"error: {_one_line(str(err))}", err=True)
        return err.exit_code
    if isinstance(err, click.exceptions.Exit):
        return err.exit_code
    if isinstance(err, (click.exceptions.Abort, KeyboardInterrupt)):
        click.echo("interrupted", err=True)
        return 130
    if isinstance(err, click.exceptions.UsageError):
        command = err.ctx.command_path if err.ctx is not None else "fedctl"
        envvar = _from_envvar(err)
        if envvar:
            click.echo(f"error: {_sentence(err.format_message())} (from ${envvar}) — correct or unset {envvar} "
                       f"(see `{command} --help`)", err=True)
        else:
            click.echo(f"error: {_sentence(err.format_message())} — see `{command} --help`", err=True)
        return err.exit_code
    if isinstance(err, click.exceptions.ClickException):
        click.echo(f"error: {_sentence(err.format_message())}", err=True)
        return err.exit_code
    if isinstance(err, OSError) and err.filename is not None:
        logging.getLogger(__name__).debug("the traceback of the error below", exc_info=err)
        click.echo(f"error: {err.filename}: {err.strerror or err} — check the path, its permissions and the free "
                   "disk space (-v shows where it happened)", err=True)
        return 1
    return None


def _from_envvar(err: click.exceptions.UsageError) -> str | None:
    """The FEDCTL_* variable a bad value came from (the option was not on the command line), if it did."""
    param = getattr(err, "param", None)
    ctx = err.ctx
    if not isinstance(param, click.Option) or ctx is None or not param.name:
        return None
    if ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
        return None
    if isinstance(param.envvar, str):
        return param.envvar
    prefix = ctx.auto_envvar_prefix
    return f"{prefix}_{param.name.upper()}" if prefix else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _sentence(text: str) -> str:
    """click's message as the cause of an ``error:`` line: one line, lower-case start, no final full stop."""
    text = _one_line(text).rstrip(".")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text
