"""`mkfast bench`: the benchmark suites, installed with the package as ``mkfast.benchmarks``.

Each suite is a module ``mkfast.benchmarks.bench_<name>`` with ``main(quick=..., output_root=...)``;
from a source checkout the same files run as ``python -m benchmarks.bench_<name>``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from mkfast.errors import UsageError

# Quick runs write here, so that the committed results under benchmarks/results stay measured ones.
QUICK_RESULTS_ROOT = os.path.join("demo_out", "benchmarks")
SUITE_PREFIX = "bench_"


def benchmark_suites() -> list[str]:
    """Names of the installed suites (``bench_<name>`` modules)."""
    import mkfast.benchmarks

    modules = pkgutil.iter_modules(mkfast.benchmarks.__path__)
    names = [module.name for module in modules]
    return sorted(name[len(SUITE_PREFIX):] for name in names if name.startswith(SUITE_PREFIX))


def run_benchmarks(suites: list[str], quick: bool, output_root: str | None = None) -> None:
    """Run ``suites`` (all when empty), every name checked before the first one starts."""
    available = benchmark_suites()
    unknown = [suite for suite in suites if suite not in available]
    if unknown:
        raise UsageError(f"bench: unknown suite {unknown[0]!r}; have {available}")
    for suite in suites or available:
        print(f"== benchmark {suite}", flush=True)
        module = importlib.import_module(f"mkfast.benchmarks.{SUITE_PREFIX}{suite}")
        module.main(quick=quick, output_root=output_root or (QUICK_RESULTS_ROOT if quick else None))


def compare(results_a: str, results_b: str) -> str:
    """Two result folders side by side (benchmarks.common.compare)."""
    from mkfast.benchmarks.common import compare as compare_results

    return compare_results(results_a, results_b)
