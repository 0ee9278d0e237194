#!/usr/bin/env bash
# Does fedctl train on an NVIDIA GPU? One command on a machine with one:
#
#   scripts/gpu_check.sh [EXAMPLE]
#
# 1. Installs, into a separate virtual environment (GPU_VENV), fedctl with PyTorch 2.13.0's CUDA build (from PyTorch's
#    index for the CUDA version the driver supports, or TORCH_INDEX) and MXNet 1.9.1's CUDA 11.2 build (mxnet-cu112,
#    numpy 1.23.5; needs Python 3.11 and the CUDA 11.2 runtime libraries, docs/install.md).
# 2. Runs EXAMPLE (a directory of examples/, by name or path; default: the first of fashion-cnn-batchnorm,
#    custom-metric, tabular-hospitals whose run.sh takes JOIN_DEVICE) with its workers on gpu:0: a local broker with
#    the example's task and PyTorch workers started with `fedctl join --device gpu:0`.
# 3. Runs the built-in mlp on the bundled MNIST sample with one PyTorch and one MXNet worker, both on gpu:0 (user
#    tasks are PyTorch-only today).
# 4. Prints what ran on the GPU: the device PyTorch and MXNet see, the processes nvidia-smi saw and their memory, the
#    GPU memory in use, and each part OK or FAILED (exit 1 if any failed).
#
# Without nvidia-smi (no NVIDIA driver) it stops at once with one line and exit 2, before installing anything.
#
# Environment: GPU_VENV (default ~/.cache/fedctl/gpu-venv; reused when it already has a CUDA torch), TORCH_INDEX
# (cu128, cu126, ... or a URL; default from the driver's CUDA version), MXNET (default mxnet-cu112; none: no MXNet
# worker), PYTHON (the interpreter the venv is made from; default python3.11 if present, else python3: no MXNet),
# DEVICE (default gpu:0), ROUNDS (default 3), SKIP_INSTALL=1 (use GPU_VENV as it is), WORKDIR (default a new
# temporary directory, kept).
set -euo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "error: nvidia-smi not found: this check needs a machine with an NVIDIA GPU and its driver (here, \`make" \
         "test\` covers everything but the GPU path)" >&2
    exit 2
fi
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "error: nvidia-smi lists no GPU ($(nvidia-smi -L 2>&1 | head -n1)): check the driver with nvidia-smi" >&2
    exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE="${DEVICE:-gpu:0}"
ROUNDS="${ROUNDS:-3}"
MXNET="${MXNET:-mxnet-cu112}"
GPU_VENV="${GPU_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fedctl/gpu-venv}"
WORK="${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/fedctl-gpu-check.XXXXXX")}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
say() { echo "== $*"; }

# ---- which example -------------------------------------------------------------------------------------------------
EXAMPLE="${1:-}"
if [[ -z "$EXAMPLE" ]]; then
    for name in fashion-cnn-batchnorm custom-metric tabular-hospitals; do
        if grep -qs JOIN_DEVICE "$REPO/examples/$name/run.sh"; then EXAMPLE="$REPO/examples/$name"; break; fi
    done
    [[ -n "$EXAMPLE" ]] || {
        echo "error: no example in $REPO/examples has a run.sh that takes JOIN_DEVICE" >&2; exit 2; }
elif [[ ! -d "$EXAMPLE" ]]; then
    EXAMPLE="$REPO/examples/$EXAMPLE"
fi
EXAMPLE="$(cd "$EXAMPLE" 2>/dev/null && pwd)" || { echo "error: no example directory ${1:-}" >&2; exit 2; }
grep -qs JOIN_DEVICE "$EXAMPLE/run.sh" || {
    echo "error: $EXAMPLE/run.sh does not take JOIN_DEVICE (its workers' --device)" >&2; exit 2; }

say "GPU"
nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv
driver_cuda="$(nvidia-smi | grep -o 'CUDA Version: [0-9.]*' | grep -o '[0-9.]*$' || true)"
echo "driver supports CUDA ${driver_cuda:-?}"

# ---- install -------------------------------------------------------------------------------------------------------
if [[ -z "${TORCH_INDEX:-}" ]]; then
    major="${driver_cuda%%.*}" minor="${driver_cuda#*.}"
    if [[ -z "$driver_cuda" ]]; then TORCH_INDEX=cu128
    elif (( major > 12 || (major == 12 && minor >= 8) )); then TORCH_INDEX=cu128
    elif (( major == 12 && minor >= 6 )); then TORCH_INDEX=cu126
    else
        echo "error: the driver supports CUDA $driver_cuda; PyTorch 2.13.0's CUDA builds need 12.6 or later: update" \
             "the driver, or set TORCH_INDEX to a build it runs" >&2
        exit 2
    fi
fi
[[ "$TORCH_INDEX" == *://* ]] || TORCH_INDEX="https://download.pytorch.org/whl/$TORCH_INDEX"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON="$(command -v python3.11 || command -v python3)"
fi
VPY="$GPU_VENV/bin/python"
if [[ "${SKIP_INSTALL:-0}" != 1 ]] && ! { [[ -x "$VPY" ]] && "$VPY" -c 'import torch, fedctl, sklearn
raise SystemExit(torch.version.cuda is None)' 2>/dev/null; }; then
    say "installing into $GPU_VENV (torch from $TORCH_INDEX, $MXNET)"
    "$PYTHON" -m venv "$GPU_VENV"
    # PIP_FIND_LINKS emptied: a local CPU wheel of torch 2.13.0 there would satisfy the pin before the CUDA index.
    PIP_FIND_LINKS= "$VPY" -m pip install --quiet --upgrade pip
    PIP_FIND_LINKS= "$VPY" -m pip install --quiet --index-url "$TORCH_INDEX" "torch==2.13.0"
    if "$VPY" -c 'import sys; raise SystemExit(sys.version_info >= (3, 12))'; then
        extra=("numpy==1.23.5")
        [[ "$MXNET" == none ]] || extra+=("$MXNET==1.9.1")
    else
        extra=("numpy>=1.26")
        [[ "$MXNET" == none ]] || { echo "note: $("$VPY" -V) cannot run MXNet 1.9.1 (Python 3.11 at most):" \
                                          "no MXNet worker (PYTHON=python3.11 for one)"; MXNET=none; }
    fi
    PIP_FIND_LINKS= "$VPY" -m pip install --quiet -e "$REPO[torch,data]" "scikit-learn>=1.3" "${extra[@]}"
fi
"$VPY" -m fedctl --version

say "frameworks"
"$VPY" - "$DEVICE" <<'EOF' | tee "$WORK/frameworks.txt"
import sys
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}, "
      f"{torch.cuda.device_count()} device(s)")
if torch.cuda.is_available():
    print(f"torch device 0: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
elif sys.argv[1].startswith("gpu"):
    raise SystemExit("error: this torch sees no CUDA device (a CPU build, or a driver too old for its CUDA)")
EOF
mxnet_ok=0
if [[ "$MXNET" != none ]]; then
    if "$VPY" -c 'import mxnet as mx; n = mx.context.num_gpus(); print(f"mxnet {mx.__version__}: {n} GPU(s)")
raise SystemExit("it sees no GPU" if n == 0 else 0)' 2>"$WORK/mxnet-import.log"; then
        mxnet_ok=1
    else
        echo "MXNet cannot use the GPU: $(tail -n 1 "$WORK/mxnet-import.log") (mxnet-cu112 needs the CUDA 11.2" \
             "runtime libraries, docs/install.md)"
    fi
fi

# ---- what runs on the GPU, sampled every 0.5 s ---------------------------------------------------------------------
sampler() {
    while true; do
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null |
        while IFS=', ' read -r pid mem; do
            [[ -n "$pid" ]] && echo "$pid $mem $(ps -o args= -p "$pid" 2>/dev/null | cut -c1-150)"
        done >>"$WORK/gpu-apps.log"
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n1 >>"$WORK/gpu-mem.log"
        sleep 0.5
    done
}
sampler &
sampler_pid=$!
trap 'kill "$sampler_pid" 2>/dev/null || true' EXIT

# ---- 1: the example's task, PyTorch workers on the GPU -------------------------------------------------------------
say "1. $(basename "$EXAMPLE"): its task, workers with --device $DEVICE, $ROUNDS rounds"
part1=FAILED
if JOIN_DEVICE="$DEVICE" ROUNDS="$ROUNDS" PYTHON="$VPY" RESULTS_JSON="$WORK/example.json" \
        bash "$EXAMPLE/run.sh" "$WORK/example" >"$WORK/example.log" 2>&1; then
    on_device="$(grep -l "torch on $DEVICE" "$WORK"/example/join*.log 2>/dev/null | wc -l)"
    if (( on_device > 0 )); then part1=OK; fi
    echo "$on_device worker(s) logged 'torch on $DEVICE'"
fi
tail -n 15 "$WORK/example.log"

# ---- 2: the built-in mlp, one PyTorch and one MXNet worker on the GPU -----------------------------------------------
say "2. built-in mlp on the MNIST sample: torch$( ((mxnet_ok)) && echo " and mxnet") workers on $DEVICE"
part2=FAILED
mkdir -p "$WORK/builtin"
(
    cd "$WORK/builtin"
    trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a broker or worker left running when another failed
    fedctl() { "$VPY" -m fedctl "$@"; }
    fedctl partition --dataset mnist-sample --clients 2 --iid --out shards >partition.log 2>&1
    fedctl serve --model mlp --bind 'tcp://127.0.0.1:*' --rounds "$ROUNDS" --min-workers 2 --eval-data test \
                 --data-dir shards --state-dir state >serve.out 2>serve.log &
    serve=$!
    endpoint=""
    for _ in $(seq 600); do
        endpoint="$(grep -o 'broker on tcp://[0-9.]*:[0-9]*' serve.log | head -n1 | cut -d' ' -f3 || true)"
        [[ -n "$endpoint" ]] && break
        kill -0 "$serve" 2>/dev/null || exit 1
        sleep 0.1
    done
    second=torch
    ((mxnet_ok)) && second=mxnet
    fedctl join --backend torch --device "$DEVICE" --data shard0 --data-dir shards --connect "$endpoint" \
                >join0-torch.out 2>join0-torch.log &
    w1=$!
    fedctl join --backend "$second" --device "$DEVICE" --data shard1 --data-dir shards --connect "$endpoint" \
                >"join1-$second.out" 2>"join1-$second.log" &
    w2=$!
    wait "$w1" && wait "$w2" && wait "$serve"
) && part2=OK
tail -n 1 "$WORK/builtin/serve.out" 2>/dev/null || true
grep -h "on $DEVICE" "$WORK"/builtin/join*.log 2>/dev/null | sed 's/^.*INFO *//' || true
[[ "$MXNET" == none || $mxnet_ok == 1 ]] || part2="$part2 (no MXNet worker: MXNet sees no GPU)"

kill "$sampler_pid" 2>/dev/null || true

# ---- what ran on the GPU -------------------------------------------------------------------------------------------
say "what ran on the GPU"
cat "$WORK/frameworks.txt"
if [[ -s "$WORK/gpu-apps.log" ]]; then
    echo "processes nvidia-smi saw (pid, peak MiB, command):"
    sort -k1,1n -k2,2nr "$WORK/gpu-apps.log" | awk '!seen[$1]++' | cut -c1-200
else
    echo "nvidia-smi listed no compute processes (inside a container it often cannot see them)"
fi
if [[ -s "$WORK/gpu-mem.log" ]]; then
    echo "GPU memory used: $(head -n1 "$WORK/gpu-mem.log") MiB at the start, at most $(sort -n "$WORK/gpu-mem.log" |
         tail -n1) MiB during the runs"
fi
echo "1. example $(basename "$EXAMPLE") (PyTorch task on $DEVICE): $part1"
echo "2. built-in mlp (PyTorch$( ((mxnet_ok)) && echo " + MXNet") on $DEVICE): $part2"
echo "logs: $WORK"
[[ "$part1" == OK && "$part2" == OK && ( "$MXNET" == none || $mxnet_ok == 1 ) ]]
