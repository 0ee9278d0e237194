"""fedctl export's pieces: picking a checkpointed model, dtypes, the four writers, refusals that write nothing; and
the broker's choice of the best model (Driver.keep_best)."""

from __future__ import annotations

import asyncio
import importlib
import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedctl import exporting as ex
from fedctl.broker.config import BrokerConfig
from fedctl.broker.drivers import Driver, metric_value
from fedctl.broker.params import ParameterStore
from fedctl.broker.store import Checkpointer
from fedctl.errors import BackendUnavailable, ConfigError
from fedctl.models import get_model, init_params

SPEC = get_model("mlp")


def _run(tmp_path: Path, rounds: int = 3, keep: int | None = None, spec: dict[str, Any] | None = None) -> Path:
    """A state dir of ``rounds`` checkpoints of the mlp whose weights of round r are init + r."""
    d = tmp_path / "state"
    cp = Checkpointer(d, keep_models=keep)
    base = init_params(SPEC, 0)
    store = ParameterStore(base)
    for r in range(1, rounds + 1):
        store.replace({k: v + r for k, v in base.items()})
        state = {"run_id": "r1", "model": "mlp", "strategy": "fedavg", "round": r, **({"spec": spec} if spec else {})}
        cp.save(store, state)
    return d


def _expected(r: int) -> dict[str, np.ndarray]:
    return {k: (v + r).astype(np.float32) for k, v in init_params(SPEC, 0).items()}


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def test_npz_export_of_the_last_and_of_a_kept_round(tmp_path: Path) -> None:
    d = _run(tmp_path)
    done = ex.export(d, "npz", tmp_path / "out" / "last.npz")
    assert (done["round"], done["version"], done["tensors"], done["parameters"]) == (3, 3, 6, SPEC.num_params)
    with np.load(tmp_path / "out" / "last.npz") as got:
        assert list(got.files) == SPEC.names()
        assert all(got[k].dtype == np.float32 and np.array_equal(got[k], v) for k, v in _expected(3).items())
    ex.export(d, "npz", tmp_path / "r2.npz", ex.Choice(round=2))
    with np.load(tmp_path / "r2.npz") as got:
        assert all(np.array_equal(got[k], v) for k, v in _expected(2).items())


def test_default_name_in_the_current_directory_or_a_given_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _run(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert ex.export(d, "npz")["path"] == Path("mlp-round3.npz") and (tmp_path / "mlp-round3.npz").is_file()
    assert ex.export(d, "npz", "into/", ex.Choice(round=1))["path"] == Path("into/mlp-round1.npz")
    assert (tmp_path / "into" / "mlp-round1.npz").is_file()


def test_a_round_not_kept_lists_the_kept_ones(tmp_path: Path) -> None:
    d = _run(tmp_path, keep=2)
    with pytest.raises(ConfigError) as e:
        ex.export(d, "npz", tmp_path / "x.npz", ex.Choice(round=1))
    assert "round 1 is not kept" in e.value.message and "round(s) 2, 3" in e.value.message
    assert "--keep-models" in (e.value.fix or "")
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("case, call, words", [
    ("no checkpoint", lambda t: ex.export(t / "none", "npz", t / "o" / "x.npz"), "holds no checkpoint"),
    ("no best", lambda t: ex.export(_run(t), "npz", t / "o" / "x.npz", ex.Choice(best=True)), "holds no best model"),
    ("both", lambda t: ex.export(_run(t), "npz", t / "o" / "x.npz", ex.Choice(round=1, best=True)),
     "both --round 1 and --best"),
    ("format", lambda t: ex.export(_run(t), "onnx", t / "o" / "x.onnx"), "unknown format 'onnx'"),
    ("out in a file", lambda t: ex.export(_run(t), "npz", t / "state" / "state.json" / "x.npz"), "not a directory"),
])
def test_refusals_write_nothing(tmp_path: Path, case: str, call: Any, words: str) -> None:
    _run(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(ConfigError) as e:
        call(tmp_path)
    assert words in str(e.value), case
    assert _files(tmp_path) == before


def test_pt_without_torch_is_refused_before_anything_is_written(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    d = _run(tmp_path)
    real = importlib.import_module

    def no_torch(name: str, *args: Any) -> Any:
        if name == "fedctl.worker.frameworks.torch":
            raise ImportError("No module named 'torch'")
        return real(name, *args)

    monkeypatch.setattr(ex.importlib, "import_module", no_torch)
    before = _files(tmp_path)
    with pytest.raises(BackendUnavailable) as e:
        ex.export(d, "pt", tmp_path / "out" / "m.pt")
    assert "needs PyTorch" in e.value.message and "--format safetensors" in (e.value.fix or "")
    assert _files(tmp_path) == before


def test_a_writer_that_fails_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _run(tmp_path)

    def boom(fh: Any, *_: Any) -> None:
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(ex.FORMATS, "npz", ex.Format("npz", ".npz", "numpy.load(FILE)", boom))
    before = _files(tmp_path)
    with pytest.raises(OSError):
        ex.export(d, "npz", tmp_path / "new" / "m.npz")
    assert _files(tmp_path) == before


# ------------------------------------------------------------------------------------------------------ dtypes
def _spec_with(dtypes: dict[str, str]) -> dict[str, Any]:
    wire = SPEC.to_wire()
    for p in wire["params"]:
        p["dtype"] = dtypes.get(p["name"], "float32")
    return wire


HALF = {"fc1.weight": "float16", "fc1.bias": "bfloat16", "fc3.bias": "float64"}


def test_tensor_dtypes_from_the_spec_the_zoo_or_float32() -> None:
    names = SPEC.names()
    assert ex.tensor_dtypes({"spec": _spec_with(HALF)}, names) == {n: HALF.get(n, "float32") for n in names}
    assert ex.tensor_dtypes({"model": "mlp"}, names) == dict.fromkeys(names, "float32")
    assert ex.tensor_dtypes({"model": "someone-elses"}, ["a"]) == {"a": "float32"}
    with pytest.raises(ConfigError, match="int8"):
        ex.tensor_dtypes({"spec": {"params": [{"name": "a", "dtype": "int8"}]}}, ["a"])


def test_bfloat16_bits_round_to_nearest_even() -> None:
    one = 0x3F800000
    cases = {one: 0x3F80, one | 0x7FFF: 0x3F80, one | 0x8000: 0x3F80, one | 0x8001: 0x3F81,
             0x3F818000: 0x3F82, 0x7F7FFFFF: 0x7F80, 0x80000000: 0x8000}
    a = np.array(list(cases), np.uint32).view(np.float32)
    assert ex.bfloat16_bits(a).tolist() == list(cases.values())


def test_npz_casts_float16_and_float64_and_keeps_bfloat16_as_float32(tmp_path: Path) -> None:
    d = _run(tmp_path, spec=_spec_with(HALF))
    done = ex.export(d, "npz", tmp_path / "m.npz")
    assert done["dtypes"] == ["bfloat16", "float16", "float32", "float64"]
    with np.load(tmp_path / "m.npz") as got:
        assert got["fc1.weight"].dtype == np.float16 and got["fc3.bias"].dtype == np.float64
        assert got["fc1.bias"].dtype == np.float32 and np.array_equal(got["fc1.bias"], _expected(3)["fc1.bias"])


def test_safetensors_holds_each_dtype_and_the_run_in_its_metadata(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    d = _run(tmp_path, spec=_spec_with(HALF))
    ex.export(d, "safetensors", tmp_path / "m.safetensors")
    with safetensors.safe_open(str(tmp_path / "m.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["fedctl.model"] == "mlp" and meta["fedctl.round"] == "3"
    raw = (tmp_path / "m.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert header["fc1.bias"]["dtype"] == "BF16" and header["fc1.weight"]["dtype"] == "F16"
    assert header["fc3.bias"]["dtype"] == "F64" and header["fc2.weight"]["dtype"] == "F32"
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    lo, hi = header["fc1.bias"]["data_offsets"]
    assert np.frombuffer(raw[start + lo:start + hi], np.uint16).tolist() == \
        ex.bfloat16_bits(_expected(3)["fc1.bias"]).tolist()


def test_float32_safetensors_loads_with_numpy_alone(tmp_path: Path) -> None:
    numpy_api = pytest.importorskip("safetensors.numpy")
    ex.export(_run(tmp_path), "safetensors", tmp_path / "m.safetensors")
    got = numpy_api.load_file(str(tmp_path / "m.safetensors"))
    assert set(got) == set(SPEC.names())
    assert all(np.array_equal(got[k], v) for k, v in _expected(3).items())


def test_pt_casts_like_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    d = _run(tmp_path, spec=_spec_with(HALF))
    ex.export(d, "pt", tmp_path / "m.pt")
    got = torch.load(tmp_path / "m.pt")
    want = _expected(3)
    assert list(got) == SPEC.names()
    assert got["fc1.bias"].dtype == torch.bfloat16 and got["fc1.weight"].dtype == torch.float16
    for name, tensor in got.items():
        assert torch.equal(tensor, torch.from_numpy(want[name]).to(tensor.dtype)), name
    assert got["fc1.bias"].view(torch.int16).numpy().view(np.uint16).tolist() == \
        ex.bfloat16_bits(want["fc1.bias"]).tolist()


def _read_params(raw: bytes) -> dict[str, np.ndarray]:
    """A reader of MXNet's NDArray list format, enough for dense CPU arrays (the test's own, not the writer's)."""
    magic, _, count = struct.unpack_from("<QQQ", raw)
    assert magic == 0x112
    pos, arrays = 24, []
    for _ in range(count):
        v2, stype, ndim = struct.unpack_from("<IiI", raw, pos)
        assert (v2, stype) == (0xF993FAC9, 0)
        shape = struct.unpack_from(f"<{ndim}q", raw, pos + 12)
        pos += 12 + 8 * ndim
        dev, _, flag = struct.unpack_from("<iii", raw, pos)
        dtype = np.dtype({0: np.float32, 1: np.float64, 2: np.float16}[flag])
        n = int(np.prod(shape)) * dtype.itemsize
        arrays.append(np.frombuffer(raw, dtype, offset=pos + 12, count=n // dtype.itemsize).reshape(shape))
        pos += 12 + n
    (names,) = struct.unpack_from("<Q", raw, pos)
    pos += 8
    out = {}
    for a in arrays:
        (length,) = struct.unpack_from("<Q", raw, pos)
        out[raw[pos + 8:pos + 8 + length].decode()] = a
        pos += 8 + length
    assert names == count and pos == len(raw)
    return out


def test_params_is_mxnets_ndarray_list(tmp_path: Path) -> None:
    d = _run(tmp_path, spec=_spec_with(HALF))
    ex.export(d, "params", tmp_path / "m.params")
    got = _read_params((tmp_path / "m.params").read_bytes())
    assert list(got) == SPEC.names()
    assert got["fc1.weight"].dtype == np.float16 and got["fc1.bias"].dtype == np.float32
    assert all(np.array_equal(got[k], v.astype(got[k].dtype)) for k, v in _expected(3).items())


def _mxnet() -> Any:
    try:
        return importlib.import_module("mxnet")
    except (ImportError, OSError, AttributeError):  # MXNet 1.9 on numpy >= 1.24 fails with AttributeError
        pytest.skip("mxnet is not usable here")


def test_params_equals_mx_nd_save_and_gluon_loads_it(tmp_path: Path) -> None:
    mx = _mxnet()
    from fedctl.worker.frameworks.mxnet import build_block

    ex.export(_run(tmp_path), "params", tmp_path / "m.params")
    weights = _expected(3)
    mx.nd.save(str(tmp_path / "ref.params"), {k: mx.nd.array(v) for k, v in weights.items()})
    assert (tmp_path / "m.params").read_bytes() == (tmp_path / "ref.params").read_bytes()
    net, params = build_block(SPEC, mx.cpu())
    net.load_parameters(str(tmp_path / "m.params"))
    assert all(np.array_equal(params[k].data().asnumpy(), v) for k, v in weights.items())


# -------------------------------------------------------------------------------------- the broker's best model
class _Driver(Driver):
    async def run(self) -> dict[str, Any]:
        return {}


def _driver(tmp_path: Path, evaluator: bool = True, **config: Any) -> tuple[_Driver, ParameterStore]:
    store = ParameterStore({"w": np.zeros(2, np.float32)})
    core = SimpleNamespace(state={"run_id": "r", "round": 0}, store=store)
    host = SimpleNamespace(core=core, config=BrokerConfig(state_dir=tmp_path, **config),
                           checkpointer=Checkpointer(tmp_path), evaluator=(lambda w: {}) if evaluator else None,
                           now=lambda: 0.0)
    return _Driver(host), store  # type: ignore[arg-type]


def _rounds_of(driver: _Driver, store: ParameterStore, records: list[dict[str, Any]]) -> None:
    for r, extra in enumerate(records, start=1):
        store.replace({"w": np.full(2, float(r))})
        asyncio.run(driver.keep_best({"round": r, "version": store.version, **extra}))


def test_the_broker_keeps_the_round_with_the_best_test_accuracy(tmp_path: Path) -> None:
    driver, store = _driver(tmp_path)
    assert driver.best_rule() == ("test_accuracy", "max")
    accs = [0.5, None, 0.8, 0.7, 0.8]
    _rounds_of(driver, store, [{"test_accuracy": a} for a in accs])
    weights, meta = Checkpointer(tmp_path).load_best()
    assert meta == {"round": 3, "version": 3, "metric": "test_accuracy", "mode": "max", "value": 0.8, "run_id": "r"}
    assert weights["w"].tolist() == [3.0, 3.0]


def test_a_loss_is_minimised_and_a_dotted_name_reaches_a_nested_metric(tmp_path: Path) -> None:
    driver, store = _driver(tmp_path, best_metric="update_metrics.train_loss")
    assert driver.best_rule() == ("update_metrics.train_loss", "min")
    _rounds_of(driver, store, [{"update_metrics": {"train_loss": v}} for v in (0.9, 0.4, 0.6)])
    assert Checkpointer(tmp_path).best()["round"] == 2  # type: ignore[index]


def test_without_an_evaluator_the_default_is_federated_evaluation(tmp_path: Path) -> None:
    driver, store = _driver(tmp_path, evaluator=False)
    assert driver.best_rule() == ("fed_eval_accuracy", "max")
    _rounds_of(driver, store, [{"test_accuracy": None}])  # no federated evaluation: nothing kept, no warning
    assert not (tmp_path / "model-best.npz").exists()
    _rounds_of(driver, store, [{"fed_eval_accuracy": 0.3}, {"fed_eval_accuracy": 0.6}])
    assert Checkpointer(tmp_path).best()["value"] == 0.6  # type: ignore[index]


def test_none_keeps_no_best_model_and_an_absent_metric_warns_once(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    driver, store = _driver(tmp_path, best_metric="none")
    assert driver.best_rule() is None
    _rounds_of(driver, store, [{"test_accuracy": 0.9}])
    assert not (tmp_path / "model-best.npz").exists()
    driver, store = _driver(tmp_path, best_metric="test_acc", best_mode="max")
    _rounds_of(driver, store, [{"test_accuracy": 0.9}, {"test_accuracy": 0.95}])
    assert [r.message for r in caplog.records].count(
        "--best-metric test_acc is in no metrics record (they hold e.g. test_accuracy); no best model is kept") == 1


def test_metric_value() -> None:
    record = {"a": 1, "b": None, "c": float("nan"), "d": True, "e": {"f": 2.5}}
    assert metric_value(record, "a") == 1.0 and metric_value(record, "e.f") == 2.5
    assert metric_value(record, "b") is None and metric_value(record, "c") is None and metric_value(record, "d") is None
    with pytest.raises(KeyError):
        metric_value(record, "e.g")


@pytest.mark.parametrize("field, value, words", [("best_metric", "test accuracy", "--best-metric"),
                                                 ("best_mode", "up", "--best-mode"),
                                                 ("keep_models", 0, "--keep-models")])
def test_config_refuses_bad_best_and_keep_settings(field: str, value: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        BrokerConfig(**{field: value})


# ----------------------------------------------------------------------------------------------------- --task
BN_TASK = '''
from torch import nn

name = "bnnet"
local_buffers = True  # FedBN: BatchNorm's statistics stay with each worker, so the run does not hold them


def model():
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
'''


def test_task_fills_in_what_the_federation_does_not_average(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from fedctl.tasks import load_task
    from fedctl.worker.frameworks.torch_task import build_task_module, task_spec

    (tmp_path / "bn.py").write_text(BN_TASK)
    task = load_task(str(tmp_path / "bn.py"))
    spec, initial = task_spec(task)
    assert [p.kind for p in spec.params] == ["param"] * 6  # weights and biases only: the buffers stay local
    store = ParameterStore({k: v + 1 for k, v in initial.items()}, version=2)
    Checkpointer(tmp_path / "state").save(store, {"model": "bnnet", "round": 2, "spec": spec.to_wire()})

    ex.export(tmp_path / "state", "pt", tmp_path / "plain.pt")
    with pytest.raises(RuntimeError, match="running_mean"):
        build_task_module(task).load_state_dict(torch.load(tmp_path / "plain.pt"))  # strict: buffers missing
    ex.export(tmp_path / "state", "pt", tmp_path / "full.pt", task=str(tmp_path / "bn.py"))
    module = build_task_module(task)
    module.load_state_dict(torch.load(tmp_path / "full.pt"))  # strict
    assert all(torch.equal(module.state_dict()[k], torch.from_numpy(v + 1)) for k, v in initial.items())

    with pytest.raises(ConfigError, match="holds a run of model 'bnnet', not of task 'mlp'"):
        ex.export(tmp_path / "state", "pt", tmp_path / "x.pt", task="mlp")
    assert not (tmp_path / "x.pt").exists()


DUAL_TASK = '''
from mxnet.gluon import nn as gnn
from torch import nn

name = "dual"
local_buffers = True
input_shape = (4,)


def model():
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def gluon_model():
    net = gnn.HybridSequential()
    net.add(gnn.Dense(3, in_units=4), gnn.BatchNorm(in_channels=3), gnn.Dense(2, in_units=3))
    return net
'''


def test_params_of_a_task_with_both_models_has_the_gluon_names(tmp_path: Path) -> None:
    """The run federates PyTorch's names; --format params --task writes the Gluon block's, which load_parameters
    takes strictly (FedBN's statistics, which the run does not hold, as the block initialises them)."""
    pytest.importorskip("torch")
    mx = _mxnet()
    from fedctl.tasks import load_task
    from fedctl.worker.frameworks.torch_task import task_spec

    (tmp_path / "dual.py").write_text(DUAL_TASK)
    task = load_task(str(tmp_path / "dual.py"))
    spec, initial = task_spec(task)
    trained = {k: v + 1 for k, v in initial.items()}
    Checkpointer(tmp_path / "state").save(ParameterStore(trained, version=2),
                                          {"model": "dual", "round": 2, "spec": spec.to_wire()})
    ex.export(tmp_path / "state", "params", tmp_path / "net.params", task=str(tmp_path / "dual.py"))
    net = task.gluon_model()
    net.load_parameters(str(tmp_path / "net.params"), ctx=mx.cpu())  # strict: every name, no extra one
    params = net._collect_params_with_prefix()
    assert np.array_equal(params["0.weight"].data().asnumpy(), trained["0.weight"])
    assert np.array_equal(params["1.gamma"].data().asnumpy(), trained["1.weight"])
    assert np.array_equal(params["1.running_var"].data().asnumpy(), np.ones(3, np.float32))
    ex.export(tmp_path / "state", "params", tmp_path / "plain.params")  # without --task: the run's own names
    assert "1.weight" in _read_params((tmp_path / "plain.params").read_bytes())
