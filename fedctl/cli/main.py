"""The ``fedctl`` command group and the one place errors become messages and exit codes."""

from __future__ import annotations

import sys

import click

from fedctl import __version__
from fedctl.cli.bench import bench_group
from fedctl.cli.common import setup_logging
from fedctl.cli.demo import demo_cmd
from fedctl.cli.join import join_cmd
from fedctl.cli.keygen import keygen_cmd
from fedctl.cli.partition import partition_cmd
from fedctl.cli.serve import serve_cmd
from fedctl.cli.simulate import simulate_cmd
from fedctl.cli.strategies import strategies_cmd
from fedctl.errors import FedctlError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "FEDCTL"})
@click.version_option(__version__, prog_name="fedctl")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """fedctl: federated learning over ZeroMQ — the data stays with the workers; only model updates travel."""
    setup_logging(verbose, quiet)


for command in (serve_cmd, join_cmd, keygen_cmd, partition_cmd, demo_cmd, simulate_cmd, strategies_cmd, bench_group):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: a FedctlError ends in one line 'error: cause — fix' and its exit code."""
    try:
        cli.main(args=argv, prog_name="fedctl", standalone_mode=False)
    except FedctlError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as ex:
        sys.exit(ex.exit_code)
