#!/usr/bin/env bash
# The full table of docs/results.md: every preset of `fedctl bench fl`, most important first.
# Needs full MNIST (pass its directory as $1, or let fedctl search / --download). About an hour on 2 cores.
# Rows accumulate in bench/results/fl.json (presets already there are skipped: delete a row to rerun it);
# an interrupted federated preset resumes from bench/results/runs/<preset>.
set -euo pipefail
cd "$(dirname "$0")/.."
FEDCTL=${FEDCTL:-.venv/bin/fedctl}
SRC=${1:+--source-dir $1}
for preset in central-mlp lenet5-fedavg-e5-b10-iid mlp-fedavg-e1-b10-iid mlp-fedsgd-iid \
              mlp-fedavg-e1-b10-noniid lenet5-fedavg-e5-b10-noniid mlp-fedsgd-noniid \
              mlp-fedavg-e1-b50-iid mlp-fedavg-e5-b10-iid mlp-fedavg-e5-b50-iid \
              lenet5-fedavg-e1-b10-iid lenet5-fedavg-e1-b50-iid lenet5-fedavg-e5-b50-iid central-lenet5 lenet5-fedsgd-iid; do
  $FEDCTL bench fl --preset "$preset" $SRC --out bench/results --skip-existing ${PARALLEL:+--parallel $PARALLEL}
done
