"""Test-wide setup: Triton interpreter on CPU-only machines, the `cuda` marker, and on GPU
machines the Triton cases that only the interpreter can run (CPU tensors) left out."""

import os

import torch

# Triton reads TRITON_INTERPRET when kernels are decorated, so set it before any
# test module imports mkfast.kernels. On a GPU machine the kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pytest-benchmark's timing stays off in the test suite (benchmarks/ measures). Set here, not in
    # pyproject's addopts: where the plugin is missing, --benchmark-disable is an unknown option.
    if config.pluginmanager.hasplugin("benchmark"):
        config.option.benchmark_disable = True


def _needs_interpreter(item) -> bool:
    """A Triton case on CPU tensors: only the interpreter can run it."""
    if "interpreter" in item.keywords:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend") == "triton" and str(params.get("device", "cpu")) == "cpu"


def pytest_collection_modifyitems(config, items):
    from mkfast.backend import triton_interpreter_enabled

    if not torch.cuda.is_available():
        skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)
    if triton_interpreter_enabled():
        return
    # A GPU machine runs the kernels compiled, in the CUDA cases; the interpreter's CPU cases
    # are left out of the run there rather than started and turned into skips on an error,
    # which could hide a real dispatch bug.
    kept = [item for item in items if not _needs_interpreter(item)]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if _needs_interpreter(item)])
        items[:] = kept


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
