"""Test-wide setup: Triton interpreter on CPU-only machines, the `cuda` marker, and on GPU
machines a skip for the Triton cases that only the interpreter can run (CPU tensors)."""

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # A test's CPU case of a Triton backend runs under the interpreter; where the interpreter
    # is off (a GPU machine: its kernels run compiled, in the test's CUDA cases) the op refuses
    # CPU tensors with BackendUnavailableError, and that case is skipped rather than failed.
    from mkfast.backend import BackendUnavailableError, triton_interpreter_enabled

    try:
        return (yield)
    except Exception as error:
        cause = error  # opcheck and autograd wrap the op's error: look along the chain
        while cause is not None and not isinstance(cause, BackendUnavailableError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or triton_interpreter_enabled() or "TRITON_INTERPRET=1" not in str(cause):
            raise
        pytest.skip(f"Triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1): {cause}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
