"""The two losses MKS2 adds on top of next-token cross-entropy."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# CLIP's initial temperature 0.07 and its cap on 1/tau (100), so the learnable
# temperature cannot collapse the softmax to one-hot early in training.
INITIAL_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = math.log(100.0)


def text_to_image_infonce(text_features: torch.Tensor, image_features: torch.Tensor,
                          logit_scale: torch.Tensor) -> torch.Tensor:
    """Text-to-image InfoNCE with in-batch negatives (docs/methods.md, eq. M4).

    text_features: (N, D) projected hidden states of each caption's last token;
    image_features: (N, D) the matching images' global features; logit_scale: () = log(1 / tau).
    L_t2i = -(1/N) sum_i log( exp(sim(D_i, I_i)/tau) / sum_j exp(sim(D_i, I_j)/tau) ), sim = cosine.
    """
    if text_features.shape != image_features.shape or text_features.dim() != 2:
        raise ValueError(f"text_to_image_infonce: text_features {tuple(text_features.shape)} and "
                         f"image_features {tuple(image_features.shape)} must both be (N, D)")
    similarity = F.normalize(text_features.float(), dim=-1) @ F.normalize(image_features.float(), dim=-1).T
    inverse_temperature = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
    targets = torch.arange(similarity.shape[0], device=similarity.device)
    return F.cross_entropy(similarity * inverse_temperature, targets)


def next_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t predicting labels[t + 1]; labels IGNORE_INDEX are skipped.

    logits: (B, S, V); labels: (B, S) int64 aligned with the inputs (not shifted).
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def sequence_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label tokens) per sequence. logits: (B, S, V); labels: (B, S) -> (B,) fp32."""
    log_probabilities = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = log_probabilities.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=-1)
