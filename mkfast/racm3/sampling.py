"""The RA-CM3 generation engine: KV-cache sampling, the image-code constraint, classifier-free guidance.

RA-CM3 "Inference" samples images and captions from the CM3 generator. Here:

- :class:`DecodingStream` feeds tokens to a causal LM, keeping transformers'
  ``DynamicCache`` between calls (``model(..., past_key_values=cache, use_cache=True)``),
  so a step costs one new token per row; with ``use_cache=False`` it re-runs
  the whole prefix every step (the baseline of benchmarks/bench_generation.py).
  On CUDA with ``attn_implementation="mkfast"`` the decode steps go through
  ``mkfast.ops.decode_attention`` (routing in mkfast/layers/attention.py).
- :func:`sample_next`: temperature, top-k and top-p (nucleus) sampling from one
  ``torch.Generator``, so a fixed seed gives the same samples.
- :class:`ImageCodeConstraint`: after the image-source special (`` src=``) a
  row may only emit image codes until it has emitted exactly the grid's number
  (``codes_per_image``), then only the closing ``>``; outside an image, image
  codes are forbidden. Every sampled image is therefore a decodable grid.
- Classifier-free guidance (beyond the paper; users of mixed-modal generators
  expect it): a conditioned and an unconditioned stream share the sampled
  tokens and their logits are mixed, ``uncond + scale * (cond - uncond)``.

Shapes: prompt_ids (B, T) int64 (every row the same length: one prompt
repeated over the samples, or prompts of equal length); logits (B, V).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from mkfast.racm3.vocabulary import IMAGE_CLOSE, IMAGE_SOURCE, CM3Vocabulary


@dataclass
class SamplingOptions:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingOptions: temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingOptions: top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingOptions: top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) -> (B, V) with tokens outside the top-k / the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability
    reaches top_p (the token that crosses it is kept, as in Holtzman et al. 2020).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probabilities = torch.softmax(sorted_logits.float(), dim=-1)
        # Probability mass strictly before each token: a token is dropped once the
        # mass before it already reaches top_p (so the most likely one always stays).
        mass_before = probabilities.cumsum(dim=-1) - probabilities
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None = None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) int64 token ids; ``allowed`` (B, V) or (V,) bool restricts the choice."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if options.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / options.temperature, options.top_k, options.top_p)
    probabilities = torch.softmax(logits, dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def guided_logits(conditioned: torch.Tensor, unconditioned: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond).

    Written as cond + (scale - 1) * (cond - uncond), the same value, so that
    scale 1 returns the conditioned logits bit for bit.
    """
    if scale == 1.0:
        return conditioned
    return conditioned + (scale - 1.0) * (conditioned - unconditioned)


def cache_keyword(model) -> str:
    """The name a transformers model's forward takes its KV cache under.

    transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns, and is
    removed in 5.40); older releases know only ``past_key_values``. Outputs use the same name.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class DecodingStream:
    """A batch of sequences fed to a causal LM step by step; ``logits`` are those of the last position.

    prompt_ids: (B, T). use_cache: keep a transformers DynamicCache (one new
    token per row per step) or re-run the whole prefix every step.
    """

    def __init__(self, model, prompt_ids: torch.Tensor, use_cache: bool = True):
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
            raise ValueError("DecodingStream: prompt_ids must be (B, T) with T >= 1, "
                             f"got {tuple(prompt_ids.shape)}")
        self.model, self.use_cache = model, use_cache
        self.device = next(model.parameters()).device
        self.token_ids = prompt_ids.to(self.device)
        self.cache = None
        if use_cache:
            from transformers import DynamicCache

            self.cache = DynamicCache()
            self.cache_keyword = cache_keyword(model)
        self.logits = self._run(self.token_ids)

    @torch.no_grad()
    def _run(self, new_ids: torch.Tensor) -> torch.Tensor:
        if self.use_cache:
            output = self.model(input_ids=new_ids, use_cache=True, logits_to_keep=1,
                                **{self.cache_keyword: self.cache})
            self.cache = output[self.cache_keyword]
        else:
            output = self.model(input_ids=self.token_ids, use_cache=False, logits_to_keep=1)
        return output.logits[:, -1].float()

    def append(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) or (B, t) -> new last-position logits (B, V)."""
        tokens = tokens.to(self.device).reshape(self.token_ids.shape[0], -1)
        self.token_ids = torch.cat([self.token_ids, tokens], dim=1)
        self.logits = self._run(tokens)
        return self.logits


class ImageCodeConstraint:
    """Per row: inside an image exactly ``codes_per_image`` image codes, then ``>``; no image codes outside.

    State per row: codes still owed (-1 outside an image, 0 = only ``>`` allowed next).
    """

    def __init__(self, vocabulary: CM3Vocabulary, codes_per_image: int):
        if codes_per_image < 1:
            raise ValueError(f"ImageCodeConstraint: codes_per_image must be >= 1, got {codes_per_image}")
        self.vocabulary, self.codes_per_image = vocabulary, codes_per_image
        self.source_id = vocabulary.special_ids[IMAGE_SOURCE]
        self.close_id = vocabulary.special_ids[IMAGE_CLOSE]
        self.remaining: torch.Tensor | None = None

    def start(self, prompt_ids: torch.Tensor) -> None:
        """Read the prompt (B, T): a row whose prompt leaves an image open owes the rest of its codes."""
        remaining = torch.full((prompt_ids.shape[0],), -1, dtype=torch.int64)
        for row, ids in enumerate(prompt_ids.tolist()):
            for token in ids:
                self._advance_row(remaining, row, token)
        self.remaining = remaining

    def _advance_row(self, remaining: torch.Tensor, row: int, token: int) -> None:
        if token == self.source_id:
            remaining[row] = self.codes_per_image
        elif remaining[row] > 0 and token >= self.vocabulary.image_offset:
            remaining[row] -= 1
        elif remaining[row] == 0 and token == self.close_id:
            remaining[row] = -1

    def allowed(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, V) bool: what each row may emit next."""
        vocabulary_size = len(self.vocabulary)
        is_image = torch.arange(vocabulary_size, device=device) >= self.vocabulary.image_offset
        only_close = torch.zeros(vocabulary_size, dtype=torch.bool, device=device)
        only_close[self.close_id] = True
        owed = self.remaining.to(device).unsqueeze(1)
        return torch.where(owed > 0, is_image, torch.where(owed == 0, only_close, ~is_image))

    def update(self, tokens: torch.Tensor) -> None:
        """tokens (B,): the tokens just emitted (vectorised :meth:`_advance_row`)."""
        tokens = tokens.to(self.remaining.device)
        remaining = self.remaining
        is_code = tokens >= self.vocabulary.image_offset
        remaining = torch.where((remaining > 0) & is_code, remaining - 1, remaining)
        remaining = torch.where((self.remaining == 0) & (tokens == self.close_id), -1, remaining)
        self.remaining = torch.where(tokens == self.source_id, self.codes_per_image, remaining)


def _make_generator(seed: int | None, generator: torch.Generator | None, device: torch.device):
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(0 if seed is None else seed)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, options: SamplingOptions | None = None,
             *, seed: int | None = None, generator: torch.Generator | None = None,
             constraint: ImageCodeConstraint | None = None, allowed: torch.Tensor | None = None,
             unconditional_prompt_ids: torch.Tensor | None = None, guidance_scale: float = 1.0,
             stop_token_id: int | None = None, pad_token_id: int = 0, min_new_tokens: int = 0,
             use_cache: bool = True) -> torch.Tensor:
    """Sample up to ``max_new_tokens`` per row after ``prompt_ids`` (B, T) -> (B, max_new_tokens) int64.

    allowed: (V,) bool, tokens a row may ever emit (combined with the constraint).
    unconditional_prompt_ids: (B, T') the unconditioned stream for classifier-free
    guidance (scale ``guidance_scale``); it receives the same sampled tokens.
    A row that emits ``stop_token_id`` is finished: later positions hold ``pad_token_id``;
    the stop token cannot be sampled before ``min_new_tokens`` (no empty captions).
    Randomness: ``generator`` or a new one seeded with ``seed`` (default 0) on the model's device.
    """
    options = options or SamplingOptions()
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    conditioned = DecodingStream(model, prompt_ids, use_cache)
    device = conditioned.device
    generator = _make_generator(seed, generator, device)
    unconditioned = None
    if unconditional_prompt_ids is not None:
        if unconditional_prompt_ids.shape[0] != prompt_ids.shape[0]:
            raise ValueError(f"generate: unconditional_prompt_ids must have {prompt_ids.shape[0]} rows, "
                             f"got {unconditional_prompt_ids.shape[0]}")
        unconditioned = DecodingStream(model, unconditional_prompt_ids, use_cache)
    if constraint is not None:
        constraint.start(prompt_ids.cpu())
    batch = prompt_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    outputs = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.int64, device=device)
    for step in range(max_new_tokens):
        logits = conditioned.logits
        if unconditioned is not None:
            logits = guided_logits(logits, unconditioned.logits, guidance_scale)
        mask = None if allowed is None else allowed.to(device).expand(batch, -1)
        if constraint is not None:
            rule = constraint.allowed(device)
            mask = rule if mask is None else mask & rule
        if stop_token_id is not None and step < min_new_tokens:
            mask = (torch.ones(batch, logits.shape[-1], dtype=torch.bool, device=device) if mask is None
                    else mask.clone())
            mask[:, stop_token_id] = False
        tokens = sample_next(logits, options, generator, mask)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        outputs[:, step] = tokens
        if stop_token_id is not None:
            finished |= tokens == stop_token_id
        if constraint is not None:
            constraint.update(tokens.cpu())
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        conditioned.append(tokens)
        if unconditioned is not None:
            unconditioned.append(tokens)
    return outputs
