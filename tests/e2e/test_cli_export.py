"""``fedctl export`` after a real federation (``fedctl simulate``, PyTorch workers, broker evaluation): the files load
into the built-in PyTorch module (and Gluon block) with the checkpoint's exact tensors and predictions, ``--best`` is
the round of the best test accuracy, ``--round N`` a kept round; without PyTorch, ``--format pt`` is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fedctl, fedctl_env, read_metrics

from fedctl.data.shards import load_shard
from fedctl.models import get_model

pytestmark = pytest.mark.timeout(300)
ROUNDS = 4


@pytest.fixture(scope="module")
def run(partition_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-round simulated federation of 5 PyTorch workers that keeps every round's model."""
    tmp = tmp_path_factory.mktemp("export-run")
    state = tmp / "state"
    done = fedctl(tmp, "simulate", "--data-dir", str(partition_dir), "--rounds", str(ROUNDS), "--min-workers", "5",
                  "--lr", "0.05", "--keep-models", "all", "--state-dir", str(state), "--backend", "torch",
                  timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return state


def _export(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = fedctl(tmp, "export", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.strip().splitlines()) == 1 and "exported the" in done.stdout
    return done


def _checkpoint(state: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(state / name) as npz:
        return {k: npz[k] for k in npz.files if "/" not in k}


def _forward(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The mlp in numpy, float64."""
    h = x.reshape(len(x), -1).astype(np.float64)
    for i, layer in enumerate(("fc1", "fc2", "fc3")):
        h = h @ w[f"{layer}.weight"].T.astype(np.float64) + w[f"{layer}.bias"]
        h = np.maximum(h, 0.0) if i < 2 else h
    return h


def test_pt_loads_into_the_pytorch_mlp_and_predicts_like_the_broker_weights(run: Path, tmp_path: Path,
                                                                            partition_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    from fedctl.worker.frameworks.torch import build_module

    _export(tmp_path, "--state-dir", str(run), "--format", "pt", "--out", str(tmp_path / "final.pt"))
    final = _checkpoint(run, f"model-{ROUNDS}.npz")
    module = build_module(get_model("mlp"))
    state_dict = torch.load(tmp_path / "final.pt")
    module.load_state_dict(state_dict)  # strict: exactly the module's names and shapes
    assert all(torch.equal(state_dict[k], torch.from_numpy(v)) for k, v in final.items())
    x = load_shard(partition_dir, "test").x[:500]  # normalised as the workers and the evaluator see it
    with torch.no_grad():
        got = module(torch.from_numpy(x)).double().numpy()
    want = _forward(final, x)
    assert np.allclose(got, want, atol=1e-4) and (got.argmax(1) == want.argmax(1)).all()


def test_safetensors_and_npz_hold_the_exact_tensors(run: Path, tmp_path: Path) -> None:
    numpy_api = pytest.importorskip("safetensors.numpy")
    _export(tmp_path, "--state-dir", str(run), "--out", str(tmp_path / "m.safetensors"))  # format from the suffix
    _export(tmp_path, "--state-dir", str(run), "--format", "npz")  # default name, in the current directory
    final = _checkpoint(run, f"model-{ROUNDS}.npz")
    tensors = numpy_api.load_file(str(tmp_path / "m.safetensors"))
    with np.load(tmp_path / f"mlp-round{ROUNDS}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    for got in (tensors, arrays):
        assert set(got) == set(final) and all(np.array_equal(got[k], v) for k, v in final.items())


def test_best_is_the_round_of_the_best_test_accuracy(run: Path, tmp_path: Path) -> None:
    metrics = read_metrics(run)
    accs = [m["test_accuracy"] for m in metrics]
    best_round = metrics[accs.index(max(accs))]["round"]  # the first of equals
    best = json.loads((run / "best.json").read_text())
    assert (best["round"], best["metric"], best["mode"], best["value"]) == (best_round, "test_accuracy", "max",
                                                                             max(accs))
    done = _export(tmp_path, "--state-dir", str(run), "--best", "--format", "npz", "--out", str(tmp_path / "b.npz"))
    assert f"of round {best_round}" in done.stdout
    kept = _checkpoint(run, f"model-{best_round}.npz")
    with np.load(tmp_path / "b.npz") as npz:
        assert set(npz.files) == set(kept) and all(np.array_equal(npz[k], v) for k, v in kept.items())


def test_round_n_exports_a_kept_round(run: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    assert sorted(p.name for p in run.glob("model-*.npz")) == sorted(
        [f"model-{r}.npz" for r in range(1, ROUNDS + 1)] + ["model-best.npz"])
    _export(tmp_path, "--state-dir", str(run), "--round", "2", "--out", str(tmp_path / "r2.pt"))
    got = torch.load(tmp_path / "r2.pt")
    assert all(torch.equal(got[k], torch.from_numpy(v)) for k, v in _checkpoint(run, "model-2.npz").items())


def test_params_loads_into_the_gluon_mlp(run: Path, tmp_path: Path) -> None:
    try:
        import mxnet as mx
    except (ImportError, OSError, AttributeError):
        pytest.skip("mxnet is not usable here")
    from fedctl.worker.frameworks.mxnet import build_block

    _export(tmp_path, "--state-dir", str(run), "--format", "params", "--out", str(tmp_path / "m.params"))
    net, params = build_block(get_model("mlp"), mx.cpu())
    net.load_parameters(str(tmp_path / "m.params"))
    final = _checkpoint(run, f"model-{ROUNDS}.npz")
    assert all(np.array_equal(params[k].data().asnumpy(), v) for k, v in final.items())


def test_pt_without_pytorch_is_one_line_and_writes_nothing(run: Path, tmp_path: Path) -> None:
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    work = tmp_path / "work"
    work.mkdir()
    env = fedctl_env(tmp_path)
    env["PYTHONPATH"] = f"{fake.parent}:{env['PYTHONPATH']}"
    done = subprocess.run([sys.executable, "-m", "fedctl", "export", "--state-dir", str(run), "--format", "pt"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=60, check=False)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 4 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: --format pt needs PyTorch") and "--format safetensors" in lines[0]
    assert list(work.iterdir()) == []
