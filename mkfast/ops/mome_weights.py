"""The weights and saved tensors of one MoME layer (docs/methods.md, eqs. M5-M7), and its RMSNorm.

Shared by the op (mkfast/ops/mome.py) and its fused backends (mkfast/ops/mome_fused.py), so that
neither imports the other's module at load time.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

# Llama-2's RMSNorm epsilon (rms_norm_eps in its Hugging Face config): the default wherever a host
# model does not give its own (the MoME norms, the visual memory's norm, MKS2's patching).
RMS_NORM_EPS = 1e-5
NUM_EXPERTS = 2  # router column 0: visual expert (S_1), column 1: text expert (S_2), as in MKS2
VISUAL, TEXT = 0, 1


def _frozen():
    return dataclasses.field(metadata={"frozen": True})


@dataclasses.dataclass(frozen=True)
class MoMEWeights:
    """Every weight of one MoME layer. Shapes with d = hidden, I = MLP width, Iv = MVM width, r = rank.

    Frozen: the two RMSNorm weights (d,), gate/up (I, d), down (d, I), fc1 (Iv, d), fc2 (d, Iv).
    Trainable: <projection>_lora_A (r, in_features), <projection>_lora_B (out_features, r),
    router_weight (2, d) and router_bias (2,) (row 0 weighs the visual expert, 1 the text one).
    lora_scale is PEFT's alpha / r; the epsilons default to Llama-2's 1e-5.
    """

    text_norm_weight: torch.Tensor = _frozen()
    gate_weight: torch.Tensor = _frozen()
    up_weight: torch.Tensor = _frozen()
    down_weight: torch.Tensor = _frozen()
    visual_norm_weight: torch.Tensor = _frozen()
    fc1_weight: torch.Tensor = _frozen()
    fc2_weight: torch.Tensor = _frozen()
    gate_lora_A: torch.Tensor
    gate_lora_B: torch.Tensor
    up_lora_A: torch.Tensor
    up_lora_B: torch.Tensor
    down_lora_A: torch.Tensor
    down_lora_B: torch.Tensor
    fc1_lora_A: torch.Tensor
    fc1_lora_B: torch.Tensor
    fc2_lora_A: torch.Tensor
    fc2_lora_B: torch.Tensor
    router_weight: torch.Tensor
    router_bias: torch.Tensor
    lora_scale: float
    text_norm_eps: float = RMS_NORM_EPS
    visual_norm_eps: float = RMS_NORM_EPS

    def frozen(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in FROZEN_NAMES]

    def trainable(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in TRAINABLE_NAMES]

    def floats(self) -> tuple[float, float, float]:
        return float(self.lora_scale), float(self.text_norm_eps), float(self.visual_norm_eps)

    @classmethod
    def from_flat(cls, frozen, trainable, floats) -> MoMEWeights:
        """The inverse of (frozen(), trainable(), floats()): what the custom op receives."""
        lora_scale, text_norm_eps, visual_norm_eps = floats
        tensors = dict(zip((*FROZEN_NAMES, *TRAINABLE_NAMES), [*frozen, *trainable], strict=True))
        return cls(**tensors, lora_scale=lora_scale, text_norm_eps=text_norm_eps,
                   visual_norm_eps=visual_norm_eps)


_TENSOR_FIELDS = [field for field in dataclasses.fields(MoMEWeights) if field.type == "torch.Tensor"]
FROZEN_NAMES = tuple(field.name for field in _TENSOR_FIELDS if field.metadata.get("frozen"))
TRAINABLE_NAMES = tuple(field.name for field in _TENSOR_FIELDS if not field.metadata.get("frozen"))


class MoMEResiduals(NamedTuple):
    """What the fused backends (cpu, triton) save in forward for their analytic backward.

    Wide (M, width) in x's dtype: the pre-activations gate_pre, up_pre (I) and visual_pre (Iv),
    from which backward recomputes the activations. Rank-r in x's dtype: text_lowrank (M, 2r) =
    [x_t A_gate^T, x_t A_up^T], visual_lowrank (M, r) = x_v A_fc1^T, and the second layers'
    LoRA-A outputs of the router-weighted activations, down_lowrank = (S_2 a_t) A_down^T and
    fc2_lowrank = (S_1 a_v) A_fc2^T (M, r). fp32: router_probs (M, 2) and rstd (M, 2), 1/rms
    of x for the text (column 0) and visual (column 1) norm.
    """

    gate_pre: torch.Tensor
    up_pre: torch.Tensor
    visual_pre: torch.Tensor
    text_lowrank: torch.Tensor
    visual_lowrank: torch.Tensor
    down_lowrank: torch.Tensor
    fc2_lowrank: torch.Tensor
    router_probs: torch.Tensor
    rstd: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama RMSNorm: statistics in fp32, weight applied in x's dtype. x: (M, d) -> (M, d), rstd (M,)."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd.squeeze(-1)
