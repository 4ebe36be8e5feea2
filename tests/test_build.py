"""The extension mkfast._C: built, registered as torch.ops.mkfast, CUDA sources compiled."""

import glob
import os
import shutil

import pytest
import torch

import mkfast
from mkfast import _extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_registers_torch_ops():
    assert _extension.missing_reason() is None
    assert _extension.built_parts()["cpu"]
    assert hasattr(torch.ops.mkfast, "topk_dedup_native")


@pytest.mark.skipif(
    torch.version.cuda is None or shutil.which("nvcc") is None or os.environ.get("MKFAST_BUILD_CUDA") == "0",
    reason="needs nvcc and a CUDA build of torch",
)
def test_cuda_sources_were_compiled_when_a_toolkit_is_present():
    # A CUDA syntax error must not land unseen: where nvcc exists the normal
    # install compiles csrc/cuda/*.cu, and this fails if it silently did not.
    assert _extension.built_parts()["cuda"]
    cuda_sources = glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu"))
    for source in cuda_sources:
        op = os.path.splitext(os.path.basename(source))[0].removesuffix("_cuda")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mkfast::{op}_native", "CUDA"), source


def test_ops_are_reachable_from_the_package():
    assert callable(mkfast.ops.topk_dedup)
