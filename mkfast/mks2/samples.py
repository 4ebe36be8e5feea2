"""Text -> TokenSample: captions (stage 1), instructions (stage 2) and multiple-choice candidates."""

from __future__ import annotations

from mkfast.mks2.model import TokenSample


def _words(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def caption_sample(tokenizer, caption: str, image_index: int | None = None) -> TokenSample:
    """"<s> caption </s>": the caption and </s> are targets (L_c), </s> is the InfoNCE read-out token."""
    ids = _words(tokenizer, caption) + [tokenizer.eos_token_id]
    return TokenSample([tokenizer.bos_token_id] + ids, [False] + [True] * len(ids), image_index)


def instruction_sample(tokenizer, prompt: str, response: str, image_index: int | None = None) -> TokenSample:
    """"<s> [INST] prompt [/INST] response </s>": loss on the response and </s> only.

    docs/methods.md, MKS2 stage 2 (instruction tuning).
    """
    prompt_ids = [tokenizer.bos_token_id] + _words(tokenizer, prompt)
    response_ids = _words(tokenizer, response) + [tokenizer.eos_token_id]
    return TokenSample(prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids),
                       image_index)


def prompt_sample(tokenizer, prompt: str, image_index: int | None = None) -> TokenSample:
    """The prompt alone, for generation."""
    ids = [tokenizer.bos_token_id] + _words(tokenizer, prompt)
    return TokenSample(ids, [False] * len(ids), image_index)


def continuation_sample(tokenizer, context: str, continuation: str) -> TokenSample:
    """Context then continuation; only the continuation is scored (multiple-choice log-likelihood).

    The two are tokenized apart and joined, as lm-evaluation-harness does, so the
    continuation's tokens are the same whatever the context."""
    context_ids = [tokenizer.bos_token_id] + _words(tokenizer, context)
    continuation_ids = _words(tokenizer, continuation)
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
    return TokenSample(context_ids + continuation_ids,
                       [False] * len(context_ids) + [True] * len(continuation_ids))
