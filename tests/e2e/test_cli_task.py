"""A user's own task in real processes (docs/tasks.md): `fedctl serve --task` and `fedctl join --task --data PATH`
over loopback TCP learn a tabular problem; a worker with another model is refused, both sides naming the first
differing tensor; `fedctl simulate --task` runs the same task."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import LOOPBACK_ANY, Launcher, fedctl, read_metrics
from test_cli_run import assert_all_exit_0, wait_all

pytestmark = pytest.mark.timeout(240)

TASK = """
    import numpy as np
    import torch
    from torch import nn

    name = "tabular"

    def model():
        return nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, {classes}))

    def load_data(path):
        arrays = np.load(path)
        return arrays["x"], arrays["y"]

    def metrics(y, scores):
        pred = scores.argmax(1)
        return {{"recall_1": float(((pred == 1) & (y == 1)).sum() / max((y == 1).sum(), 1))}}

    def optimizer(params, lr):
        return torch.optim.Adam(params, lr=lr)
"""


def write_task(directory: Path, name: str = "task.py", classes: int = 2) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(TASK.format(classes=classes)))
    return path


def write_data(directory: Path, parts: int, n: int = 300) -> list[Path]:
    """A linearly separable 12-feature problem, split among ``parts`` data holders (each its own npz)."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=12)
    paths = []
    for i in range(parts):
        x = rng.normal(size=(n, 12)).astype(np.float32)
        y = (x @ w > 0).astype(np.int64)
        paths.append(directory / f"holder{i}.npz")
        np.savez(paths[-1], x=x, y=y)
    return paths


def test_serve_and_join_a_user_task_over_tcp(spawn: Launcher, tmp_path: Path) -> None:
    task = write_task(tmp_path)
    data = write_data(tmp_path, 3)
    state = tmp_path / "state"
    broker = spawn("serve", "serve", "--task", str(task), "--bind", LOOPBACK_ANY, "--state-dir", str(state),
                   "--rounds", "4", "--min-workers", "3", "--lr", "0.01", "--batch-size", "16")
    endpoint = broker.wait_endpoint()
    workers = [spawn(f"join-{i}", "join", "--task", str(task), "--data", str(path), "--connect", endpoint,
                     "--threads", "1", "--connect-timeout", "60") for i, path in enumerate(data)]
    procs = [broker, *workers]
    assert_all_exit_0(procs, wait_all(procs))
    metrics = read_metrics(state)
    assert [m["round"] for m in metrics] == [1, 2, 3, 4] and all(m["participants"] == 3 for m in metrics)
    losses = [m["train_loss"] for m in metrics]
    assert losses[-1] < 0.5 * losses[0], losses  # Adam on a separable problem
    saved = json.loads((state / "state.json").read_text())
    assert saved["model"] == "tabular"
    assert [p["name"] for p in saved["spec"]["params"]] == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "3.weight", "3.bias"]
    with np.load(state / saved["model_file"]) as npz:
        assert npz["1.running_mean"].shape == (16,) and np.abs(npz["1.running_mean"]).sum() > 0, \
            "BatchNorm statistics are averaged like weights"


def test_a_worker_with_another_model_is_refused_naming_the_first_difference(spawn: Launcher,
                                                                            tmp_path: Path) -> None:
    task, other = write_task(tmp_path), write_task(tmp_path, "other.py", classes=3)
    [data] = write_data(tmp_path, 1)
    broker = spawn("serve", "serve", "--task", str(task), "--bind", LOOPBACK_ANY, "--state-dir",
                   str(tmp_path / "state"), "--rounds", "1", "--min-workers", "1")
    endpoint = broker.wait_endpoint()
    run = fedctl(tmp_path, "join", "--task", str(other), "--data", str(data), "--connect", endpoint,
                 "--connect-timeout", "30", "--threads", "1")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, run.stderr
    assert "tensor 6 is 3.weight (2, 16) float32 on the broker, 3.weight (3, 16) float32 on the worker" in lines[0]
    broker.popen.terminate()
    broker.wait(30)
    assert "MODEL_MISMATCH" in broker.stderr and "3.weight (3, 16) float32 on the worker" in broker.stderr


def test_simulate_a_user_task_on_a_partition(tmp_path: Path, partition_dir: Path) -> None:
    task = tmp_path / "tiny_cnn.py"
    task.write_text(textwrap.dedent("""
        from torch import nn

        def model():
            return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(4 * 14 * 14, 10))

        def metrics(y, scores):
            return {"recall_0": float((scores.argmax(1)[y == 0] == 0).mean())}
    """))
    run = fedctl(tmp_path, "simulate", "--task", str(task), "--data-dir", str(partition_dir), "--rounds", "2",
                 "--state-dir", str(tmp_path / "state"), "--lr", "0.05")
    assert run.returncode == 0, run.stderr
    metrics = read_metrics(tmp_path / "state")
    assert [m["round"] for m in metrics] == [1, 2] and metrics[-1]["test_accuracy"] > 0.8, metrics
    assert 0.8 < metrics[-1]["test_recall_0"] <= 1.0, "the task's own metric, from the broker's test evaluation"


@pytest.mark.parametrize("body, args, words", [
    ("def model(:\n", ("serve",), "syntax error at line 1"),
    ("x = 1\n", ("serve",), "defines no model() function"),
    (TASK.format(classes=2), ("join", "--data", "{bad}"), "the model does not take the local data"),
    (TASK.format(classes=2), ("join", "--data", "{labels}"), "the model has 2 classes"),
    (TASK.format(classes=2), ("serve", "--model", "lenet5"), "name two models"),
    ("from torch import nn\ndef model():\n    return nn.ModuleList(nn.Linear(1, 1) for _ in range(2100))\n",
     ("serve",), "the model has 4200 tensors; a run carries at most 4096"),
    ("from torch import nn\ndef model():\n    return nn.ModuleDict({f'layer_with_a_long_name_{i}': nn.Linear(1, 1) "
     "for i in range(1000)})\n", ("join", "--data", "{bad}"), "does not fit a join header"),
])
def test_task_mistakes_are_one_line(tmp_path: Path, body: str, args: tuple[str, ...], words: str) -> None:
    task = tmp_path / "task.py"
    task.write_text(textwrap.dedent(body))
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 5), np.float32), y=np.zeros(4, np.int64))
    np.savez(tmp_path / "labels.npz", x=np.zeros((4, 12), np.float32), y=np.full(4, 7, np.int64))
    names = {"bad": str(tmp_path / "bad.npz"), "labels": str(tmp_path / "labels.npz")}
    extra = ["--bind", "tcp://127.0.0.1:1", "--state-dir", str(tmp_path / "state")] if args[0] == "serve" else \
        ["--connect", "tcp://127.0.0.1:1", "--connect-timeout", "5"]
    run = fedctl(tmp_path, *[a.format(**names) for a in args], "--task", str(task), *extra)
    out = [line for line in (run.stdout + run.stderr).splitlines() if line.strip() and "INFO" not in line]
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert len(out) == 1 and out[0].startswith("error: ") and words in out[0], run.stderr
    assert not (tmp_path / "state").exists()


FAILING_TASK = """
    import numpy as np
    from torch import nn

    FAIL = False

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            if FAIL and self.training:
                raise RuntimeError("simulated failure in the task")
            return self.fc(x)

    def model():
        return Net()

    def load_data(path):
        global FAIL
        FAIL = "broken" in path
        arrays = np.load(path)
        return arrays["x"], arrays["y"]
"""


def test_a_worker_whose_task_raises_reports_it_and_the_rounds_go_on(spawn: Launcher, tmp_path: Path) -> None:
    """The broken worker is alone first: it reports each failure, its round fails and is retried, and after three
    failures in a row it gives up with one line; a good worker then runs the rounds."""
    task = tmp_path / "task.py"
    task.write_text(textwrap.dedent(FAILING_TASK))
    data = write_data(tmp_path, 3)
    broken = tmp_path / "broken.npz"
    data[2].rename(broken)
    state = tmp_path / "state"
    broker = spawn("serve", "serve", "--task", str(task), "--bind", LOOPBACK_ANY, "--state-dir", str(state),
                   "--rounds", "2", "--min-workers", "1", "--round-timeout", "30")
    endpoint = broker.wait_endpoint()
    bad = spawn("join-broken", "join", "--task", str(task), "--data", str(broken), "--connect", endpoint,
                "--threads", "1")
    assert bad.wait(60) != 0 and "Traceback" not in bad.stderr, bad.describe()
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: training failed in 3 rounds in a row: RuntimeError: simulated failure in the task "
                      "— fix the task (run `fedctl join -v` for the traceback)"], bad.stderr
    good = [spawn("join-0", "join", "--task", str(task), "--data", str(data[0]), "--connect", endpoint,
                  "--threads", "1")]
    assert_all_exit_0([broker, *good], wait_all([broker, *good]))
    assert [m["round"] for m in read_metrics(state)] == [1, 2]
    assert broker.stderr.count("could not train round 1: RuntimeError: simulated failure in the task") == 3
    assert "left (training failed in 3 rounds in a row" in broker.stderr


FEDBN_TASK = """
    import numpy as np
    import torch
    from torch import nn

    local_buffers = True  # FedBN

    def model():
        return nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))

    def load_data(path):
        arrays = np.load(path)
        return arrays["x"], arrays["y"]

    def optimizer(params, lr):
        return torch.optim.Adam(params, lr=lr)
"""


def test_fedbn_workers_evaluate_and_restart_with_their_own_statistics(spawn: Launcher, tmp_path: Path) -> None:
    """Two holders whose features are shifted far apart (+8 and -8: FedBN's feature shift): the shared classifier
    is right only behind each holder's own BatchNorm statistics, so federated evaluation must use them — and a
    worker restarted from its --state-dir must still have them before it trains again."""
    task = tmp_path / "fedbn.py"
    task.write_text(textwrap.dedent(FEDBN_TASK))
    rng = np.random.default_rng(3)
    data = []
    for i, (shift, scale) in enumerate([(8.0, 1.0), (-8.0, 2.0)]):
        z = rng.normal(size=(400, 4)).astype(np.float32)
        data.append(tmp_path / f"holder{i}.npz")
        np.savez(data[-1], x=z * scale + shift, y=(z[:, 0] + z[:, 1] > 0).astype(np.int64))

    def run(state: Path, rounds: int, worker_states: list[Path]) -> list[dict]:
        broker = spawn("serve", "serve", "--task", str(task), "--bind", LOOPBACK_ANY, "--state-dir", str(state),
                       "--rounds", str(rounds), "--min-workers", "2", "--lr", "0.05", "--batch-size", "32",
                       "--fed-eval-every", "1")
        endpoint = broker.wait_endpoint()
        workers = [spawn(f"join-{i}", "join", "--task", str(task), "--data", str(path), "--connect", endpoint,
                         "--threads", "1", "--holdout", "0.25", "--state-dir", str(ws))
                   for i, (path, ws) in enumerate(zip(data, worker_states))]
        assert_all_exit_0([broker, *workers], wait_all([broker, *workers]))
        return read_metrics(state)

    worker_states = [tmp_path / "w0", tmp_path / "w1"]
    metrics = run(tmp_path / "state", 6, worker_states)
    assert metrics[-1]["fed_eval_accuracy"] > 0.95, metrics  # with the initial statistics: 0.515
    # The run resumed for one more round by new worker processes: one round of fresh statistics (BatchNorm's
    # momentum 0.1, 10 steps) would leave them a third short of the shift (accuracy 0.5-0.7); the saved ones carry on.
    resumed = run(tmp_path / "state", 7, worker_states)
    assert resumed[-1]["round"] == 7 and resumed[-1]["fed_eval_accuracy"] > 0.95, resumed


MANY_TENSORS_TASK = """
    import numpy as np
    import torch
    from torch import nn

    class Wide(nn.Module):  # 160 small layers side by side: 320 tensors, more than a message once carried (256)
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList(nn.Linear(4, 2) for _ in range(160))

        def forward(self, x):
            return sum(branch(x) for branch in self.branches) / len(self.branches)

    def model():
        return Wide()

    def load_data(path):
        arrays = np.load(path)
        return arrays["x"], arrays["y"]
"""


@pytest.mark.parametrize("chunked", [False, True], ids=["one-message", "chunked"])
def test_a_model_with_hundreds_of_tensors_federates(spawn: Launcher, tmp_path: Path, chunked: bool) -> None:
    task = tmp_path / "wide.py"
    task.write_text(textwrap.dedent(MANY_TENSORS_TASK))
    rng = np.random.default_rng(5)
    data = []
    for i in range(2):
        x = rng.normal(size=(200, 4)).astype(np.float32)
        data.append(tmp_path / f"holder{i}.npz")
        np.savez(data[-1], x=x, y=(x[:, 0] > 0).astype(np.int64))
    state = tmp_path / "state"
    chunking = ["--chunk-above-mb", "0.001", "--chunk-kb", "2"] if chunked else []  # ~4 KB of weights, 2 KB chunks
    broker = spawn("serve", "serve", "--task", str(task), "--bind", LOOPBACK_ANY, "--state-dir", str(state),
                   "--rounds", "2", "--min-workers", "2", "--lr", "0.5", "--round-timeout", "30", *chunking)
    endpoint = broker.wait_endpoint()
    workers = [spawn(f"join-{i}", "join", "--task", str(task), "--data", str(path), "--connect", endpoint,
                     "--threads", "1", "--holdout", "0") for i, path in enumerate(data)]
    assert_all_exit_0([broker, *workers], wait_all([broker, *workers]))
    metrics = read_metrics(state)
    assert [m["participants"] for m in metrics] == [2, 2]
    saved = json.loads((state / "state.json").read_text())
    assert len(saved["spec"]["params"]) == 320
    with np.load(state / saved["model_file"]) as npz:
        assert len(npz.files) == 320
    for worker in workers:
        assert ("in 4 chunks" in worker.stderr) == chunked, worker.describe()  # 6,400 B of weights, 2 KiB chunks
