"""Tiny random transformers causal LMs of the architectures mkfast's drop-in supports (tests only)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def tiny_causal_lm(architecture: str, sizes: dict, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random ``architecture`` model of ``sizes`` (config fields) on SDPA, in ``dtype``, eval mode."""
    config_class, model_class = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    return model_class(config_class(**sizes, attn_implementation="sdpa")).to(dtype).eval()
