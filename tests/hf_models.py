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


def assert_greedy_equal_up_to_near_ties(reference, prompt: torch.Tensor, generated: torch.Tensor,
                                        expected: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                        margin: float = 1e-3) -> None:
    """Greedy continuations equal up to each row's first difference, which must be a near-tie of
    ``reference``'s logits (top-2 gap <= ``margin``): fp32 kernels and SDPA sum in other orders."""
    mask = torch.ones_like(expected) if attention_mask is None else torch.cat(
        [attention_mask, torch.ones_like(expected[:, prompt.shape[1]:])], dim=1)
    with torch.no_grad():
        logits = reference(expected, attention_mask=mask, use_cache=False).logits[:, prompt.shape[1] - 1:-1]
    top2 = logits.float().topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > margin
    new_tokens = slice(prompt.shape[1], None)
    same_so_far = (generated[:, new_tokens] != expected[:, new_tokens]).float().cumsum(dim=1) == 0
    diverged_at = (~same_so_far).float().argmax(dim=1)
    for row in range(expected.shape[0]):
        if not bool(same_so_far[row].all()):
            assert not bool(decisive[row, diverged_at[row]]), (row, int(diverged_at[row]))
