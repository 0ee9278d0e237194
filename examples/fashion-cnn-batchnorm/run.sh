#!/usr/bin/env bash
# One federated run of the Fashion-MNIST CNN: a PyTorch worker and an MXNet worker train side by side.
#
#   examples/fashion-cnn-batchnorm/run.sh [aggregated|local] [OUT_DIR]
#
# aggregated (default): BatchNorm statistics are averaged like the weights; local: FedBN, each worker keeps its own.
# Needs Debian's dataset-fashion-mnist (`make fashion-mnist`), or set DATASET=mnist-sample for a quick try on the
# MNIST sample bundled with fedctl (same shapes). Other knobs, with their defaults: ROUNDS=3 EPOCHS=1 BATCH=64
# LR=0.05 CLIENTS=2 (the run uses shard0 and shard1 of a CLIENTS-way IID partition: CLIENTS=4 trains on half the
# data) FEDCTL=fedctl PYTHON=python. The broker binds a free loopback port; the workers read it from its log.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BN="${1:-aggregated}"
OUT="${2:-runs/fashion-$BN}"
case "$BN" in aggregated|local) ;; *) echo "usage: $0 [aggregated|local] [OUT_DIR]" >&2; exit 2 ;; esac
DATASET="${DATASET:-fashion-mnist}" ROUNDS="${ROUNDS:-3}" EPOCHS="${EPOCHS:-1}" BATCH="${BATCH:-64}"
LR="${LR:-0.05}" CLIENTS="${CLIENTS:-2}" FEDCTL="${FEDCTL:-fedctl}"
export FASHION_BN="$BN" OMP_NUM_THREADS=1 MXNET_CPU_WORKER_NTHREADS=1  # one core per process on a 2-core machine
export FEDCTL_PLAIN_LOGS=1
TASK="$HERE/task.py"

mkdir -p "$OUT"
rm -rf "$OUT/state"
[ -f "$OUT/shards/manifest.json" ] ||  # kept for the next run: delete OUT/shards to partition again
  $FEDCTL partition --dataset "$DATASET" --clients "$CLIENTS" --iid --out "$OUT/shards" > "$OUT/partition.log"

start=$(date +%s)
$FEDCTL serve --task "$TASK" --bind 'tcp://127.0.0.1:*' --rounds "$ROUNDS" --min-workers 2 --epochs "$EPOCHS" \
  --batch-size "$BATCH" --lr "$LR" --eval-data test --data-dir "$OUT/shards" --state-dir "$OUT/state" \
  > "$OUT/serve.out" 2> "$OUT/serve.log" &
broker=$! torch_worker="" mxnet_worker=""
trap 'kill $broker $torch_worker $mxnet_worker 2>/dev/null || true' EXIT
ENDPOINT=""
for _ in $(seq 600); do  # the broker logs "broker on tcp://127.0.0.1:PORT" once it is bound
  ENDPOINT="$(grep -o 'broker on tcp://[0-9.]*:[0-9]*' "$OUT/serve.log" | head -n 1 | cut -d' ' -f3 || true)"
  [ -n "$ENDPOINT" ] && break
  kill -0 $broker 2>/dev/null || { cat "$OUT/serve.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$ENDPOINT" ] || { echo "the broker did not start: $OUT/serve.log" >&2; exit 1; }
$FEDCTL join --task "$TASK" --backend torch --data shard0 --data-dir "$OUT/shards" --threads 1 \
  --connect "$ENDPOINT" --worker-id torch-0 > /dev/null 2> "$OUT/torch-0.log" &
torch_worker=$!
$FEDCTL join --task "$TASK" --backend mxnet --data shard1 --data-dir "$OUT/shards" --threads 1 \
  --connect "$ENDPOINT" --worker-id mxnet-1 > /dev/null 2> "$OUT/mxnet-1.log" &
mxnet_worker=$!
wait $torch_worker; wait $mxnet_worker; wait $broker  # set -e: a process that fails ends the script (and the rest)
trap - EXIT
echo "BatchNorm statistics $BN: $(cat "$OUT/serve.out") ($(( $(date +%s) - start )) s)"
# The global model with each worker's own statistics (FedBN's accuracy), and with the model's own, on the test set.
"${PYTHON:-python}" "$HERE/evaluate.py" --task "$TASK" --state-dir "$OUT/state" --shards "$OUT/shards" shard0 shard1
