"""Layers point one way: walk every import of fedctl with ast (lazy and TYPE_CHECKING imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest

import fedctl

ROOT = Path(fedctl.__file__).resolve().parent
PACKAGE_ROOT = ROOT.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


@lru_cache(maxsize=1)
def all_imports() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def hits(imported: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in imported if any(m == b or m.startswith(b + ".") for b in banned))


EXEMPT = {"fedctl.testing.hostile": ("zmq",)}
"""Deliberate exceptions: the hostile client is a test harness that speaks (and mangles) ZeroMQ itself."""


def violations(package: str, banned: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for mod, imported in all_imports().items():
        if mod == package or mod.startswith(package + "."):
            allowed = EXEMPT.get(mod, ())
            bad = [b for b in hits(imported, banned) if not any(b == a or b.startswith(a + ".") for a in allowed)]
            if bad:
                out[mod] = bad
    return out


def test_the_walk_sees_the_packages() -> None:
    mods = all_imports()
    for expected in ("fedctl.wire.messages", "fedctl.strategies.fedavg", "fedctl.broker.service",
                     "fedctl.worker.client", "fedctl.worker.frameworks.torch", "fedctl.cli.main"):
        assert expected in mods
    assert "fedctl.errors" in mods["fedctl.wire.messages"]
    assert "fedctl.wire.constants" in mods["fedctl.wire.messages"]  # "from fedctl.wire import constants as C"
    assert "torch" in mods["fedctl.worker.frameworks.torch"]


@pytest.mark.parametrize("package, banned", [
    ("fedctl.wire", ("zmq", "asyncio", "torch", "mxnet", "fedctl.broker", "fedctl.worker", "fedctl.cli",
                     "fedctl.strategies", "msgpack_numpy", "pickle")),
    ("fedctl.strategies", ("zmq", "asyncio", "torch", "mxnet", "fedctl.broker", "fedctl.worker", "fedctl.cli")),
    ("fedctl.broker", ("torch", "mxnet", "fedctl.worker", "fedctl.cli")),
    ("fedctl.models", ("zmq", "asyncio", "torch", "mxnet", "fedctl.broker", "fedctl.worker", "fedctl.cli")),
    ("fedctl.worker", ("fedctl.broker", "fedctl.cli")),
    ("fedctl.testing", ("zmq", "torch", "mxnet", "fedctl.broker", "fedctl.cli")),
    ("fedctl.tasks", ("zmq", "asyncio", "torch", "mxnet", "fedctl.broker", "fedctl.worker", "fedctl.cli")),
    ("fedctl.api", ("click", "fedctl.cli")),
    ("fedctl.edge", ("torch", "mxnet", "click", "fedctl.cli", "fedctl.api", "fedctl.worker.frameworks")),
])
def test_layer_imports(package: str, banned: tuple[str, ...]) -> None:
    assert violations(package, banned) == {}


def test_only_the_adapters_import_a_framework() -> None:
    allowed = {"fedctl.worker.frameworks.torch", "fedctl.worker.frameworks.torch_task",
               "fedctl.worker.frameworks.mxnet", "fedctl.worker.frameworks.mxnet_task"}
    offenders = {m: hits(i, ("torch", "mxnet")) for m, i in all_imports().items() if m not in allowed}
    assert {m: b for m, b in offenders.items() if b} == {}


def test_only_the_cli_imports_click() -> None:
    offenders = {m: hits(i, ("click",)) for m, i in all_imports().items() if not m.startswith("fedctl.cli")}
    assert {m: b for m, b in offenders.items() if b} == {}


@pytest.mark.timeout(60)
def test_broker_and_strategies_import_no_framework_at_runtime() -> None:
    code = textwrap.dedent("""
        import sys
        import fedctl.broker.service, fedctl.strategies
        import fedctl.strategies.fedavg, fedctl.strategies.fedsgd
        heavy = sorted(m for m in ("torch", "mxnet", "click", "fedctl.cli") if m in sys.modules)
        import fedctl.wire
        print(",".join(heavy) or "none")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"


@pytest.mark.timeout(60)
def test_wire_alone_imports_no_socket_library() -> None:
    code = "import sys, fedctl.wire; print(sorted(m for m in ('zmq', 'asyncio', 'torch', 'mxnet') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


CORE = ("fedctl.broker.core", "fedctl.broker.intake", "fedctl.broker.chunking", "fedctl.broker.effects",
        "fedctl.broker.params", "fedctl.broker.policy", "fedctl.broker.registry", "fedctl.broker.downlink",
        "fedctl.broker.evaluation")
"""The broker's sans-IO core and the pure modules it is made of."""
IO_MODULES = ("zmq", "asyncio", "os", "io", "pathlib", "shutil", "tempfile", "threading", "socket", "subprocess",
              "fedctl.broker.service", "fedctl.broker.transport", "fedctl.broker.store", "fedctl.broker.durable",
              "fedctl.broker.transfers", "fedctl.fsio")


@pytest.mark.parametrize("module", CORE)
def test_the_broker_core_does_no_io(module: str) -> None:
    """No socket, event loop or file module is imported, and no file is opened."""
    assert hits(all_imports()[module], IO_MODULES) == []
    path = ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
    calls = [node.func.id for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    assert "open" not in calls and "print" not in calls


def broker_graph() -> dict[str, set[str]]:
    """Imports among fedctl.broker's modules (TYPE_CHECKING and lazy imports included)."""
    mods = {m for m in all_imports() if m.startswith("fedctl.broker.")}
    return {m: {i for i in all_imports()[m] if i in mods and i != m} for m in mods}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_broker_has_no_import_circle() -> None:
    graph = broker_graph()
    assert "fedctl.broker.core" in graph["fedctl.broker.service"]
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
