"""The CM3 generator: a Llama-architecture decoder from a config (RA-CM3 "Generator").

RA-CM3 trains a 2.7B CM3 decoder from scratch; here any size is a
``GeneratorConfig`` away. The attention implementation is chosen in one place,
:func:`attention_implementation`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GeneratorConfig:
    """Defaults: the demo's small model (about 1M parameters without embeddings)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 344  # ~8/3 * hidden, Llama's SwiGLU ratio
    max_sequence_length: int = 4096  # RA-CM3: 4096 tokens hold up to 3 documents
    rope_theta: float = 10000.0
    attention_implementation: str = "auto"
    # One matrix embeds and un-embeds each token: a head that copies a token from a retrieved document
    # then works for any token, also one never copied in training.
    tie_word_embeddings: bool = False


def _mkfast_attention_registered() -> bool:
    """Register ``attn_implementation="mkfast"`` (mkfast.layers.attention); False where it cannot be."""
    try:
        from mkfast.layers.attention import register_transformers_attention
    except ImportError:
        return False
    return register_transformers_attention()


def attention_implementation(requested: str = "auto", device: torch.device | str = "cpu") -> str:
    """``"mkfast"`` on CUDA when registered; ``"sdpa"`` otherwise.

    On CPU the mkfast op runs ATen's CPU flash attention, the kernel SDPA itself runs
    there, so going through the custom op costs a dispatch and buys nothing.
    """
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda" and _mkfast_attention_registered():
        return "mkfast"
    return "sdpa"


def build_generator(vocabulary_size: int, config: GeneratorConfig | None = None, pad_token_id: int = 0,
                    device: torch.device | str = "cpu"):
    """A randomly initialised ``LlamaForCausalLM`` over the CM3 vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or GeneratorConfig()
    llama_config = LlamaConfig(
        vocab_size=vocabulary_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_sequence_length,
        rope_theta=config.rope_theta,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    llama_config._attn_implementation = attention_implementation(config.attention_implementation, device)
    return LlamaForCausalLM(llama_config).to(device)
