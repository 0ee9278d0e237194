"""The strategy registry: names to classes. A new algorithm is one file that decorates its class with @register."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, TypeVar

from fedctl.errors import ConfigError

if TYPE_CHECKING:
    from fedctl.strategies.base import Strategy, TaskConfig

_REGISTRY: dict[str, type[Strategy]] = {}
_BUILTIN = ("fedctl.strategies.fedsgd", "fedctl.strategies.fedavg", "fedctl.strategies.dgc", "fedctl.strategies.ssgd",
            "fedctl.strategies.fedavgm", "fedctl.strategies.fedadagrad", "fedctl.strategies.fedadam",
            "fedctl.strategies.fedyogi", "fedctl.strategies.fedprox", "fedctl.strategies.scaffold")
S = TypeVar("S", bound=type)


def register(cls: S) -> S:
    """Class decorator: make a Strategy subclass available under its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls!r} needs a non-empty class attribute 'name' to be registered")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"strategy {name!r} is already registered by {_REGISTRY[name]!r}")
    _REGISTRY[name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)


def strategy_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_strategy_class(name: str) -> type[Strategy]:
    """The class registered as ``name``; ConfigError lists the known ones otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}", f"choose one of: {', '.join(sorted(_REGISTRY))}") from None


def get_strategy(name: str, task: TaskConfig) -> Strategy:
    """Instantiate the strategy registered as ``name`` with ``task`` (its options checked)."""
    return get_strategy_class(name)(task)
