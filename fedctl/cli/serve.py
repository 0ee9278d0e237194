"""``fedctl serve``: run the broker (parameter server) of one federated run."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import click

from fedctl.broker.config import BrokerConfig
from fedctl.broker.service import Broker
from fedctl.cli.common import check_endpoint, load_data, make_evaluator, resolve_backend
from fedctl.cli.options import broker_config, run_options
from fedctl.cli.tasking import broker_model, model_given, resolve_task, task_option
from fedctl.errors import ConfigError
from fedctl.fsio import check_readable_dir, check_writable_dir, removed_if_empty_on_error
from fedctl.models import get_model
from fedctl.security import check_serve_security, is_local_bind, load_allowed_keys, load_key_pair

log = logging.getLogger(__name__)


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
@click.option("--secret-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The broker's NAME.key_secret (`fedctl keygen`): encrypt with CURVE and admit only the workers "
                   "in --allowed-keys. Required unless --bind is loopback, ipc or inproc.")
@click.option("--allowed-keys", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the admitted workers' public keys (their NAME.key files).")
@click.option("--insecure", is_flag=True, default=False,
              help="Serve a non-loopback --bind without CURVE: plaintext, anyone who reaches it may join.")
def serve_cmd(bind: str, eval_data: str | None, data_dir: Path | None, eval_backend: str, heartbeat_interval: float,
              liveness: float, max_message_mb: float, chunk_above_mb: float | None, chunk_kb: int,
              secret_key: Path | None, allowed_keys: Path | None,
              insecure: bool, task_ref: str | None, **run: Any) -> None:
    """Run the parameter server: hold the global model, hand it out, aggregate the updates under the --policy
    (synchronous rounds, stale-synchronous ssp:S or async) and checkpoint to --state-dir.

    Every option is checked, and --state-dir probed for writing, before the broker binds --bind.
    """
    check_endpoint(bind, "--bind", bind=True)
    check_serve_security(bind, secret_key, allowed_keys, insecure)
    task = resolve_task(task_ref, run["model"], model_given(click.get_current_context()))
    run["model"] = task.name
    max_message_bytes = int(max_message_mb * 2**20)
    if chunk_kb * 1024 > max_message_bytes // 2:
        raise ConfigError(f"--chunk-kb {chunk_kb} is more than half of --max-message-mb {max_message_mb:g}",
                          f"pass --chunk-kb {max(max_message_bytes // 2048, 1)} or less, or a larger --max-message-mb")
    config = broker_config(run, bind=bind, heartbeat_interval_s=heartbeat_interval, liveness_s=liveness,
                           max_message_bytes=max_message_bytes,
                           chunk_above=int(chunk_above_mb * 2**20) if chunk_above_mb else 0,
                           chunk_bytes=chunk_kb * 1024, curve_secret_key=secret_key, allowed_keys=allowed_keys)
    check_writable_dir(config.state_dir, "--state-dir")
    if secret_key is not None and allowed_keys is not None:  # fail on a bad key before loading evaluation data
        check_readable_dir(allowed_keys, "--allowed-keys")
        load_key_pair(secret_key)
        load_allowed_keys(allowed_keys)
    elif insecure and not is_local_bind(bind):
        log.warning("serving %s in plaintext (--insecure): anyone who reaches it can join, and model updates "
                    "travel unencrypted", bind)
    model = broker_model(task, config.seed)  # a user task's spec and initial weights (imports its framework)
    evaluator = None
    if eval_data:
        shard = load_data(eval_data, data_dir, "--eval-data")
        spec = get_model(config.model) if model is None else model[0]
        evaluator = make_evaluator("torch" if model is not None else resolve_backend(eval_backend), spec, shard,
                                   task=task)
        log.info("evaluating on %s (%d examples) every %d round(s)", shard.name, shard.num_examples,
                 config.eval_every)
    with removed_if_empty_on_error(config.state_dir):  # e.g. --bind in use: no empty run directory stays
        summary = asyncio.run(_serve(config, evaluator, model))
    last = summary["last"]
    acc = last.get("test_accuracy")
    click.echo(f"run complete: {summary['rounds']} rounds, model version {summary['version']}"
               + (f", test accuracy {acc:.4f}" if acc is not None else "")
               + f"; metrics in {config.state_dir}/metrics.jsonl")


async def _serve(config: BrokerConfig, evaluator: Any, model: Any) -> dict[str, Any]:
    broker = Broker(config, evaluator, model=model)
    return await broker.run()
