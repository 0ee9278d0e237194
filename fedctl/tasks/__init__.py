"""Tasks: the user's model, data loader, loss, metrics and optimiser in one Python file or module
(docs/tasks.md). The built-in models ``mlp``, ``lenet5``, ``2nn`` and ``cnn`` are tasks of the same kind."""

from fedctl.tasks.loader import BUILTIN_TASKS, Task, load_task

__all__ = ["BUILTIN_TASKS", "Task", "load_task"]
