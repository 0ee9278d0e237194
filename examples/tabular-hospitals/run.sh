#!/usr/bin/env bash
# Five hospitals federate an MLP on the breast-cancer table over loopback TCP, evaluated only by the hospitals
# themselves (the broker holds no data); then the best model is exported and compared with centralised training.
#
#   examples/tabular-hospitals/run.sh [WORKDIR]      (default: a new temporary directory, kept, its path printed)
#
# Environment: ROUNDS (default 20), PYTHON (default python3: the interpreter fedctl, torch and scikit-learn are
# installed in, e.g. .venv/bin/python), JOIN_DEVICE (the workers' --device, default cpu; scripts/gpu_check.sh
# sets gpu:0), RESULTS_JSON (also write compare.py's numbers there).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="$(command -v "${PYTHON:-python3}")" || { echo "error: no ${PYTHON:-python3} on PATH (set PYTHON)" >&2; exit 1; }
[[ "$PYTHON" == /* ]] || PYTHON="$PWD/$PYTHON"  # the script changes directory
ROUNDS="${ROUNDS:-20}"
HOSPITALS=5
HOLDOUT=0.2
JOIN_DEVICE="${JOIN_DEVICE:-cpu}"
WORK="${1:-$(mktemp -d "${TMPDIR:-/tmp}/fedctl-hospitals.XXXXXX")}"
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
"$PYTHON" "$HERE/prepare.py" --out breast_cancer.csv

# One table cut among five hospitals with label skew (Dirichlet 0.5); 20% set aside as a common test split that
# only the centralised comparison uses.
fedctl partition --input breast_cancer.csv --label-column diagnosis --clients "$HOSPITALS" --dirichlet 0.5 \
                 --test-fraction 0.2 --out hospitals

# The broker: no --eval-data, so it evaluates nothing itself; after every round the hospitals evaluate the global
# model on their held-out examples (fed_eval_* in metrics.jsonl). The model of the round with the lowest
# fed_eval_loss is kept as the best: with ~90 held-out examples the accuracy moves in steps of 1.1 points and
# often ties (the first of the ties would win), the loss does not.
fedctl serve --task task.py --bind 'tcp://127.0.0.1:*' --rounds "$ROUNDS" --min-workers "$HOSPITALS" \
             --epochs 1 --batch-size 16 --lr 0.01 --seed 0 --fed-eval-every 1 --best-metric fed_eval_loss \
             --state-dir state \
             >serve.out 2>serve.log &
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

for i in $(seq 0 $((HOSPITALS - 1))); do
    fedctl join --task task.py --data "shard$i" --data-dir hospitals --holdout "$HOLDOUT" --connect "$endpoint" \
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

# The best model (lowest fed_eval_loss), as a PyTorch state dict (with --task: a strict load_state_dict takes it) and
# as plain numpy arrays.
fedctl export --state-dir state --best --format pt --task task.py --out model.pt
fedctl export --state-dir state --best --format npz --out model.npz

"$PYTHON" "$HERE/compare.py" --task task.py --data-dir hospitals --holdout "$HOLDOUT" --state-dir state \
          --pt model.pt --npz model.npz --epochs "$ROUNDS" --lr 0.01 --batch-size 16 \
          ${RESULTS_JSON:+--json "$RESULTS_JSON"}
echo "files: $WORK (state/metrics.jsonl, model.pt, model.npz, *.log)"
