"""MKS2 = a patched Hugging Face Llama + the vision adapter + the stage-1 retrieval head.

Sequences are token lists that start with BOS; an image, when a sample has one,
enters as the block <img-start> [Q soft tokens] <img-end> right after BOS, so a
stage-1 caption reads "<s> <img> a handwritten digit seven </s>" and a stage-2
instruction "<s> <img> [INST] which digit is shown? [/INST] seven </s>".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mkfast.mks2.losses import (
    IGNORE_INDEX,
    INITIAL_TEMPERATURE,
    next_token_cross_entropy,
    sequence_log_likelihoods,
    text_to_image_infonce,
)
from mkfast.mks2.vision import VisionAdapter


@dataclass
class TokenSample:
    """One sequence: token_ids start with BOS; loss_mask[t] says token t is a target; image_index into
    images."""

    token_ids: list[int]
    loss_mask: list[bool]
    image_index: int | None = None


class MKS2Model(nn.Module):
    """language_model: a LlamaForCausalLM (patched with add_visual_memory / enable_momes);
    vision: VisionAdapter; text_to_image_head: (D_llm -> D_vision) linear; logit_scale = log(1/tau)."""

    def __init__(self, language_model: nn.Module, vision: VisionAdapter):
        super().__init__()
        self.language_model = language_model
        self.vision = vision
        hidden_size = language_model.config.hidden_size
        self.text_to_image_head = nn.Linear(hidden_size, vision.global_feature_size, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(-torch.log(torch.tensor(INITIAL_TEMPERATURE)).item()))

    @property
    def device(self) -> torch.device:
        return self.text_to_image_head.weight.device

    def assemble(self, samples: list[TokenSample], images: torch.Tensor | None = None,
                 padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token samples (+ images (M, 3, H, W) or their ImageFeatures, which they index) ->
        inputs_embeds (B, S, D), attention_mask (B, S), labels (B, S) with IGNORE_INDEX on
        non-targets, image positions and padding."""
        embedding = self.language_model.get_input_embeddings()
        device = embedding.weight.device
        image_blocks = None
        if images is not None and any(sample.image_index is not None for sample in samples):
            soft_tokens, _ = self.vision.encode(images)
            image_blocks = self.vision.image_block(soft_tokens.to(embedding.weight.dtype))
        pieces, label_rows = [], []
        for sample in samples:
            if not sample.token_ids or len(sample.loss_mask) != len(sample.token_ids):
                raise ValueError("MKS2Model: each sample needs token_ids (starting with BOS) "
                                 "and a loss_mask as long")
            ids = torch.tensor(sample.token_ids, device=device)
            labels = torch.where(torch.tensor(sample.loss_mask, device=device), ids, IGNORE_INDEX)
            token_embeds = embedding(ids)
            if sample.image_index is not None:
                if image_blocks is None:
                    raise ValueError("MKS2Model: a sample has an image_index but no images were given")
                block = image_blocks[sample.image_index]
                token_embeds = torch.cat([token_embeds[:1], block, token_embeds[1:]])
                labels = torch.cat([labels[:1], labels.new_full((block.shape[0],), IGNORE_INDEX), labels[1:]])
            pieces.append(token_embeds)
            label_rows.append(labels)
        length = max(piece.shape[0] for piece in pieces)
        batch, hidden = len(pieces), pieces[0].shape[-1]
        inputs_embeds = pieces[0].new_zeros(batch, length, hidden)
        attention_mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=device)
        for row, (piece, label_row) in enumerate(zip(pieces, label_rows, strict=True)):
            span = (slice(0, piece.shape[0]) if padding_side == "right"
                    else slice(length - piece.shape[0], length))
            inputs_embeds[row, span] = piece
            attention_mask[row, span] = 1
            labels[row, span] = label_row
        return inputs_embeds, attention_mask, labels

    def forward_logits(self, samples: list[TokenSample], images: torch.Tensor | None = None):
        inputs_embeds, attention_mask, labels = self.assemble(samples, images)
        output = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        return output.logits, labels

    def language_loss(self, samples: list[TokenSample], images: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy on the loss_mask tokens (stage-1 captions, stage-2 responses)."""
        logits, labels = self.forward_logits(samples, images)
        return next_token_cross_entropy(logits, labels)

    def log_likelihoods(self, samples: list[TokenSample], images: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) summed log-probability of each sample's loss_mask tokens."""
        logits, labels = self.forward_logits(samples, images)
        return sequence_log_likelihoods(logits, labels)

    def caption_features(self, caption_samples: list[TokenSample]) -> torch.Tensor:
        """Text only: final hidden state at each caption's last token (</s>) -> head.
        (N, D_vision)."""
        inputs_embeds, attention_mask, _ = self.assemble(caption_samples)
        output = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     output_hidden_states=True)
        last_positions = attention_mask.sum(dim=1) - 1
        rows = torch.arange(len(caption_samples), device=attention_mask.device)
        last_hidden = output.hidden_states[-1][rows, last_positions]
        # The head trains in its own dtype (fp32), whatever the frozen Llama runs in (bf16 on a GPU).
        return self.text_to_image_head(last_hidden.to(self.text_to_image_head.weight.dtype))

    def stage1_losses(self, caption_samples: list[TokenSample],
                      images: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_stage1 = L_c + L_t2i (docs/methods.md, eq. M3).

        caption_samples[i] is "<s> caption </s>" with the caption tokens as targets and
        image_index i; L_c conditions on the image, L_t2i reads the caption alone (the
        retrieval query is text, so the image must not leak into it)."""
        with_images = [TokenSample(sample.token_ids, sample.loss_mask, index)
                       for index, sample in enumerate(caption_samples)]
        captioning = self.language_loss(with_images, images)
        text_only = [TokenSample(sample.token_ids, sample.loss_mask, None) for sample in caption_samples]
        _, global_features = self.vision.encode(images)
        retrieval = text_to_image_infonce(self.caption_features(text_only), global_features, self.logit_scale)
        return {"loss": captioning + retrieval, "captioning": captioning, "text_to_image": retrieval}

    def stage2_losses(self, samples: list[TokenSample],
                      images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Instruction tuning: cross-entropy on the response tokens only (docs/methods.md, MKS2 stage 2)."""
        loss = self.language_loss(samples, images)
        return {"loss": loss}

    @torch.no_grad()
    def generate(self, samples: list[TokenSample], images: torch.Tensor | None = None,
                 max_new_tokens: int = 16, num_beams: int = 1, **generate_kwargs) -> torch.Tensor:
        """Greedy (num_beams=1) or beam search through the language model's ``generate``.

        samples hold the prompt tokens (BOS first); returns only the new tokens
        (B, <= max_new_tokens)."""
        inputs_embeds, attention_mask, _ = self.assemble(samples, images, padding_side="left")
        config = self.language_model.config
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                            max_new_tokens=max_new_tokens, num_beams=num_beams,
                                            do_sample=False, pad_token_id=config.pad_token_id,
                                            eos_token_id=config.eos_token_id, **generate_kwargs)

    def stage1_trainable(self) -> None:
        """Stage 1: the MVMs (already trainable from add_visual_memory), projection, image tokens, head,
        tau."""
        for module in (self.vision.projection, self.text_to_image_head):
            module.requires_grad_(True)
        for parameter in (self.vision.image_start, self.vision.image_end, self.logit_scale):
            parameter.requires_grad_(True)

    def freeze_outside_language_model(self) -> None:
        """Stage 2: only LoRA + router (inside the language model) train."""
        for name, parameter in self.named_parameters():
            if not name.startswith("language_model."):
                parameter.requires_grad_(False)
