"""``fedctl serve``: run the broker (parameter server) of one federated run."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from fedctl.broker.config import BrokerConfig
from fedctl.broker.policy import SyncConfig
from fedctl.broker.service import Broker
from fedctl.cli.common import check_endpoint, load_data, make_evaluator, resolve_backend
from fedctl.models import MODELS, get_model
from fedctl.strategies import TaskConfig, strategy_names

log = logging.getLogger(__name__)


@click.command("serve")
@click.option("--bind", default="tcp://*:5555", show_default=True, help="ZeroMQ endpoint to listen on.")
@click.option("--model", type=click.Choice(sorted(MODELS)), default="mlp", show_default=True)
@click.option("--strategy", type=click.Choice(strategy_names()), default="fedavg", show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--fraction", "-C", type=float, default=1.0, show_default=True,
              help="Client fraction C: each round samples max(C·K, 1) of the K connected workers.")
@click.option("--min-workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Quorum: a round starts once this many workers wait, and at the deadline it is aggregated "
                   "only if min(this, sampled) updates arrived (otherwise retried).")
@click.option("--round-timeout", type=float, default=120.0, show_default=True, help="Round deadline, seconds.")
@click.option("--epochs", "-E", type=click.IntRange(min=1), default=1, show_default=True, help="Local epochs E.")
@click.option("--batch-size", "-B", type=click.IntRange(min=0), default=10, show_default=True,
              help="Local batch size B (0 = the whole shard, B=∞).")
@click.option("--lr", type=float, default=0.1, show_default=True, help="Learning rate η.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the model initialisation and sampling.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/default"),
              show_default=True, help="Checkpoints and metrics.jsonl go here; an existing run there is resumed.")
@click.option("--eval-data", default=None,
              help="Evaluate the global model after every round on this shard of --data-dir (e.g. test), "
                   "or on a dataset split such as mnist:test.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--eval-backend", default="auto", show_default=True, help="Framework for evaluation: auto|torch|mxnet.")
@click.option("--heartbeat-interval", type=float, default=1.0, show_default=True, help="Seconds.")
@click.option("--liveness", type=float, default=10.0, show_default=True,
              help="A worker silent for this many seconds is dropped from the run.")
@click.option("--max-message-mb", type=float, default=256.0, show_default=True,
              help="Largest frame accepted (ZMQ_MAXMSGSIZE).")
def serve_cmd(bind: str, model: str, strategy: str, rounds: int, fraction: float, min_workers: int,
              round_timeout: float, epochs: int, batch_size: int, lr: float, seed: int, state_dir: Path,
              eval_data: str | None, data_dir: Path | None, eval_backend: str, heartbeat_interval: float,
              liveness: float, max_message_mb: float) -> None:
    """Run the parameter server: hold the global model, run synchronous rounds, aggregate, checkpoint."""
    check_endpoint(bind, "--bind", bind=True)
    config = BrokerConfig(bind=bind, model=model, strategy=strategy, rounds=rounds,
                          task=TaskConfig(epochs, batch_size, lr),
                          sync=SyncConfig(fraction, min_workers, round_timeout),
                          seed=seed, state_dir=state_dir, heartbeat_interval_s=heartbeat_interval,
                          liveness_s=liveness, max_message_bytes=int(max_message_mb * 2**20))
    evaluator = None
    if eval_data:
        shard = load_data(eval_data, data_dir)
        evaluator = make_evaluator(resolve_backend(eval_backend), get_model(model), shard)
        log.info("evaluating on %s (%d examples) after every round", shard.name, shard.num_examples)
    summary = asyncio.run(_serve(config, evaluator))
    last = summary["last"]
    acc = last.get("test_accuracy")
    click.echo(f"run complete: {summary['rounds']} rounds, model version {summary['version']}"
               + (f", test accuracy {acc:.4f}" if acc is not None else "") + f"; metrics in {state_dir}/metrics.jsonl")


async def _serve(config: BrokerConfig, evaluator) -> dict:  # type: ignore[no-untyped-def]
    broker = Broker(config, evaluator)
    return await broker.run()
