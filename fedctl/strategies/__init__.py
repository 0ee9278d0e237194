"""Federated algorithms, one file each, as pure numpy functions; the registry maps names to classes."""

from fedctl.strategies.base import AggregateResult, ClientResult, Strategy, TaskConfig, Update
from fedctl.strategies.registry import get_strategy, register, strategy_names

__all__ = ["AggregateResult", "ClientResult", "Strategy", "TaskConfig", "Update", "get_strategy", "register",
           "strategy_names"]
