"""Model specs shared by the broker and every framework adapter.

A spec lists each parameter's canonical name, shape and initialiser, so the broker can create the global
model with numpy alone and an MXNet worker and a PyTorch worker can train the same tensors. Layouts follow
the common convention of both frameworks: dense weights are (out, in), conv weights are (out, in, kh, kw).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedctl.errors import ConfigError

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class ParamSpec:
    """One federated tensor: canonical name, shape, dtype, fan-in used by the initialiser, and its kind.

    ``dtype`` is the tensor's type in the model (``float32``, ``float16``, ``bfloat16``); on the wire and in the
    broker every federated tensor is float32, and a worker casts it back. ``kind`` is ``param`` (a parameter,
    trainable or frozen) or ``buffer`` (a float buffer such as BatchNorm's running statistics, averaged like
    weights unless the task keeps buffers local).
    """

    name: str
    shape: tuple[int, ...]
    fan_in: int
    dtype: str = "float32"
    kind: str = "param"

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))


@dataclass(frozen=True)
class ModelSpec:
    """A model: its name, the input shape of one example, the number of classes and its parameters in order."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    params: tuple[ParamSpec, ...]
    description: str = ""

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def nbytes(self) -> int:
        """Bytes of the model as it travels and as the broker holds it (float32)."""
        return 4 * self.num_params

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def to_wire(self) -> dict:
        """The spec as plain data, for the welcome message."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "params": [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "kind": p.kind}
                       for p in self.params],
        }

    def signature(self) -> list[list[Any]]:
        """``[name, shape, dtype]`` of every federated tensor, in order: what a worker's ``join`` carries so that the
        broker can name the first difference from its own model."""
        return [[p.name, list(p.shape), p.dtype] for p in self.params]


def first_difference(ours: list[list[Any]], theirs: list[list[Any]], here: str = "here",
                     there: str = "there") -> str | None:
    """The first difference between two model signatures (``ModelSpec.signature``), in words; None if equal."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if list(a) != list(b):
            return (f"tensor {i} is {a[0]} {tuple(a[1])} {a[2]} on the {here}, "
                    f"{b[0]} {tuple(b[1])} {b[2]} on the {there}")
    if len(ours) != len(theirs):
        longer, which = (ours, here) if len(ours) > len(theirs) else (theirs, there)
        extra = longer[min(len(ours), len(theirs))]
        return (f"the {here} has {len(ours)} tensors, the {there} {len(theirs)}: the first extra one (on the "
                f"{which}) is {extra[0]} {tuple(extra[1])} {extra[2]}")
    return None


def spec_from_wire(data: dict[str, Any]) -> ModelSpec:
    """A ModelSpec from the ``run.model`` map of a welcome (or a state dir's ``spec``); ConfigError when malformed."""
    try:
        params = tuple(ParamSpec(str(p["name"]), tuple(int(d) for d in p["shape"]), 1, str(p.get("dtype", "float32")),
                                 str(p.get("kind", "param"))) for p in data["params"])
        return ModelSpec(str(data["name"]), tuple(int(d) for d in data.get("input_shape") or ()),
                         int(data.get("num_classes") or 0), params, str(data.get("description") or ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed model spec ({type(exc).__name__}: {exc})",
                          "use the same fedctl version on the broker and the workers") from None


def _dense(name: str, n_in: int, n_out: int) -> tuple[ParamSpec, ParamSpec]:
    return (ParamSpec(f"{name}.weight", (n_out, n_in), n_in), ParamSpec(f"{name}.bias", (n_out,), n_in))


def _conv(name: str, c_in: int, c_out: int, k: int) -> tuple[ParamSpec, ParamSpec]:
    fan_in = c_in * k * k
    return (ParamSpec(f"{name}.weight", (c_out, c_in, k, k), fan_in), ParamSpec(f"{name}.bias", (c_out,), fan_in))


def _mlp() -> ModelSpec:
    params = (*_dense("fc1", 784, 128), *_dense("fc2", 128, 64), *_dense("fc3", 64, 10))
    return ModelSpec("mlp", (1, 28, 28), 10, params, "MLP 784-128-64-10, ReLU")


def _lenet5() -> ModelSpec:
    # conv1 pads by 2 so a 28x28 MNIST image gives 28x28 -> pool 14 -> conv2 10 -> pool 5 -> 16*5*5 = 400.
    params = (
        *_conv("conv1", 1, 6, 5),
        *_conv("conv2", 6, 16, 5),
        *_dense("fc1", 400, 120),
        *_dense("fc2", 120, 84),
        *_dense("fc3", 84, 10),
    )
    return ModelSpec("lenet5", (1, 28, 28), 10, params,
                     "LeNet-5: conv5x5(6, pad 2)-pool-conv5x5(16)-pool-120-84-10, ReLU, max pool")


def _twonn() -> ModelSpec:
    # McMahan et al. 2017's "2NN": 784*200+200 + 200*200+200 + 200*10+10 = 199,210 parameters.
    params = (*_dense("fc1", 784, 200), *_dense("fc2", 200, 200), *_dense("fc3", 200, 10))
    return ModelSpec("2nn", (1, 28, 28), 10, params,
                     "McMahan et al. 2017's 2NN: MLP 784-200-200-10, ReLU (199,210 parameters)")


def _cnn() -> ModelSpec:
    # McMahan et al. 2017's CNN. The paper states no padding; its 1,663,370 parameters need fc1 to take 64*7*7 = 3136
    # inputs, which "same" padding (2) on both 5x5 convs gives: 28 -> conv 28 -> pool 14 -> conv 14 -> pool 7;
    # 832 + 51,264 + 1,606,144 + 5,130 = 1,663,370. Unpadded convs (28 -> 24 -> 12 -> 8 -> 4) would give 582,026.
    params = (
        *_conv("conv1", 1, 32, 5),
        *_conv("conv2", 32, 64, 5),
        *_dense("fc1", 64 * 7 * 7, 512),
        *_dense("fc2", 512, 10),
    )
    return ModelSpec("cnn", (1, 28, 28), 10, params,
                     "McMahan et al. 2017's CNN: conv5x5(32, pad 2)-pool-conv5x5(64, pad 2)-pool-512-10, ReLU, 2x2 "
                     "max pool; 'same' padding (28-14-7, fc1 input 64*7*7 = 3136) is what gives the paper's "
                     "1,663,370 parameters")


def _wide1g() -> ModelSpec:
    # 16 dense 4096x4096 layers: 268,500,992 float32 parameters, 1.07 GB — for chunked-transfer benchmarks.
    params = tuple(p for i in range(16) for p in _dense(f"fc{i + 1}", 4096, 4096))
    return ModelSpec("wide1g", (4096,), 4096, params,
                     "16 dense 4096x4096 layers (1.07 GB of float32): a benchmark model for transfers far larger "
                     "than one message; no framework trains it (scripts/big_update.py uses a no-op trainer)")


def _wide5m() -> ModelSpec:
    # 784-1635-10: 1,299,835 float32 parameters, 5.2 MB — the large model of `fedctl bench round`.
    params = (*_dense("fc1", 784, 1635), *_dense("fc2", 1635, 10))
    return ModelSpec("wide5m", (1, 28, 28), 10, params,
                     "MLP 784-1635-10 (5.2 MB of float32): a benchmark model for round cost (`fedctl bench round`); "
                     "no framework trains it")


MODELS: dict[str, Callable[[], ModelSpec]] = {
    "mlp": _mlp, "lenet5": _lenet5, "2nn": _twonn, "cnn": _cnn, "wide5m": _wide5m, "wide1g": _wide1g,
}


def get_model(name: str) -> ModelSpec:
    """Return the spec of a model by name, or raise ConfigError naming the known models."""
    try:
        return MODELS[name]()
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ConfigError(f"unknown model {name!r}", f"choose one of: {known}") from None


def init_params(spec: ModelSpec, seed: int) -> Params:
    """Initialise every parameter with numpy alone, reproducibly from ``seed``.

    Weights and biases are drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the default of PyTorch's Linear and
    Conv2d layers, so a federated run starts where a plain PyTorch run would.
    """
    rng = np.random.default_rng(seed)
    out: Params = {}
    for p in spec.params:
        bound = 1.0 / math.sqrt(p.fan_in)
        out[p.name] = rng.uniform(-bound, bound, size=p.shape).astype(p.dtype)
    return out
