"""Building MKS2 from parts: a small Llama from config (tests, demo) or a local pretrained one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mkfast.errors import pretrained_source
from mkfast.mks2.model import MKS2Model
from mkfast.mks2.patching import add_visual_memory, seeded
from mkfast.mks2.vision import load_blip2_vision_adapter, small_vision_adapter


@dataclass
class SmallLlamaConfig:
    """A Llama small enough for CPU tests and the digits demo (same architecture as Llama-2)."""

    vocab_size: int = 64
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 128


def small_llama(config: SmallLlamaConfig, tokenizer=None, seed: int = 0):
    """A LlamaForCausalLM built from config, its special token ids taken from ``tokenizer`` when given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    special = {}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    llama_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                               intermediate_size=config.intermediate_size,
                               num_hidden_layers=config.num_hidden_layers,
                               num_attention_heads=config.num_attention_heads,
                               num_key_value_heads=config.num_key_value_heads,
                               max_position_embeddings=config.max_position_embeddings,
                               tie_word_embeddings=False, **special)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return LlamaForCausalLM(llama_config)
    finally:
        torch.random.set_rng_state(state)


def load_llama(path: str, dtype: torch.dtype = torch.bfloat16):
    """A LlamaForCausalLM-like model and its tokenizer from a local directory, or from the hub when
    ``path`` is written ``"hf:<org>/<name>"``; a local path that does not exist is a UsageError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, local_only = pretrained_source(path, "load_llama: path")
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama-2 ships no pad token
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def build_mks2(language_model, vision_path: str | None = None, image_size: int = 32,
               visual_memory_ratio: float = 0.25, seed: int = 0) -> MKS2Model:
    """Patch ``language_model`` with visual memory and attach a vision adapter (BLIP-2 from ``vision_path``,
    else a small one built from config for ``image_size`` images). Stage-1 parameters trainable."""
    hidden_size = language_model.config.hidden_size
    if vision_path:
        vision = load_blip2_vision_adapter(vision_path, hidden_size, dtype=language_model.dtype)
    else:
        vision = small_vision_adapter(hidden_size, image_size=image_size, seed=seed)
    # The new modules' initialisation depends on ``seed`` only, not on what ran before.
    with seeded(seed):
        add_visual_memory(language_model, ratio=visual_memory_ratio)
        model = MKS2Model(language_model, vision.to(language_model.device))
    model.stage1_trainable()
    return model.to(device=language_model.device)
