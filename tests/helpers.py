"""The one place tests get tolerances, devices and opcheck from."""

from __future__ import annotations

import pytest
import torch

# Per-dtype tolerances for a fused kernel against the fp32-accumulating eager
# reference run on the same inputs. fp16 has 10 mantissa bits, bf16 has 7.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> dict[str, float]:
    """atol/rtol for ``dtype``; ``scale`` widens both for long reductions (say why)."""
    base = TOLERANCES[dtype]
    return {"atol": base["atol"] * scale, "rtol": base["rtol"] * scale}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, message: str = "") -> None:
    """Compare in fp32 with the tolerance of ``dtype`` (default: ``expected.dtype``)."""
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), **tolerance(dtype, scale),
                               msg=(lambda default: f"{message}\n{default}") if message else None)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def devices_to_test() -> list:
    """Devices to run a test on: CPU (Triton under the interpreter, so left out of GPU machines' runs
    by conftest), CUDA when present."""
    devices = [pytest.param("cpu", marks=pytest.mark.interpreter)]
    if cuda_available():
        devices.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return devices


def interpreter_dtypes() -> list[torch.dtype]:
    """Dtypes a Triton test runs with: no bf16 arithmetic in the CPU interpreter."""
    dtypes = [torch.float32, torch.float16]
    if cuda_available():
        dtypes.append(torch.bfloat16)
    return dtypes


def run_opcheck(op, args: tuple, kwargs: dict | None = None) -> None:
    """torch.library.opcheck with every check, failing the test on any failure."""
    results = torch.library.opcheck(op, args, kwargs or {})
    failures = {name: result for name, result in results.items() if result != "SUCCESS"}
    assert not failures, f"opcheck failed: {failures}"
