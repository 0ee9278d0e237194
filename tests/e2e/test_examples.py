"""The examples a user copies, run as a new user runs them: each example's run.sh in a fresh directory (a broker and
its workers as real `fedctl` processes over loopback TCP), then its claims checked from the files it leaves —
metrics.jsonl, the exported model, the numbers its comparison script writes. And scripts/gpu_check.sh on a machine
without a GPU: one clear line, non-zero exit, nothing installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from conftest import REPO, fedctl_env, read_metrics

EXAMPLES = REPO / "examples"

pytestmark = pytest.mark.timeout(300)


def run_example(name: str, work: Path, timeout: float = 240.0, **env: str) -> tuple[dict[str, Any], str]:
    """Run ``examples/NAME/run.sh WORK`` to completion; return the numbers it wrote (RESULTS_JSON) and its output.

    The script runs in its own session, so on a timeout the whole group (broker and workers too) is killed."""
    results = work.parent / f"{name}.json"
    full_env = {**fedctl_env(work.parent), "PYTHON": sys.executable, "RESULTS_JSON": str(results), **env}
    proc = subprocess.Popen(["bash", str(EXAMPLES / name / "run.sh"), str(work)], cwd=work.parent, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{name}/run.sh did not finish within {timeout:g} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{name}/run.sh exited {proc.returncode}:\n{out[-4000:]}"
    return json.loads(results.read_text()), out


def import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{path.parent.name.replace('-', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tabular_hospitals_matches_centralised_training(tmp_path: Path) -> None:
    """Issue 12's acceptance: five hospitals, federated evaluation only, within 2 points of centralised logistic
    regression on the same test split; the exported .pt loads into the task's model() and predicts as the broker's
    model does."""
    pytest.importorskip("sklearn")
    torch = pytest.importorskip("torch")
    work = tmp_path / "hospitals"
    results, out = run_example("tabular-hospitals", work)
    assert "exported .pt loads into model()" in out, out

    records = read_metrics(work / "state")
    assert [r["round"] for r in records] == list(range(1, 21))
    assert all(r["test_accuracy"] is None for r in records), "the broker holds no data: no centralised test_*"
    assert all(r["fed_eval_workers"] == 5 and r["fed_eval_examples"] == results["held_out_examples"]
               for r in records), records[-1]

    central = max(results["logreg"]["test"], results["logreg_all"]["test"])
    assert central >= 0.93, results  # the task is learnable: centralised training is near its usual 0.95-0.97
    assert results["federated_export"]["test"] >= central - 0.02, results
    assert results["fed_eval_accuracy"]["exported"] >= results["logreg"]["held_out"] - 0.02, results
    # fed_eval_accuracy is the example-weighted mean over the hospitals: the exported model's pooled held-out
    # accuracy, recomputed here from the same seeded split that `fedctl join --holdout 0.2` made.
    assert results["federated_export"]["held_out"] == pytest.approx(results["fed_eval_accuracy"]["exported"],
                                                                    abs=1e-9)
    assert results["best"]["metric"] == "fed_eval_loss" and results["export_matches_numpy"] is True

    # The export round trip once more, independently of compare.py: strict load, tensors equal to the npz export.
    task = import_file(work / "task.py")
    net = task.model()
    state = torch.load(work / "model.pt")
    net.load_state_dict(state)
    with np.load(work / "model.npz") as npz:
        assert set(npz.files) <= set(state) and "0.batches" in state  # the local integer buffer comes from model()
        for name in npz.files:
            np.testing.assert_array_equal(state[name].numpy(), npz[name], err_msg=name)


def test_custom_metric_reports_macro_f1_and_pooled_confusion_counts(tmp_path: Path) -> None:
    """The fast variant (3 rounds): the task's metrics arrive as fed_eval_<name>, their fractions pool exactly (the
    per-class true positives add up to the accuracy), and the exported model reproduces the last evaluation."""
    torch = pytest.importorskip("torch")
    work = tmp_path / "custom"
    results, out = run_example("custom-metric", work, ROUNDS="3")
    assert "confusion matrix" in out and "pooled macro-F1" in out, out

    records = read_metrics(work / "state")
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        tp, fp, fn = ([r[f"fed_eval_{kind}_{c}"] for c in range(10)] for kind in ("tp", "fp", "fn"))
        assert sum(tp) == pytest.approx(r["fed_eval_accuracy"], abs=1e-9), r
        assert sum(fp) == pytest.approx(1 - r["fed_eval_accuracy"], abs=1e-9)
        assert sum(fn) == pytest.approx(1 - r["fed_eval_accuracy"], abs=1e-9)
        assert 0 < r["fed_eval_macro_f1"] <= 1 and r["test_accuracy"] is not None
    last = records[-1]
    assert last["test_accuracy"] > 0.75 and last["fed_eval_accuracy"] > 0.75, last
    assert results["export_test_accuracy"] == pytest.approx(last["test_accuracy"], abs=1e-9)

    # The workers' held-out examples, split as `fedctl join --holdout 0.1` split them; the exported (last) model on
    # each: the example-weighted means of the task's metrics are the broker's fed_eval_* of the last round.
    from fedctl.data import list_shards, load_shard, with_holdout

    task = import_file(work / "task.py")
    net = task.model()
    net.load_state_dict(torch.load(work / "model.pt"))
    net.eval()
    shards = [with_holdout(load_shard(work / "shards", name), 0.1, seed=0) for name in list_shards(work / "shards")]
    weighted: dict[str, float] = {}
    ys, preds = [], []
    for shard in shards:
        with torch.no_grad():
            scores = net(torch.from_numpy(shard.holdout_x)).numpy()
        for key, value in task.metrics(shard.holdout_y, scores).items():
            weighted[key] = weighted.get(key, 0.0) + value * len(shard.holdout_y)
        ys.append(shard.holdout_y)
        preds.append(scores.argmax(1))
    n = sum(len(y) for y in ys)
    assert n == last["fed_eval_examples"]
    for key, total in weighted.items():
        assert last[f"fed_eval_{key}"] == pytest.approx(total / n, abs=1e-6), key
    # The pooled macro-F1 that report.py derives from the fractions is the macro-F1 of all the examples together.
    y, pred = np.concatenate(ys), np.concatenate(preds)
    f1 = [2 * np.sum((pred == c) & (y == c)) / (np.sum(pred == c) + np.sum(y == c)) for c in range(10)]
    assert results["fed_eval_pooled_macro_f1"] == pytest.approx(float(np.mean(f1)), abs=1e-9)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: the check would run")
def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path: Path) -> None:
    venv = tmp_path / "gpu-venv"
    env = {**fedctl_env(tmp_path), "GPU_VENV": str(venv)}
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert run.returncode == 2, run
    assert len(lines) == 1 and lines[0].startswith("error: nvidia-smi not found"), lines
    assert "NVIDIA GPU" in lines[0]
    assert not venv.exists(), "nothing is installed before the GPU is found"


FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
# nvidia-smi's answers for one GPU, on a machine without one: gpu_check.sh's flow runs with --device cpu.
case "$*" in
  -L) echo "GPU 0: Test GPU (UUID: GPU-test)";;
  *query-gpu=index*) echo "index, name"; echo "0, Test GPU";;
  *query-gpu=memory.used*) echo 7;;
  *query-compute-apps*) ;;
  *) echo "| NVIDIA-SMI 570.00   Driver Version: 570.00   CUDA Version: 12.8 |";;
esac
"""


def test_gpu_check_flow_with_a_stand_in_nvidia_smi_on_cpu(tmp_path: Path) -> None:
    """Everything gpu_check.sh does after finding a GPU, on CPU: the example's run.sh with JOIN_DEVICE, the built-in
    model's broker and workers, the summary. (Installing the CUDA builds and the GPU itself are left out.)"""
    pytest.importorskip("torch")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = fedctl_env(tmp_path)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SKIP_INSTALL="1", GPU_VENV=sys.prefix, DEVICE="cpu", MXNET="none",
               ROUNDS="1", WORKDIR=str(tmp_path / "work"))
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "gpu_check.sh"), "custom-metric"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"gpu_check.sh did not finish:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert "5 worker(s) logged 'torch on cpu'" in out
    assert "1. example custom-metric (PyTorch task on cpu): OK" in out
    assert "2. built-in mlp (PyTorch on cpu): OK" in out
    assert "test accuracy" in out  # the built-in run's broker evaluated
