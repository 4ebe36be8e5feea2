"""The import graph, read from the source (every module ast-parsed, imports inside functions included):
dependencies run downward only, kernels -> ops -> layers -> models -> commands -> demo/CLI, and no cycle.

docs/design.md describes the layers; a module's layer is set by its path (LAYERS, first match wins).
"""

import ast
import functools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Source folder -> the package it installs as (setup.py's package_dir).
PACKAGES = {"mkfast": "mkfast", "kernels": "mkfast.kernels", "benchmarks": "mkfast.benchmarks"}

# (pattern on the module name, layer); lower layers may not import higher ones.
LAYERS = [
    (r"mkfast\.kernels(\..*)?$", 0),  # Triton kernels and launchers: nothing of mkfast
    (r"mkfast\._C$", 0),  # the compiled extension
    # Shared by every layer above the kernels.
    (r"mkfast\.(_extension|backend|errors|config|files|plotting|progress|claims)$", 1),
    (r"mkfast\.ops(\..*)?$", 2),
    (r"mkfast\.layers(\..*)?$", 3),
    (r"mkfast\.(mks2|racm3)\.(\w*demo\w*)$", 6),  # demos, and the commands that read a demo's run
    (r"mkfast\.(mks2|racm3)\.(\w*commands)$", 5),
    (r"mkfast\.(data|mks2|racm3)(\..*)?$", 4),  # the models, their data, their training
    (r"mkfast\.(training|distributed)$", 4),
    (r"mkfast\.(environment|bench|audit)(\..*)?$", 5),
    (r"mkfast\.benchmarks(\..*)?$", 5),
    (r"mkfast\.(demo|report|cli)$", 6),
    # The package's public face: the ops, the layers' and MKS2's patch helpers (ops never import it).
    (r"mkfast$", 4),
]
LAYER_NAMES = {0: "kernels", 1: "shared", 2: "ops", 3: "layers", 4: "models", 5: "commands", 6: "demo/CLI"}


def _modules() -> dict[str, str]:
    """Module name -> file, for every .py file of the installed packages."""
    modules = {}
    for folder, package in PACKAGES.items():
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                relative = os.path.relpath(os.path.join(directory, name), os.path.join(ROOT, folder))
                parts = relative[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join([package, *parts])] = os.path.join(directory, name)
    modules["mkfast._C"] = ""  # compiled: imported, never parsed
    return modules


def _resolve(name: str, modules: dict[str, str]) -> str | None:
    """The module ``name`` refers to: itself, or its longest prefix that is a module (an attribute import)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        if not path:
            graph[module] = set()
            continue
        with open(path) as handle:
            tree = ast.parse(handle.read(), path)
        is_package = path.endswith("__init__.py")
        edges = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module
                names = [f"{prefix}.{alias.name}" for alias in node.names]
            for name in names:
                if name.startswith("benchmarks."):  # a checkout's name for the installed mkfast.benchmarks
                    name = "mkfast." + name
                target = _resolve(name, modules) if name.startswith("mkfast") else None
                if target and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


# A top-level module not listed above counts as a command: nothing below may import it until listed.
UNLISTED_LAYER = 5


def layer_of(module: str) -> int:
    for pattern, layer in LAYERS:
        if re.match(pattern, module):
            return layer
    return UNLISTED_LAYER


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer_and_imports_only_downward():
    graph = import_graph()
    upward = [f"{module} ({LAYER_NAMES[layer_of(module)]}) imports {target} ({LAYER_NAMES[layer_of(target)]})"
              for module, targets in sorted(graph.items()) for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _module_cycles() -> list[list[str]]:
    graph = import_graph()
    # A package's __init__ re-exporting its submodules is not a cycle with them: Python imports
    # the package first whenever a submodule is imported, so only edges between modules count.
    packages = {module for module, path in _modules().items() if path.endswith("__init__.py")}
    between_modules = {module: {target for target in targets if target not in packages}
                       for module, targets in graph.items()}
    return _cycles(between_modules)


def test_the_import_graph_has_no_cycle():
    assert _module_cycles() == []


def test_kernels_import_nothing_of_mkfast_but_themselves():
    graph = import_graph()
    outside = {module: sorted(target for target in targets if not target.startswith("mkfast.kernels"))
               for module, targets in graph.items() if module.startswith("mkfast.kernels")}
    assert not any(outside.values()), outside


def test_the_checker_sees_an_upward_import_and_a_cycle():
    """The two checks can fail: a planted upward edge and a planted cycle are reported."""
    graph = import_graph()
    assert layer_of("mkfast.ops.attention") < layer_of("mkfast.mks2.model")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "mkfast.backend" in graph["mkfast.ops.attention"], "the graph misses a plain import"
    assert "mkfast.kernels.attention" in graph["mkfast.ops.attention"], "the graph misses a lazy import"


@pytest.mark.parametrize("module", ["mkfast.cli", "mkfast.demo", "mkfast.racm3.commands", "mkfast.backend"])
def test_modules_named_in_the_layering_exist(module):
    assert module in import_graph()


def test_no_module_of_the_package_edits_sys_path():
    """`mkfast bench` and the rest run from an installed package: nothing puts a checkout on sys.path."""
    editing = []
    for module, path in _modules().items():
        if not path or os.path.basename(path).startswith("gpu_"):  # gpu_check/gpu_report: checkout scripts
            continue
        with open(path) as handle:
            tree = ast.parse(handle.read(), path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                editing.append(module)
    assert editing == []


def test_bench_finds_the_suites_in_the_installed_package():
    from mkfast.bench import benchmark_suites

    expected = sorted(name[len("bench_"):-len(".py")] for name in os.listdir(os.path.join(ROOT, "benchmarks"))
                      if name.startswith("bench_") and name.endswith(".py"))
    assert benchmark_suites() == expected and "topk_dedup" in expected
