"""The two MKS2 stages as loss functions over in-memory data, for the Trainer.

Stage 1 (docs/methods.md, eq. M3): L_c + L_t2i on image-caption pairs,
only the MVMs + projection + InfoNCE head train. Stage 2 ("MoMEs"): response-only
cross-entropy on text-only and image-text instructions, only LoRA + router train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mkfast.mks2.model import MKS2Model
from mkfast.mks2.patching import MOMES, enable_momes, patch_state, seeded
from mkfast.mks2.samples import caption_sample, instruction_sample
from mkfast.mks2.vision import ImageFeatures


@dataclass
class CaptionData:
    """images: (N, 3, H, W) or their precomputed ImageFeatures; captions: N strings."""

    images: torch.Tensor | ImageFeatures
    captions: list[str]


@dataclass
class InstructionData:
    """prompts/responses: N strings ("[INST] ... [/INST]", answer).

    image_indices[i] indexes images, or is None for a text-only instruction.
    """

    prompts: list[str]
    responses: list[str]
    image_indices: list[int | None]
    images: torch.Tensor | ImageFeatures | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def text_only(self) -> InstructionData:
        keep = [index for index, image in enumerate(self.image_indices) if image is None]
        return InstructionData([self.prompts[i] for i in keep], [self.responses[i] for i in keep],
                               [None] * len(keep), None)


def stage1_loss_fn(model: MKS2Model, tokenizer, data: CaptionData, batch_size: int):
    """Draws ``batch_size`` pairs (in-batch negatives for L_t2i) and returns model.stage1_losses."""
    def loss_fn(generator: torch.Generator) -> dict:
        indices = torch.randint(len(data.captions), (batch_size,), generator=generator)
        samples = [caption_sample(tokenizer, data.captions[index]) for index in indices.tolist()]
        return model.stage1_losses(samples, data.images[indices])
    return loss_fn


def instruction_batch(tokenizer, data: InstructionData, indices: list[int]):
    """TokenSamples for ``indices`` and the (M, 3, H, W) images they use (None when text only)."""
    image_rows, samples = [], []
    for index in indices:
        image_index = data.image_indices[index]
        local = None
        if image_index is not None:
            local = len(image_rows)
            image_rows.append(image_index)
        samples.append(instruction_sample(tokenizer, data.prompts[index], data.responses[index], local))
    images = data.images[torch.tensor(image_rows)] if image_rows else None
    return samples, images


def stage2_loss_fn(model: MKS2Model, tokenizer, data: InstructionData, batch_size: int):
    def loss_fn(generator: torch.Generator) -> dict:
        indices = torch.randint(len(data), (batch_size,), generator=generator).tolist()
        samples, images = instruction_batch(tokenizer, data, indices)
        return model.stage2_losses(samples, images)
    return loss_fn


def prepare_stage2(model: MKS2Model, rank: int = 8, alpha: float = 16, seed: int = 0) -> MKS2Model:
    """Enable MoMEs (if not already; LoRA A initialised from ``seed``); only LoRA + router stay trainable."""
    if patch_state(model.language_model) != MOMES:
        with seeded(seed):
            enable_momes(model.language_model, rank=rank, alpha=alpha)
    model.freeze_outside_language_model()
    return model
