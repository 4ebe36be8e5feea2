"""Test-wide setup: Triton interpreter on CPU-only machines, the `cuda` marker."""

import os

import torch

# Triton reads TRITON_INTERPRET when kernels are decorated, so set it before any
# test module imports mkfast.kernels. On a GPU machine the kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
