#!/usr/bin/env bash
# Five workers federate an MNIST classifier whose task reports macro-F1 and per-class confusion counts; the broker
# evaluates on the test split (test_*), the workers on their held-out examples (fed_eval_*); report.py reads it back.
#
#   examples/custom-metric/run.sh [WORKDIR]      (default: a new temporary directory, kept, its path printed)
#
# Environment: ROUNDS (default 10), PYTHON (default python3: the interpreter fedctl and torch are installed in,
# e.g. .venv/bin/python), JOIN_DEVICE (the workers' --device, default cpu; scripts/gpu_check.sh: gpu:0),
# RESULTS_JSON (also write report.py's numbers there).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="$(command -v "${PYTHON:-python3}")" || { echo "error: no ${PYTHON:-python3} on PATH (set PYTHON)" >&2; exit 1; }
[[ "$PYTHON" == /* ]] || PYTHON="$PWD/$PYTHON"  # the script changes directory
ROUNDS="${ROUNDS:-10}"
WORKERS=5
JOIN_DEVICE="${JOIN_DEVICE:-cpu}"
WORK="${1:-$(mktemp -d "${TMPDIR:-/tmp}/fedctl-custom-metric.XXXXXX")}"
mkdir -p "$WORK"
cd "$WORK"
echo "working in $WORK"

fedctl() { "$PYTHON" -m fedctl "$@"; }

pids=()
stop_all() {  # on any exit, stop the processes this script started and that still run
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT

cp "$HERE/task.py" task.py

# The bundled MNIST sample (10,000 training images, 2,000 test images), label-skewed among 5 workers.
fedctl partition --dataset mnist-sample --clients "$WORKERS" --dirichlet 0.5 --out shards

# The broker evaluates every round on test.npz (test_accuracy, test_loss); every round the workers also evaluate on
# their held-out 10% (fed_eval_accuracy, fed_eval_loss and fed_eval_<name> for each of the task's metrics).
fedctl serve --task task.py --bind 'tcp://127.0.0.1:*' --rounds "$ROUNDS" --min-workers "$WORKERS" \
             --epochs 1 --batch-size 10 --lr 0.05 --seed 0 --eval-data test --data-dir shards \
             --fed-eval-every 1 --state-dir state >serve.out 2>serve.log &
pids+=($!)
endpoint=""
for _ in $(seq 600); do  # the broker logs 'broker on tcp://127.0.0.1:PORT' once it is bound
    endpoint="$(grep -o 'broker on tcp://[0-9.]*:[0-9]*' serve.log | head -n1 | cut -d' ' -f3 || true)"
    [[ -n "$endpoint" ]] && break
    kill -0 "${pids[0]}" 2>/dev/null || { cat serve.log >&2; echo "error: fedctl serve exited" >&2; exit 1; }
    sleep 0.1
done
[[ -n "$endpoint" ]] || { echo "error: fedctl serve did not log its endpoint within 60 s" >&2; exit 1; }
echo "broker on $endpoint"

for i in $(seq 0 $((WORKERS - 1))); do
    fedctl join --task task.py --data "shard$i" --data-dir shards --holdout 0.1 --connect "$endpoint" \
                --device "$JOIN_DEVICE" >"join$i.out" 2>"join$i.log" &
    pids+=($!)
done

failed=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        failed=1
        log="$([[ $i == 0 ]] && echo serve.log || echo "join$((i - 1)).log")"
        echo "error: $log:" >&2 && tail -n 20 "$log" >&2
    fi
done
[[ $failed == 0 ]] || exit 1
pids=()
tail -n 1 serve.out

fedctl export --state-dir state --format pt --task task.py --out model.pt   # the last round's model
"$PYTHON" "$HERE/report.py" --task task.py --state-dir state --data-dir shards --pt model.pt \
          ${RESULTS_JSON:+--json "$RESULTS_JSON"}
echo "files: $WORK (state/metrics.jsonl, model.pt, *.log)"
