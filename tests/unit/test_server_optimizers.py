"""The server optimisers of Reddi et al. 2021 (FedAvgM, FedAdagrad, FedAdam, FedYogi) on literal arrays, against
the paper's update rules written out plainly here: three workers with different n_k, three rounds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from fedctl.api.config import run_config
from fedctl.broker.config import BrokerConfig
from fedctl.broker.params import ParameterStore
from fedctl.broker.store import Checkpointer
from fedctl.cli.strategies import strategies_cmd
from fedctl.errors import ConfigError
from fedctl.models import get_model, init_params
from fedctl.strategies import TaskConfig, Update, get_strategy, strategy_names
from fedctl.strategies.base import Params
from fedctl.testing.trainers import NumpyMLPTrainer, synthetic_digits
from fedctl.wire.tensors import SparseTensor, Tensor

RNG = np.random.default_rng(0)
ALGORITHMS = ("fedavgm", "fedadagrad", "fedadam", "fedyogi")
X0 = {"w": np.array([[0.1, -0.2, 0.3], [0.0, 0.5, -0.4]], np.float32),
      "b": np.array([0.05, -0.05, 0.0], np.float32)}
N = (10, 30, 60)
OFFSETS = (  # each worker's change to X0 in round 1; later rounds scale it (SCALES)
    {"w": [[0.5, -0.3, 0.2], [0.7, -0.6, 0.1]], "b": [0.4, -0.2, 0.3]},
    {"w": [[-0.4, 0.6, 0.3], [0.2, -0.1, 0.5]], "b": [-0.3, 0.5, 0.1]},
    {"w": [[0.3, 0.2, -0.5], [-0.6, 0.4, 0.3]], "b": [0.2, 0.1, -0.4]},
)
SCALES = (1.0, 0.1, -2.0)
"""Round 2's changes are small (Yogi's v then shrinks, v > Δ²) and round 3's large and reversed (v grows)."""
OPTS = {"fedavgm": {"eta": 0.7, "beta": 0.8}}
ADAPTIVE = {"eta": 0.05, "beta1": 0.8, "beta2": 0.5, "tau": 0.01}


def worker_models(round_index: int) -> list[Params]:
    """The three workers' models of a round: X0 plus their scaled offsets (literal, whatever the server did)."""
    s = SCALES[round_index]
    return [{k: (X0[k] + np.float32(s) * np.array(off[k], np.float32)).astype(np.float32) for k in X0}
            for off in OFFSETS]


def updates_of(models: Sequence[Mapping[str, Tensor]], kind: str = "weights") -> list[Update]:
    return [Update(f"w{i}", n, m, kind) for i, (m, n) in enumerate(zip(models, N))]


def reference(algo: str, opts: dict[str, float], rounds: int) -> list[tuple[Params, dict[str, np.ndarray]]]:
    """The paper's rules in plain float64 numpy (Algorithm 2; FedAvgM: m ← βm + Δ, x ← x + ηm); the model is
    rounded to float32 after each round as the broker stores it. Returns (model, moments) after each round."""
    eta = opts["eta"]
    x = {k: v.copy() for k, v in X0.items()}
    m = {k: np.zeros(v.shape) for k, v in X0.items()}
    v = {k: np.full(a.shape, opts.get("tau", 0.0) ** 2) for k, a in X0.items()}
    out = []
    for r in range(rounds):
        models, n = worker_models(r), sum(N)
        for name in X0:
            delta = np.zeros(X0[name].shape)
            for model, n_k in zip(models, N):
                delta += n_k / n * (model[name].astype(np.float64) - x[name].astype(np.float64))
            if algo == "fedavgm":
                m[name] = opts["beta"] * m[name] + delta
                step = eta * m[name]
            else:
                b1, b2, tau = opts["beta1"], opts["beta2"], opts["tau"]
                m[name] = b1 * m[name] + (1 - b1) * delta
                if algo == "fedadagrad":
                    v[name] = v[name] + delta ** 2
                elif algo == "fedadam":
                    v[name] = b2 * v[name] + (1 - b2) * delta ** 2
                else:
                    v[name] = v[name] - (1 - b2) * delta ** 2 * np.sign(v[name] - delta ** 2)
                step = eta * m[name] / (np.sqrt(v[name]) + tau)
            x[name] = (x[name].astype(np.float64) + step).astype(np.float32)
        moments = {f"m/{k}": a.copy() for k, a in m.items()}
        if algo != "fedavgm":
            moments.update({f"v/{k}": a.copy() for k, a in v.items()})
        out.append(({k: a.copy() for k, a in x.items()}, moments))
    return out


def run(algo: str, opts: dict[str, Any], rounds: int, kind: str = "weights") -> list[Any]:
    strategy = get_strategy(algo, TaskConfig(1, 10, 0.1, options=opts))
    weights, results = dict(X0), []
    state: dict[str, Any] = {}
    for r in range(rounds):
        models = worker_models(r)
        if kind == "delta":
            models = [{k: m[k] - weights[k] for k in m} for m in models]
        result = strategy.aggregate(weights, updates_of(models, kind), state, RNG)
        weights, state = result.weights, result.state
        results.append(result)
    return results


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_three_rounds_follow_the_papers_update_rule(algo: str) -> None:
    opts = OPTS.get(algo, ADAPTIVE)
    got, want = run(algo, opts, 3), reference(algo, opts, 3)
    for r, (result, (model, moments)) in enumerate(zip(got, want), 1):
        for name in X0:
            assert result.weights[name].dtype == np.float32
            np.testing.assert_allclose(result.weights[name], model[name], rtol=1e-6, atol=1e-7,
                                       err_msg=f"{algo} round {r} {name}")
        assert set(result.state) == set(moments)
        for key, arr in moments.items():
            assert result.state[key].dtype == np.float64
            np.testing.assert_allclose(result.state[key], arr, rtol=1e-9, atol=1e-12, err_msg=f"{algo} r{r} {key}")
        assert result.metrics["updates"] == 3 and result.metrics["delta_norm"] > 0
    moved = [float(np.abs(got[-1].weights[k] - X0[k]).max()) for k in X0]
    assert max(moved) > 1e-3, "the model must move"


def test_defaults_are_reddis_and_fedadam_with_defaults_follows_the_rule() -> None:
    adam = get_strategy("fedadam", TaskConfig())
    assert adam.opts == {"eta": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    assert get_strategy("fedavgm", TaskConfig()).opts == {"eta": 1.0, "beta": 0.9}
    got, want = run("fedadam", {}, 2), reference("fedadam", adam.opts, 2)
    for result, (model, _) in zip(got, want):
        for name in X0:
            np.testing.assert_allclose(result.weights[name], model[name], rtol=1e-6, atol=1e-7)
    # v_{-1} = τ²: the first round's v is β₂τ² + (1 − β₂)Δ²
    delta = np.sum([n / 100 * np.array(o["b"]) for o, n in zip(OFFSETS, N)], axis=0)
    np.testing.assert_allclose(got[0].state["v/b"], 0.99 * 1e-6 + 0.01 * delta ** 2, rtol=1e-6)  # float32 models


def test_yogi_exercises_both_signs_and_differs_from_adam() -> None:
    yogi, adam = run("fedyogi", ADAPTIVE, 3), run("fedadam", ADAPTIVE, 3)
    v1, v2, v3 = (r.state["v/w"] for r in yogi)
    assert (v2 < v1).all(), "small round-2 changes: v > Δ² and Yogi's v shrinks additively"
    assert (v3 > v2).all(), "large round-3 changes: v < Δ² and v grows"
    assert not np.allclose(yogi[1].state["v/w"], adam[1].state["v/w"])


def test_fedavgm_without_momentum_at_rate_one_is_fedavg() -> None:
    fedavg = get_strategy("fedavg", TaskConfig())
    avgm = get_strategy("fedavgm", TaskConfig(options={"beta": "0", "eta": "1"}))
    a_weights, m_weights = dict(X0), dict(X0)
    state: dict[str, Any] = {}
    for r in range(3):
        models = worker_models(r)
        a_weights = fedavg.aggregate(a_weights, updates_of(models), {}, RNG).weights
        result = avgm.aggregate(m_weights, updates_of(models), state, RNG)
        m_weights, state = result.weights, result.state
        for name in X0:
            assert m_weights[name].dtype == np.float32
            # x + (Σ p_k x_k − x) in float64 can land one float64 ulp from Σ p_k x_k and round to the next
            # float32 when that sum is next to a float32 tie (here in round 2): at most one float32 ulp apart.
            np.testing.assert_allclose(m_weights[name], a_weights[name], rtol=0, atol=1e-7)
            np.testing.assert_array_max_ulp(m_weights[name], a_weights[name], maxulp=1)


def _sparse(dense: np.ndarray, dtype: Any) -> SparseTensor:
    idx = np.flatnonzero(dense.reshape(-1)).astype(np.uint32)
    return SparseTensor(dense.shape, idx, dense.reshape(-1)[idx].astype(dtype))


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_sparse_and_fp16_updates_equal_their_dense_float32_values(algo: str) -> None:
    strategy = get_strategy(algo, TaskConfig(options=OPTS.get(algo, ADAPTIVE)))
    models = worker_models(0)
    models[0]["w"][0, :] = 0.0  # mostly zero: worker 0 sends w sparse
    models[0]["w"][1, 1] = 0.0
    fp16 = [{k: v.astype(np.float16) for k, v in m.items()} for m in models]
    mixed: list[dict[str, Tensor]] = [
        {"w": _sparse(fp16[0]["w"], np.float16), "b": fp16[0]["b"]},  # sparse fp16 values, dense fp16
        {"w": _sparse(models[1]["w"], np.float32), "b": models[1]["b"]},  # sparse float32 (all kept)
        dict(fp16[2])]  # dense fp16
    dense = [{k: v.astype(np.float32) for k, v in m.items()} for m in fp16[:1]] + [models[1]] + \
            [{k: v.astype(np.float32) for k, v in fp16[2].items()}]
    got = strategy.aggregate(dict(X0), updates_of(mixed), {}, RNG)
    want = strategy.aggregate(dict(X0), updates_of(dense), {}, RNG)
    for name in X0:
        np.testing.assert_array_equal(got.weights[name], want.weights[name])
    for key in want.state:
        np.testing.assert_allclose(got.state[key], want.state[key], rtol=1e-12)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_delta_updates_give_what_weights_updates_give(algo: str) -> None:
    opts = OPTS.get(algo, ADAPTIVE)
    for by_weights, by_delta in zip(run(algo, opts, 3), run(algo, opts, 3, kind="delta")):
        for name in X0:
            np.testing.assert_allclose(by_delta.weights[name], by_weights.weights[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("algo, option, value", [
    *[(a, "eta", bad) for a in ALGORITHMS for bad in ("0", "-0.1", "inf", "nan")],
    *[(a, "beta1", bad) for a in ALGORITHMS[1:] for bad in ("1", "-0.1", "1.5")],
    *[(a, "beta2", bad) for a in ALGORITHMS[1:] for bad in ("1", "-0.01")],
    *[(a, "tau", bad) for a in ALGORITHMS[1:] for bad in ("0", "-1e-3", "inf")],
    ("fedavgm", "beta", "1"), ("fedavgm", "beta", "-0.5"), ("fedadam", "eta", "fast"),
])
def test_options_out_of_range_are_refused(algo: str, option: str, value: str) -> None:
    with pytest.raises(ConfigError, match=option):
        get_strategy(algo, TaskConfig(options={option: value}))


def test_unknown_options_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="no option 'beta'") as info:
        get_strategy("fedadam", TaskConfig(options={"beta": "0.9"}))
    assert "beta1" in (info.value.fix or "") and "tau" in (info.value.fix or "")
    with pytest.raises(ConfigError, match="no option 'tau'"):
        get_strategy("fedavgm", TaskConfig(options={"tau": "0.1"}))


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_the_next_round_reads_the_state_it_is_given(algo: str) -> None:
    strategy = get_strategy(algo, TaskConfig(options=OPTS.get(algo, ADAPTIVE)))
    first = strategy.aggregate(dict(X0), updates_of(worker_models(0)), {"other": 5}, RNG)
    assert first.state["other"] == 5, "other state keys are kept"
    for name, x in X0.items():
        assert first.state[f"m/{name}"].shape == x.shape
    saved = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in first.state.items()}
    second = strategy.aggregate(first.weights, updates_of(worker_models(1)), first.state, RNG)
    for key, arr in saved.items():  # the state given is read, never written
        assert np.array_equal(first.state[key], arr), key
    # Scaled moments give another round: the state is what the round reads (nothing hidden in the strategy).
    scaled = {k: (2 * v if isinstance(v, np.ndarray) else v) for k, v in first.state.items()}
    other = strategy.aggregate(first.weights, updates_of(worker_models(1)), scaled, RNG)
    assert not np.array_equal(other.weights["w"], second.weights["w"])
    again = strategy.aggregate(first.weights, updates_of(worker_models(1)), saved, RNG)
    for name in X0:
        assert again.weights[name].tobytes() == second.weights[name].tobytes()


def test_state_survives_a_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    strategy = get_strategy("fedadam", TaskConfig(options=ADAPTIVE))
    first = strategy.aggregate(dict(X0), updates_of(worker_models(0)), {}, RNG)
    Checkpointer(tmp_path).save(ParameterStore(first.weights, 1), {"round": 1, "strategy_state": first.state})
    store, state = Checkpointer(tmp_path).load()
    assert set(store.weights) == set(X0), "moments are not model tensors"
    assert set(state["strategy_state"]) == {"m/w", "m/b", "v/w", "v/b"}
    resumed = strategy.aggregate(store.weights, updates_of(worker_models(1)), state["strategy_state"], RNG)
    straight = strategy.aggregate(first.weights, updates_of(worker_models(1)), first.state, RNG)
    for name in X0:
        assert resumed.weights[name].tobytes() == straight.weights[name].tobytes()


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_task_for_round_carries_what_the_worker_needs(algo: str) -> None:
    broker_side = get_strategy(algo, TaskConfig(2, 16, 0.05, options={"eta": "0.3"}))
    task = broker_side.task_for_round(3, 99)
    assert {k: task[k] for k in ("strategy", "kind", "epochs", "batch_size", "lr", "seed", "round")} == {
        "strategy": algo, "kind": "weights", "epochs": 2, "batch_size": 16, "lr": 0.05, "seed": 99, "round": 3}
    assert task["options"] == broker_side.opts and task["options"]["eta"] == 0.3
    # The worker rebuilds the strategy from the task as fedctl.worker.client does, and runs FedAvg's local SGD.
    worker_side = get_strategy(task["strategy"], TaskConfig(int(task["epochs"]), int(task["batch_size"]),
                                                            float(task["lr"]), options=task["options"]))
    spec = get_model("mlp")
    x, y = synthetic_digits(40, seed=1)
    trainer, weights = NumpyMLPTrainer(spec, x, y), init_params(spec, 0)
    result = worker_side.client_update(weights, trainer, task, {})
    fedavg = get_strategy("fedavg", TaskConfig(2, 16, 0.05)).client_update(weights, trainer, task, {})
    assert result.kind == "weights" and result.num_examples == 40 and result.state == {}
    for name in weights:
        assert np.asarray(result.tensors[name]).tobytes() == np.asarray(fedavg.tensors[name]).tobytes()


# ----------------------------------------------------------------------------------------------- policies
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_the_optimisers_are_sync_only_and_the_broker_refuses_other_policies(algo: str, tmp_path: Path) -> None:
    cls = type(get_strategy(algo, TaskConfig()))
    assert cls.policies == ("sync",)
    for policy in ("ssp:5", "async"):
        with pytest.raises(ConfigError) as info:
            BrokerConfig(strategy=algo, policy=policy, state_dir=tmp_path / "s")
        text = str(info.value)
        assert algo in text and policy.partition(":")[0] in text and "sync" in text and "\n" not in text
        with pytest.raises(ConfigError, match=algo):
            run_config(model="mlp", strategy=algo, policy=policy, state_dir=tmp_path / "s")
    assert BrokerConfig(strategy=algo, policy="sync", state_dir=tmp_path / "s").policy == "sync"
    assert not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="synchronous"):
        get_strategy(algo, TaskConfig()).apply_async(dict(X0), updates_of(worker_models(0)), [1.0] * 3, {}, RNG)


def test_the_other_strategies_still_run_under_every_policy(tmp_path: Path) -> None:
    for name in ("fedavg", "fedsgd", "dgc", "ssgd"):
        for policy in ("sync", "ssp:2", "async"):
            assert BrokerConfig(strategy=name, policy=policy, state_dir=tmp_path).strategy == name
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        BrokerConfig(strategy="nope", state_dir=tmp_path)


def test_strategies_command_lists_them_with_their_options_and_policies() -> None:
    assert set(ALGORITHMS) <= set(strategy_names())
    out = CliRunner().invoke(strategies_cmd, terminal_width=200).output
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip() and not line.startswith(" ")}
    for algo in ALGORITHMS:
        assert "--policy sync)" in lines[algo], lines[algo]
    assert "--policy sync, ssp, async)" in lines["fedavg"]
    for option in ("eta", "beta1", "beta2", "tau", "beta"):
        assert f"  {option} " in out
