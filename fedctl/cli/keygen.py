"""``fedctl keygen``: write a CURVE key pair for a broker or a worker and say what to do with each file."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import click

from fedctl.security import generate_key_pair


def default_name() -> str:
    """This machine's host name, reduced to the characters a key name may hold."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]).strip("-._")
    return name[:64] or "fedctl"


@click.command("keygen")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for NAME.key (public) and NAME.key_secret (secret, mode 600); created if missing.")
@click.option("--name", default=None, help="File name of the pair [default: this host's name].")
@click.option("--force", is_flag=True, default=False, help="Replace an existing key pair of that name.")
def keygen_cmd(out_dir: Path, name: str | None, force: bool) -> None:
    """Create a CURVE key pair: one per broker and one per worker (see README, 'Secure setup across machines')."""
    name = name or default_name()
    public_path, secret_path, public_key = generate_key_pair(out_dir, name, force=force)
    click.echo(f"public key: {public_key.decode('ascii')}")
    click.echo(f"wrote {public_path}  (public: share it)")
    click.echo(f"wrote {secret_path}  (secret, mode 600: keep it on this machine, never copy it)")
    click.echo("As a broker:  fedctl serve --secret-key " f"{secret_path} --allowed-keys DIR_OF_WORKER_KEYS ...")
    click.echo(f"              and give each worker {public_path.name} (or the public key above) for --server-key.")
    click.echo(f"As a worker:  copy {public_path.name} into the broker's --allowed-keys directory, then")
    click.echo(f"              fedctl join --server-key BROKER_KEY --secret-key {secret_path} ...")
