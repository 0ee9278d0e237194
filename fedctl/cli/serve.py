"""``fedctl serve``: run the broker (parameter server) of one federated run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fedctl.api.serving import Server
from fedctl.cli.options import dp_phrase, metrics_options, run_options
from fedctl.cli.tasking import model_given, task_option


@click.command("serve")
@click.option("--bind", default="tcp://*:5555", show_default=True,
              help="ZeroMQ endpoint to listen on: tcp://HOST:PORT (tcp://127.0.0.1:* for any free port on this "
                   "machine only; other addresses need CURVE keys or --insecure), ipc://PATH or inproc://NAME.")
@run_options
@task_option
@click.option("--eval-data", default=None,
              help="Evaluate the global model after every round on this shard of --data-dir (e.g. test), "
                   "or on a dataset split such as mnist:test.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Partition directory (`fedctl partition --out`) holding the --eval-data shard.")
@click.option("--eval-backend", type=click.Choice(["auto", "torch", "mxnet"]), default="auto", show_default=True,
              help="Framework for evaluation (auto: the first one installed).")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Seconds between heartbeats to each worker.")
@click.option("--liveness", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="A worker silent for this many seconds is dropped from the run.")
@click.option("--max-message-mb", type=click.FloatRange(min=0.01), default=256.0, show_default=True,
              help="Largest frame accepted (ZMQ_MAXMSGSIZE).")
@click.option("--chunk-above-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Dense models and updates larger than this go in chunks paced by the receiver's credits "
                   "[default: 64, or 3/4 of --max-message-mb when that is smaller].")
@click.option("--chunk-kb", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tensor data per chunk message.")
@click.option("--compress", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Models sent to workers through zlib: auto (per worker, only where its measured link is slow "
                   "enough that the bytes saved outweigh deflating and inflating; docs/protocol.md §4.4), always "
                   "or never.")
@click.option("--secret-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The broker's NAME.key_secret (`fedctl keygen`): encrypt with CURVE and admit only the workers "
                   "in --allowed-keys. Required unless --bind is loopback, ipc or inproc.")
@click.option("--allowed-keys", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the admitted workers' public keys (their NAME.key files).")
@click.option("--insecure", is_flag=True, default=False,
              help="Serve a non-loopback --bind without CURVE: plaintext, anyone who reaches it may join.")
@click.option("--upstream", default=None, metavar="tcp://PARENT:PORT",
              help="Run as an edge broker: a broker to the workers that join --bind, one worker of this parent "
                   "broker (its examples are its workers' sum). Each parent round runs among the edge's workers "
                   "(its own --fraction, --min-workers, --round-timeout) and one merged update goes up. The parent "
                   "decides the rounds and when the run ends: an edge ignores --rounds (docs/architecture.md, edge "
                   "brokers).")
@click.option("--server-key", default=None, metavar="KEY|FILE",
              help="With --upstream: the parent's CURVE public key (or its NAME.key file); the edge connects with "
                   "the key pair of --secret-key (its public key in the parent's --allowed-keys).")
@click.option("--edge-id", default=None, metavar="NAME",
              help="With --upstream: this edge's worker id at the parent [default: edge-HOST-PORT].")
@metrics_options
@click.option("--metrics-per-worker", is_flag=True, default=False,
              help="Also one metrics series per worker (fedctl_peer_*, labelled worker=ID): their count grows with "
                   "the federation.")
def serve_cmd(bind: str, eval_data: str | None, data_dir: Path | None, eval_backend: str, heartbeat_interval: float,
              liveness: float, max_message_mb: float, chunk_above_mb: float | None, chunk_kb: int, compress: str,
              secret_key: Path | None, allowed_keys: Path | None,
              insecure: bool, metrics_bind: str | None, metrics_token: Path | None, metrics_insecure: bool,
              metrics_per_worker: bool, upstream: str | None, server_key: str | None, edge_id: str | None,
              task_ref: str | None, **run: Any) -> None:
    """Run the parameter server: hold the global model, hand it out, aggregate the updates under the --policy
    (synchronous rounds, stale-synchronous ssp:S or async) and checkpoint to --state-dir.

    Every option is checked, and --state-dir probed for writing, before the broker binds --bind.
    """
    model = run.pop("model")
    server = Server(task_ref, bind=bind, model=model if model_given(click.get_current_context()) else None,
                    eval_data=eval_data, data_dir=data_dir, eval_backend=eval_backend,
                    heartbeat_interval=heartbeat_interval, liveness=liveness, max_message_mb=max_message_mb,
                    chunk_above_mb=chunk_above_mb, chunk_kb=chunk_kb, compress=compress,
                    secret_key=secret_key, allowed_keys=allowed_keys, insecure=insecure,
                    metrics_bind=metrics_bind, metrics_token=metrics_token, metrics_insecure=metrics_insecure,
                    metrics_per_worker=metrics_per_worker, upstream=upstream, server_key=server_key,
                    edge_id=edge_id, **run)
    summary = server.run().summary
    if upstream is not None:
        up = summary.get("upstream") or {}
        click.echo(f"edge done: the parent's run ended after its round {up.get('final_round')}; this edge took part "
                   f"in {up.get('rounds_trained', 0)} rounds; metrics in {server.config.state_dir}/metrics.jsonl")
        return
    acc = summary["last"].get("test_accuracy")
    click.echo(f"run complete: {summary['rounds']} rounds, model version {summary['version']}"
               + (f", test accuracy {acc:.4f}" if acc is not None else "") + dp_phrase(summary)
               + f"; metrics in {server.config.state_dir}/metrics.jsonl")
