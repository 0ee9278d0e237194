"""Getting the model out of a state dir (``fedctl export``): pick a checkpointed model, cast each tensor back to its
dtype, and write it in a framework's own format, atomically.

Formats (:data:`FORMATS`): ``pt`` (a ``torch.save`` state dict; written by the PyTorch adapter, the one place that
imports torch), ``safetensors``, ``npz`` and ``params`` (MXNet Gluon's ``save_parameters`` format, written here with
numpy alone). Every file is keyed by the canonical parameter names, which are the built-in PyTorch modules' and
Gluon blocks' own names, so ``module.load_state_dict(...)`` and ``net.load_parameters(...)`` take it as it is.

Dtypes: the broker holds float32. A tensor whose model dtype (``state.json``'s ``spec``, else the built-in model's
spec, else float32) is float16 or float64 is cast to it in every format; bfloat16, which numpy lacks, is a real
bfloat16 tensor in ``pt`` and ``safetensors`` (rounded to nearest even, as ``Tensor.to`` rounds) and stays float32
in ``npz`` and ``params`` (``torch.from_numpy(a).to(torch.bfloat16)`` then gives exactly the ``pt`` tensor).
"""

from __future__ import annotations

import importlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedctl.broker.store import Checkpointer
from fedctl.errors import BackendUnavailable, ConfigError
from fedctl.fsio import atomic_write, check_writable_dir, removed_if_empty_on_error
from fedctl.models import MODELS, get_model
from fedctl.models.zoo import spec_from_wire

Params = dict[str, np.ndarray]
DTYPES = ("float32", "float16", "bfloat16", "float64")
"""Model dtypes an export can cast to (``ParamSpec.dtype``)."""
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32, "float64": np.float64}
"""The numpy dtype each model dtype is written as where the format has no bfloat16."""


@dataclass(frozen=True)
class Format:
    """One output format: its file suffix, what loads it, and its writer ``write(fh, arrays, dtypes, meta)``."""

    name: str
    suffix: str
    loads_with: str
    write: Callable[[BinaryIO, Params, dict[str, str], dict[str, str]], None]
    ready: Callable[[], None] = lambda: None
    """Raises BackendUnavailable when the library the writer needs is missing (checked before any work)."""


def bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) of float32 ``a``, rounded to nearest even like PyTorch; NaN stays NaN."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return np.where(np.isnan(a), np.uint32(0x7FC0), rounded).astype(np.uint16)


def _as_numpy(arrays: Params, dtypes: dict[str, str]) -> Params:
    return {k: np.ascontiguousarray(v, _NUMPY[dtypes[k]]) for k, v in arrays.items()}


def _write_npz(fh: BinaryIO, arrays: Params, dtypes: dict[str, str], meta: dict[str, str]) -> None:
    np.savez(fh, **_as_numpy(arrays, dtypes))


def _safetensors() -> Any:
    try:
        return importlib.import_module("safetensors")
    except ImportError as exc:
        raise BackendUnavailable(f"--format safetensors needs the safetensors package ({exc})",
                                 "pip install safetensors, or pass --format npz") from None


def _write_safetensors(fh: BinaryIO, arrays: Params, dtypes: dict[str, str], meta: dict[str, str]) -> None:
    """bfloat16 tensors as BF16 (safetensors has it; ``safetensors.numpy.load_file`` cannot read it, torch can)."""
    lib = _safetensors()
    data = {k: bfloat16_bits(v) if dtypes[k] == "bfloat16" else np.ascontiguousarray(v, _NUMPY[dtypes[k]])
            for k, v in arrays.items()}
    spec_class = getattr(lib, "TensorSpec", None)  # safetensors >= 0.8; older ones take plain dicts

    def entry(name: str, a: np.ndarray) -> Any:
        dtype = dtypes[name] if dtypes[name] == "bfloat16" else a.dtype.name
        if spec_class is not None:
            return spec_class(dtype=dtype, shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
        return {"dtype": dtype, "shape": list(a.shape), "data": a.tobytes()}

    fh.write(bytes(lib.serialize({k: entry(k, a) for k, a in data.items()}, metadata=meta)))


_MX_TYPE_FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2}
"""mshadow's type flags, as MXNet 1.x writes them."""


def _write_params(fh: BinaryIO, arrays: Params, dtypes: dict[str, str], meta: dict[str, str]) -> None:
    """MXNet 1.x's ``NDArray`` list file (``mx.nd.save`` of a dict, what ``Block.save_parameters`` writes): a list
    header, each array (V2 magic, dense storage, int64 shape, CPU context, type flag, little-endian data), then
    the names."""
    data = _as_numpy(arrays, dtypes)
    for name, a in data.items():
        if a.ndim == 0:
            raise ConfigError(f"tensor {name} is a scalar, which MXNet's params format cannot hold",
                              "pass --format npz or safetensors")
    out = [struct.pack("<QQQ", 0x112, 0, len(data))]
    for a in data.values():
        out.append(struct.pack("<Ii", 0xF993FAC9, 0) + struct.pack(f"<I{a.ndim}q", a.ndim, *a.shape))
        out.append(struct.pack("<iii", 1, 0, _MX_TYPE_FLAGS[a.dtype]) + a.astype(a.dtype.newbyteorder("<")).tobytes())
    out.append(struct.pack("<Q", len(data)))
    for name in data:
        encoded = name.encode()
        out.append(struct.pack("<Q", len(encoded)) + encoded)
    fh.write(b"".join(out))


def _torch_adapter() -> Any:
    try:
        return importlib.import_module("fedctl.worker.frameworks.torch")
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(f"--format pt needs PyTorch, which cannot be imported ({exc})",
                                 "pip install 'fedctl[torch]', or pass --format safetensors or npz") from None


def _write_pt(fh: BinaryIO, arrays: Params, dtypes: dict[str, str], meta: dict[str, str],
              template: Any = None) -> None:
    _torch_adapter().save_state_dict(fh, arrays, dtypes, template)


def _torch_ready() -> None:
    _torch_adapter()


def _safetensors_ready() -> None:
    _safetensors()


FORMATS: dict[str, Format] = {
    "pt": Format("pt", ".pt", "module.load_state_dict(torch.load(FILE))", _write_pt, _torch_ready),
    "safetensors": Format("safetensors", ".safetensors",
                          "module.load_state_dict(safetensors.torch.load_file(FILE)), or safetensors.numpy.load_file",
                          _write_safetensors, _safetensors_ready),
    "npz": Format("npz", ".npz", "numpy.load(FILE)", _write_npz),
    "params": Format("params", ".params", "net.load_parameters(FILE) (MXNet Gluon)", _write_params),
}
"""Output formats by ``--format`` name."""
SUFFIXES = {".pth": "pt", **{f.suffix: name for name, f in FORMATS.items()}}


def tensor_dtypes(state: dict[str, Any], names: list[str]) -> dict[str, str]:
    """Each tensor's model dtype: from ``state['spec']['params']`` when the state dir records it, else from the
    built-in model's spec, else float32. ConfigError for a dtype no format can write."""
    found: dict[str, str] = {}
    spec = state.get("spec")
    if isinstance(spec, dict) and isinstance(spec.get("params"), list):
        found = {str(p.get("name")): str(p.get("dtype", "float32")) for p in spec["params"] if isinstance(p, dict)}
    elif state.get("model") in MODELS:
        found = {p.name: p.dtype for p in get_model(str(state["model"])).params}
    dtypes = {name: found.get(name, "float32") for name in names}
    for name, dtype in dtypes.items():
        if dtype not in DTYPES:
            raise ConfigError(f"tensor {name} has dtype {dtype!r}, which fedctl export cannot write",
                              f"export only models of {', '.join(DTYPES)} tensors")
    return dtypes


@dataclass(frozen=True)
class Choice:
    """Which model to export: round (None: the last checkpoint's), or the best one."""

    round: int | None = None
    best: bool = False

    def __post_init__(self) -> None:
        if self.best and self.round is not None:
            raise ConfigError(f"both --round {self.round} and --best were given", "pass one of them, or neither")


def pick(ckpt: Checkpointer, state: dict[str, Any], choice: Choice) -> dict[str, Any]:
    """Where the chosen model is (``version``, ``round``, ``best``: the best model's description or None), checked
    to exist before anything is loaded or written."""
    if choice.best:
        best = ckpt.best()
        if best is None:
            raise ConfigError(f"{ckpt.dir} holds no best model (model-best.npz)",
                              "serve with an evaluation (--eval-data, or federated evaluation) or --best-metric "
                              "NAME to keep one; export the last model without --best")
        return {"round": best.get("round"), "version": best.get("version"), "best": best}
    if choice.round is None:
        return {"round": state.get("round"), "version": int(state["version"]), "best": None}
    kept = ckpt.kept_versions()
    if choice.round not in kept:
        raise ConfigError(f"round {choice.round} is not kept in {ckpt.dir}: its models are of round(s) "
                          f"{', '.join(map(str, kept)) or 'none'}",
                          "pass one of those to --round, or serve with --keep-models N|all to keep more")
    return {"round": choice.round, "version": choice.round, "best": None}


def _check_out(path: Path) -> None:
    try:
        check_writable_dir(path.parent, "--out")
    except ConfigError as err:
        raise ConfigError(f"--out {path} cannot be written: {err.message}",
                          "pass --out a file in a directory you can write to") from None


def default_out(model: str, where: dict[str, Any], fmt: Format) -> Path:
    """``<model>-round<N>`` (``-best-round<N>`` for the best) plus the format's suffix, in the current directory."""
    tag = "best-round" if where["best"] else "round"
    return Path(f"{model}-{tag}{where['round']}{fmt.suffix}")


def task_template(task_ref: str, state: dict[str, Any], state_dir: Path, fmt: Format) -> Any:
    """``--task``: check that ``state_dir`` holds a run of that task. For a user task and ``pt``, a fresh
    ``model()``'s state dict, whose tensors the federation does not average fill in the file; for ``params`` and a
    task with ``gluon_model()``, a function from the run's arrays to the Gluon block's (names and the tensors the
    federation does not hold: :func:`~fedctl.worker.frameworks.mxnet_task.gluon_export`); else None."""
    task = importlib.import_module("fedctl.tasks").load_task(task_ref)
    if task.name != state.get("model"):
        raise ConfigError(f"{state_dir} holds a run of model {state.get('model')!r}, not of task {task.name!r}",
                          "pass the --task (or --model) the run was started with, or no --task")
    if task.is_builtin:
        return None
    if fmt.name == "params" and task.gluon_model is not None:
        load_trainer_class = importlib.import_module("fedctl.worker.frameworks").load_trainer_class
        load_trainer_class("mxnet_task")  # MXNet missing: one line naming how to install it
        adapter = importlib.import_module("fedctl.worker.frameworks.mxnet_task")
        spec = spec_from_wire(state["spec"]) if isinstance(state.get("spec"), dict) else None
        if spec is None:
            raise ConfigError(f"{state_dir} does not record its model's tensors (a run of an older fedctl)",
                              "export without --task")
        return lambda arrays: adapter.gluon_export(task, spec, arrays)
    if fmt.name != "pt":
        return None
    _torch_adapter()
    return importlib.import_module("fedctl.worker.frameworks.torch_task").build_task_module(task).state_dict()


def export(state_dir: Path, fmt_name: str, out: Path | str | None = None,
           choice: Choice | None = None, task: str | None = None) -> dict[str, Any]:
    """Write the chosen model of ``state_dir`` as ``fmt_name`` to ``out`` (an existing directory, or a name ending
    in ``/``: the default name in it); returns what was written.

    Every check (format, its library, checkpoint, round, output directory) comes before the model is read, and
    the file is written to a temp file and renamed: a failure leaves nothing behind.

    ``task``: the run's ``--task`` (see :func:`task_template`).

    Raises
    ------
    ConfigError
        No checkpoint, an unknown format, a round not kept, no best model, an unwritable output, another task.
    BackendUnavailable
        The format's library (PyTorch for ``pt``, safetensors) is not installed.
    """
    try:
        fmt = FORMATS[fmt_name]
    except KeyError:
        raise ConfigError(f"unknown format {fmt_name!r}", f"pass --format {'|'.join(FORMATS)}") from None
    choice = choice or Choice()
    ckpt = Checkpointer(state_dir)
    state = ckpt.read_state()
    where = pick(ckpt, state, choice)
    model = str(state.get("model") or "model")
    path = default_out(model, where, fmt) if out is None else Path(out)
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        path = path / default_out(model, where, fmt)
    _check_out(path)
    fmt.ready()
    template = None if task is None else task_template(task, state, state_dir, fmt)
    if where["best"] is not None:
        arrays = ckpt.load_best()[0]
    elif choice.round is None:
        arrays = ckpt.load_version(int(state["version"]))
    else:
        arrays = ckpt.load_version(where["version"])
    dtypes = tensor_dtypes(state, list(arrays))
    meta = {"format": "pt", "fedctl.model": model, "fedctl.round": str(where["round"]),
            "fedctl.version": str(where["version"]), "fedctl.run_id": str(state.get("run_id"))}
    if callable(template):  # params of a Gluon task: the block's names and tensors, float32
        arrays = template(arrays)
        dtypes, template = {name: "float32" for name in arrays}, None
    with removed_if_empty_on_error(path.parent):
        if template is None:
            atomic_write(path, lambda fh: fmt.write(fh, arrays, dtypes, meta))
        else:
            atomic_write(path, lambda fh: _write_pt(fh, arrays, dtypes, meta, template))
    return {"path": path, "format": fmt.name, "model": model, "tensors": len(arrays),
            "parameters": sum(int(a.size) for a in arrays.values()), "dtypes": sorted(set(dtypes.values())),
            "loads_with": fmt.loads_with, **where}
