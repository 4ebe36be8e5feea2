"""Mixed-modal document encoder on open_clip (RA-CM3 "Retriever (frozen)").

RA-CM3 encodes a document by splitting it into its text part and image part,
encoding each with frozen CLIP (ViT-L/14), averaging the two and scaling to unit
L2 norm; a text-only or image-only document uses its one part. Any open_clip
model works: ViT-L/14 from a local checkpoint on a user's machine
(:meth:`MixedModalEncoder.from_pretrained`), or the small config below, trained
on the demo data with the CLIP contrastive loss (:func:`train_clip`).

Shapes: images (B, 3, H, W) in [0, 1] (resized to the model's input size and
normalised here); texts: B strings; embeddings (B, embed_dim) unit-norm fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mkfast.progress import progress_bar

# OpenAI CLIP's pixel statistics, what open_clip's models are trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# RA-CM3 query dropout: drop ~20% of the query's tokens before retrieval (training only).
QUERY_DROPOUT = 0.2


@dataclass
class SmallCLIPConfig:
    """A CLIP small enough to train on the digits on 2 CPU cores in seconds."""

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    text_width: int = 64
    text_layers: int = 2
    heads: int = 2
    # Captions of the demo are 4-6 CLIP tokens; 16 keeps text attention cheap.
    context_length: int = 16
    embed_dim: int = 64


def build_small_clip(config: SmallCLIPConfig | None = None) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` with the (bundled) OpenAI BPE vocabulary size."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    config = config or SmallCLIPConfig()
    vision = CLIPVisionCfg(layers=config.vision_layers, width=config.vision_width,
                           patch_size=config.patch_size, image_size=config.image_size,
                           head_width=config.vision_width // config.heads)
    text = CLIPTextCfg(context_length=config.context_length, vocab_size=49408, width=config.text_width,
                       heads=config.heads, layers=config.text_layers)
    return CLIP(embed_dim=config.embed_dim, vision_cfg=vision, text_cfg=text)


def _model_image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def _patch_size(model: nn.Module) -> int:
    size = getattr(model.visual, "patch_size", (16, 16))
    return size[0] if isinstance(size, (tuple, list)) else int(size)


class MixedModalEncoder(nn.Module):
    """E(document) = normalise(mean(normalise(E_text(text)), normalise(E_image(image))))."""

    def __init__(self, clip_model: nn.Module, tokenizer=None):
        super().__init__()
        import open_clip

        self.clip = clip_model
        context_length = getattr(clip_model, "context_length", 77)
        self.tokenizer = tokenizer or open_clip.SimpleTokenizer(context_length=context_length)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, model_name: str = "ViT-L-14", checkpoint_path: str | None = None,
                        device: str | torch.device = "cpu") -> MixedModalEncoder:
        """An open_clip model by name, weights from ``checkpoint_path`` (a local file) or open_clip's tag."""
        import open_clip

        model = open_clip.create_model(model_name, pretrained=checkpoint_path, device=device)
        return cls(model, open_clip.get_tokenizer(model_name)).to(device).eval()

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[1])

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.pixel_mean.device)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> CLIP input at the model's resolution, normalised."""
        size = _model_image_size(self.clip)
        images = images.to(self.pixel_mean.device, torch.float32)
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (images - self.pixel_mean) / self.pixel_std

    def text_features(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, context) CLIP token ids -> (B, embed_dim), unit norm."""
        return F.normalize(self.clip.encode_text(token_ids).float(), dim=-1)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, embed_dim), unit norm."""
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    @staticmethod
    def combine(text_embeddings: torch.Tensor | None, image_embeddings: torch.Tensor | None) -> torch.Tensor:
        """RA-CM3's document embedding from unit-norm parts (B, d); a missing part means the other alone."""
        if text_embeddings is None and image_embeddings is None:
            raise ValueError("combine: a document needs a text or an image embedding")
        if text_embeddings is None:
            return F.normalize(image_embeddings, dim=-1)
        if image_embeddings is None:
            return F.normalize(text_embeddings, dim=-1)
        return F.normalize((text_embeddings + image_embeddings) / 2.0, dim=-1)

    def _autocast(self):
        device_type = self.pixel_mean.device.type
        enabled = device_type == "cuda"
        bf16 = enabled and torch.cuda.is_bf16_supported(including_emulation=False)
        dtype = torch.bfloat16 if bf16 else torch.float16
        return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256, drop_fraction: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """B strings -> (B, embed_dim); ``drop_fraction`` of each text's tokens dropped (query dropout)."""
        outputs = []
        for start in range(0, len(texts), batch_size):
            token_ids = self.tokenize(texts[start:start + batch_size])
            if drop_fraction > 0:
                token_ids = drop_text_tokens(token_ids, drop_fraction, generator)
            with self._autocast():
                outputs.append(self.text_features(token_ids))
        return torch.cat(outputs) if outputs else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 256, drop_fraction: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, embed_dim); ``drop_fraction`` of patches blanked (query dropout)."""
        outputs = []
        for start in range(0, images.shape[0], batch_size):
            pixels = self.prepare_images(images[start:start + batch_size])
            if drop_fraction > 0:
                pixels = drop_image_patches(pixels, _patch_size(self.clip), drop_fraction, generator)
            with self._autocast():
                outputs.append(self.image_features(pixels))
        return torch.cat(outputs) if outputs else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_documents(self, texts: list[str | None] | None = None, images: torch.Tensor | None = None,
                         batch_size: int = 256) -> torch.Tensor:
        """Documents (text i, image i) -> (B, embed_dim); a text may be None (image-only document)."""
        if texts is None and images is None:
            raise ValueError("encode_documents: give texts, images or both")
        count = len(texts) if texts is not None else images.shape[0]
        if images is not None and images.shape[0] != count:
            raise ValueError(f"encode_documents: {count} texts but {images.shape[0]} images")
        image_embeddings = self.encode_images(images, batch_size) if images is not None else None
        if texts is None:
            return self.combine(None, image_embeddings)
        present = [index for index, text in enumerate(texts) if text is not None]
        text_embeddings = torch.zeros(count, self.embed_dim, device=self.pixel_mean.device)
        if present:
            text_embeddings[present] = self.encode_texts([texts[index] for index in present], batch_size)
        if image_embeddings is None:
            if len(present) != count:
                raise ValueError("encode_documents: a document has neither text nor image")
            return self.combine(text_embeddings, None)
        combined = self.combine(text_embeddings, image_embeddings)
        missing = [index for index in range(count) if texts[index] is None]
        combined[missing] = image_embeddings[missing]
        return combined


def drop_text_tokens(token_ids: torch.Tensor, drop_fraction: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, context) CLIP ids -> same shape with ~drop_fraction of the word tokens removed, re-packed.

    The start and end tokens stay (the text tower pools at the end token); at least
    one word token is kept.
    """
    output = torch.zeros_like(token_ids)
    for row_index, row in enumerate(token_ids):
        length = int((row != 0).sum())
        words = row[1:length - 1]
        keep = torch.rand(words.shape[0], generator=generator) >= drop_fraction
        if words.shape[0] and not bool(keep.any()):
            keep[torch.randint(0, words.shape[0], (1,), generator=generator)] = True
        kept = torch.cat([row[:1], words[keep.to(words.device)], row[length - 1:length]])
        output[row_index, :kept.shape[0]] = kept
    return output


def drop_image_patches(pixels: torch.Tensor, patch_size: int, drop_fraction: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, S, S) -> same, with ~drop_fraction of the ViT's patches set to 0 (the mean pixel)."""
    batch, _, height, width = pixels.shape
    grid = (height // patch_size, width // patch_size)
    keep = (torch.rand(batch, 1, *grid, generator=generator) >= drop_fraction).to(pixels.dtype)
    keep = F.interpolate(keep.to(pixels.device), size=(height, width), mode="nearest")
    return pixels * keep


@dataclass
class CLIPTrainingConfig:
    steps: int = 150
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0


def train_clip(encoder: MixedModalEncoder, images: torch.Tensor, texts: list[str], config: CLIPTrainingConfig,
               progress: bool = False) -> list[float]:
    """CLIP contrastive training (open_clip's ClipLoss) on pairs; returns per-step losses."""
    from open_clip import ClipLoss
    loss_function = ClipLoss()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(encoder.clip.parameters(), lr=config.learning_rate, weight_decay=0.1)
    encoder.train()
    losses = []
    for _ in progress_bar(range(config.steps), desc="clip", enabled=progress):
        indices = torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)
        pixels = encoder.prepare_images(images[indices])
        token_ids = encoder.tokenize([texts[index] for index in indices.tolist()])
        loss = loss_function(encoder.image_features(pixels), encoder.text_features(token_ids),
                             encoder.clip.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    encoder.eval()
    return losses
