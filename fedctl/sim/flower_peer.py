"""Flower's side of `fedctl bench round`, run with the Python of the benchmark's own Flower virtual environment
(it imports flwr and numpy, never fedctl):

    python flower_peer.py server PORT WORKERS ROUNDS SHAPES_JSON TIMES_FILE
    python flower_peer.py client PORT SEED SHAPES_JSON

The workload is fedctl's: dense FedAvg over all WORKERS every round, each client returning w + fixed N(0, 1e-3²)
noise for 600 examples; no evaluation. The server appends ``round wall_time`` to TIMES_FILE after each round's
aggregation (the same instant fedctl's metrics record marks), so the harness times rounds and samples CPU alike.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import numpy as np

EXAMPLES = 600
NOISE = 1e-3


def _weights(shapes: list[list[int]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-0.05, 0.05, size=tuple(s)).astype(np.float32) for s in shapes]


def server(port: int, workers: int, rounds: int, shapes: list[list[int]], times_file: str) -> None:
    import flwr as fl

    class Timed(fl.server.strategy.FedAvg):  # type: ignore[misc]
        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            out = super().aggregate_fit(server_round, results, failures)
            with open(times_file, "a") as f:
                f.write(f"{server_round} {time.time()} {len(results)} {len(failures)}\n")
            return out

    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=workers, min_evaluate_clients=0,
                     min_available_clients=workers,
                     initial_parameters=fl.common.ndarrays_to_parameters(_weights(shapes)))
    fl.server.start_server(server_address=f"127.0.0.1:{port}", strategy=strategy,
                           config=fl.server.ServerConfig(num_rounds=rounds, round_timeout=600))


def client(port: int, seed: int, shapes: list[list[int]]) -> None:
    import flwr as fl

    nu = [(NOISE * np.random.default_rng(seed).standard_normal(tuple(s), dtype=np.float32)) for s in shapes]

    class NoOp(fl.client.NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config):  # type: ignore[no-untyped-def]
            return _weights(shapes)

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [np.add(p, n, dtype=np.float32) for p, n in zip(parameters, nu)], EXAMPLES, {}

    fl.client.start_client(server_address=f"127.0.0.1:{port}", client=NoOp().to_client(), insecure=True)


def main(argv: list[str]) -> int:
    warnings.filterwarnings("ignore")
    if argv[:1] == ["server"] and len(argv) == 6:
        server(int(argv[1]), int(argv[2]), int(argv[3]), json.loads(argv[4]), argv[5])
        return 0
    if argv[:1] == ["client"] and len(argv) == 4:
        client(int(argv[1]), int(argv[2]), json.loads(argv[3]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
