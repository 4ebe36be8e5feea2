"""VisualMemory: MKS2's Modular Visual Memory (MVM), a small FFN inside every block.

MKS2 (docs/methods.md, eq. M2): ``h_F = h_s + MVM(Norm(h_s))`` with a
two-layer feed-forward network of inner size hidden/4. This module is
``MVM(Norm(x))`` without the residual: the caller (the patched block) adds it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mkfast.ops.mome import RMS_NORM_EPS

# The paper names no activation; SiLU is the one of the Llama MLP the memory
# sits next to, and lets the fused MoME kernel share one epilogue for both experts.
ACTIVATION = "silu"
# Pass the host model's own epsilon; the default is Llama-2's.
DEFAULT_EPS = RMS_NORM_EPS


def _check_size(module: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{module}: {name} must be a positive int, got {value!r}")


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: statistics in fp32, weight applied in the input's dtype.

    Same attribute names as transformers' LlamaRMSNorm (``weight``, ``variance_epsilon``).
    """

    def __init__(self, hidden_size: int, eps: float = DEFAULT_EPS, *, device=None, dtype=None):
        super().__init__()
        _check_size("RMSNorm", "hidden_size", hidden_size)
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (..., d) -> (..., d) in the input's dtype."""
        if hidden_states.shape[-1:] != self.weight.shape:
            raise ValueError(f"RMSNorm: hidden_states must be (..., {self.weight.shape[0]}) like its weight, "
                             f"got shape {tuple(hidden_states.shape)}")
        if not hidden_states.is_floating_point():  # the output is cast back to it: integers would truncate
            raise TypeError(f"RMSNorm: hidden_states must be floating point, got {hidden_states.dtype}")
        input_dtype = hidden_states.dtype
        hidden_fp32 = hidden_states.float()
        variance = hidden_fp32.pow(2).mean(-1, keepdim=True)
        normalized = hidden_fp32 * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * normalized.to(input_dtype)


class VisualMemory(nn.Module):
    """MVM(norm(x)): RMSNorm -> fc1 (d -> d*ratio) -> SiLU -> fc2 (-> d), no biases, no residual.

    fc2 starts at zero, so a freshly inserted memory leaves the model unchanged.
    Input (B, T, d) or (N, d), any float dtype matching the parameters. Pass the host
    model's ``device`` and ``dtype`` (like ``nn.Linear``); :class:`MoMEFFN` also moves a
    memory to its MLP's.
    """

    def __init__(self, hidden_size: int, ratio: float = 0.25, eps: float = DEFAULT_EPS, *, device=None,
                 dtype=None):
        super().__init__()
        _check_size("VisualMemory", "hidden_size", hidden_size)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio < math.inf):
            raise ValueError(f"VisualMemory: ratio must be a positive finite number, got {ratio!r}")
        self.hidden_size = hidden_size
        self.inner_size = max(1, int(round(hidden_size * ratio)))
        factory = dict(device=device, dtype=dtype)
        self.norm = RMSNorm(hidden_size, eps, **factory)
        self.fc1 = nn.Linear(hidden_size, self.inner_size, bias=False, **factory)
        self.fc2 = nn.Linear(self.inner_size, hidden_size, bias=False, **factory)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: (..., d) -> MVM(norm(hidden_states)): (..., d)."""
        return self.fc2(F.silu(self.fc1(self.norm(hidden_states))))

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, inner_size={self.inner_size}, activation={ACTIVATION}"
