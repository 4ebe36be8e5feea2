"""Zero-shot multiple choice by log-likelihood (acc, acc_norm as lm-evaluation-harness defines them) and
generation."""

from __future__ import annotations

import torch

from mkfast.mks2.model import MKS2Model
from mkfast.mks2.samples import continuation_sample, prompt_sample

# lm-evaluation-harness joins context and choice with one space (its target_delimiter).
TARGET_DELIMITER = " "


@torch.no_grad()
def choice_log_likelihoods(model: MKS2Model, tokenizer, question: str, choices: list[str]) -> torch.Tensor:
    """(C,) summed log p(delimiter + choice | question) for each choice, one batched forward."""
    samples = [continuation_sample(tokenizer, question, TARGET_DELIMITER + choice) for choice in choices]
    return model.log_likelihoods(samples).cpu()


def score_item(log_likelihoods: torch.Tensor, choices: list[str], answer: int) -> dict[str, float]:
    """acc: argmax of the log-likelihoods; acc_norm: argmax of log-likelihood / len(choice) in characters
    (lm-evaluation-harness's length normalisation)."""
    lengths = torch.tensor([float(len(choice)) for choice in choices])
    return {"acc": float(int(log_likelihoods.argmax()) == answer),
            "acc_norm": float(int((log_likelihoods / lengths).argmax()) == answer)}


@torch.no_grad()
def evaluate_multiple_choice(model: MKS2Model, tokenizer, items: list[dict]) -> dict[str, float]:
    """Mean acc and acc_norm over {question, choices, answer} items."""
    if not items:
        raise ValueError("evaluate_multiple_choice: no items")
    was_training = model.training
    model.eval()
    totals = {"acc": 0.0, "acc_norm": 0.0}
    for item in items:
        scores = score_item(choice_log_likelihoods(model, tokenizer, item["question"], item["choices"]),
                            item["choices"], item["answer"])
        for key in totals:
            totals[key] += scores[key]
    model.train(was_training)
    return {key: value / len(items) for key, value in totals.items()} | {"items": len(items)}


@torch.no_grad()
def generate_text(model: MKS2Model, tokenizer, prompts: list[str], images: torch.Tensor | None = None,
                  num_beams: int = 1, max_new_tokens: int = 8) -> list[str]:
    """Greedy (num_beams=1, text tasks) or beam search (num_beams=4, VQA) answers; images[i] goes with
    prompts[i]."""
    samples = [prompt_sample(tokenizer, prompt, index if images is not None else None)
               for index, prompt in enumerate(prompts)]
    new_tokens = model.generate(samples, images, max_new_tokens=max_new_tokens, num_beams=num_beams)
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
