"""The Python API without a federation: ``import fedctl`` is light, the API's names and signatures, the defaults the
CLI shares with it, mistakes raised as fedctl's exceptions (never printed), and the blocking/background runner."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest

import fedctl
from fedctl.api.background import Background, run_blocking
from fedctl.api.config import RUN_OPTIONS, keep_models_count, run_config, strategy_settings
from fedctl.api.joining import arrays_shard
from fedctl.errors import ConfigError, DataError, FedctlError

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> set[str]:
    """The top-level modules loaded after running ``code`` in a fresh interpreter (from the repo)."""
    script = textwrap.dedent(code) + "\nimport sys; print(','.join(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50, check=False,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.strip().split(","))


def test_import_fedctl_loads_no_framework_and_no_zmq() -> None:
    loaded = _modules_after("import fedctl; fedctl.__version__; fedctl.ConfigError")
    assert not loaded & {"torch", "mxnet", "zmq", "click", "numpy", "rich"}, loaded


def test_the_api_loads_on_first_use_still_without_a_framework() -> None:
    loaded = _modules_after("import fedctl; fedctl.simulate; fedctl.serve_background; fedctl.join; "
                            "fedctl.export; fedctl.Run")
    assert "zmq" in loaded and not loaded & {"torch", "mxnet"}, loaded


def test_the_package_lists_the_api_and_keeps_its_modules() -> None:
    for name in ("simulate", "serve", "serve_background", "join", "join_background", "export", "export_model",
                 "partition",
                 "Run", "JoinResult", "Exported", "Partition", "Server", "Simulation", "Participant",
                 "BrokerHandle", "WorkerHandle", "ConfigError", "FedctlError"):
        assert name in dir(fedctl) and name in fedctl.__all__
        assert getattr(fedctl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'simulat'"):
        fedctl.simulat  # type: ignore[attr-defined]  # noqa: B018
    assert fedctl.export is fedctl.export_model and callable(fedctl.export)  # the function, not a module
    from fedctl import exporting as module

    assert hasattr(module, "FORMATS")


def test_the_functions_take_the_parameters_of_their_classes() -> None:
    for function, cls in ((fedctl.simulate, fedctl.Simulation), (fedctl.serve, fedctl.Server),
                          (fedctl.serve_background, fedctl.Server), (fedctl.join, fedctl.Participant),
                          (fedctl.join_background, fedctl.Participant)):
        assert list(inspect.signature(function).parameters) == list(inspect.signature(cls).parameters)
    params = inspect.signature(fedctl.simulate).parameters
    assert params["rounds"].default == 20 and params["state_dir"].default == "runs/default"
    assert params["data"].kind is inspect.Parameter.KEYWORD_ONLY


def _plain(value: Any) -> Any:
    """A default as comparable data: no default (click's UNSET sentinel) and an empty tuple are None, a path str."""
    if value is getattr(click.core, "UNSET", object()) or value is inspect.Parameter.empty or value == ():
        return None
    return str(value) if isinstance(value, Path) else value


def _click_defaults(command: click.Command) -> dict[str, Any]:
    return {p.name: p.default for p in command.params if p.name}


@pytest.mark.parametrize("command, cls, renamed, skipped", [
    ("serve", "Server", {"task_ref": "task"}, {"bind"}),  # the API binds loopback by default
    ("simulate", "Simulation", {"task_ref": "task", "data_dir": "data", "delay_s": "delay", "ray_address": "ray"},
     set()),
    ("join", "Participant", {"task_ref": "task"}, set()),
    ("export", "export_model", {"task_ref": "task", "round_no": "round", "fmt": "format"}, set()),
])
def test_the_cli_and_the_api_share_their_defaults(command: str, cls: str, renamed: dict[str, str],
                                                  skipped: set[str]) -> None:
    from fedctl.cli.main import cli

    cli_defaults = _click_defaults(cli.get_command(click.Context(cli), command))
    api = inspect.signature(getattr(fedctl, cls)).parameters
    compared = 0
    for name, default in cli_defaults.items():
        target = renamed.get(name, name)
        if name in skipped or name == "model":  # --model's default is the task's: None in the API means mlp
            continue
        assert target in api, f"fedctl {command} --{name} has no {cls} parameter"
        value = keep_models_count(default) if name == "keep_models" else _plain(default)
        assert _plain(api[target].default) == value, (command, name)
        compared += 1
    assert compared >= len(cli_defaults) - 2


def test_every_run_option_is_a_parameter_of_serve_and_simulate() -> None:
    for cls in (fedctl.Server, fedctl.Simulation):
        assert set(RUN_OPTIONS) <= set(inspect.signature(cls).parameters)


def test_run_config_maps_the_options_and_checks_them() -> None:
    config = run_config(model="mlp", strategy="dgc", rounds=3, fraction=0.5, epochs=2, batch_size=0, lr=0.05,
                        strategy_options={"sparsity": 0.99}, keep_models="all", state_dir="runs/a", bind="tcp://x:1")
    assert (config.rounds, config.sync.fraction, config.task.epochs, config.task.batch_size) == (3, 0.5, 2, 0)
    assert config.task.options == {"sparsity": 0.99} and config.keep_models is None
    assert config.state_dir == Path("runs/a") and config.bind == "tcp://x:1"
    assert strategy_settings(["sparsity=0.9"]) == {"sparsity": "0.9"} and strategy_settings("a=1") == {"a": "1"}
    for bad, words in (({"rounds": 0}, "--rounds must be at least 1"), ({"fraction": 2.0}, "fraction"),
                       ({"lr": -1.0}, "learning rate"), ({"seed": -1}, "--seed"),
                       ({"strategy_options": ["sparsity"]}, "not KEY=VALUE"),
                       ({"strategy": "dgc", "strategy_options": {"sparsity": 2}}, "sparsity"),
                       ({"keep_models": "some"}, "keep_models"), ({"policy": "sometimes"}, "policy")):
        with pytest.raises(ConfigError, match=words) as caught:
            run_config(model="mlp", **bad)
        assert caught.value.message


@pytest.mark.parametrize("call, error, words", [
    (lambda tmp: fedctl.Server(bind="127.0.0.1:5555", state_dir=tmp / "s"), ConfigError, "lacks a transport"),
    (lambda tmp: fedctl.Server(bind="tcp://0.0.0.0:5555", state_dir=tmp / "s"), ConfigError, "unencrypted"),
    (lambda tmp: fedctl.Server(task="lenet5", model="mlp", state_dir=tmp / "s"), ConfigError, "name two models"),
    (lambda tmp: fedctl.Server(chunk_kb=1024, max_message_mb=1, state_dir=tmp / "s"), ConfigError, "--chunk-kb"),
    (lambda tmp: fedctl.Server(strategy="nope", state_dir=tmp / "s"), ConfigError, "nope"),
    (lambda tmp: fedctl.Server(eval_data="test", state_dir=tmp / "s"), ConfigError, "no --data-dir"),
    (lambda tmp: fedctl.Participant(data="shard0"), ConfigError, "no --data-dir"),
    (lambda tmp: fedctl.Participant(data="shard0", data_dir=tmp / "nowhere"), DataError, "does not exist"),
    (lambda tmp: fedctl.Participant(data="x", connect="tcp://*:5555"), ConfigError, "for binding"),
    (lambda tmp: fedctl.Participant(data=(np.zeros((3, 2)), np.zeros(2, np.int64))), ConfigError, "data=(x, y)"),
    (lambda tmp: fedctl.Simulation(data=tmp / "nowhere", state_dir=tmp / "s"), DataError, "nowhere"),
    (lambda tmp: fedctl.export(tmp), ConfigError, "holds no checkpoint"),
    (lambda tmp: fedctl.export(tmp, format="npz", out="m.pt"), ConfigError, "suffix of --format pt"),
    (lambda tmp: fedctl.partition(tmp / "p", dataset="mnist-sample", clients=3, scheme="dirichlet"), ConfigError,
     "needs"),
])
def test_mistakes_are_raised_as_fedctl_errors_not_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          call: Any, error: type[FedctlError], words: str) -> None:
    with pytest.raises(error) as caught:
        call(tmp_path)
    assert words in str(caught.value) and caught.value.message
    assert capsys.readouterr() == ("", ""), "the API prints nothing"
    assert not (tmp_path / "s").exists(), "a refused start leaves no state dir"


def test_arrays_become_a_shard() -> None:
    shard = arrays_shard((np.ones((4, 3), np.float64), np.array([0, 2, 1, 2])))
    assert shard.x.dtype == np.float32 and shard.y.dtype == np.int64 and shard.num_examples == 4
    assert shard.classes == ("0", "1", "2")
    for bad in ((np.ones((4, 3)), np.ones(4)), (np.ones((4, 3)), np.array([0, -1, 0, 0])),
                (np.ones((0, 3)), np.zeros(0, np.int64)), (np.ones(3),)):
        with pytest.raises(ConfigError):
            arrays_shard(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the runner


async def _answer(started: Any, value: int = 7, delay: float = 0.0) -> int:
    started(None)
    await asyncio.sleep(delay)
    return value


async def _fail(started: Any) -> int:
    started(None)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_raise_config())
    return 0


async def _raise_config() -> None:
    raise ConfigError("the task failed", "fix it")


def test_run_blocking_runs_here_or_in_a_thread_under_a_running_loop() -> None:
    assert run_blocking(_answer, "t") == 7

    async def notebook_cell() -> int:  # a loop already runs in this thread, as in Jupyter
        return run_blocking(_answer, "t")

    assert asyncio.run(notebook_cell()) == 7


def test_an_error_inside_a_task_group_is_raised_as_itself() -> None:
    with pytest.raises(ConfigError, match="the task failed"):
        run_blocking(_fail, "t")
    handle = Background(_fail, "t")
    with pytest.raises(ConfigError, match="the task failed"):
        handle.wait(10)


def test_a_background_run_waits_times_out_and_stops() -> None:
    handle = Background(lambda started: _answer(started, 3, delay=30.0), "fedctl-test-run")
    with pytest.raises(TimeoutError):
        handle.wait(0.05)
    assert not handle.done() and "running" in repr(handle)
    started = time.monotonic()
    handle.stop()
    assert time.monotonic() - started < 5 and handle.done() and "stopped" in repr(handle)
    from concurrent.futures import CancelledError

    with pytest.raises(CancelledError):
        handle.wait()
    handle.stop()  # stopping again does nothing
    with Background(_answer, "fedctl-test-run") as done:
        assert done.wait(10) == 7


def test_a_run_that_fails_to_start_raises_from_the_constructor() -> None:
    async def refuse(started: Any) -> int:
        raise ConfigError("cannot start")

    with pytest.raises(ConfigError, match="cannot start"):
        Background(refuse, "fedctl-test-run")
