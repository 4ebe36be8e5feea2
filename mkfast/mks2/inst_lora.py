"""INST-LoRA, the MKS2 paper's baseline: LoRA (rank 16) on the plain LLM, no visual memory.

Each target ``nn.Linear`` W0 of every decoder layer becomes W0 x + (alpha / r) B A x with A
initialised as PEFT does (Kaiming-uniform, a = sqrt(5)) and B at zero, so the wrapped model's
logits equal the plain model's until training moves B. Only A and B train.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mkfast.mks2.patching import decoder_layers, seeded

INST_LORA_RANK, INST_LORA_ALPHA = 16, 32
# Every projection of a Llama block: the baseline gets LoRA wherever a weight is, attention included.
TARGET_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LoRALinear(nn.Module):
    """base(x) + scaling * x A^T B^T; base frozen, A: (r, in), B: (out, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRALinear: rank must be positive, got {rank}")
        self.base = base.requires_grad_(False)
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.base(inputs) + F.linear(F.linear(inputs, self.lora_A), self.lora_B) * self.scaling


def apply_inst_lora(language_model: nn.Module, rank: int = INST_LORA_RANK, alpha: float = INST_LORA_ALPHA,
                    targets: tuple[str, ...] = TARGET_MODULES, seed: int = 0) -> nn.Module:
    """Freeze ``language_model`` and wrap each of ``targets`` in every decoder layer with LoRA, in place."""
    language_model.requires_grad_(False)
    with seeded(seed):
        for layer in decoder_layers(language_model):
            for target in targets:
                parent_name, _, name = target.rpartition(".")
                parent = layer.get_submodule(parent_name)
                base = getattr(parent, name)
                if not isinstance(base, nn.Linear):
                    raise ValueError(f"apply_inst_lora: {target} must be an nn.Linear, got "
                                     f"{type(base).__name__}")
                setattr(parent, name, LoRALinear(base, rank, alpha))
    return language_model
